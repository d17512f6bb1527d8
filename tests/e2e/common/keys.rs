//! The contract's key format, re-implemented by the tests: `kg_` + 43 base62 digits + the
//! 6-digit base62 CRC-32 of what precedes them.

pub(crate) const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The contract's checksum: CRC-32 (IEEE) of `text`, as exactly 6 base62 digits.
pub(crate) fn checksum(text: &str) -> String {
    let mut n = crc32fast::hash(text.as_bytes());
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("ascii")
}

/// `kg_` + 43 base62 digits + the checksum of what precedes it.
pub(crate) fn is_well_formed(key: &str) -> bool {
    let Some(body) = key.strip_prefix("kg_") else {
        return false;
    };
    body.len() == 49
        && body.bytes().all(|b| b.is_ascii_alphanumeric())
        && checksum(&key[..46]) == body[43..]
}

/// Asserts `key` matches `^kg_[0-9A-Za-z]{49}$` and its last 6 characters are the CRC-32 of
/// what precedes them.
pub(crate) fn assert_key_format(key: &str) {
    let body = key
        .strip_prefix("kg_")
        .unwrap_or_else(|| panic!("{key:?} does not start with kg_"));
    assert!(
        body.len() == 49 && body.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{key:?} does not match ^kg_[0-9A-Za-z]{{49}}$"
    );
    assert_eq!(body[43..], checksum(&key[..46]), "{key:?}: bad checksum");
}

/// `key` with the character at `index` replaced by another base62 digit (so that, in the
/// body, the checksum fails).
pub(crate) fn with_char_changed(key: &str, index: usize) -> String {
    let mut bytes = key.as_bytes().to_vec();
    bytes[index] = if bytes[index] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).expect("ascii")
}
