//! The state every part of a running gateway shares: its configuration and routes (`Live`,
//! swapped whole by a reload), key cache, usage counters, metrics, rate limits and quotas,
//! and the key authenticator. The request path (`gateway`), the management API, the ops
//! listener and the background tasks each hold an `Arc<Shared>` next to state of their own.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::drain::Drain;
use crate::keys::KeyFormat;
use crate::metrics::Metrics;
use crate::ratelimit::Limits;
use crate::routing::Router;
use crate::store::KeyCache;
use crate::tunnels::Tunnels;
use crate::usage::UsageRecorder;

/// The configuration in force and the routes built from it. A request takes one snapshot
/// when it arrives and keeps it to the end, so a reload never changes a request midway.
pub(crate) struct Live {
    pub config: Arc<Config>,
    pub router: Router,
}

pub(crate) struct Shared {
    live: ArcSwap<Live>,
    pub cache: Arc<KeyCache>,
    pub usage: Arc<UsageRecorder>,
    pub metrics: Arc<Metrics>,
    /// Rate limits and quotas of keys and routes, here or in Redis.
    pub limits: Limits,
    pub auth: Authenticator,
    /// Requests in flight, and whether the gateway is stopping.
    pub drain: &'static Drain,
    /// Open WebSocket tunnels, swept for revoked and expired keys.
    pub tunnels: Arc<Tunnels>,
}

impl Shared {
    pub(crate) fn new(
        config: Arc<Config>,
        router: Router,
        cache: Arc<KeyCache>,
        usage: Arc<UsageRecorder>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Self {
        let format = KeyFormat::new(&config.keys.prefix);
        Shared {
            auth: Authenticator::new(format, Arc::clone(&cache), &metrics),
            limits,
            drain: Drain::leak(),
            tunnels: Arc::new(Tunnels::new(&metrics)),
            live: ArcSwap::from_pointee(Live { config, router }),
            cache,
            usage,
            metrics,
        }
    }

    /// The configuration and routes in force now.
    pub(crate) fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Puts a new configuration in force for every request that arrives from now on.
    pub(crate) fn put_live(&self, live: Live) {
        self.live.store(Arc::new(live));
    }
}
