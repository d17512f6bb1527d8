//! Cross-instance cache coherence on PostgreSQL: revokes, rotations and other changes are
//! NOTIFYed in the transaction that makes them, and every gateway LISTENs and drops the
//! hashes it is told about from its own cache. Creates are NOTIFYed too, and added to the
//! key filter; while the listener is away the filter is not trusted (a key created on
//! another gateway meanwhile would be wrongly refused) and is rebuilt once it is back.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::KeyCache;
use super::PgOptions;
use super::pg_connection::Connector;
use super::postgres::{CREATED_CHANNEL, INVALIDATION_CHANNEL, describe};
use crate::keys::KeyHash;

const LISTENER_FIRST_BACKOFF: Duration = Duration::from_millis(100);
const LISTENER_MAX_BACKOFF: Duration = Duration::from_secs(2);
const LISTENER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A silently dead connection (no RST) would miss notifications forever: probe it.
const LISTENER_HEARTBEAT: Duration = Duration::from_secs(5);
const LISTENER_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a silently dead connection can go unnoticed: the connection dies just after a
/// heartbeat, the next one is sent `LISTENER_HEARTBEAT` later and times out. Until then
/// notifications may be missed (and the cache is cleared once LISTEN is back). The help
/// text of `keygate_invalidation_listener_connected` states this bound.
pub const DEAD_CONNECTION_NOTICED_WITHIN: Duration =
    Duration::from_secs(LISTENER_HEARTBEAT.as_secs() + LISTENER_HEARTBEAT_TIMEOUT.as_secs());

/// Keeps `cache` coherent with revokes and expiry changes made by other instances: one
/// dedicated connection `LISTEN`s on `keygate_invalidate` and invalidates each hash it is
/// told about. Whenever notifications may have been missed (the connection dropped, or a
/// new `LISTEN` just started) the whole cache is cleared, so a missed notification can
/// never keep a revoked key alive. Reconnects with backoff (up to 2 s) until `shutdown`
/// turns true or its sender is dropped.
///
/// Connects with the default options (statement timeout, system CA roots); see
/// `run_listener_with`.
pub async fn run_listener(url: String, cache: Arc<KeyCache>, shutdown: watch::Receiver<bool>) {
    let options = PgOptions::new(1, LISTENER_CONNECT_TIMEOUT);
    run_listener_with(url, &options, cache, None, shutdown).await;
}

/// `run_listener`, connecting with `options` (`sslmode` and CA, statement timeout: the same
/// as the pool's) and holding `connected` (if any) at 1 while LISTENing, 0 otherwise.
pub async fn run_listener_with(
    url: String,
    options: &PgOptions,
    cache: Arc<KeyCache>,
    connected: Option<IntGauge>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (mut config, tls) = match Connector::new(&url, options, "keygate-invalidation-listener") {
        Ok(Connector { config, tls, .. }) => (config, tls),
        Err(e) => {
            tracing::error!(
                error = %e,
                "cannot connect to PostgreSQL as configured: cross-instance cache invalidation is off"
            );
            stopped(&mut shutdown).await;
            return;
        }
    };
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(LISTENER_CONNECT_TIMEOUT);
    }
    let mut backoff = LISTENER_FIRST_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let ended = listen_until_lost(
            &config,
            &tls,
            &cache,
            connected.as_ref(),
            &mut shutdown,
            &mut backoff,
        )
        .await;
        if let Some(gauge) = &connected {
            gauge.set(0);
        }
        // Creates on other gateways are no longer heard of: until a rebuild that starts
        // after LISTEN is back, the filter could refuse them.
        cache.filter().mark_stale();
        match ended {
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
/// build does not understand: clear everything (or rebuild the filter) rather than guess.
fn apply_notification(cache: &KeyCache, channel: &str, payload: &str) {
    match (channel, KeyHash::from_hex(payload)) {
        (INVALIDATION_CHANNEL, Some(hash)) => cache.invalidate(&hash),
        (INVALIDATION_CHANNEL, None) => {
            tracing::warn!(
                payload,
                "unexpected invalidation payload; key cache cleared"
            );
            cache.clear();
        }
        (CREATED_CHANNEL, Some(hash)) => cache.key_created(&hash),
        (CREATED_CHANNEL, None) => {
            tracing::warn!(
                payload,
                "unexpected key creation payload; key filter rebuilt"
            );
            cache.filter().mark_stale();
            cache.filter().request_rebuild();
        }
        _ => {}
    }
}

/// One connection: connect, LISTEN, clear the cache, then apply notifications and send
/// heartbeats until the connection is lost or `shutdown`.
async fn listen_until_lost(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    cache: &Arc<KeyCache>,
    connected: Option<&IntGauge>,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Listening {
    let connecting = tokio::time::timeout(LISTENER_CONNECT_TIMEOUT, config.connect(tls.clone()));
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
                Some(Ok(AsyncMessage::Notification(n))) => {
                    apply_notification(&driver_cache, n.channel(), n.payload());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return describe(&e),
                None => return "connection closed".to_string(),
            }
        }
    });
    let abort = driver.abort_handle();
    let _abort_on_return = AbortOnDrop(abort);

    let listen = format!("LISTEN {INVALIDATION_CHANNEL}; LISTEN {CREATED_CHANNEL}");
    match tokio::time::timeout(LISTENER_CONNECT_TIMEOUT, client.batch_execute(&listen)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Listening::Lost(describe(&e)),
        Err(_) => return Listening::Lost("timed out starting LISTEN".to_string()),
    }
    // Anything revoked or created before the LISTEN took effect was not notified to us.
    cache.clear();
    cache.request_warm();
    cache.filter().mark_stale();
    cache.filter().request_rebuild();
    if let Some(gauge) = connected {
        gauge.set(1);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_states_the_bound_on_noticing_a_dead_connection() {
        assert_eq!(DEAD_CONNECTION_NOTICED_WITHIN, Duration::from_secs(10));
        let text = String::from_utf8(crate::metrics::Metrics::new().render()).expect("UTF-8");
        let help = text
            .lines()
            .find(|line| line.starts_with("# HELP keygate_invalidation_listener_connected "))
            .expect("the gauge is exported");
        let bound = format!("within {} s", DEAD_CONNECTION_NOTICED_WITHIN.as_secs());
        assert!(help.contains(&bound), "{help}");
    }
}
