//! The ops listener (`admin_listen`): `/metrics` (Prometheus text), `/healthz` (the process
//! is up), `/readyz` (store usable and at least one route with a healthy upstream) and
//! `POST /-/reload` (Prometheus's convention: read the configuration file again).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::config::ConfigErrors;
use crate::error::{code, error_body};
use crate::state::Shared;

/// Reads the configuration file again and applies it whole, or changes nothing.
#[async_trait]
pub(crate) trait Reload: Send + Sync {
    /// The restart-only fields the file changed (applied at the next start), or every
    /// problem of the file.
    async fn reload(&self) -> Result<Vec<&'static str>, ConfigErrors>;
}

pub(crate) struct OpsApp {
    pub shared: Arc<Shared>,
    pub reload: Arc<dyn Reload>,
}

/// The answer to `POST /-/reload` (contract section 10).
pub(crate) fn reload_answer(outcome: Result<Vec<&'static str>, ConfigErrors>) -> Response<Vec<u8>> {
    match outcome {
        Ok(restart_required) => json(
            200,
            serde_json::json!({"reloaded": true, "restart_required": restart_required}),
        ),
        Err(errors) => {
            let mut details: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for problem in errors.0 {
                details
                    .entry(problem.path)
                    .or_default()
                    .push(problem.reason);
            }
            let count = details.len();
            let message = format!(
                "the configuration file was not applied: {count} field(s) have problems; the running configuration stays in force"
            );
            let details = serde_json::json!(details);
            response(
                400,
                "application/json",
                error_body(code::INVALID_CONFIG, &message, "", Some(&details)).to_vec(),
            )
        }
    }
}

fn response(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_default()
}

fn json(status: u16, value: serde_json::Value) -> Response<Vec<u8>> {
    response(
        status,
        "application/json",
        serde_json::to_vec(&value).unwrap_or_default(),
    )
}

impl OpsApp {
    /// Refreshes the gauges that are read rather than counted.
    async fn refresh_gauges(&self) {
        let shared = &self.shared;
        for route in shared.live().router.routes() {
            for (upstream, healthy) in route.upstream_health() {
                shared
                    .metrics
                    .upstream_healthy
                    .with_label_values(&[route.name(), upstream.as_str()])
                    .set(i64::from(healthy));
            }
        }
        if let Ok(count) = shared.cache.store().count().await {
            shared.metrics.keys.set(count as i64);
        }
        shared
            .metrics
            .key_filter_ready
            .set(i64::from(shared.cache.filter().is_ready()));
        shared
            .metrics
            .usage_pending
            .set(shared.usage.pending_keys() as i64);
    }

    async fn readiness(&self) -> Response<Vec<u8>> {
        let store = self.shared.cache.store().ping().await;
        let live = self.shared.live();
        let healthy_routes: Vec<&str> = live
            .router
            .routes()
            .iter()
            .filter(|r| r.upstream_health().iter().any(|(_, healthy)| *healthy))
            .map(|r| r.name())
            .collect();
        let ready = store.is_ok() && !healthy_routes.is_empty();
        json(
            if ready { 200 } else { 503 },
            serde_json::json!({
                "status": if ready { "ready" } else { "not_ready" },
                "store": if store.is_ok() { "ok" } else { "unavailable" },
                "routes_with_healthy_upstream": healthy_routes,
            }),
        )
    }
}

#[async_trait]
impl ServeHttp for OpsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/metrics" => {
                self.refresh_gauges().await;
                response(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.shared.metrics.render(),
                )
            }
            "/healthz" => json(
                200,
                serde_json::json!({"status": "ok", "service": "keygate", "version": env!("CARGO_PKG_VERSION")}),
            ),
            "/readyz" => self.readiness().await,
            "/-/reload" if session.req_header().method == http::Method::POST => {
                reload_answer(self.reload.reload().await)
            }
            "/-/reload" => response(
                405,
                "application/json",
                error_body(
                    code::METHOD_NOT_ALLOWED,
                    "reload with POST /-/reload",
                    "",
                    None,
                )
                .to_vec(),
            ),
            _ => response(
                404,
                "application/json",
                error_body(
                    code::NOT_FOUND,
                    "the ops listener serves /metrics, /healthz, /readyz and POST /-/reload",
                    "",
                    None,
                )
                .to_vec(),
            ),
        }
    }
}
