//! Protocol upgrades (contract section 9). Only a `websocket = true` route forwards one, and
//! only to WebSocket; everywhere else the upgrade headers go and the request is forwarded
//! as an ordinary one, as nginx does. Removing them from the request as received (not just
//! from the upstream's copy) also makes Pingora frame it as an ordinary request: a 101 from
//! an upstream can then never turn the connection into a tunnel.

use http::HeaderValue;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
use pingora::http::RequestHeader;

/// What to do with a request's `Upgrade`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpgradeRequest {
    /// No `Upgrade` header.
    None,
    /// `Upgrade: websocket` (alone), over HTTP/1.1.
    WebSocket,
    /// Anything else: h2c, TLS, several protocols, or an upgrade over HTTP/1.0.
    Other,
}

pub(crate) fn classify(req: &RequestHeader) -> UpgradeRequest {
    let mut values = req.headers.get_all(UPGRADE).iter();
    let Some(first) = values.next() else {
        return UpgradeRequest::None;
    };
    let only_websocket = values.next().is_none()
        && first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"websocket");
    if only_websocket && req.version == http::Version::HTTP_11 {
        UpgradeRequest::WebSocket
    } else {
        UpgradeRequest::Other
    }
}

/// Removes `Upgrade`, `HTTP2-Settings` (h2c's companion) and the `upgrade` and
/// `http2-settings` tokens of `Connection`, keeping its other tokens (`keep-alive`,
/// `close`).
pub(crate) fn strip(req: &mut RequestHeader) {
    req.remove_header(&UPGRADE);
    req.remove_header("http2-settings");
    let kept: Vec<String> = req
        .headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| {
            !token.is_empty()
                && !token.eq_ignore_ascii_case("upgrade")
                && !token.eq_ignore_ascii_case("http2-settings")
        })
        .map(str::to_string)
        .collect();
    req.remove_header(&CONNECTION);
    if !kept.is_empty()
        && let Ok(value) = HeaderValue::from_str(&kept.join(", "))
    {
        // Cannot fail: the name is valid and the value was checked just above.
        let _ = req.insert_header(CONNECTION, value);
    }
}

/// Works around Pingora 0.9.1 ending an upgrade right after its 101 when the upstream's
/// answer is read before the proxy has passed on the end of the upgrade request's own,
/// empty, body: that end is then taken for the end of the tunnel (cloudflare/pingora#946,
/// unfixed in any release). On a loaded machine it ended a tunnel in several runs of
/// the WebSocket tests here. A handshake without a body is announced to Pingora's request reader as a
/// one-byte body, so no end is passed on before the 101; from the 101 on Pingora reads the
/// connection as the tunnel.
/// The upstream's copy of the request loses the announcement (`unhold_empty_body`).
pub(crate) fn hold_empty_body(req: &mut RequestHeader) -> pingora::Result<()> {
    if req.headers.contains_key(CONTENT_LENGTH) || req.headers.contains_key(TRANSFER_ENCODING) {
        return Ok(());
    }
    req.insert_header(CONTENT_LENGTH, HELD_LENGTH)
}

const HELD_LENGTH: &str = "1";

/// The request as the upstream gets it: a handshake without a body again.
pub(crate) fn unhold_empty_body(headers: &mut http::HeaderMap) {
    if headers
        .get(CONTENT_LENGTH)
        .is_some_and(|v| v == HELD_LENGTH)
    {
        headers.remove(CONTENT_LENGTH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: http::Version, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/chat", None).expect("request");
        req.set_version(version);
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).expect("header");
        }
        req
    }

    #[test]
    fn only_a_lone_websocket_upgrade_over_http_1_1_is_a_websocket() {
        let v11 = http::Version::HTTP_11;
        assert_eq!(classify(&request(v11, &[])), UpgradeRequest::None);
        for value in ["websocket", "WebSocket", " websocket "] {
            let req = request(v11, &[("upgrade", value)]);
            assert_eq!(classify(&req), UpgradeRequest::WebSocket, "{value}");
        }
        for value in ["h2c", "websocket, h2c", "TLS/1.2", ""] {
            let req = request(v11, &[("upgrade", value)]);
            assert_eq!(classify(&req), UpgradeRequest::Other, "{value}");
        }
        let twice = request(v11, &[("upgrade", "websocket"), ("upgrade", "websocket")]);
        assert_eq!(classify(&twice), UpgradeRequest::Other);
        let http10 = request(http::Version::HTTP_10, &[("upgrade", "websocket")]);
        assert_eq!(classify(&http10), UpgradeRequest::Other);
    }

    #[test]
    fn strip_removes_the_upgrade_and_keeps_other_connection_tokens() {
        let mut req = request(
            http::Version::HTTP_11,
            &[
                ("upgrade", "h2c"),
                ("connection", "Upgrade, HTTP2-Settings"),
                ("connection", "keep-alive"),
                ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ],
        );
        strip(&mut req);
        assert!(req.headers.get(UPGRADE).is_none());
        assert!(req.headers.get("http2-settings").is_none());
        let connection: Vec<_> = req.headers.get_all(CONNECTION).iter().collect();
        assert_eq!(connection, ["keep-alive"]);
        assert_eq!(classify(&req), UpgradeRequest::None);

        let mut only_upgrade = request(
            http::Version::HTTP_11,
            &[("upgrade", "websocket"), ("connection", "upgrade")],
        );
        strip(&mut only_upgrade);
        assert!(only_upgrade.headers.get(CONNECTION).is_none());
    }
}
