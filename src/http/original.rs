//! Forward authentication (contract section 11): the original request a proxy asks keygate
//! to decide for, read from the headers the proxies send (`X-Forwarded-Method/-Uri/-Host`:
//! Traefik, Caddy; `X-Original-Method/-URI`: nginx) or from the path after `/authorize`
//! (Envoy's `path_prefix`).
//!
//! Each proxy sets its own headers but passes the client's other headers along, so a
//! client could add the convention its proxy does not use (`X-Forwarded-Uri: /public`
//! through nginx). Whichever convention keygate preferred, some proxy's clients could then
//! choose the path decided for; so where two sources name the original request they must
//! agree, or the call is refused.

use http::HeaderMap;
use http::header::HOST;
use pingora::http::RequestHeader;

use crate::error::GatewayError;

/// `X-Forwarded-Uri` and `X-Original-URI`, in that order.
const URI_HEADERS: [&str; 2] = ["x-forwarded-uri", "x-original-uri"];
const METHOD_HEADERS: [&str; 2] = ["x-forwarded-method", "x-original-method"];
const HOST_HEADER: &str = "x-forwarded-host";

/// The original request of an authorize call: `req` is the call itself, `suffix` what its
/// path has after `/authorize` (`""` when nothing). The result carries the original
/// method, target and Host (the call's own Host when no `X-Forwarded-Host`), ready for the
/// request path's own target, host and path checks.
pub(crate) fn original_request(
    req: &RequestHeader,
    suffix: &str,
) -> Result<RequestHeader, GatewayError> {
    let headers = &req.headers;
    let from_suffix = (!suffix.is_empty()).then(|| suffix_target(suffix, req.uri.query()));
    let target = agreed(
        URI_HEADERS
            .iter()
            .map(|name| single(headers, name))
            .chain([Ok(from_suffix.as_deref())]),
    )?
    .unwrap_or("/");
    let method = agreed(METHOD_HEADERS.iter().map(|name| single(headers, name)))?
        .unwrap_or(req.method.as_str());
    let method =
        http::Method::from_bytes(method.as_bytes()).map_err(|_| GatewayError::InvalidOriginal)?;
    let mut original = RequestHeader::build(method, target.as_bytes(), None)
        .map_err(|_| GatewayError::InvalidOriginal)?;
    let host = match single(headers, HOST_HEADER)? {
        Some(host) => Some(host),
        None => single(headers, HOST.as_str())?,
    };
    if let Some(host) = host {
        original
            .insert_header(HOST, host)
            .map_err(|_| GatewayError::InvalidOriginal)?;
    }
    Ok(original)
}

/// The Envoy form: `/authorize/api/items?x=1` is `/api/items?x=1`.
fn suffix_target(suffix: &str, query: Option<&str>) -> String {
    match query {
        Some(query) => format!("{suffix}?{query}"),
        None => suffix.to_string(),
    }
}

/// A header's value as text, when it is sent once; two of them could disagree.
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, GatewayError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(GatewayError::ConflictingOriginal);
    }
    first
        .to_str()
        .map(|text| Some(text.trim()))
        .map_err(|_| GatewayError::InvalidOriginal)
}

/// The one value every source that is present names, if any.
fn agreed<'a>(
    sources: impl Iterator<Item = Result<Option<&'a str>, GatewayError>>,
) -> Result<Option<&'a str>, GatewayError> {
    let mut found: Option<&str> = None;
    for source in sources {
        match (source?, found) {
            (Some(value), Some(seen)) if value != seen => {
                return Err(GatewayError::ConflictingOriginal);
            }
            (Some(value), _) => found = Some(value),
            (None, _) => {}
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).expect("request");
        req.insert_header("host", "keygate.internal").expect("host");
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).expect("header");
        }
        req
    }

    fn read(req: &RequestHeader, suffix: &str) -> Result<(String, String, String), GatewayError> {
        let original = original_request(req, suffix)?;
        let host = original
            .headers
            .get(HOST)
            .map(|h| h.to_str().expect("text").to_string())
            .unwrap_or_default();
        Ok((original.method.to_string(), original.uri.to_string(), host))
    }

    fn want(method: &str, uri: &str, host: &str) -> Result<(String, String, String), GatewayError> {
        Ok((method.into(), uri.into(), host.into()))
    }

    #[test]
    fn each_convention_names_the_original_request() {
        let traefik = call(
            "/_keygate/authorize",
            &[
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", "/api/items?page=2"),
                ("x-forwarded-host", "api.example"),
            ],
        );
        assert_eq!(
            read(&traefik, ""),
            want("POST", "/api/items?page=2", "api.example")
        );
        let nginx = call(
            "/_keygate/authorize",
            &[("x-original-method", "DELETE"), ("x-original-uri", "/a/b")],
        );
        assert_eq!(read(&nginx, ""), want("DELETE", "/a/b", "keygate.internal"));
        let envoy = call("/_keygate/authorize/api/items?x=1", &[]);
        assert_eq!(
            read(&envoy, "/api/items"),
            want("GET", "/api/items?x=1", "keygate.internal")
        );
        let bare = call("/_keygate/authorize", &[]);
        assert_eq!(read(&bare, ""), want("GET", "/", "keygate.internal"));
    }

    #[test]
    fn sources_that_disagree_are_refused() {
        let conflict = Err(GatewayError::ConflictingOriginal);
        let injected = call(
            "/_keygate/authorize",
            &[("x-original-uri", "/admin"), ("x-forwarded-uri", "/public")],
        );
        assert_eq!(read(&injected, ""), conflict);
        let against_suffix = call(
            "/_keygate/authorize/admin",
            &[("x-forwarded-uri", "/public")],
        );
        assert_eq!(read(&against_suffix, "/admin"), conflict);
        let methods = call(
            "/_keygate/authorize",
            &[("x-forwarded-method", "GET"), ("x-original-method", "POST")],
        );
        assert_eq!(read(&methods, ""), conflict);
        let twice = call(
            "/_keygate/authorize",
            &[("x-forwarded-uri", "/a"), ("x-forwarded-uri", "/b")],
        );
        assert_eq!(read(&twice, ""), conflict);
        // The same value from two sources is one original request.
        let agreeing = call(
            "/_keygate/authorize",
            &[("x-forwarded-uri", "/a"), ("x-original-uri", "/a")],
        );
        assert_eq!(read(&agreeing, ""), want("GET", "/a", "keygate.internal"));
    }

    #[test]
    fn a_malformed_original_is_refused() {
        let invalid = Err(GatewayError::InvalidOriginal);
        let method = call("/_keygate/authorize", &[("x-forwarded-method", "GE T")]);
        assert_eq!(read(&method, ""), invalid);
        let uri = call("/_keygate/authorize", &[("x-forwarded-uri", "/a b")]);
        assert_eq!(read(&uri, ""), invalid);
    }
}
