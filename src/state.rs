//! The state every part of a running gateway shares: its configuration, routes, key cache,
//! usage counters, metrics, per-key rate limits and the key authenticator. The request path
//! (`gateway`), the management API, the ops listener and the background tasks each hold an
//! `Arc<Shared>` next to state of their own.

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::drain::Drain;
use crate::keys::KeyFormat;
use crate::metrics::Metrics;
use crate::ratelimit::KeyLimits;
use crate::routing::Router;
use crate::store::KeyCache;
use crate::tunnels::Tunnels;
use crate::usage::UsageRecorder;

pub(crate) struct Shared {
    pub config: Arc<Config>,
    pub router: Router,
    pub cache: Arc<KeyCache>,
    pub usage: Arc<UsageRecorder>,
    pub metrics: Arc<Metrics>,
    pub rate_limits: KeyLimits,
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
    ) -> Self {
        let format = KeyFormat::new(&config.keys.prefix);
        Shared {
            auth: Authenticator::new(format, Arc::clone(&cache), &metrics),
            rate_limits: KeyLimits::default(),
            drain: Drain::leak(),
            tunnels: Arc::new(Tunnels::new(&metrics)),
            config,
            router,
            cache,
            usage,
            metrics,
        }
    }
}
