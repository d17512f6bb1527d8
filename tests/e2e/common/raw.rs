//! Raw HTTP/1.1 over TCP, for requests a real client would normalize or refuse to send,
//! and for an upstream that answers with bytes of the test's choosing.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response read off a raw TCP connection.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The `error.code` of keygate's JSON error; None unless the whole envelope is right
    /// (`envelope::error_envelope`).
    pub(crate) fn error_code(&self) -> Option<String> {
        let error = super::envelope::error_envelope(self).ok()?;
        error["code"].as_str().map(str::to_string)
    }
}

impl super::envelope::Received for RawResponse {
    fn status(&self) -> u16 {
        self.status
    }

    fn header(&self, name: &str) -> Option<&str> {
        RawResponse::header(self, name)
    }

    fn body(&self) -> &[u8] {
        &self.body
    }
}

/// A keep-alive upstream on a free loopback port that answers each request with what
/// `answer` returns for its head (request line and headers, as received), after the delay
/// it returns; every head is also sent on the returned channel.
pub(crate) async fn raw_upstream(
    answer: fn(&str) -> (Duration, &'static str),
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the raw upstream");
    let addr = listener.local_addr().expect("raw upstream address");
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while let Some(end) = find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let (delay, reply) = answer(&head);
                        let _ = seen_tx.send(head);
                        tokio::time::sleep(delay).await;
                        if stream.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    if read_more(&mut stream, &mut buf).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen_rx)
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub(crate) async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 16384];
    let n = stream
        .read(&mut chunk)
        .await
        .map_err(|e| format!("read failed: {e}"))?;
    if n == 0 {
        return Err(format!(
            "connection closed; got {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(300)])
        ));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Reads one final response off `stream` (skipping `1xx` interim responses), framed by
/// Content-Length or chunked encoding, or by the end of the connection. Err when the
/// connection fails or ends before a whole response arrived.
pub(crate) async fn read_response(stream: &mut TcpStream) -> Result<RawResponse, String> {
    read_next_response(stream, &mut Vec::new()).await
}

/// As `read_response`, for one of several responses on a connection (pipelining): `buf`
/// holds bytes already read past the previous response and keeps those past this one.
pub(crate) async fn read_next_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<RawResponse, String> {
    let (status, headers, head_end) = loop {
        let head_end = loop {
            if let Some(pos) = find(buf, b"\r\n\r\n") {
                break pos + 4;
            }
            read_more(stream, buf).await?;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        if (100..200).contains(&status) {
            buf.drain(..head_end);
            continue;
        }
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        break (status, headers, head_end);
    };
    let mut rest = buf[head_end..].to_vec();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| format!("content-length {len:?}"))?;
        while rest.len() < len {
            read_more(stream, &mut rest).await?;
        }
        *buf = rest.split_off(len);
        rest
    } else if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(pos) = find(&rest, b"\r\n") {
                    break pos;
                }
                read_more(stream, &mut rest).await?;
            };
            let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("chunk size {size_text:?}"))?;
            while rest.len() < line_end + 2 + size + 2 {
                read_more(stream, &mut rest).await?;
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest.drain(..line_end + 2 + size + 2);
            if size == 0 {
                *buf = rest;
                break body;
            }
        }
    } else {
        let _ = stream.read_to_end(&mut rest).await;
        buf.clear();
        rest
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// Sends `bytes` on one connection and reads up to `count` responses; stops early at EOF.
pub(crate) async fn pipelined(port: u16, bytes: &[u8], count: usize) -> (Vec<RawResponse>, bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream.write_all(bytes).await.expect("write");
        let mut leftover = Vec::new();
        let mut responses = Vec::new();
        for _ in 0..count {
            match read_next_response(&mut stream, &mut leftover).await {
                Ok(response) => responses.push(response),
                Err(_) => return (responses, true),
            }
        }
        (responses, false)
    })
    .await
    .expect("answers within 10 s")
}
