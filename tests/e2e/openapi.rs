//! OpenAPI conformance: real answers of a running gateway, each checked against what
//! `src/management/openapi.json` documents for its operation and status. The document drives the
//! check: operation (path template and method) -> status -> response object (following
//! `$ref`s into `components.responses`) -> its `application/json` schema, validated as
//! JSON Schema 2020-12 (formats included) by a validator over the whole document, so every
//! `#/components/schemas/...` resolves; the response's declared headers are validated too.
//!
//! `KEYGATE_TEST_OPENAPI=<path>` validates against another copy of the document (to see the
//! check fail on a deliberately broken schema without touching `src/`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use jsonschema::{Draft, Registry, Validator};
use reqwest::Method;
use serde_json::{Value, json};

use crate::common::management::*;
use crate::common::*;

/// The URI the document is registered under, for `$ref`s into it.
const DOC_URI: &str = "https://keygate.test/openapi.json";

/// Management limits small enough to reach 429 with a key (the admin is exempt), and
/// sign-up on.
const SECTIONS: &str = "[management.limits]\ncreate_per_hour = 2\nlist_per_minute = 1000\nrevoke_per_minute = 1000\n\n[signup]\nenabled = true\nper_client_per_hour = 10\n";

/// A well-formed ULID no store holds.
const UNKNOWN_ID: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";

fn source_document() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/management/openapi.json");
    let text = std::fs::read_to_string(&path).expect("src/management/openapi.json");
    serde_json::from_str(&text).expect("src/management/openapi.json is JSON")
}

/// `~` and `/` escaped for a JSON pointer token.
fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// A JSON pointer as a URI fragment.
fn fragment(pointer: &str) -> String {
    pointer
        .replace('%', "%25")
        .replace('{', "%7B")
        .replace('}', "%7D")
}

/// The OpenAPI document, with a JSON Schema registry over all of it.
struct Spec {
    doc: Value,
    registry: Registry<'static>,
}

/// One real answer, with the operation (e.g. `POST /keys/{id}/rotate`) that produced it.
struct Exchange {
    method: Method,
    template: &'static str,
    reply: Reply,
}

impl Exchange {
    fn operation(&self) -> String {
        format!("{} {}", self.method, self.template)
    }
}

impl Spec {
    /// `src/management/openapi.json`, or the copy `KEYGATE_TEST_OPENAPI` names.
    fn load() -> Spec {
        let Some(path) = std::env::var_os("KEYGATE_TEST_OPENAPI").map(PathBuf::from) else {
            return Spec::from_doc(source_document());
        };
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("KEYGATE_TEST_OPENAPI {}: {e}", path.display()));
        Spec::from_doc(serde_json::from_str(&text).expect("the document is JSON"))
    }

    fn from_doc(doc: Value) -> Spec {
        let resource = Draft::Draft202012.create_resource(doc.clone());
        let registry = Registry::new()
            .draft(Draft::Draft202012)
            .add(DOC_URI, resource)
            .expect("the document's URI")
            .prepare()
            .expect("a registry over the document");
        Spec { doc, registry }
    }

    fn at(&self, pointer: &str) -> &Value {
        self.doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("the document has nothing at {pointer}"))
    }

    /// A validator for the schema at `pointer` in the document.
    fn validator(&self, pointer: &str) -> Validator {
        jsonschema::options()
            .with_draft(Draft::Draft202012)
            .should_validate_formats(true)
            .with_registry(&self.registry)
            .build(&json!({ "$ref": format!("{DOC_URI}#{}", fragment(pointer)) }))
            .unwrap_or_else(|e| panic!("no validator for {pointer}: {e}"))
    }

    /// The pointer of the response object the document gives for `exchange`: the
    /// operation's response for its status (a `$ref` followed), or, for a method the path
    /// does not serve, the component response that documents the answer's error code.
    fn response_pointer(&self, exchange: &Exchange) -> Result<String, String> {
        let path = format!("/paths/{}", pointer_token(exchange.template));
        if self.doc.pointer(&path).is_none() {
            return Err(format!("the document has no path {}", exchange.template));
        }
        let method = exchange.method.as_str().to_ascii_lowercase();
        if self.doc.pointer(&format!("{path}/{method}")).is_none() {
            let code = exchange.reply.json["error"]["code"].as_str().unwrap_or("");
            return self.component_response_for_code(code).ok_or_else(|| {
                format!(
                    "{}: no operation, and no response documents {code:?}",
                    exchange.operation()
                )
            });
        }
        let pointer = format!("{path}/{method}/responses/{}", exchange.reply.status);
        let Some(response) = self.doc.pointer(&pointer) else {
            return Err(format!(
                "{} does not document status {}",
                exchange.operation(),
                exchange.reply.status
            ));
        };
        Ok(match response["$ref"].as_str() {
            Some(reference) => reference.trim_start_matches('#').to_string(),
            None => pointer,
        })
    }

    /// The `components.responses` entry whose description names `` `code` ``.
    fn component_response_for_code(&self, code: &str) -> Option<String> {
        let responses = self.at("/components/responses").as_object()?;
        responses
            .iter()
            .find(|(_, r)| {
                r["description"]
                    .as_str()
                    .is_some_and(|d| d.contains(&format!("`{code}`")))
            })
            .map(|(name, _)| format!("/components/responses/{}", pointer_token(name)))
    }

    /// Every way `exchange` departs from the document (empty when it conforms).
    fn problems(&self, exchange: &Exchange) -> Vec<String> {
        let what = format!("{} -> {}", exchange.operation(), exchange.reply.status);
        let pointer = match self.response_pointer(exchange) {
            Ok(pointer) => pointer,
            Err(why) => return vec![format!("{what}: {why}")],
        };
        let mut problems = Vec::new();
        let schema = format!("{pointer}/content/application~1json/schema");
        if self.doc.pointer(&format!("{pointer}/content")).is_none() {
            // A response documented without content must have none.
            if !exchange.reply.bytes.is_empty() {
                problems.push(format!(
                    "{what}: {pointer} documents no body, the answer has {} bytes",
                    exchange.reply.bytes.len()
                ));
            }
        } else if self.doc.pointer(&schema).is_none() {
            problems.push(format!(
                "{what}: {pointer} documents no application/json body"
            ));
        } else {
            let validator = self.validator(&schema);
            for error in validator.iter_errors(&exchange.reply.json) {
                problems.push(format!(
                    "{what}: body at {:?} breaks {pointer}: {error}",
                    error.instance_path().as_str()
                ));
            }
        }
        problems.extend(self.error_code_problems(exchange, &pointer, &what));
        problems.extend(self.header_problems(exchange, &pointer, &what));
        problems
    }

    /// An error answer's code must be one its response object's description names.
    fn error_code_problems(&self, exchange: &Exchange, pointer: &str, what: &str) -> Vec<String> {
        if exchange.reply.status < 400 {
            return Vec::new();
        }
        let code = exchange.reply.json["error"]["code"].as_str().unwrap_or("");
        let description = self.at(pointer)["description"].as_str().unwrap_or("");
        if description.contains(&format!("`{code}`")) {
            Vec::new()
        } else {
            vec![format!(
                "{what}: error code {code:?} is not among those {pointer} documents"
            )]
        }
    }

    /// Every header the response object declares that the answer carries must match its
    /// schema; a 405's `Allow` must list exactly the methods the document gives the path.
    fn header_problems(&self, exchange: &Exchange, pointer: &str, what: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let declared = self.at(pointer)["headers"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for (name, header) in &declared {
            let Some(value) = exchange.reply.header(name) else {
                continue;
            };
            let header_pointer = match header["$ref"].as_str() {
                Some(reference) => reference.trim_start_matches('#').to_string(),
                None => format!("{pointer}/headers/{}", pointer_token(name)),
            };
            let schema = self.at(&format!("{header_pointer}/schema"));
            let instance = match schema["type"].as_str() {
                Some("integer") => value.parse::<i64>().map_or(json!(value), |n| json!(n)),
                _ => json!(value),
            };
            let validator = self.validator(&format!("{header_pointer}/schema"));
            for error in validator.iter_errors(&instance) {
                problems.push(format!("{what}: header {name}: {value:?}: {error}"));
            }
        }
        if exchange.reply.status == 405 {
            problems.extend(self.allow_problems(exchange, what));
        }
        problems
    }

    fn allow_problems(&self, exchange: &Exchange, what: &str) -> Vec<String> {
        let path = format!("/paths/{}", pointer_token(exchange.template));
        let documented: BTreeSet<String> = self
            .at(&path)
            .as_object()
            .into_iter()
            .flat_map(|item| item.keys())
            .filter(|k| {
                ["get", "put", "post", "delete", "patch", "options", "head"].contains(&k.as_str())
            })
            .map(|k| k.to_ascii_uppercase())
            .collect();
        let allowed: BTreeSet<String> = exchange
            .reply
            .header("allow")
            .unwrap_or_default()
            .split(',')
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        if allowed == documented {
            Vec::new()
        } else {
            vec![format!(
                "{what}: Allow {allowed:?}, the document has {documented:?}"
            )]
        }
    }

    /// Asserts every exchange conforms, listing every problem found.
    fn assert_conform(&self, exchanges: &[Exchange]) {
        for exchange in exchanges {
            eprintln!(
                "checked: {} -> {}",
                exchange.operation(),
                exchange.reply.status
            );
        }
        let problems: Vec<String> = exchanges.iter().flat_map(|e| self.problems(e)).collect();
        assert!(
            problems.is_empty(),
            "{} of {} answers depart from the OpenAPI document:\n{}",
            problems.len(),
            exchanges.len(),
            problems.join("\n")
        );
    }

    /// Every success status the document gives each operation, as (operation, status).
    fn documented_successes(&self) -> BTreeSet<(String, u16)> {
        let mut out = BTreeSet::new();
        for (path, item) in self.at("/paths").as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("path item") {
                let Some(responses) = operation["responses"].as_object() else {
                    continue;
                };
                for status in responses.keys().filter_map(|s| s.parse::<u16>().ok()) {
                    if status < 300 {
                        out.insert((format!("{} {path}", method.to_ascii_uppercase()), status));
                    }
                }
            }
        }
        out
    }
}

/// Sends management requests through an `Env` and keeps every answer for the check.
struct Recorder<'a> {
    env: &'a Env,
    exchanges: Vec<Exchange>,
}

impl Recorder<'_> {
    /// `method path` (an instance of `template`); returns the answer's JSON.
    async fn send(
        &mut self,
        method: Method,
        template: &'static str,
        path: &str,
        cred: Cred<'_>,
        body: Body,
    ) -> Value {
        let reply = self.env.send(method.clone(), path, cred, body).await;
        let json = reply.json.clone();
        self.exchanges.push(Exchange {
            method,
            template,
            reply,
        });
        json
    }

    async fn get(&mut self, template: &'static str, path: &str, cred: Cred<'_>) -> Value {
        self.send(Method::GET, template, path, cred, Body::None)
            .await
    }

    async fn post(
        &mut self,
        template: &'static str,
        path: &str,
        cred: Cred<'_>,
        body: Body,
    ) -> Value {
        self.send(Method::POST, template, path, cred, body).await
    }

    async fn delete(&mut self, template: &'static str, path: &str, cred: Cred<'_>) -> Value {
        self.send(Method::DELETE, template, path, cred, Body::None)
            .await
    }

    /// As `send`, for an answer that is not a management answer (a forward-auth decision
    /// has no body): `headers` are added, nothing is asserted of the answer.
    async fn send_unchecked(
        &mut self,
        template: &'static str,
        path: &str,
        headers: &[(&str, &str)],
    ) {
        let url = format!("{}/_keygate{path}", self.env.config.base_url());
        let mut req = self.env.http.get(url);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req.send().await.expect("request");
        let reply = Reply::read(format!("GET {path}"), resp).await;
        self.exchanges.push(Exchange {
            method: Method::GET,
            template,
            reply,
        });
    }

    fn last(&self) -> &Reply {
        &self.exchanges.last().expect("an exchange").reply
    }

    /// The (operation, status) pairs exercised.
    fn covered(&self) -> BTreeSet<(String, u16)> {
        self.exchanges
            .iter()
            .map(|e| (e.operation(), e.reply.status))
            .collect()
    }
}

/// Creates a key as the admin (with every optional field) and one with it, reads and lists
/// them; returns the first key's id and raw key.
async fn create_and_read(r: &mut Recorder<'_>) -> (String, String) {
    let body = json!({
        "owner": "alice@example.com",
        "name": "ci",
        "scopes": ["keys:manage", "read"],
        "ttl_seconds": 86_400,
        "rate_limit": {"requests": 100, "window_seconds": 60},
        "metadata": {"team": "core", "n": 3}
    });
    let created = r
        .post("/keys", "/keys", Cred::Admin, Body::Json(body))
        .await;
    assert_eq!(r.last().status, 201, "{}", r.last().text);
    let id = id_of(&created);
    let key = created["key"].as_str().expect("key").to_string();
    r.env.assert_admitted(&key, "the new key").await;
    r.post("/keys", "/keys", Cred::Key(&key), Body::None).await;
    let record = format!("/keys/{id}");
    r.get("/keys/{id}", &record, Cred::Admin).await;
    r.get("/keys/{id}", &record, Cred::Key(&key)).await;
    r.get("/keys", "/keys?limit=1", Cred::Admin).await;
    r.get("/keys", "/keys?owner=alice@example.com", Cred::Key(&key))
        .await;
    r.get(
        "/keys",
        "/keys?state=active&name=ci&scope=read",
        Cred::Admin,
    )
    .await;
    assert_eq!(r.last().json["data"][0]["id"], id.as_str());
    let change = json!({
        "name": "ci-2",
        "allowed_ips": ["127.0.0.0/8", "2001:db8::/32"],
        "metadata": null,
        "expires_at": null
    });
    r.send(
        Method::PATCH,
        "/keys/{id}",
        &record,
        Cred::Admin,
        Body::Json(change),
    )
    .await;
    assert_eq!(r.last().status, 200, "{}", r.last().text);
    let bounded = json!({"rate_limit": {"requests": 50, "window_seconds": 60}});
    r.send(
        Method::PATCH,
        "/keys/{id}",
        &record,
        Cred::Key(&key),
        Body::Json(bounded),
    )
    .await;
    assert_eq!(r.last().status, 200, "{}", r.last().text);
    (id, key)
}

/// Rotates and revokes (by id and by value) a key made by `key`, signs up, and reads the
/// audit log and the document.
async fn rotate_revoke_and_the_rest(r: &mut Recorder<'_>, key: &str) {
    let child = r.post("/keys", "/keys", Cred::Key(key), Body::None).await;
    let child = format!("/keys/{}", id_of(&child));
    let grace = Body::Json(json!({"grace_seconds": 60}));
    let rotated = r
        .post(
            "/keys/{id}/rotate",
            &format!("{child}/rotate"),
            Cred::Admin,
            grace,
        )
        .await;
    let quota = Body::Json(json!({"owner": "alice", "quota": {"requests": 9, "period": "month"}}));
    let metered = r.post("/keys", "/keys", Cred::Admin, quota).await;
    let refill = format!("/keys/{}/quota/refill", id_of(&metered));
    r.post("/keys/{id}/quota/refill", &refill, Cred::Admin, Body::None)
        .await;
    r.post(
        "/keys/{id}/quota/refill",
        &refill,
        Cred::Key(key),
        Body::None,
    )
    .await;
    let none = format!("/keys/{}/quota/refill", &child["/keys/".len()..]);
    r.post("/keys/{id}/quota/refill", &none, Cred::Admin, Body::None)
        .await;
    let by_value = Body::Json(json!({"key": rotated["key"]}));
    r.post("/keys/revoke", "/keys/revoke", Cred::Key(key), by_value)
        .await;
    r.delete("/keys/{id}", &child, Cred::Admin).await;
    let name = Body::Json(json!({"name": "mine"}));
    r.post("/signup", "/signup", Cred::None, name).await;
    r.get("/audit", "/audit?limit=2", Cred::Admin).await;
    r.get("/openapi.json", "/openapi.json", Cred::None).await;
    let verify = Body::Json(json!({"key": key, "scopes": ["read"]}));
    r.post("/keys/verify", "/keys/verify", Cred::Admin, verify)
        .await;
    let unknown = Body::Json(json!({"key": "kg_nope"}));
    r.post("/keys/verify", "/keys/verify", Cred::Admin, unknown)
        .await;
    let original = [("x-forwarded-uri", "/items?page=1"), ("x-api-key", key)];
    r.send_unchecked("/authorize", "/authorize", &original)
        .await;
    assert_eq!(r.last().status, 200, "{}", r.last().text);
    r.send_unchecked(
        "/authorize/{original}",
        "/authorize/items",
        &[("x-api-key", key)],
    )
    .await;
    r.send_unchecked("/authorize", "/authorize", &[("x-forwarded-uri", "/items")])
        .await;
    assert_eq!(r.last().status, 401, "{}", r.last().text);
}

/// The check is not vacuous: a real record without a required property, and a real record
/// against a document that requires one more property, are both reported.
fn assert_the_check_can_fail(spec: &Spec, exchanges: &[Exchange]) {
    let created = exchanges
        .iter()
        .find(|e| e.reply.status == 201 && e.template == "/keys")
        .expect("a created key");
    let mut without_key = created.reply.json.clone();
    without_key.as_object_mut().expect("record").remove("key");
    let broken = Exchange {
        method: created.method.clone(),
        template: created.template,
        reply: Reply {
            json: without_key,
            ..created.reply.clone()
        },
    };
    let problems = spec.problems(&broken);
    assert!(
        problems.iter().any(|p| p.contains("key")),
        "a created key without `key` passed: {problems:?}"
    );
    let mut doc = spec.doc.clone();
    doc["components"]["schemas"]["KeyRecord"]["required"]
        .as_array_mut()
        .expect("KeyRecord.required")
        .push(json!("not_a_field"));
    let stricter = Spec::from_doc(doc);
    let fetched = exchanges
        .iter()
        .find(|e| e.template == "/keys/{id}" && e.method == Method::GET)
        .expect("a fetched record");
    let problems = stricter.problems(fetched);
    assert!(
        problems.iter().any(|p| p.contains("not_a_field")),
        "a record passed a schema requiring `not_a_field`: {problems:?}"
    );
}

/// Every documented success answer, from a real gateway, matches its schema: a created key
/// record (201, with `key`), created by the admin and by a manager key, a fetched record, a
/// list page (with and without a next cursor), an audit page, a rotation, both revokes,
/// a sign-up and the document itself.
#[tokio::test]
async fn success_answers_match_the_document() {
    let spec = Spec::load();
    let env = Env::start(SECTIONS).await;
    let mut recorder = Recorder {
        env: &env,
        exchanges: Vec::new(),
    };
    let (_, key) = create_and_read(&mut recorder).await;
    rotate_revoke_and_the_rest(&mut recorder, &key).await;
    spec.assert_conform(&recorder.exchanges);
    let missing: Vec<_> = spec
        .documented_successes()
        .difference(&recorder.covered())
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "documented successes never exercised: {missing:?}"
    );
    assert_the_check_can_fail(&spec, &recorder.exchanges);
}

/// Refusals for credentials, scope, unknown keys and methods, sent through `r`.
async fn auth_and_routing_errors(r: &mut Recorder<'_>, manager: &str, plain: &str) {
    r.get("/keys", "/keys", Cred::None).await;
    r.get("/keys", "/keys", Cred::Bearer("not-the-token")).await;
    r.get("/keys", "/keys", Cred::Key(plain)).await;
    r.get("/audit", "/audit", Cred::Key(manager)).await;
    let unknown = format!("/keys/{UNKNOWN_ID}");
    r.get("/keys/{id}", &unknown, Cred::Admin).await;
    r.delete("/keys/{id}", &unknown, Cred::Admin).await;
    let junk = Body::Json(json!({"key": "kg_nope"}));
    r.post("/keys/revoke", "/keys/revoke", Cred::Admin, junk)
        .await;
    r.send(Method::PUT, "/keys", "/keys", Cred::Admin, Body::None)
        .await;
    r.get("/keys/revoke", "/keys/revoke", Cred::Admin).await;
    r.delete("/audit", "/audit", Cred::Admin).await;
    for _ in 0..3 {
        r.post("/keys", "/keys", Cred::Key(manager), Body::None)
            .await;
    }
}

/// Refusals for bodies, parameters and the key's state (rotated, revoked), sent through `r`.
async fn body_and_state_errors(r: &mut Recorder<'_>, plain_id: &str) {
    let raw = |bytes: &[u8]| Body::Raw(bytes.to_vec(), "application/json");
    r.post("/keys", "/keys", Cred::Admin, raw(b"{")).await;
    let pad = "x".repeat(70 * 1024);
    let big = format!("{{\"owner\": \"alice\", \"metadata\": {{\"pad\": \"{pad}\"}}}}");
    r.post("/keys", "/keys", Cred::Admin, raw(big.as_bytes()))
        .await;
    let invalid = Body::Json(json!({"owner": "alice", "name": "", "bogus": 1}));
    r.post("/keys", "/keys", Cred::Admin, invalid).await;
    r.get("/keys", "/keys?limit=0", Cred::Admin).await;
    r.get("/audit", "/audit?cursor=nope", Cred::Admin).await;
    let rotate = format!("/keys/{plain_id}/rotate");
    let grace = Body::Json(json!({"grace_seconds": -1}));
    r.post("/keys/{id}/rotate", &rotate, Cred::Admin, grace)
        .await;
    let successor = r
        .post("/keys/{id}/rotate", &rotate, Cred::Admin, Body::None)
        .await;
    r.post("/keys/{id}/rotate", &rotate, Cred::Admin, Body::None)
        .await;
    let successor = format!("/keys/{}", id_of(&successor));
    r.delete("/keys/{id}", &successor, Cred::Admin).await;
    let rotate = format!("{successor}/rotate");
    r.post("/keys/{id}/rotate", &rotate, Cred::Admin, Body::None)
        .await;
    let change = Body::Json(json!({"name": "x"}));
    r.send(Method::PATCH, "/keys/{id}", &successor, Cred::Admin, change)
        .await;
    let bad = Body::Json(json!({"allowed_ips": ["nope"], "quota": {"requests": 1}}));
    let plain = format!("/keys/{plain_id}");
    r.send(Method::PATCH, "/keys/{id}", &plain, Cred::Admin, bad)
        .await;
    r.get("/keys", "/keys?state=nope", Cred::Admin).await;
}

/// Error answers (400, 401, 403, 404, 405, 409, 413, 422, 429) from a real gateway match
/// the responses the document gives for their operation and status, codes included.
#[tokio::test]
async fn error_answers_match_the_document() {
    let spec = Spec::load();
    let env = Env::start(SECTIONS).await;
    let (_, manager) = env.admin_create("alice", &["keys:manage", "read"]).await;
    let (plain, plain_key) = env.admin_create("alice", &["read"]).await;
    let mut r = Recorder {
        env: &env,
        exchanges: Vec::new(),
    };
    auth_and_routing_errors(&mut r, &manager, &plain_key).await;
    body_and_state_errors(&mut r, &id_of(&plain)).await;
    spec.assert_conform(&r.exchanges);
    let statuses: BTreeSet<u16> = r.exchanges.iter().map(|e| e.reply.status).collect();
    let wanted: BTreeSet<u16> = [400, 401, 403, 404, 405, 409, 413, 422, 429].into();
    assert!(
        wanted.is_subset(&statuses),
        "statuses never exercised: {:?}",
        wanted.difference(&statuses).collect::<Vec<_>>()
    );
}

/// `GET /openapi.json` serves `src/management/openapi.json`: as it is while sign-up is
/// on, without `/signup` while it is off (contract section 13).
#[tokio::test]
async fn the_served_document_is_the_source_document() {
    let on = Env::start(&format!("{GENEROUS}[signup]\nenabled = true\n")).await;
    let served = on.get("/openapi.json", Cred::None).await;
    assert_eq!(served.ok(200), &source_document());
    let off = Env::start(GENEROUS).await;
    let served = off.get("/openapi.json", Cred::None).await;
    let mut expected = source_document();
    let removed = expected["paths"]
        .as_object_mut()
        .and_then(|paths| paths.remove("/signup"));
    assert!(removed.is_some(), "the source document documents /signup");
    assert_eq!(served.ok(200), &expected);
}
