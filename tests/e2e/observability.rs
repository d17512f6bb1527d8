//! Metrics, the access log, secrets and the Grafana dashboard, checked against a running
//! gateway.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::common::raw::find;
use crate::common::*;

const ADMIN: &str = "observability-admin-token-3f9a-p";

/// Parses Prometheus text into (series with labels) -> value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn family_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn value(metrics: &BTreeMap<String, f64>, series: &str) -> f64 {
    *metrics
        .get(series)
        .unwrap_or_else(|| panic!("series {series} missing"))
}

/// Every metric name the dashboard's queries use.
fn dashboard_metric_names(dashboard: &str) -> BTreeSet<String> {
    let doc: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard JSON");
    let mut exprs = Vec::new();
    collect_exprs(&doc, &mut exprs);
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    let mut names = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("keygate_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn contract_families() -> Vec<&'static str> {
    vec![
        "keygate_requests_total",
        "keygate_request_duration_seconds",
        "keygate_auth_duration_seconds",
        "keygate_upstream_responses_total",
        "keygate_upstream_healthy",
        "keygate_key_cache_lookups_total",
        "keygate_keys",
        "keygate_usage_pending",
        "keygate_usage_flush_duration_seconds",
        "keygate_usage_flush_errors_total",
        "keygate_management_requests_total",
        "keygate_build_info",
        "keygate_config_reloads_total",
        "keygate_config_last_reload_successful",
        "keygate_config_last_reload_success_timestamp_seconds",
        "keygate_ratelimit_backend_errors_total",
        "keygate_ratelimit_redis_duration_seconds",
    ]
}

/// A gateway with a required route, a scope-guarded route, a rate-limited route and a
/// public route, plus keys: (config, upstream, gateway, full key, limited key, expired key).
async fn observed_gateway() -> (GatewayConfig, Upstream, Gateway, String, String, String) {
    let upstream = Upstream::start("u").await;
    let a = upstream.addr;
    let config = GatewayConfig::with_routes(&format!(
        r#"
[[routes]]
name = "api"
path_prefix = "/api"
upstreams = ["{a}"]
[[routes]]
name = "admin"
path_prefix = "/admin"
upstreams = ["{a}"]
scopes = ["admin"]
[[routes]]
name = "limited"
path_prefix = "/limited"
upstreams = ["{a}"]
rate_limit = {{ requests = 1, window_seconds = 3600 }}
[[routes]]
name = "public"
path_prefix = "/public"
upstreams = ["{a}"]
auth = "none"
"#
    ));
    config.write();
    let (_, key) = create_key(&config.path(), "alice", &["read"], None);
    let (_, limited) = create_key(&config.path(), "bob", &[], None);
    let (_, expired) = create_key(&config.path(), "carol", &[], Some(1));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let gateway = Gateway::start_with_env(&config, &[("KEYGATE_ADMIN_TOKEN", ADMIN)]).await;
    (config, upstream, gateway, key, limited, expired)
}

/// One request of each outcome; returns the keys seen in the traffic.
async fn traffic_of_every_outcome(base: &str, key: &str, limited: &str, expired: &str) -> String {
    let c = client();
    let get = |path: &str| c.get(format!("{base}{path}"));
    let format = keygate::keys::KeyFormat::new("kg");
    let unknown = format.generate().expect("rng");
    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        (get("/api/x").header("x-api-key", key), 200),
        (get("/api/x").bearer_auth(key), 200),
        (get("/api/x"), 401),
        (get("/api/x").header("x-api-key", "kg_short"), 401),
        (get("/api/x").header("x-api-key", &unknown), 401),
        (get("/api/x").header("x-api-key", &unknown), 401),
        (get("/api/x").header("x-api-key", expired), 401),
        (get("/admin/x").header("key", key), 403),
        (get("/limited/x").header("x-api-key", limited), 200),
        (get("/limited/x").header("x-api-key", limited), 429),
        (
            get("/api/x")
                .header("x-api-key", key)
                .header("key", limited),
            400,
        ),
        (get("/elsewhere"), 404),
        (get("/public/x"), 200),
        // A key put in the query string by mistake must not reach the logs either.
        (
            get(&format!("/api/x?api_key={key}")).header("x-api-key", key),
            200,
        ),
    ];
    for (request, expected) in cases {
        let resp = request.send().await.expect("request");
        assert_eq!(resp.status().as_u16(), expected);
    }
    let resp = c
        .get(format!("{base}/_keygate/keys"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("management call");
    assert_eq!(resp.status(), 200);
    unknown
}

#[tokio::test]
async fn every_family_is_exported_with_traffic_counted() {
    let (_config, _upstream, gateway, key, limited, expired) = observed_gateway().await;
    traffic_of_every_outcome(&gateway.base, &key, &limited, &expired).await;
    // Let a usage flush run so its histogram has an observation.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let text = scrape_metrics(&gateway.admin).await;
    let families = family_names(&text);
    for family in contract_families() {
        assert!(families.contains(family), "family {family} missing");
    }
    let m = parse_metrics(&text);
    for (route, outcome, at_least) in [
        ("api", "allowed", 3.0),
        ("api", "missing_credentials", 1.0),
        ("api", "invalid_key", 3.0),
        ("api", "key_expired", 1.0),
        ("admin", "insufficient_scope", 1.0),
        ("limited", "allowed", 1.0),
        ("limited", "rate_limited", 1.0),
        ("api", "bad_request", 1.0),
        ("_none", "no_route", 1.0),
        ("public", "public", 1.0),
    ] {
        let series = format!("keygate_requests_total{{outcome=\"{outcome}\",route=\"{route}\"}}");
        assert!(value(&m, &series) >= at_least, "{series}");
    }
    assert!(
        value(
            &m,
            "keygate_upstream_responses_total{route=\"api\",status_class=\"2xx\"}"
        ) >= 3.0
    );
    let upstream_label = format!(
        "keygate_upstream_healthy{{route=\"api\",upstream=\"{}\"}}",
        _upstream.addr
    );
    assert_eq!(value(&m, &upstream_label), 1.0);
    assert!(value(&m, "keygate_key_cache_lookups_total{result=\"hit\"}") >= 1.0);
    assert!(value(&m, "keygate_key_cache_lookups_total{result=\"miss\"}") >= 1.0);
    assert!(
        value(
            &m,
            "keygate_key_cache_lookups_total{result=\"negative_hit\"}"
        ) >= 1.0
    );
    assert_eq!(value(&m, "keygate_keys"), 3.0);
    assert!(value(&m, "keygate_auth_duration_seconds_count") >= 8.0);
    assert!(value(&m, "keygate_request_duration_seconds_count{route=\"api\"}") >= 8.0);
    assert!(value(&m, "keygate_usage_flush_duration_seconds_count") >= 1.0);
    assert_eq!(value(&m, "keygate_usage_flush_errors_total"), 0.0);
    assert!(
        value(
            &m,
            "keygate_management_requests_total{operation=\"list\",status=\"200\"}"
        ) >= 1.0
    );
    assert_eq!(
        value(
            &m,
            &format!(
                "keygate_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );

    promtool_agrees_where_installed(&text);
}

/// promtool, where installed, agrees the exposition is well-formed.
fn promtool_agrees_where_installed(text: &str) {
    // promtool, where installed, agrees the exposition is well-formed.
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write to promtool");
        let out = child.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn health_and_readiness() {
    let upstream = Upstream::start("u").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    let gateway = Gateway::start(&config).await;
    let c = client();
    let healthz = c
        .get(format!("{}/healthz", gateway.admin))
        .send()
        .await
        .expect("healthz");
    assert_eq!(healthz.status(), 200);
    let readyz = c
        .get(format!("{}/readyz", gateway.admin))
        .send()
        .await
        .expect("readyz");
    assert_eq!(readyz.status(), 200);
    upstream.stop();
    drop(upstream);
    let admin = gateway.admin.clone();
    let not_ready = eventually(Duration::from_secs(5), || {
        let c = c.clone();
        let admin = admin.clone();
        async move {
            c.get(format!("{admin}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 503)
        }
    })
    .await;
    assert!(
        not_ready,
        "/readyz must fail once no route has a healthy upstream"
    );
    let healthz = c
        .get(format!("{}/healthz", gateway.admin))
        .send()
        .await
        .expect("healthz");
    assert_eq!(healthz.status(), 200, "the process is still up");
}

#[tokio::test]
async fn no_secret_in_logs_metrics_or_store() {
    let (config, _upstream, mut gateway, key, limited, expired) = observed_gateway().await;
    let unknown = traffic_of_every_outcome(&gateway.base, &key, &limited, &expired).await;

    let (api_key, rotated_key) = management_traffic_with_secrets(&gateway.base).await;

    let metrics = scrape_metrics(&gateway.admin).await;
    assert!(gateway.stop());

    let secrets = [
        key.as_str(),
        limited.as_str(),
        expired.as_str(),
        unknown.as_str(),
        api_key.as_str(),
        rotated_key.as_str(),
        ADMIN,
    ];
    let access_log = std::fs::read(config.access_log_path()).expect("access log");
    assert!(
        access_log.len() > 1000,
        "the access log should hold the traffic ({} bytes)",
        access_log.len()
    );
    let first_line: serde_json::Value =
        serde_json::from_slice(access_log.split(|b| *b == b'\n').next().expect("a line"))
            .expect("access log lines are JSON");
    for field in [
        "request_id",
        "route",
        "method",
        "path",
        "status",
        "outcome",
        "duration_ms",
    ] {
        assert!(
            first_line.get(field).is_some(),
            "access log field {field} missing"
        );
    }
    assert!(
        find(&access_log, b"api_key=").is_none(),
        "query strings are not logged"
    );

    let mut files = vec![
        config.access_log_path(),
        config.dir.path().join("stderr.log"),
        config.path(),
    ];
    files_under(&config.store_path(), &mut files);
    assert!(files.len() > 3, "the store directory has files");
    for secret in secrets {
        assert!(!metrics.contains(secret), "secret in /metrics");
        for file in &files {
            if file == &config.path() {
                continue;
            }
            let bytes = std::fs::read(file).unwrap_or_default();
            assert!(
                find(&bytes, secret.as_bytes()).is_none(),
                "a secret appears in {}",
                file.display()
            );
        }
    }
}

/// Keys made through the API too (create, rotate, then revoke by value), and a failed admin
/// login; returns the created and the rotated key.
async fn management_traffic_with_secrets(base: &str) -> (String, String) {
    // Keys made through the API too: create, rotate, revoke by value.
    let c = client();
    let created: serde_json::Value = c
        .post(format!("{base}/_keygate/keys"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"owner": "dave", "scopes": ["keys:manage"]}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("JSON");
    let api_key = created["key"].as_str().expect("key").to_string();
    let rotated: serde_json::Value = c
        .post(format!(
            "{}/_keygate/keys/{}/rotate",
            base,
            created["id"].as_str().expect("id")
        ))
        .header("x-api-key", &api_key)
        .json(&serde_json::json!({"grace_seconds": 60}))
        .send()
        .await
        .expect("rotate")
        .json()
        .await
        .expect("JSON");
    let rotated_key = rotated["key"].as_str().expect("key").to_string();
    let resp = c
        .post(format!("{base}/_keygate/keys/revoke"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"key": rotated_key}))
        .send()
        .await
        .expect("revoke by value");
    assert_eq!(resp.status(), 200);
    // A failed admin login must not echo the token attempt either.
    let resp = c
        .get(format!("{base}/_keygate/keys"))
        .bearer_auth(format!("{ADMIN}-wrong"))
        .send()
        .await
        .expect("wrong token");
    assert_eq!(resp.status(), 401);
    (api_key, rotated_key)
}

#[tokio::test]
async fn dashboard_queries_use_only_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard = std::fs::read_to_string(root.join("grafana/dashboards/keygate.json"))
        .expect("dashboard file");
    let used = dashboard_metric_names(&dashboard);

    let upstream = Upstream::start("u").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    let gateway = Gateway::start(&config).await;
    let exported = family_names(&scrape_metrics(&gateway.admin).await);
    for name in &used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| exported.contains(*f)))
            .unwrap_or(name);
        assert!(
            exported.contains(family),
            "the dashboard queries {name}, which keygate does not export"
        );
    }
    for family in contract_families() {
        assert!(
            used.iter().any(|u| u.starts_with(family)),
            "no panel shows {family}"
        );
    }

    // The datasource is a variable, and provisioning points at the dashboard's folder.
    let doc: serde_json::Value = serde_json::from_str(&dashboard).expect("JSON");
    let variables = doc["templating"]["list"].as_array().expect("variables");
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus")
    );
    let provider =
        std::fs::read_to_string(root.join("grafana/provisioning/dashboards/keygate.yml"))
            .expect("dashboard provider");
    assert!(provider.contains("path: /var/lib/grafana/dashboards"));
    assert!(root.join("grafana/dashboards").is_dir());
    let datasource =
        std::fs::read_to_string(root.join("grafana/provisioning/datasources/prometheus.yml"))
            .expect("datasource provisioning");
    assert!(datasource.contains("type: prometheus"));
}
