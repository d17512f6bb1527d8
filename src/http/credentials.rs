//! Credential extraction: which header carries an API key, pure functions over the request
//! headers. Works on raw bytes, so non-UTF-8 values are judged, never unwrapped.

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName};

use super::names::{KEY, X_API_KEY};

use crate::keys::KeyFormat;

/// The headers a key may arrive in. A bit set, so that one key sent twice is one credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CredentialSources(u8);

impl CredentialSources {
    pub const KEY: Self = CredentialSources(1);
    pub const X_API_KEY: Self = CredentialSources(2);
    pub const AUTHORIZATION: Self = CredentialSources(4);

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// Header names to strip before forwarding, so the key never travels past keygate.
    pub fn header_names(self) -> impl Iterator<Item = HeaderName> {
        [
            (Self::KEY, KEY),
            (Self::X_API_KEY, X_API_KEY),
            (Self::AUTHORIZATION, AUTHORIZATION),
        ]
        .into_iter()
        .filter(move |(source, _)| self.contains(*source))
        .map(|(_, name)| name)
    }
}

/// The API key found in a request, borrowed from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credential<'a> {
    pub value: &'a [u8],
    pub sources: CredentialSources,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("the request carries two different API keys")]
    Conflicting,
}

/// Finds the request's API key. Only values starting with `<prefix>_` count: any other
/// value (a backend's own Bearer token, say) is not ours and is left alone. Several headers,
/// or repeated ones, carrying the same key are one credential; different keys conflict.
pub fn extract<'a>(
    headers: &'a HeaderMap,
    format: &KeyFormat,
) -> Result<Option<Credential<'a>>, ExtractError> {
    let mut found: Option<Credential<'a>> = None;
    // One pass over the header block: three look-ups by name cost a hash each, more than
    // a request's few headers take to walk.
    let candidates = headers.iter().filter_map(|(name, value)| {
        let value = value.as_bytes();
        if *name == KEY {
            Some((CredentialSources::KEY, Some(value)))
        } else if *name == X_API_KEY {
            Some((CredentialSources::X_API_KEY, Some(value)))
        } else if *name == AUTHORIZATION {
            Some((CredentialSources::AUTHORIZATION, bearer_token(value)))
        } else {
            None
        }
    });
    for (source, value) in candidates {
        let Some(value) = value.map(<[u8]>::trim_ascii) else {
            continue;
        };
        if !format.is_candidate(value) {
            continue;
        }
        match &mut found {
            None => {
                found = Some(Credential {
                    value,
                    sources: source,
                })
            }
            Some(existing) if existing.value == value => existing.sources.insert(source),
            Some(_) => return Err(ExtractError::Conflicting),
        }
    }
    Ok(found)
}

/// The token of `Bearer <token>` (scheme case-insensitive), or None for other schemes.
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    // Header values hold no CR, LF or form feed, so this trims exactly OWS (SP, HTAB).
    let value = value.trim_ascii();
    let scheme = value.get(..6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let rest = &value[6..];
    match rest.first() {
        Some(b' ') | Some(b'\t') => {
            let token = rest.trim_ascii();
            (!token.is_empty()).then_some(token)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_bytes(value).expect("value"),
            );
        }
        map
    }

    fn format() -> KeyFormat {
        KeyFormat::new("kg")
    }

    #[test]
    fn each_header_is_read() {
        let f = format();
        for (name, value, source) in [
            ("key", "kg_abc", CredentialSources::KEY),
            ("x-api-key", "kg_abc", CredentialSources::X_API_KEY),
            (
                "authorization",
                "Bearer kg_abc",
                CredentialSources::AUTHORIZATION,
            ),
            (
                "authorization",
                "bEaReR   kg_abc ",
                CredentialSources::AUTHORIZATION,
            ),
        ] {
            let map = headers(&[(name, value.as_bytes())]);
            let cred = extract(&map, &f).expect("ok").expect("found");
            assert_eq!(cred.value, b"kg_abc");
            assert_eq!(cred.sources, source);
        }
    }

    #[test]
    fn foreign_values_are_not_credentials() {
        let f = format();
        for (name, value) in [
            ("authorization", "Bearer eyJhbGciOi"),
            ("authorization", "Basic a2dfYWJj"),
            ("authorization", "Bearer"),
            ("authorization", "Bearerkg_abc"),
            ("x-api-key", "sk_live_123"),
            ("key", ""),
        ] {
            let map = headers(&[(name, value.as_bytes())]);
            assert_eq!(extract(&map, &f), Ok(None), "{name}: {value}");
        }
    }

    #[test]
    fn same_key_twice_is_one_credential_and_different_keys_conflict() {
        let f = format();
        let map = headers(&[("key", b"kg_abc"), ("x-api-key", b"kg_abc")]);
        let cred = extract(&map, &f).expect("ok").expect("found");
        assert!(cred.sources.contains(CredentialSources::KEY));
        assert!(cred.sources.contains(CredentialSources::X_API_KEY));
        assert!(!cred.sources.contains(CredentialSources::AUTHORIZATION));

        let map = headers(&[("key", b"kg_abc"), ("authorization", b"Bearer kg_abd")]);
        assert_eq!(extract(&map, &f), Err(ExtractError::Conflicting));
        let map = headers(&[("x-api-key", b"kg_abc"), ("x-api-key", b"kg_xyz")]);
        assert_eq!(extract(&map, &f), Err(ExtractError::Conflicting));
    }

    #[test]
    fn a_prefixed_key_next_to_a_foreign_token_is_no_conflict() {
        let f = format();
        let map = headers(&[("x-api-key", b"kg_abc"), ("authorization", b"Bearer other")]);
        let cred = extract(&map, &f).expect("ok").expect("found");
        assert_eq!(cred.sources, CredentialSources::X_API_KEY);
    }

    #[test]
    fn non_utf8_values_are_handled_as_bytes() {
        let f = format();
        let map = headers(&[("x-api-key", b"kg_\xff\xfe")]);
        let cred = extract(&map, &f).expect("ok").expect("found");
        assert_eq!(cred.value, b"kg_\xff\xfe");
        assert!(f.check(cred.value).is_err());
    }

    proptest! {
        #[test]
        fn extract_never_panics(values in proptest::collection::vec((0usize..3, proptest::collection::vec(any::<u8>(), 0..70)), 0..5)) {
            let names = ["key", "x-api-key", "authorization"];
            let mut map = HeaderMap::new();
            for (i, bytes) in &values {
                if let Ok(v) = HeaderValue::from_bytes(bytes) {
                    map.append(names[*i], v);
                }
            }
            let f = format();
            if let Ok(Some(cred)) = extract(&map, &f) {
                prop_assert!(cred.value.starts_with(b"kg_"));
                prop_assert!(!cred.sources.is_empty());
            }
        }

        #[test]
        fn bearer_token_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Some(token) = bearer_token(&bytes) {
                prop_assert!(!token.is_empty());
            }
        }
    }
}
