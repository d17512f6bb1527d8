//! Deciding who a request's key belongs to: the credential found in its headers, the key
//! format checked without hashing, then the cache (or one store read) and the expiry. Both
//! the request path and the management API authenticate keys here.

use std::sync::Arc;

use http::HeaderMap;
use prometheus::IntCounter;

use crate::clock::unix_now;
use crate::error::GatewayError;
use crate::http::credentials::{self, CredentialSources};
use crate::keys::{KeyFormat, KeyHash};
use crate::metrics::{CacheMetrics, Metrics};
use crate::store::{CachedKey, KeyCache, LookupSource};

pub(crate) struct Authenticator {
    format: KeyFormat,
    cache: Arc<KeyCache>,
    cache_metrics: CacheMetrics,
    store_reads: IntCounter,
}

impl Authenticator {
    pub(crate) fn new(format: KeyFormat, cache: Arc<KeyCache>, metrics: &Metrics) -> Self {
        Authenticator {
            format,
            cache,
            cache_metrics: CacheMetrics::new(metrics),
            store_reads: metrics.store_reads.clone(),
        }
    }

    pub(crate) fn format(&self) -> &KeyFormat {
        &self.format
    }

    /// Finds and checks the request's key: present, well-formed, known, not revoked, not
    /// expired. Only a key missing from the cache costs a store read.
    pub(crate) async fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> Result<(Arc<CachedKey>, CredentialSources), GatewayError> {
        let credential = credentials::extract(headers, &self.format)
            .map_err(|_| GatewayError::ConflictingCredentials)?
            .ok_or(GatewayError::MissingCredentials)?;
        let key = self
            .find(credential.value)
            .await?
            .ok_or(GatewayError::InvalidKey)?;
        if key.is_expired(unix_now()) {
            return Err(GatewayError::KeyExpired);
        }
        Ok((key, credential.sources))
    }

    /// The live (not revoked) key `raw` is, expired or not; None for a malformed, unknown
    /// or revoked key.
    pub(crate) async fn find(&self, raw: &[u8]) -> Result<Option<Arc<CachedKey>>, GatewayError> {
        if self.format.check(raw).is_err() {
            return Ok(None);
        }
        let hash = KeyHash::of(raw);
        let resolved = self.cache.resolve(&hash).await.map_err(|e| {
            tracing::warn!(error = %e, "key store read failed");
            GatewayError::StoreUnavailable
        })?;
        match resolved.source {
            LookupSource::Hit => self.cache_metrics.hit.inc(),
            LookupSource::NegativeHit => self.cache_metrics.negative_hit.inc(),
            LookupSource::Miss => {
                self.cache_metrics.miss.inc();
                self.store_reads.inc();
            }
        }
        Ok(resolved.key)
    }
}
