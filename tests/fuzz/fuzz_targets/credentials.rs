//! Credential extraction on arbitrary header sets: never panics; a credential it returns
//! is one of the headers' values and starts with the key prefix; it returns none only
//! when no credential header carries a prefixed value; two different prefixed values
//! conflict.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use keygate::http::credentials as auth;
use keygate::keys::KeyFormat;
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 5] = ["key", "x-api-key", "authorization", "x-other", "cookie"];

/// The values that count as credentials, read independently of `auth`: `key` and
/// `x-api-key` values, and the token of `Bearer <token>`, trimmed of spaces and tabs.
fn prefixed_values(headers: &HeaderMap) -> Vec<&[u8]> {
    let mut values = Vec::new();
    for (name, value) in headers {
        let bytes = value.as_bytes().trim_ascii();
        let candidate = match name.as_str() {
            "key" | "x-api-key" => Some(bytes),
            "authorization" => bytes
                .get(..7)
                .filter(|scheme| {
                    scheme[..6].eq_ignore_ascii_case(b"bearer") && matches!(scheme[6], b' ' | b'\t')
                })
                .map(|_| bytes[7..].trim_ascii()),
            _ => None,
        };
        if let Some(candidate) = candidate.filter(|c| c.starts_with(b"kg_")) {
            values.push(candidate);
        }
    }
    values
}

fuzz_target!(|data: &[u8]| {
    let format = KeyFormat::new("kg");
    let mut headers = HeaderMap::new();
    // Each header: one byte picks the name, the bytes up to the next 0xFF are its value.
    for part in data.split(|b| *b == 0xff) {
        let Some((&pick, value)) = part.split_first() else {
            continue;
        };
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let name = HeaderName::from_static(NAMES[usize::from(pick) % NAMES.len()]);
        headers.append(name, value);
    }
    let expected = prefixed_values(&headers);
    match auth::extract(&headers, &format) {
        Ok(Some(credential)) => {
            assert!(credential.value.starts_with(b"kg_"));
            assert!(!credential.sources.is_empty());
            assert!(
                expected.iter().all(|v| *v == credential.value),
                "{expected:?}"
            );
            assert!(!expected.is_empty());
        }
        Ok(None) => assert!(expected.is_empty(), "missed {expected:?}"),
        Err(_) => assert!(
            expected.iter().any(|v| *v != expected[0]),
            "conflict without two different values: {expected:?}"
        ),
    }
});
