//! Request bodies keygate reads before forwarding: chunked ones, read whole and checked.
//!
//! Pingora forwards the request head before it reads the body, so a chunked body whose
//! framing turns out broken would reach the upstream as a request (head and the good
//! chunks) before Pingora rejects it. The contract says such a request is never forwarded,
//! so a chunked body is read whole first and then forwarded with a `Content-Length`.
//! `Content-Length` bodies stream through: their framing cannot be malformed, only cut
//! short, which is a client going away.

use std::time::Duration;

use pingora::proxy::Session;
use pingora::{ErrorSource, ErrorType};

use crate::error::GatewayError;

/// The largest chunked body keygate buffers. Pingora 0.9 hands a body read in a hook back
/// to the proxy only through its retry buffer, which holds 64 KiB; a bigger chunked body
/// is refused with 413 rather than forwarded unchecked.
pub const CHUNKED_BODY_LIMIT: usize = 64 * 1024;

/// Refused bodies up to this size are read to their end before the answer, so that the
/// client gets to read it; beyond it the answer comes at once and the connection closes
/// (and the client may only see the close).
pub const DRAIN_LIMIT: usize = 1024 * 1024;

/// How a request's body is framed, as far as forwarding it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body, or one with a `Content-Length`: streamed through.
    Plain,
    /// `Transfer-Encoding: chunked`: read whole first.
    Chunked,
}

/// The request's framing. Only a lone `chunked` coding is accepted: keygate forwards a
/// body it has read with a `Content-Length`, which would present `gzip, chunked` bytes to
/// the upstream as a plain body. (Pingora has already refused any other final coding.)
pub fn framing(req: &pingora::http::RequestHeader) -> Result<Framing, GatewayError> {
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

/// Answers `Expect: 100-continue` so that the client sends the body keygate is about to
/// read (Pingora's body reader does not). Pingora then marks the connection not reusable (a
/// response went out before the body was read); what it was before is returned, for
/// `keep_alive_after_continue` to restore once the body has been read whole.
pub async fn continue_if_expected(session: &mut Session) -> pingora::Result<Option<KeepAlive>> {
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects_continue {
        return Ok(None);
    }
    let before = KeepAlive(session.get_keepalive());
    session.write_continue_response().await?;
    Ok(Some(before))
}

/// A connection's keep-alive setting before a `100 Continue`.
#[derive(Debug, Clone, Copy)]
pub struct KeepAlive(Option<u64>);

/// Puts back the keep-alive setting a `100 Continue` took away, once the body is read to
/// its end.
pub fn keep_alive_after_continue(session: &mut Session, before: Option<KeepAlive>) {
    if let Some(KeepAlive(setting)) = before {
        session.set_keepalive(setting);
    }
}

/// Reads a chunked body whole, within `deadline`, into Pingora's retry buffer, from where
/// the proxy sends it upstream. Returns its length.
pub async fn buffer_chunked(
    session: &mut Session,
    deadline: Duration,
) -> Result<usize, GatewayError> {
    session.as_mut().enable_retry_buffering();
    let continued = continue_if_expected(session)
        .await
        .map_err(|_| GatewayError::MalformedBody)?;
    let length = match tokio::time::timeout(deadline, read_to_limit(session)).await {
        Ok(read) => read?,
        Err(_) => return Err(GatewayError::BodyTimeout),
    };
    keep_alive_after_continue(session, continued);
    Ok(length)
}

async fn read_to_limit(session: &mut Session) -> Result<usize, GatewayError> {
    let mut total = 0usize;
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                total += chunk.len();
                if total > DRAIN_LIMIT {
                    return Err(GatewayError::ChunkedBodyTooLarge);
                }
            }
            Ok(None) if total > CHUNKED_BODY_LIMIT => {
                return Err(GatewayError::ChunkedBodyTooLarge);
            }
            Ok(None) => return Ok(total),
            Err(e) => return Err(read_error(e.etype(), e.esource())),
        }
    }
}

/// A broken chunk and a body cut short are both the client's doing (400; if the client has
/// gone, the answer is simply not delivered).
fn read_error(kind: &ErrorType, source: &ErrorSource) -> GatewayError {
    match kind {
        ErrorType::ReadTimedout => GatewayError::BodyTimeout,
        _ if *source == ErrorSource::Internal => GatewayError::Internal,
        _ => GatewayError::MalformedBody,
    }
}

/// The upstream request for a body keygate has already read: its length instead of the
/// chunked coding (and no `Expect`, which keygate has answered itself).
pub fn frame_as_buffered(
    req: &mut pingora::http::RequestHeader,
    length: usize,
) -> pingora::Result<()> {
    req.remove_header(&http::header::TRANSFER_ENCODING);
    req.remove_header(&http::header::EXPECT);
    req.insert_header(http::header::CONTENT_LENGTH, length.to_string())?;
    Ok(())
}
