//! A gateway with an admin token, driven through the management API (contract sections 3,
//! 5, 6 and 7): every answer is read whole and checked as every management answer must be
//! (`Cache-Control: no-store`, an `x-request-id`, JSON, and from 400 up keygate's error
//! envelope).

use reqwest::Method;
use serde_json::{Value, json};

use super::envelope::{Reply, error_envelope};
use super::{Gateway, GatewayConfig, Upstream, client, create_key, error_code};

/// The admin token of every `Env`.
pub(crate) const ADMIN: &str = "api-test-admin-token-5f1c0e2a-pa";

/// Limits high enough that tests not about them never trip them.
pub(crate) const GENEROUS: &str = "[management.limits]\ncreate_per_hour = 10000\nlist_per_minute = 10000\nrevoke_per_minute = 10000\n";

/// How a request authenticates.
#[derive(Clone, Copy)]
pub(crate) enum Cred<'a> {
    None,
    Admin,
    /// `Authorization: Bearer <token>`, for a wrong admin token or a key.
    Bearer(&'a str),
    /// `x-api-key: <key>`
    Key(&'a str),
    /// `key: <key>`
    KeyHeader(&'a str),
}

pub(crate) enum Body {
    None,
    Json(Value),
    Raw(Vec<u8>, &'static str),
}

/// Asserts what every management answer carries.
fn assert_management_reply(reply: &Reply) {
    let (what, status, text) = (&reply.what, reply.status, &reply.text);
    assert_eq!(
        reply.header("cache-control"),
        Some("no-store"),
        "{what}: Cache-Control ({status}, {text})"
    );
    let request_id = reply.header("x-request-id").unwrap_or_default();
    assert!(!request_id.is_empty(), "{what}: no x-request-id ({status})");
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{what}: Content-Type {:?}",
        reply.header("content-type")
    );
    if let Err(e) = serde_json::from_slice::<Value>(&reply.bytes) {
        panic!("{what}: body is not JSON ({e}): {text}");
    }
    if status >= 400
        && let Err(why) = error_envelope(reply)
    {
        panic!("{what}: {why}");
    }
}

pub(crate) struct Env {
    pub upstream: Upstream,
    pub config: GatewayConfig,
    pub gateway: Gateway,
    pub http: reqwest::Client,
}

impl Env {
    /// A gateway with `sections` (e.g. [management.limits], [signup]) and one route "/" to a
    /// fresh upstream "api", auth required.
    pub(crate) async fn start(sections: &str) -> Env {
        Self::start_with(sections, |_| {}).await
    }

    pub(crate) async fn start_with(sections: &str, tweak: impl FnOnce(&mut GatewayConfig)) -> Env {
        let upstream = Upstream::start("api").await;
        let mut config = Self::config(sections, &upstream);
        tweak(&mut config);
        Self::on(config, upstream).await
    }

    /// The config `start` uses, for tests that prepare the store before starting.
    pub(crate) fn config(sections: &str, upstream: &Upstream) -> GatewayConfig {
        let mut config = GatewayConfig::single_route(&[upstream.addr]);
        config.extra = format!("{sections}\n{}", config.extra);
        config
    }

    /// Starts the gateway on `config` with the admin token.
    pub(crate) async fn on(config: GatewayConfig, upstream: Upstream) -> Env {
        let gateway = Self::start_gateway(&config).await;
        Env {
            upstream,
            config,
            gateway,
            http: client(),
        }
    }

    pub(crate) async fn start_gateway(config: &GatewayConfig) -> Gateway {
        Gateway::start_with_env(config, &[("KEYGATE_ADMIN_TOKEN", ADMIN)]).await
    }

    /// `method <management path><path>`, checked as every management answer must be.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        cred: Cred<'_>,
        body: Body,
    ) -> Reply {
        let what = format!("{method} {path}");
        let mut req = self
            .http
            .request(method, format!("{}/_keygate{path}", self.config.base_url()));
        req = match cred {
            Cred::None => req,
            Cred::Admin => req.bearer_auth(ADMIN),
            Cred::Bearer(t) => req.bearer_auth(t),
            Cred::Key(k) => req.header("x-api-key", k),
            Cred::KeyHeader(k) => req.header("key", k),
        };
        req = match body {
            Body::None => req,
            Body::Json(v) => req.json(&v),
            Body::Raw(bytes, content_type) => req.header("content-type", content_type).body(bytes),
        };
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: request failed: {e:?}"));
        let reply = Reply::read(what, resp).await;
        assert_management_reply(&reply);
        reply
    }

    pub(crate) async fn get(&self, path: &str, cred: Cred<'_>) -> Reply {
        self.send(Method::GET, path, cred, Body::None).await
    }

    pub(crate) async fn post(&self, path: &str, cred: Cred<'_>, body: Value) -> Reply {
        self.send(Method::POST, path, cred, Body::Json(body)).await
    }

    pub(crate) async fn delete(&self, path: &str, cred: Cred<'_>) -> Reply {
        self.send(Method::DELETE, path, cred, Body::None).await
    }

    /// POST /keys that must answer 201; returns (record, raw key).
    pub(crate) async fn create(&self, cred: Cred<'_>, body: Value) -> (Value, String) {
        let reply = self.post("/keys", cred, body).await;
        let record = reply.ok(201).clone();
        let key = record["key"]
            .as_str()
            .unwrap_or_else(|| panic!("no key in {record}"))
            .to_string();
        (record, key)
    }

    /// The admin creates a key for `owner` with `scopes`.
    pub(crate) async fn admin_create(&self, owner: &str, scopes: &[&str]) -> (Value, String) {
        self.create(Cred::Admin, json!({"owner": owner, "scopes": scopes}))
            .await
    }

    /// GET /keys/{id} as the admin, 200.
    pub(crate) async fn record(&self, id: &str) -> Value {
        self.get(&format!("/keys/{id}"), Cred::Admin)
            .await
            .ok(200)
            .clone()
    }

    /// A proxied GET with `key` in x-api-key: (status, error code if keygate refused).
    pub(crate) async fn proxied(&self, key: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("{}/resource", self.config.base_url()))
            .header("x-api-key", key)
            .send()
            .await
            .expect("proxied request");
        if resp.status() == 200 {
            assert_eq!(
                resp.headers()
                    .get("x-upstream")
                    .and_then(|v| v.to_str().ok()),
                Some("api"),
                "a 200 that did not come from the upstream"
            );
            return (200, String::new());
        }
        error_code(resp).await
    }

    pub(crate) async fn assert_admitted(&self, key: &str, what: &str) {
        assert_eq!(self.proxied(key).await, (200, String::new()), "{what}");
    }

    /// Every item of a paginated listing, following `next_cursor`; also returns page sizes.
    pub(crate) async fn all_pages(
        &self,
        path: &str,
        cred: Cred<'_>,
        limit: usize,
    ) -> (Vec<Value>, Vec<usize>) {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut items = Vec::new();
        let mut sizes = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let url = match &cursor {
                None => format!("{path}{sep}limit={limit}"),
                Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
            };
            let page = self.get(&url, cred).await.ok(200).clone();
            let data = page["data"].as_array().expect("data array").clone();
            assert!(data.len() <= limit, "{url}: {} items", data.len());
            sizes.push(data.len());
            items.extend(data);
            match &page["next_cursor"] {
                Value::Null => return (items, sizes),
                Value::String(c) => cursor = Some(c.clone()),
                other => panic!("{url}: next_cursor is {other}"),
            }
        }
        panic!("{path}: more than 100 pages");
    }
}

pub(crate) fn ids(items: &[Value]) -> Vec<String> {
    items.iter().map(id_of).collect()
}

pub(crate) fn id_of(record: &Value) -> String {
    record["id"].as_str().expect("id").to_string()
}

/// RFC 3339 UTC with whole seconds: `YYYY-MM-DDTHH:MM:SSZ`; returns Unix seconds.
pub(crate) fn whole_second_utc(value: &Value, what: &str) -> i64 {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {value}"));
    let shape_ok = text.len() == 20
        && text.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            19 => b == b'Z',
            _ => b.is_ascii_digit(),
        });
    assert!(shape_ok, "{what}: {text:?} is not YYYY-MM-DDTHH:MM:SSZ");
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{what}: {text:?} does not parse: {e}"))
        .unix_timestamp()
}

/// Unix seconds now.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// A key in the right format (valid checksum) that this gateway has never seen: made by the
/// offline CLI on a store of its own.
pub(crate) fn foreign_key() -> String {
    let other = GatewayConfig::single_route(&["127.0.0.1:9".parse().expect("address")]);
    other.write();
    create_key(&other.path(), "stranger", &[], None).1
}

/// The numeric Retry-After of `reply`.
pub(crate) fn retry_after(reply: &Reply) -> u64 {
    reply
        .header("retry-after")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{}: no numeric Retry-After", reply.what))
}
