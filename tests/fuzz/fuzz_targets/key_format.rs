//! The key check on arbitrary bytes: never panics, and accepts only `kg_` + 49 base62
//! characters whose last 6 are the CRC-32 of the rest. Any 32 bytes encode to a key
//! that checks, and changing any one character of it makes the check fail.
#![no_main]

use keygate::keys::KeyFormat;
use libfuzzer_sys::fuzz_target;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The contract's checksum, computed here independently of keygate's code.
fn checksum(text: &[u8]) -> [u8; 6] {
    let mut n = crc32fast::hash(text);
    let mut digits = [b'0'; 6];
    for digit in digits.iter_mut().rev() {
        *digit = BASE62[(n % 62) as usize];
        n /= 62;
    }
    digits
}

fuzz_target!(|data: &[u8]| {
    let format = KeyFormat::new("kg");
    if format.check(data).is_ok() {
        assert_eq!(data.len(), format.key_len());
        assert!(data.starts_with(b"kg_"));
        assert!(data[3..].iter().all(u8::is_ascii_alphanumeric));
        let (text, sum) = data.split_at(data.len() - 6);
        assert_eq!(checksum(text), sum);
    }
    if let Some((secret, rest)) = data.split_first_chunk::<32>()
        && let [at, replacement, ..] = rest
    {
        let key = format.encode(secret);
        assert!(format.check(key.as_bytes()).is_ok(), "{key}");
        let mut changed = key.into_bytes();
        let at = usize::from(*at) % changed.len();
        let replacement = BASE62[usize::from(*replacement) % BASE62.len()];
        if changed[at] != replacement {
            changed[at] = replacement;
            assert!(format.check(&changed).is_err());
        }
    }
});
