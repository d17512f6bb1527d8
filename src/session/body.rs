//! Reading request bodies from a Pingora session: a chunked body read whole before it is
//! forwarded (see `http::body` for why), a management call's JSON body, and the
//! `100 Continue` both need.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use pingora::{ErrorSource, ErrorType};

use crate::error::GatewayError;
use crate::http::body::{CHUNKED_BODY_LIMIT, DRAIN_LIMIT, MANAGEMENT_BODY_LIMIT};

/// Answers `Expect: 100-continue` so that the client sends the body keygate is about to
/// read (Pingora's body reader does not). Pingora then marks the connection not reusable (a
/// response went out before the body was read); what it was before is returned, for
/// `keep_alive_after_continue` to restore once the body has been read whole.
pub(crate) async fn continue_if_expected(
    session: &mut Session,
) -> pingora::Result<Option<KeepAlive>> {
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
pub(crate) struct KeepAlive(Option<u64>);

/// Puts back the keep-alive setting a `100 Continue` took away, once the body is read to
/// its end.
pub(crate) fn keep_alive_after_continue(session: &mut Session, before: Option<KeepAlive>) {
    if let Some(KeepAlive(setting)) = before {
        session.set_keepalive(setting);
    }
}

/// Reads a chunked body whole, within `deadline`, into Pingora's retry buffer, from where
/// the proxy sends it upstream. Returns its length.
pub(crate) async fn buffer_chunked(
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

/// Why a management body could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Over `MANAGEMENT_BODY_LIMIT`.
    TooLarge,
    /// Broken framing or the client went away; the connection cannot be reused.
    Unreadable,
    /// The `100 Continue` could not be written.
    Continue,
}

/// Reads a management call's body, at most `MANAGEMENT_BODY_LIMIT` of it (a larger one is
/// read on up to `DRAIN_LIMIT`, so the client gets to read the 413).
pub(crate) async fn read_management_body(session: &mut Session) -> Result<Bytes, BodyError> {
    let continued = continue_if_expected(session)
        .await
        .map_err(|_| BodyError::Continue)?;
    let mut body = BytesMut::new();
    let mut total = 0usize;
    loop {
        let chunk = match session.read_request_body().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => {
                // Where a broken body ends is unknown: what follows must not be read as
                // the next request.
                session.set_keepalive(None);
                return Err(BodyError::Unreadable);
            }
        };
        total += chunk.len();
        if total > DRAIN_LIMIT {
            return Err(BodyError::TooLarge);
        }
        if total <= MANAGEMENT_BODY_LIMIT {
            body.extend_from_slice(&chunk);
        }
    }
    if total > MANAGEMENT_BODY_LIMIT {
        return Err(BodyError::TooLarge);
    }
    keep_alive_after_continue(session, continued);
    Ok(body.freeze())
}
