//! Open WebSocket tunnels, and closing them when their key stops being valid (contract
//! section 9: within 1 s of the revoke's answer or of the expiry).
//!
//! Once Pingora has switched a connection to a tunnel it only moves bytes, and no hook of
//! ours runs unless bytes arrive, so a revoked key's idle tunnel would live on. A sweep
//! every `SWEEP_INTERVAL` looks each tunnel's key up again (through the cache: a revoke or
//! an expiry change invalidates it, here or, on PostgreSQL, by NOTIFY from another
//! gateway) and shuts down the client's socket of those whose key is gone or expired;
//! Pingora then sees the client leave and ends the tunnel, upstream side included.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use prometheus::{IntCounter, IntGauge};

use crate::clock::unix_now;
use crate::keys::KeyHash;
use crate::metrics::{CloseReason, Metrics};
use crate::store::{CachedKey, KeyCache, StoreError};

/// Leaves the promised 1 s with room for the store read that follows an invalidation.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

struct OpenTunnel {
    key_hash: KeyHash,
    /// The client connection's socket. Valid while the entry exists: the entry is removed
    /// (by `TunnelGuard`, in the request's logging hook) before Pingora closes the socket.
    socket: RawFd,
    /// Shut down already; the entry stays until Pingora has ended the tunnel.
    closed: bool,
}

pub(crate) struct Tunnels {
    open: DashMap<u64, OpenTunnel>,
    next_id: AtomicU64,
    gauge: IntGauge,
    closed_revoked: IntCounter,
    closed_expired: IntCounter,
}

/// One registered tunnel; dropping it forgets the tunnel.
pub(crate) struct TunnelGuard {
    tunnels: Arc<Tunnels>,
    id: u64,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        if self.tunnels.open.remove(&self.id).is_some() {
            self.tunnels.gauge.dec();
        }
    }
}

impl Tunnels {
    pub(crate) fn new(metrics: &Metrics) -> Self {
        let closed = |reason: CloseReason| {
            metrics
                .websocket_tunnels_closed
                .with_label_values(&[reason.label()])
        };
        Tunnels {
            open: DashMap::new(),
            next_id: AtomicU64::new(0),
            gauge: metrics.websocket_tunnels.clone(),
            closed_revoked: closed(CloseReason::Revoked),
            closed_expired: closed(CloseReason::Expired),
        }
    }

    /// Watches the tunnel on client socket `socket`, opened with `key`, until the guard is
    /// dropped. The guard must be dropped before the socket is closed.
    pub(crate) fn register(self: &Arc<Self>, key: &CachedKey, socket: RawFd) -> TunnelGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open.insert(
            id,
            OpenTunnel {
                key_hash: key.hash,
                socket,
                closed: false,
            },
        );
        self.gauge.inc();
        TunnelGuard {
            tunnels: Arc::clone(self),
            id,
        }
    }

    /// Closes every tunnel whose key is revoked, gone or expired. A key the store cannot be
    /// read for keeps its tunnels, as cached keys keep working while the store is down.
    pub(crate) async fn sweep(&self, cache: &KeyCache) {
        let watched: Vec<(u64, KeyHash)> = self
            .open
            .iter()
            .filter(|entry| !entry.value().closed)
            .map(|entry| (*entry.key(), entry.value().key_hash))
            .collect();
        for (id, hash) in watched {
            let verdict = match cache.resolve(&hash).await {
                Ok(resolved) => match resolved.key {
                    None => Some(CloseReason::Revoked),
                    Some(key) if key.is_expired(unix_now()) => Some(CloseReason::Expired),
                    Some(_) => None,
                },
                // Busy: the read bound is taken (a flood); the next sweep tries again.
                Err(StoreError::Busy) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot recheck a WebSocket tunnel's key");
                    None
                }
            };
            if let Some(reason) = verdict {
                self.close(id, reason);
            }
        }
    }

    fn close(&self, id: u64, reason: CloseReason) {
        // Holding the entry keeps its guard from dropping it meanwhile, so the socket is
        // still the tunnel's own while it is shut down.
        let Some(mut tunnel) = self.open.get_mut(&id) else {
            return;
        };
        tunnel.closed = true;
        // Counted first: whoever sees the tunnel end also sees it counted.
        match reason {
            CloseReason::Revoked => self.closed_revoked.inc(),
            CloseReason::Expired => self.closed_expired.inc(),
        }
        // SAFETY: shutdown(2) on a descriptor only changes the state of the connection
        // behind it; the descriptor is the tunnel's client socket and still open (see
        // `OpenTunnel::socket`). It is not closed here: Pingora does that.
        let result = unsafe { libc::shutdown(tunnel.socket, libc::SHUT_RDWR) };
        if result == 0 {
            tracing::info!(reason = reason.label(), "closed a WebSocket tunnel");
        } else {
            let error = std::io::Error::last_os_error();
            tracing::warn!(%error, "could not close a WebSocket tunnel");
        }
    }
}
