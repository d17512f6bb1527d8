//! Cross-instance cache coherence on PostgreSQL: revokes, rotations and other changes are
//! NOTIFYed in the transaction that makes them, and every gateway LISTENs and drops the
//! hashes it is told about from its own cache.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

use super::KeyCache;
use super::postgres::{INVALIDATION_CHANNEL, describe};
use crate::keys::KeyHash;

const LISTENER_FIRST_BACKOFF: Duration = Duration::from_millis(100);
const LISTENER_MAX_BACKOFF: Duration = Duration::from_secs(2);
const LISTENER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A silently dead connection (no RST) would miss notifications forever: probe it.
const LISTENER_HEARTBEAT: Duration = Duration::from_secs(5);
const LISTENER_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps `cache` coherent with revokes and expiry changes made by other instances: one
/// dedicated connection `LISTEN`s on `keygate_invalidate` and invalidates each hash it is
/// told about. Whenever notifications may have been missed (the connection dropped, or a
/// new `LISTEN` just started) the whole cache is cleared, so a missed notification can
/// never keep a revoked key alive. Reconnects with backoff (up to 2 s) until `shutdown`
/// turns true or its sender is dropped.
pub async fn run_listener(url: String, cache: Arc<KeyCache>, mut shutdown: watch::Receiver<bool>) {
    let mut config: tokio_postgres::Config = match url.parse() {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(
                error = %describe(&e),
                "invalid PostgreSQL URL: cross-instance cache invalidation is off"
            );
            stopped(&mut shutdown).await;
            return;
        }
    };
    if config.get_application_name().is_none() {
        config.application_name("keygate-invalidation-listener");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(LISTENER_CONNECT_TIMEOUT);
    }
    let mut backoff = LISTENER_FIRST_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return;
        }
        match listen_until_lost(&config, &cache, &mut shutdown, &mut backoff).await {
            Listening::Shutdown => return,
            Listening::Lost(reason) => {
                // The cache is kept while the database is away (cached keys keep working,
                // contract section 4); it is cleared once LISTEN is back, which covers every
                // notification missed in between.
                tracing::warn!(
                    reason = %reason,
                    retry_in_ms = backoff.as_millis() as u64,
                    "invalidation listener lost PostgreSQL; the cache is cleared when it reconnects"
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut shutdown) => return,
        }
        backoff = (backoff * 2).min(LISTENER_MAX_BACKOFF);
    }
}

/// Resolves once `shutdown` is true or its sender is gone. (The guard `wait_for` returns
/// is not `Send`: it must not live in a `select!` whose branches await.)
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

enum Listening {
    Shutdown,
    Lost(String),
}

/// Applies one notification. A payload that is not a key hash is from something this
/// build does not understand: clear everything rather than guess.
fn apply_notification(cache: &KeyCache, payload: &str) {
    match KeyHash::from_hex(payload) {
        Some(hash) => cache.invalidate(&hash),
        None => {
            tracing::warn!(
                payload,
                "unexpected invalidation payload; key cache cleared"
            );
            cache.clear();
        }
    }
}

async fn listen_until_lost(
    config: &tokio_postgres::Config,
    cache: &Arc<KeyCache>,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Listening {
    let connecting = tokio::time::timeout(LISTENER_CONNECT_TIMEOUT, config.connect(NoTls));
    let (client, mut connection) = tokio::select! {
        connected = connecting => match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Listening::Lost(describe(&e)),
            Err(_) => return Listening::Lost("timed out connecting".to_string()),
        },
        _ = stopped(shutdown) => return Listening::Shutdown,
    };
    // The connection task reads every message: responses for `client` and notifications.
    let driver_cache = Arc::clone(cache);
    let mut driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == INVALIDATION_CHANNEL => {
                    apply_notification(&driver_cache, n.payload());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return describe(&e),
                None => return "connection closed".to_string(),
            }
        }
    });
    let abort = driver.abort_handle();
    let _abort_on_return = AbortOnDrop(abort);

    let listen = format!("LISTEN {INVALIDATION_CHANNEL}");
    match tokio::time::timeout(LISTENER_CONNECT_TIMEOUT, client.batch_execute(&listen)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Listening::Lost(describe(&e)),
        Err(_) => return Listening::Lost("timed out starting LISTEN".to_string()),
    }
    // Anything revoked before the LISTEN took effect was not notified to us.
    cache.clear();
    *backoff = LISTENER_FIRST_BACKOFF;
    tracing::info!(
        channel = INVALIDATION_CHANNEL,
        "invalidation listener connected"
    );

    let mut heartbeat = tokio::time::interval(LISTENER_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            _ = stopped(shutdown) => return Listening::Shutdown,
            ended = &mut driver => {
                return Listening::Lost(ended.unwrap_or_else(|e| e.to_string()));
            }
            _ = heartbeat.tick() => {
                match tokio::time::timeout(
                    LISTENER_HEARTBEAT_TIMEOUT,
                    client.batch_execute("SELECT 1"),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Listening::Lost(describe(&e)),
                    Err(_) => return Listening::Lost("heartbeat timed out".to_string()),
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
