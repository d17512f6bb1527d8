//! The request's host, from its Host header, as routing compares it.

/// A Host header that is not a plain host name or IP literal (with an optional port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidHost;

/// The request's host from its Host header (which `gateway` fills in from an absolute-form
/// URL that came without one): without port, brackets or a fully qualified name's root dot
/// (`api.example.` is `api.example` to every upstream). Anything but a plain name, an IPv4
/// address or a bracketed IPv6 address is refused: `[public.example]junk` must not be
/// routed as `public.example` while the upstream reads something else.
pub(crate) fn request_host(
    req: &pingora::http::RequestHeader,
) -> Result<Option<&str>, InvalidHost> {
    let Some(value) = req.headers.get(http::header::HOST) else {
        return Ok(None);
    };
    let raw = value.to_str().map_err(|_| InvalidHost)?;
    // An empty Host is allowed for a target without an authority (RFC 9112 3.2).
    if raw.is_empty() {
        return Ok(None);
    }
    let (host, port) = match raw.strip_prefix('[') {
        Some(bracketed) => {
            let (literal, after) = bracketed.split_once(']').ok_or(InvalidHost)?;
            literal
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| InvalidHost)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or(InvalidHost)?),
            };
            (literal, port)
        }
        None => match raw.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (raw, None),
        },
    };
    // RFC 3986 allows an empty port (`example.com:`).
    if port.is_some_and(|p| !p.bytes().all(|b| b.is_ascii_digit())) {
        return Err(InvalidHost);
    }
    if raw.starts_with('[') {
        return Ok(Some(host));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if !is_host_name(name) {
        return Err(InvalidHost);
    }
    Ok(Some(name))
}

/// Dot-separated labels of letters, digits, `-` and `_` (an IPv4 address is such a name).
pub(crate) fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_port_brackets_and_root_dot() {
        let host_of = |header: &str| {
            let mut req = pingora::http::RequestHeader::build("GET", b"/", None).expect("req");
            if !header.is_empty() {
                req.insert_header("host", header).expect("host");
            }
            request_host(&req).map(|h| h.map(str::to_string))
        };
        for (header, host) in [
            ("api.example:8080", "api.example"),
            ("api.example.", "api.example"),
            ("api.example.:443", "api.example"),
            ("API.example", "API.example"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("[::1]:80", "::1"),
            ("[::1]", "::1"),
            ("api.example:", "api.example"),
        ] {
            assert_eq!(host_of(header), Ok(Some(host.to_string())), "{header}");
        }
        assert_eq!(host_of(""), Ok(None));
        let mut empty = pingora::http::RequestHeader::build("GET", b"/", None).expect("req");
        empty.insert_header("host", "").expect("host");
        assert_eq!(request_host(&empty), Ok(None));
        for bad in [
            "[public.example]",
            "[public.example]junk",
            "[::1]junk",
            "api.example:80x",
            "a..b",
            ".",
            "api example",
            "api.example:80:81",
            "user@api.example",
        ] {
            assert_eq!(host_of(bad), Err(InvalidHost), "{bad}");
        }
    }
}
