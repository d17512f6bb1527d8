//! Connection-level limits Pingora lacks: a cap on concurrent connections, and a total
//! deadline for each request's header. Pingora's downstream read timeout applies per read,
//! so a client trickling one header byte at a time would otherwise hold its connection (and
//! a task) indefinitely.
//!
//! Both wrap `ServerApp::process_new`, inside which Pingora serves every request of a
//! keep-alive connection.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{ALPN, Stream};
use pingora::server::ShutdownWatch;

use crate::drain::Drain;

tokio::task_local! {
    /// Set for an HTTP/1 connection's task: when its next header is due.
    static HEADER_DUE: HeaderDue;
}

/// Marks the current request's header as complete (from `early_request_filter`, which
/// Pingora runs in the connection's task right after parsing it).
pub(crate) fn header_parsed() {
    let _ = HEADER_DUE.try_with(|due| due.at.set(None));
}

/// Marks the current request as served (from `logging`, Pingora's last hook of every
/// request): the next header on the connection is due within the keep-alive time.
pub(crate) fn request_done() {
    let _ = HEADER_DUE.try_with(|due| due.at.set(Some(Instant::now() + due.between_requests)));
}

/// At most `max_connections` connections at once; over the cap a new connection is closed
/// at once rather than queued (queued sockets still cost memory). While the gateway stops,
/// every new connection is closed. A reload may move the cap (`limit`): connections over a
/// lowered cap finish, and new ones wait for the count to fall under it.
pub(crate) struct ConnectionCap<A> {
    inner: Arc<A>,
    open: AtomicUsize,
    limit: Arc<AtomicUsize>,
    drain: &'static Drain,
}

impl<A> ConnectionCap<A> {
    pub(crate) fn new(inner: A, limit: Arc<AtomicUsize>, drain: &'static Drain) -> Self {
        ConnectionCap {
            inner: Arc::new(inner),
            open: AtomicUsize::new(0),
            limit,
            drain,
        }
    }
}

/// Counts a connection as open until dropped.
struct OpenConnection<'a>(&'a AtomicUsize);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ConnectionCap<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if self.drain.is_draining() {
            return None;
        }
        let open = OpenConnection(&self.open);
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.limit.load(Ordering::Relaxed) {
            return None;
        }
        let stream = self.inner.process_new(session, shutdown).await;
        drop(open);
        stream
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// A connection's first header must be complete within `header_timeout` of its start, and
/// each later one within `keepalive_timeout` of the previous response: that is also what
/// closes an idle keep-alive connection. Pingora is told to keep connections open without
/// a timeout of its own (`early_request_filter`), since its keep-alive timeout is a timer
/// registered for each wait on the connection, one a request.
///
/// Kept per connection, not per request: the connection's task carries when its next
/// header is due (`HEADER_DUE`), which `early_request_filter` clears and `logging` sets
/// again, and one timer a connection wakes only when that moment may have passed. A
/// request therefore pays two writes to a task-local, not a timer of its own. HTTP/2
/// connections are left out: their streams run in tasks of their own, each arriving with
/// its header whole, and an idle HTTP/2 connection is closed by `h2_idle_timeout`. Only
/// HTTP/2 chosen by ALPN is recognised: cleartext HTTP/2 (Pingora's `h2c` option) is left
/// off (`edge.rs`); turning it on would need it recognised here too, or every h2c
/// connection would be cut at the header time.
pub(crate) struct HeaderDeadline<A> {
    inner: Arc<A>,
    header_timeout: Duration,
    keepalive_timeout: Duration,
}

impl<A> HeaderDeadline<A> {
    pub(crate) fn new(inner: A, header_timeout: Duration, keepalive_timeout: Duration) -> Self {
        HeaderDeadline {
            inner: Arc::new(inner),
            header_timeout,
            keepalive_timeout,
        }
    }
}

/// What one connection's header deadline needs from its requests.
struct HeaderDue {
    /// When the header being waited for must be complete; None while a request is served.
    at: Cell<Option<Instant>>,
    /// From the end of a request to its successor's complete header: the keep-alive time.
    between_requests: Duration,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeaderDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.inner.process_new(stream, shutdown).await;
        }
        let first_due = Instant::now() + self.header_timeout;
        let due = HeaderDue {
            at: Cell::new(Some(first_due)),
            between_requests: self.keepalive_timeout,
        };
        let watched = async {
            let work = self.inner.process_new(stream, shutdown);
            tokio::pin!(work);
            let timer = tokio::time::sleep_until(first_due.into());
            tokio::pin!(timer);
            loop {
                tokio::select! {
                    biased;
                    stream = &mut work => return stream,
                    () = &mut timer => {}
                }
                let now = Instant::now();
                match HEADER_DUE.with(|due| due.at.get()) {
                    // Dropping the connection's work closes it, mid-header.
                    Some(at) if at <= now => return None,
                    Some(at) => timer.as_mut().reset(at.into()),
                    // A request is being served: look again one header timeout later.
                    None => timer.as_mut().reset((now + self.header_timeout).into()),
                }
            }
        };
        HEADER_DUE.scope(due, watched).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}
