//! The ops listener (`admin_listen`): `/metrics` (Prometheus text), `/healthz` (the process is up) and
//! `/readyz` (store usable and at least one route with a healthy upstream).

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::error::{code, error_body};
use crate::state::Shared;

pub(crate) struct OpsApp {
    pub shared: Arc<Shared>,
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
        for route in shared.router.routes() {
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
        let healthy_routes: Vec<&str> = self
            .shared
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
            _ => response(
                404,
                "application/json",
                error_body(
                    code::NOT_FOUND,
                    "the ops listener serves /metrics, /healthz and /readyz",
                    "",
                    None,
                )
                .to_vec(),
            ),
        }
    }
}
