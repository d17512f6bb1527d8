//! Gateways on a PostgreSQL store, for the multi-instance and outage tests.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use super::*;

/// The admin token every cluster instance is started with.
pub(crate) const ADMIN: &str = "cluster-admin-token-padded-to-32";

/// One `keygate serve` on the PostgreSQL store at `db_url`, one route "/" to `upstream`
/// (WebSockets allowed).
/// Reuses `common::Gateway` for the process (SIGTERM stop, kill on drop) and
/// `common::GatewayConfig` for the temp dir and ports, with our own config text: the
/// common one always writes a sled [store].
pub(crate) struct Instance {
    pub config: GatewayConfig,
    pub gateway: Gateway,
}

impl Instance {
    pub(crate) async fn start(db_url: &str, upstream: SocketAddr) -> Instance {
        Self::start_with(db_url, upstream, "").await
    }

    /// `start`, with `store_extra` (TOML lines) added to its [store].
    pub(crate) async fn start_with(
        db_url: &str,
        upstream: SocketAddr,
        store_extra: &str,
    ) -> Instance {
        Self::start_full(db_url, upstream, store_extra, "", &[]).await
    }

    /// `start_with`, with `sections` (TOML tables such as [ratelimit]) before the route,
    /// and `env` in its environment.
    pub(crate) async fn start_full(
        db_url: &str,
        upstream: SocketAddr,
        store_extra: &str,
        sections: &str,
        env: &[(&str, &str)],
    ) -> Instance {
        let config = GatewayConfig::single_route(&[upstream]);
        let text = format!(
            "[server]\n\
             listen = \"127.0.0.1:{listen}\"\n\
             admin_listen = \"127.0.0.1:{admin}\"\n\
             threads = 2\n\
             shutdown_grace_seconds = 0\n\
             access_log = \"{log}\"\n\
             \n\
             [store]\n\
             backend = \"postgres\"\n\
             url_env = \"KEYGATE_DATABASE_URL\"\n\
             pool_size = 4\n\
             connect_timeout_seconds = 1\n\
             usage_flush_interval_ms = 200\n\
             {store_extra}\n\
             \n\
             [management]\n\
             admin_token_env = \"KEYGATE_ADMIN_TOKEN\"\n\
             \n\
             {sections}\n\
             [[routes]]\n\
             name = \"default\"\n\
             path_prefix = \"/\"\n\
             upstreams = [\"{upstream}\"]\n\
             websocket = true\n\
             health_check_interval_ms = 200\n",
            listen = config.listen,
            admin = config.admin,
            log = config.access_log_path().display(),
        );
        let path = config.path();
        std::fs::write(&path, text).expect("write config");
        let stderr_path = config.dir.path().join("stderr.log");
        let mut command = Command::new(BIN);
        command.envs(env.iter().copied());
        let child = command
            .args(["serve", "--config", path.to_str().expect("utf-8 path")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(&stderr_path).expect("log file"),
            ))
            .env("KEYGATE_DATABASE_URL", db_url)
            .env("KEYGATE_ADMIN_TOKEN", ADMIN)
            .spawn()
            .expect("spawn keygate");
        let mut instance = Instance {
            gateway: Gateway {
                child: Some(child),
                base: config.base_url(),
                admin: config.admin_url(),
            },
            config,
        };
        instance.gateway.wait_ready(&instance.config).await;
        instance.wait_listening().await;
        instance
    }

    /// Waits until the invalidation listener LISTENs: it clears the cache when it starts,
    /// which would otherwise drop keys a test has just cached.
    async fn wait_listening(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let metrics = scrape_metrics(&self.gateway.admin).await;
            if metrics
                .lines()
                .any(|line| line == "keygate_invalidation_listener_connected 1")
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the invalidation listener did not connect; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(self.config.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub(crate) fn base(&self) -> &str {
        &self.gateway.base
    }

    /// SIGTERM and wait; true when it exited successfully.
    pub(crate) fn stop(&mut self) -> bool {
        self.gateway.stop()
    }

    /// POST /_keygate/keys as the admin; (status, body).
    pub(crate) async fn try_create_key(&self, owner: &str) -> (u16, serde_json::Value) {
        let resp = client()
            .post(format!("{}/_keygate/keys", self.base()))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({"owner": owner}))
            .send()
            .await
            .expect("create request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }

    /// Creates a key through the management API; returns (id, raw key).
    pub(crate) async fn create_key(&self, owner: &str) -> (String, String) {
        let (status, body) = self.try_create_key(owner).await;
        assert_eq!(status, 201, "create answered {status}: {body}");
        (
            body["id"].as_str().expect("id").to_string(),
            body["key"].as_str().expect("key").to_string(),
        )
    }

    /// GET /readyz on the admin listener; (status, body).
    pub(crate) async fn readyz(&self) -> (u16, String) {
        let resp = client()
            .get(format!("{}/readyz", self.gateway.admin))
            .send()
            .await
            .expect("readyz request");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    pub(crate) async fn get_key(&self, id: &str) -> serde_json::Value {
        let resp = client()
            .get(format!("{}/_keygate/keys/{id}", self.base()))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("get request");
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        assert_eq!(status, 200, "GET key answered {status}: {body}");
        body
    }

    /// `keygate_key_cache_lookups_total{result="hit"}` on this instance.
    pub(crate) async fn cache_hits(&self) -> u64 {
        let text = client()
            .get(format!("{}/metrics", self.gateway.admin))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .find(|line| {
                line.starts_with("keygate_key_cache_lookups_total")
                    && line.contains("result=\"hit\"")
            })
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<f64>().ok())
            .map_or(0, |value| value as u64)
    }

    /// One proxied request with `key`; (status, error code or "").
    pub(crate) async fn call(&self, key: &str) -> (u16, String) {
        let resp = client()
            .get(format!("{}/work", self.base()))
            .header("x-api-key", key)
            .send()
            .await
            .expect("proxied request");
        error_code(resp).await
    }
}
