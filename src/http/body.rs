//! Request bodies keygate reads before forwarding: chunked ones, read whole and checked.
//!
//! Pingora forwards the request head before it reads the body, so a chunked body whose
//! framing turns out broken would reach the upstream as a request (head and the good
//! chunks) before Pingora rejects it. The contract says such a request is never forwarded,
//! so a chunked body is read whole first and then forwarded with a `Content-Length`.
//! `Content-Length` bodies stream through: their framing cannot be malformed, only cut
//! short, which is a client going away.

use crate::error::GatewayError;

/// The largest chunked body keygate buffers. Pingora 0.9 hands a body read in a hook back
/// to the proxy only through its retry buffer, which holds 64 KiB; a bigger chunked body
/// is refused with 413 rather than forwarded unchecked.
pub(crate) const CHUNKED_BODY_LIMIT: usize = 64 * 1024;

/// The largest management API body (JSON, a few hundred bytes in practice). Equal to
/// `CHUNKED_BODY_LIMIT` by coincidence, not by design.
pub(crate) const MANAGEMENT_BODY_LIMIT: usize = 64 * 1024;

/// Refused bodies up to this size are read to their end before the answer, so that the
/// client gets to read it; beyond it the answer comes at once and the connection closes
/// (and the client may only see the close).
pub(crate) const DRAIN_LIMIT: usize = 1024 * 1024;

/// How a request's body is framed, as far as forwarding it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body, or one with a `Content-Length`: streamed through.
    Plain,
    /// `Transfer-Encoding: chunked`: read whole first.
    Chunked,
}

/// The request's framing. Only a lone `chunked` coding is accepted: keygate forwards a
/// body it has read with a `Content-Length`, which would present `gzip, chunked` bytes to
/// the upstream as a plain body. (Pingora has already refused any other final coding.)
pub(crate) fn framing(req: &pingora::http::RequestHeader) -> Result<Framing, GatewayError> {
    let mut codings = req.headers.get_all(http::header::TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (None, _) => Ok(Framing::Plain),
        (Some(coding), None)
            if coding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked") =>
        {
            Ok(Framing::Chunked)
        }
        _ => Err(GatewayError::UnsupportedTransferCoding),
    }
}

/// Whether the client framed its body both ways, `Content-Length` and
/// `Transfer-Encoding`. Pingora has removed the `Content-Length` by the time any hook
/// runs (RFC 9112 6.3) and switched keep-alive off for it (6.1); that is the one reason
/// an HTTP/1.1 request with `Transfer-Encoding` and without `Connection: close` has
/// keep-alive off before keygate's first hook. Both ways is how requests are smuggled
/// past a proxy that reads the other one, so keygate refuses it (nginx answers 400 too).
pub(crate) fn framed_both_ways(req: &pingora::http::RequestHeader, keepalive_off: bool) -> bool {
    let asks_close = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"));
    let headers = &req.headers;
    let both_present = headers.contains_key(http::header::CONTENT_LENGTH)
        && headers.contains_key(http::header::TRANSFER_ENCODING);
    let content_length_removed = keepalive_off
        && req.version == http::Version::HTTP_11
        && !asks_close
        && headers.contains_key(http::header::TRANSFER_ENCODING);
    both_present || content_length_removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal's message names the limit (it cannot format the constant: `error` sits
    /// below this module).
    #[test]
    fn the_chunked_refusal_names_the_limit() {
        let message = GatewayError::ChunkedBodyTooLarge.to_string();
        assert!(
            message.contains(&format!("{} KiB", CHUNKED_BODY_LIMIT / 1024)),
            "{message}"
        );
    }

    #[test]
    fn both_framings_are_seen_also_once_pingora_dropped_the_length() {
        let mut req = pingora::http::RequestHeader::build("POST", b"/", None).expect("req");
        req.insert_header("transfer-encoding", "chunked")
            .expect("te");
        assert!(
            framed_both_ways(&req, true),
            "keep-alive off, no Connection: close"
        );
        assert!(!framed_both_ways(&req, false));
        req.insert_header("connection", "close").expect("close");
        assert!(!framed_both_ways(&req, true), "closed for its own reason");
        req.insert_header("content-length", "5").expect("cl");
        assert!(framed_both_ways(&req, false), "both still present");
    }
}
