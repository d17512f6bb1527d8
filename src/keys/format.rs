//! The key format: `<prefix>_`, 43 base62 digits of a 256-bit secret from the OS CSPRNG,
//! then 6 base62 digits of a CRC-32 over everything before them; checking it, previews.

use rand::TryRng;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 32 random bytes written as one big-endian number in base62 need at most 43 digits.
const SECRET_DIGITS: usize = 43;
/// A CRC-32 needs at most 6 base62 digits.
const CHECKSUM_DIGITS: usize = 6;
const BODY_LEN: usize = SECRET_DIGITS + CHECKSUM_DIGITS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("the key does not start with the expected prefix")]
    Prefix,
    #[error("the key has the wrong length")]
    Length,
    #[error("the key contains characters outside 0-9A-Za-z")]
    Charset,
    #[error("the key's checksum does not match")]
    Checksum,
}

/// The key format of one deployment: `<prefix>_` followed by the 49-character body.
#[derive(Debug, Clone)]
pub struct KeyFormat {
    /// `<prefix>_`, kept with its underscore so that a candidate check is one comparison.
    lead: String,
}

impl KeyFormat {
    pub fn new(prefix: &str) -> Self {
        KeyFormat {
            lead: format!("{prefix}_"),
        }
    }

    /// Every well-formed key has exactly this many bytes.
    pub fn key_len(&self) -> usize {
        self.lead.len() + BODY_LEN
    }

    /// Whether a credential value claims to be one of our keys (starts with `<prefix>_`).
    /// Other values, such as a backend's own Bearer tokens, are not ours to judge.
    pub fn is_candidate(&self, value: &[u8]) -> bool {
        value.starts_with(self.lead.as_bytes())
    }

    /// Checks length, charset and checksum. Cheap and allocation-free, so that junk and
    /// mistyped keys are refused before any hashing or store look-up.
    pub fn check(&self, value: &[u8]) -> Result<(), KeyFormatError> {
        if !self.is_candidate(value) {
            return Err(KeyFormatError::Prefix);
        }
        if value.len() != self.key_len() {
            return Err(KeyFormatError::Length);
        }
        let body = &value[self.lead.len()..];
        if !body.iter().all(u8::is_ascii_alphanumeric) {
            return Err(KeyFormatError::Charset);
        }
        let (checked, checksum) = value.split_at(value.len() - CHECKSUM_DIGITS);
        let mut expected = [0u8; CHECKSUM_DIGITS];
        encode_u32(crc32fast::hash(checked), &mut expected);
        if expected != checksum {
            return Err(KeyFormatError::Checksum);
        }
        Ok(())
    }

    /// A fresh key: 32 bytes from the OS CSPRNG, base62, then the checksum.
    pub fn generate(&self) -> Result<String, rand::rngs::SysError> {
        let mut secret = [0u8; 32];
        rand::rngs::SysRng.try_fill_bytes(&mut secret)?;
        Ok(self.encode(&secret))
    }

    /// The key for given secret bytes; `generate` is this with random bytes.
    pub fn encode(&self, secret: &[u8; 32]) -> String {
        let mut key = String::with_capacity(self.key_len());
        key.push_str(&self.lead);
        let mut digits = [0u8; SECRET_DIGITS];
        encode_256(secret, &mut digits);
        key.extend(digits.iter().map(|&d| char::from(d)));
        let mut checksum = [0u8; CHECKSUM_DIGITS];
        encode_u32(crc32fast::hash(key.as_bytes()), &mut checksum);
        key.extend(checksum.iter().map(|&d| char::from(d)));
        key
    }

    /// `kg_Ab3x…9QzT`: enough for a person to tell keys apart, far too little to use.
    pub fn preview(&self, key: &str) -> String {
        let body = key.get(self.lead.len()..).unwrap_or_default();
        let head = body.get(..4).unwrap_or_default();
        let tail = body.get(body.len().saturating_sub(4)..).unwrap_or_default();
        format!("{}{head}…{tail}", self.lead)
    }
}

/// Writes `value` as exactly `out.len()` base62 digits, zero-padded, most significant first.
fn encode_u32(mut value: u32, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
}

/// Writes a 256-bit big-endian number as exactly 43 base62 digits by long division.
fn encode_256(number: &[u8; 32], out: &mut [u8; SECRET_DIGITS]) {
    let mut work = *number;
    for slot in out.iter_mut().rev() {
        let mut remainder: u32 = 0;
        for byte in work.iter_mut() {
            let acc = (remainder << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            remainder = acc % 62;
        }
        *slot = BASE62[remainder as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let format = KeyFormat::new("kg");
        let key = format.generate().expect("os rng");
        assert_eq!(key.len(), 3 + 49);
        assert!(key.starts_with("kg_"));
        assert!(key[3..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(format.check(key.as_bytes()), Ok(()));
    }

    #[test]
    fn checksum_is_crc32_of_prefix_and_secret_in_base62() {
        let format = KeyFormat::new("kg");
        let key = format.encode(&[0u8; 32]);
        let secret_part = format!("kg_{}", "0".repeat(43));
        assert!(key.starts_with(&secret_part));
        // Independent computation: CRC-32 as a number, then base62 by repeated division.
        let mut crc = u64::from(crc32fast::hash(secret_part.as_bytes()));
        let mut digits = Vec::new();
        for _ in 0..6 {
            digits.push(BASE62[(crc % 62) as usize]);
            crc /= 62;
        }
        digits.reverse();
        assert_eq!(&key.as_bytes()[46..], &digits[..]);
    }

    #[test]
    fn all_ones_secret_fits_in_43_digits() {
        let format = KeyFormat::new("kg");
        let key = format.encode(&[0xff; 32]);
        assert_eq!(key.len(), 52);
        assert_eq!(format.check(key.as_bytes()), Ok(()));
        // 2^256 - 1 in base62 starts with these digits (checked with Python's int arithmetic).
        assert!(
            key.starts_with("kg_yhjskwdA6OZ1AL1YmHWZWm8LLG7HjnuCA2j5rOw8Xp1"),
            "{key}"
        );
    }

    #[test]
    fn one_changed_character_fails_the_checksum() {
        let format = KeyFormat::new("kg");
        let key = format.generate().expect("os rng");
        for position in 3..key.len() {
            let mut bytes = key.clone().into_bytes();
            bytes[position] = if bytes[position] == b'a' { b'b' } else { b'a' };
            assert_eq!(
                format.check(&bytes),
                Err(KeyFormatError::Checksum),
                "at {position}"
            );
        }
    }

    #[test]
    fn wrong_length_charset_and_prefix_are_told_apart() {
        let format = KeyFormat::new("kg");
        let key = format.generate().expect("os rng");
        assert_eq!(
            format.check(&key.as_bytes()[..51]),
            Err(KeyFormatError::Length)
        );
        assert_eq!(
            format.check(format!("{key}0").as_bytes()),
            Err(KeyFormatError::Length)
        );
        let mut bad = key.clone().into_bytes();
        bad[10] = b'-';
        assert_eq!(format.check(&bad), Err(KeyFormatError::Charset));
        assert_eq!(format.check(b"xx_abc"), Err(KeyFormatError::Prefix));
        assert_eq!(format.check(b"kg_"), Err(KeyFormatError::Length));
    }

    #[test]
    fn hundred_thousand_keys_are_distinct() {
        let format = KeyFormat::new("kg");
        let mut seen = HashSet::with_capacity(100_000);
        for _ in 0..100_000 {
            let key = format.generate().expect("os rng");
            assert_eq!(format.check(key.as_bytes()), Ok(()));
            assert!(seen.insert(key));
        }
    }

    #[test]
    fn preview_shows_four_and_four() {
        let format = KeyFormat::new("kg");
        let key = format.generate().expect("os rng");
        let preview = format.preview(&key);
        assert_eq!(preview, format!("kg_{}…{}", &key[3..7], &key[48..]));
    }

    proptest::proptest! {
        #[test]
        fn check_never_panics_and_accepts_only_well_formed(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            let format = KeyFormat::new("kg");
            if format.check(&bytes).is_ok() {
                proptest::prop_assert_eq!(bytes.len(), 52);
                proptest::prop_assert!(bytes.starts_with(b"kg_"));
            }
        }

        #[test]
        fn prefixed_random_bodies_are_rejected(body in "[0-9A-Za-z]{49}") {
            let format = KeyFormat::new("kg");
            let candidate = format!("kg_{body}");
            // A random body passes the CRC only by a 1-in-2^32 chance; re-encoding tells.
            let valid = format.check(candidate.as_bytes()).is_ok();
            let mut expected = [0u8; CHECKSUM_DIGITS];
            encode_u32(crc32fast::hash(&candidate.as_bytes()[..46]), &mut expected);
            proptest::prop_assert_eq!(valid, candidate.as_bytes()[46..] == expected[..]);
        }
    }
}
