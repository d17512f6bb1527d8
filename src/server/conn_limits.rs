//! Connection-level limits Pingora lacks: a cap on concurrent connections, and a total
//! deadline for each request's header. Pingora's downstream read timeout applies per read,
//! so a client trickling one header byte at a time would otherwise hold its connection (and
//! a task) indefinitely.
//!
//! Two wrappers, because Pingora serves every request of a keep-alive connection inside
//! one `ServerApp::process_new` call: the cap wraps that (a connection), the deadline wraps
//! `HttpServerApp::process_new_http` (one request).

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashSet;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::protocols::http::v2::server::H2Options;
use pingora::server::ShutdownWatch;

use crate::drain::Drain;

tokio::task_local! {
    /// Set while a request is processed; true once its header is parsed.
    static HEADER_PARSED: Cell<bool>;
}

/// Marks the current request's header as complete (from `early_request_filter`, which
/// Pingora runs in the connection's task right after parsing it).
pub(crate) fn header_parsed() {
    let _ = HEADER_PARSED.try_with(|parsed| parsed.set(true));
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

/// Each request's header must be complete within `header_timeout` of the moment keygate
/// starts waiting for it; on a reused keep-alive connection the client may first stay idle
/// for `keepalive_timeout`.
pub(crate) struct HeaderDeadline<A> {
    inner: Arc<A>,
    header_timeout: Duration,
    keepalive_timeout: Duration,
    /// Connections between two requests (by stream id): their next header may first wait
    /// out the keep-alive idle time. The stream id is the raw fd, which the OS reuses once
    /// a connection closes; that is safe only because Pingora calls `process_new_http`
    /// again at once on a reused stream (pingora-core `apps/mod.rs`), which removes the
    /// entry before the fd can be closed and handed to a new connection.
    idle: DashSet<i32, foldhash::fast::RandomState>,
}

impl<A> HeaderDeadline<A> {
    pub(crate) fn new(inner: A, header_timeout: Duration, keepalive_timeout: Duration) -> Self {
        HeaderDeadline {
            inner: Arc::new(inner),
            header_timeout,
            keepalive_timeout,
            idle: DashSet::with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    fn finished(
        &self,
        connection: Option<i32>,
        reused: Option<ReusedHttpStream>,
    ) -> Option<ReusedHttpStream> {
        if let (Some(connection), Some(_)) = (connection, &reused) {
            self.idle.insert(connection);
        }
        reused
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> HttpServerApp for HeaderDeadline<A> {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let connection = session.stream().map(|stream| stream.id());
        let reused = connection.is_some_and(|id| self.idle.remove(&id).is_some());
        let deadline = if reused {
            self.keepalive_timeout + self.header_timeout
        } else {
            self.header_timeout
        };
        // A flag the request's own task sets, read only if the deadline passes: no channel,
        // no wake-up, for the requests (nearly all) that finish before it.
        let work = HEADER_PARSED.scope(
            Cell::new(false),
            self.inner.process_new_http(session, shutdown),
        );
        tokio::pin!(work);
        tokio::select! {
            biased;
            reused = &mut work => return self.finished(connection, reused),
            () = tokio::time::sleep(deadline) => {}
        }
        // Dropping a request whose header is still incomplete closes the connection; one
        // that got past its header goes on without a deadline.
        let parsed = work
            .as_mut()
            .take_value()
            .is_some_and(|parsed| parsed.get());
        if !parsed {
            return None;
        }
        let reused = work.await;
        self.finished(connection, reused)
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.inner.server_options()
    }

    async fn http_cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}
