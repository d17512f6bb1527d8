//! Connection-level limits Pingora lacks: a cap on concurrent connections, and a total
//! deadline for each request's header. Pingora's downstream read timeout applies per read,
//! so a client trickling one header byte at a time would otherwise hold its connection (and
//! a task) indefinitely.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashSet;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::sync::{Semaphore, oneshot};

tokio::task_local! {
    /// Set while a connection's request is processed; taken once its header is parsed.
    static HEADER_PARSED: RefCell<Option<oneshot::Sender<()>>>;
}

/// Marks the current request's header as complete (from `early_request_filter`, which
/// Pingora runs in the connection's task right after parsing it).
pub fn header_parsed() {
    let _ = HEADER_PARSED.try_with(|cell| {
        if let Some(signal) = cell.borrow_mut().take() {
            let _ = signal.send(());
        }
    });
}

pub struct Guarded<A> {
    inner: Arc<A>,
    permits: Arc<Semaphore>,
    header_timeout: Duration,
    keepalive_timeout: Duration,
    /// Connections waiting between two requests: the next header may first wait out the
    /// keep-alive idle time.
    idle: DashSet<i32>,
}

impl<A> Guarded<A> {
    pub fn new(
        inner: A,
        max_connections: usize,
        header_timeout: Duration,
        keepalive_timeout: Duration,
    ) -> Self {
        Guarded {
            inner: Arc::new(inner),
            permits: Arc::new(Semaphore::new(max_connections)),
            header_timeout,
            keepalive_timeout,
            idle: DashSet::new(),
        }
    }

    fn finished(&self, connection: i32, stream: Option<Stream>) -> Option<Stream> {
        if stream.is_some() {
            self.idle.insert(connection);
        }
        stream
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let connection = session.id();
        let reused = self.idle.remove(&connection).is_some();
        // Over the cap: close at once rather than queue (queued sockets still cost memory).
        let _permit = Arc::clone(&self.permits).try_acquire_owned().ok()?;
        let deadline = if reused {
            self.keepalive_timeout + self.header_timeout
        } else {
            self.header_timeout
        };
        let (signal, parsed) = oneshot::channel();
        let work = HEADER_PARSED.scope(
            RefCell::new(Some(signal)),
            self.inner.process_new(session, shutdown),
        );
        tokio::pin!(work);
        tokio::select! {
            biased;
            stream = &mut work => return self.finished(connection, stream),
            _ = parsed => {}
            // Dropping the request closes the connection.
            _ = tokio::time::sleep(deadline) => return None,
        }
        let stream = work.await;
        self.finished(connection, stream)
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}
