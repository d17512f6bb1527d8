//! Request paths as keygate routes them, and as the most lenient upstream could read them.
//!
//! keygate picks a route (and so a scope and whether a key is needed) from the path, but
//! the upstream decides what the path means. Wherever the two could disagree, a path could
//! reach a protected resource through a route that protects less: `/%61dmin` (that is
//! `/admin`), `/admin%2Fx`, `//admin`, `/admin;x` (a path parameter, dropped by Java
//! servers), `/open/..;/admin`. So keygate routes on the path with percent-encoded
//! unreserved characters decoded (RFC 3986 6.2.2.2: the same path), and refuses a path
//! whose lenient reading has a dot segment or belongs to another route.

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// The byte a `%XX` escape at `at` stands for.
fn escaped_byte(path: &[u8], at: usize) -> Option<u8> {
    if path.get(at) != Some(&b'%') {
        return None;
    }
    let high = hex_value(*path.get(at + 1)?)?;
    let low = hex_value(*path.get(at + 2)?)?;
    Some(high << 4 | low)
}

/// The byte a `%25XX` at `at` stands for once decoded twice, when that matters to
/// routing: an unreserved character or a separator.
fn double_escaped_byte(path: &[u8], at: usize) -> Option<u8> {
    let high = hex_value(*path.get(at + 3)?)?;
    let low = hex_value(*path.get(at + 4)?)?;
    let byte = high << 4 | low;
    (is_unreserved(byte) || byte == b'/' || byte == b'\\').then_some(byte)
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// A request target split into its path and its query (with the `?`; empty when none).
pub fn split_query(target: &[u8]) -> (&[u8], &[u8]) {
    let at = target
        .iter()
        .position(|b| *b == b'?')
        .unwrap_or(target.len());
    target.split_at(at)
}

/// A `%` not followed by two hex digits: not a URI path (RFC 3986 2.1), and a way to make
/// a path whose meaning changes with each decoding (`%3%30` decodes to `%30`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedEscape;

/// The path with its percent-encoded unreserved characters decoded (`/%61dmin` ->
/// `/admin`); None when there are none, which is every path without a `%`. Bytes, not
/// text: a target need not be UTF-8, and its other bytes pass through untouched.
pub fn decode_unreserved(path: &[u8]) -> Result<Option<Vec<u8>>, MalformedEscape> {
    if !path.contains(&b'%') {
        return Ok(None);
    }
    let mut decoded = Vec::with_capacity(path.len());
    let mut changed = false;
    let mut i = 0;
    while i < path.len() {
        if path[i] != b'%' {
            decoded.push(path[i]);
            i += 1;
            continue;
        }
        let byte = escaped_byte(path, i).ok_or(MalformedEscape)?;
        if is_unreserved(byte) {
            decoded.push(byte);
            changed = true;
        } else {
            decoded.extend_from_slice(&path[i..i + 3]);
        }
        i += 3;
    }
    Ok(changed.then_some(decoded))
}

/// A path encoded more times over than any upstream decodes (`%2525252e`): refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep;

/// Readings after the first that may still change the path (so at most four decodings).
const MAX_REREADS: usize = 3;

/// The path as the most lenient upstream reads it: `%2F`, `%5C` and `%2E` decoded (and
/// escapes of escapes of separators and unreserved characters, `%252e`, read again until
/// nothing changes), `\` as `/`, `;parameters` dropped from every segment, repeated
/// slashes merged. None when it reads exactly as written, which is every path without
/// `%`, `;`, `\` or `//`.
pub fn lenient_reading(path: &str) -> Result<Option<String>, TooDeep> {
    let Some(mut read) = read_once(path) else {
        return Ok(None);
    };
    for _ in 0..MAX_REREADS {
        match read_once(&read) {
            Some(again) => read = again,
            None => return Ok(Some(read)),
        }
    }
    Err(TooDeep)
}

fn read_once(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    // One pass over the bytes (a substring search for `//` costs more than the path).
    let mut after_slash = false;
    let plain = bytes.iter().all(|&b| {
        let repeated_slash = b == b'/' && after_slash;
        after_slash = b == b'/';
        !repeated_slash && !matches!(b, b'%' | b';' | b'\\')
    });
    if plain {
        return None;
    }
    let mut read = Vec::with_capacity(bytes.len());
    let mut in_parameters = false;
    let mut i = 0;
    while i < bytes.len() {
        let (byte, width) = match escaped_byte(bytes, i) {
            Some(b @ (b'/' | b'\\' | b'.')) => (b, 3),
            // `%252e`: an escape escaped, which an upstream that decodes twice reads as `.`.
            Some(b'%') => match double_escaped_byte(bytes, i) {
                Some(b) => (b, 5),
                None => (b'%', 3),
            },
            _ => (bytes[i], 1),
        };
        i += width;
        match byte {
            b'/' | b'\\' => {
                in_parameters = false;
                if read.last() != Some(&b'/') {
                    read.push(b'/');
                }
            }
            b';' => in_parameters = true,
            _ if in_parameters => {}
            _ => read.push(byte),
        }
    }
    // Cuts fall on ASCII bytes and decoded bytes are ASCII, so the UTF-8 stays whole.
    let read = String::from_utf8(read)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    (read != path).then_some(read)
}

/// The path as servers that read more into a segment may read it: trailing dots and
/// spaces (`%20`) dropped from every segment (`/admin.` and `/admin%20` are `/admin` to
/// Windows servers), and a format suffix dropped from the last segment (`/admin.json` is
/// `/admin` to Rails and older Spring). None when it reads as written, which is every
/// path without `.` or `%20`.
pub fn suffix_reading(path: &str) -> Option<String> {
    let has_space_escape = path.contains('%') && path.contains("%20");
    if !path.contains('.') && !has_space_escape {
        return None;
    }
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    let read: Vec<&str> = segments
        .iter()
        .enumerate()
        .map(|(i, segment)| {
            let mut segment = *segment;
            // `.` and `..` are dot segments, refused on their own; keep them as they are.
            if segment == "." || segment == ".." {
                return segment;
            }
            loop {
                let trimmed = segment.trim_end_matches(['.', ' ']);
                let trimmed = trimmed.strip_suffix("%20").unwrap_or(trimmed);
                if trimmed == segment {
                    break;
                }
                segment = trimmed;
            }
            if i == last
                && let Some((name, format)) = segment.rsplit_once('.')
                && !name.is_empty()
                && !format.is_empty()
                && format.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                segment = name;
            }
            segment
        })
        .collect();
    let read = read.join("/");
    (read != path).then_some(read)
}

/// Whether the path starts with what some URL parsers take for an authority: `//`, or
/// a `/` followed by a backslash or an encoded (or twice encoded) slash or backslash.
pub fn leads_with_authority(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let head = rest.as_bytes();
    if matches!(head.first(), Some(b'/' | b'\\')) {
        return true;
    }
    // `%2f`, or an escape of it (`%252f`, `%25252f`, ...).
    let Some(mut escaped) = head.strip_prefix(b"%") else {
        return false;
    };
    while let Some(inner) = escaped.strip_prefix(b"25") {
        escaped = inner;
    }
    escaped
        .get(..2)
        .is_some_and(|code| code.eq_ignore_ascii_case(b"2f") || code.eq_ignore_ascii_case(b"5c"))
}

/// Whether any segment is `.` or `..`.
pub fn has_dot_segment(path: &str) -> bool {
    path.contains('.')
        && path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn suffixes_dots_and_spaces_are_read_away() {
        let read = |p: &str| suffix_reading(p);
        assert_eq!(read("/admin.json").as_deref(), Some("/admin"));
        assert_eq!(read("/admin.").as_deref(), Some("/admin"));
        assert_eq!(read("/admin%20").as_deref(), Some("/admin"));
        assert_eq!(read("/admin.%20.").as_deref(), Some("/admin"));
        assert_eq!(read("/admin./users").as_deref(), Some("/admin/users"));
        assert_eq!(
            read("/files/report.tar.gz").as_deref(),
            Some("/files/report.tar")
        );
        assert_eq!(read("/plain/path"), None);
        assert_eq!(read("/.well-known"), None);
        assert_eq!(read("/a/../b"), None);
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_nothing_else() {
        let decoded = |path: &str| {
            decode_unreserved(path.as_bytes())
                .expect("well-formed")
                .map(|d| String::from_utf8(d).expect("utf-8"))
        };
        assert_eq!(decoded("/plain/path"), None);
        assert_eq!(decoded("/%61dmin/x").as_deref(), Some("/admin/x"));
        assert_eq!(decoded("/%5Fkeygate").as_deref(), Some("/_keygate"));
        assert_eq!(decoded("/a%7Eb%2d").as_deref(), Some("/a~b-"));
        // Reserved characters and non-ASCII stay as they are.
        assert_eq!(decoded("/a%2Fb%20c%C3%A9"), None);
        assert_eq!(decoded("/%2561"), None);
        for broken in ["/%zz", "/%4", "/a%", "/%3%30", "/%%41"] {
            assert_eq!(
                decode_unreserved(broken.as_bytes()),
                Err(MalformedEscape),
                "{broken}"
            );
        }
        // Bytes that are not UTF-8 pass through.
        assert_eq!(decode_unreserved(b"/\xff%61"), Ok(Some(b"/\xffa".to_vec())));
    }

    #[test]
    fn lenient_readings() {
        for plain in ["/", "/a/b", "/a.b/c", "/a%20b/c%C3%A9"] {
            assert_eq!(lenient_reading(plain), Ok(None), "{plain}");
        }
        for (path, read) in [
            ("/admin%2Fx", "/admin/x"),
            ("/admin%2fx", "/admin/x"),
            ("/admin%5Cx", "/admin/x"),
            ("/admin\\x", "/admin/x"),
            ("//admin", "/admin"),
            ("/a///b//", "/a/b/"),
            ("/admin;jsessionid=1/x", "/admin/x"),
            ("/open/..;/admin", "/open/../admin"),
            ("/open/%2e%2e/admin", "/open/../admin"),
            ("/open/.%2E/admin", "/open/../admin"),
            ("/x;a=1;b=2", "/x"),
            ("/open/%252e%252E/admin", "/open/../admin"),
            ("/%2561dmin", "/admin"),
            ("/a%252Fb", "/a/b"),
            ("/a%2520b", "/a%20b"),
            ("/open/%25252e%25252e/admin", "/open/../admin"),
        ] {
            assert_eq!(lenient_reading(path), Ok(Some(read.to_string())), "{path}");
        }
    }

    #[test]
    fn authority_looking_starts() {
        for path in [
            "//evil/x",
            "/\\evil",
            "/%2Fevil",
            "/%5cevil",
            "/%252Fevil",
            "/%25252fevil",
            "//",
        ] {
            assert!(leads_with_authority(path), "{path}");
        }
        for path in ["/", "/x//y", "/%20", "/x%2F", "", "x//", "/%25", "/%2520"] {
            assert!(!leads_with_authority(path), "{path}");
        }
    }

    #[test]
    fn escapes_of_escapes_are_read_to_a_limit() {
        assert_eq!(
            lenient_reading("/a/%2525252e%2525252e/b"),
            Ok(Some("/a/../b".to_string()))
        );
        assert_eq!(lenient_reading("/a/%252525252e"), Err(TooDeep));
    }

    proptest! {
        #[test]
        fn decoding_is_idempotent(path in "/[a-zA-Z0-9%/._~;-]{0,40}") {
            if let Ok(Some(decoded)) = decode_unreserved(path.as_bytes()) {
                prop_assert_eq!(decode_unreserved(&decoded), Ok(None));
                prop_assert!(decoded.len() < path.len());
            }
        }

        #[test]
        fn lenient_readings_are_plain(path in "/[a-zA-Z0-9%/\\\\._;25fFcCeE-]{0,40}") {
            if let Ok(Some(read)) = lenient_reading(&path) {
                prop_assert_eq!(lenient_reading(&read), Ok(None));
                prop_assert!(!read.contains("//"), "{}", read);
                prop_assert!(!read.contains(';') && !read.contains('\\'), "{}", read);
                let lowered = read.to_ascii_lowercase();
                prop_assert!(
                    !lowered.contains("%2f") && !lowered.contains("%5c") && !lowered.contains("%2e"),
                    "{} -> {}", path, read
                );
            }
        }

        #[test]
        fn arbitrary_text_never_panics(path in any::<String>()) {
            let _ = decode_unreserved(path.as_bytes());
            let _ = lenient_reading(&path);
            let _ = has_dot_segment(&path);
        }
    }
}
