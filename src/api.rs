//! The management API, mounted under `management.path` on the proxy listener. Handlers
//! return `Result<Reply, ApiError>`; `serve` is the one place that writes the answer.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method};
use pingora::proxy::Session;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ManagementLimits;
use crate::error::{GatewayError, error_body};
use crate::gateway::{Gateway, RequestCtx, unix_now};
use crate::keys::{KeyHash, KeyRecord, RateLimit};
use crate::ratelimit::{Decision, KeyedLimiter};
use crate::respond::{self, Reply};
use crate::service::{
    Actor, DEFAULT_NAME, FieldErrors, KeyView, MAX_GRACE_SECONDS, MAX_TTL_SECONDS, NewKey,
    ServiceError, parse_rfc3339, rfc3339, validate_new_key,
};
use crate::store::{CachedKey, StoreError};

/// Largest accepted body.
pub const MAX_BODY: usize = 64 * 1024;
const MANAGE_SCOPE: &str = "keys:manage";
const OPENAPI: &str = include_str!("openapi.json");

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Auth(GatewayError),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    #[error("the body exceeds 64 KiB")]
    PayloadTooLarge,
    #[error("{0}")]
    InvalidJson(String),
    #[error("validation failed")]
    Validation(FieldErrors),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{1}")]
    Conflict(&'static str, &'static str),
    #[error("rate limited")]
    RateLimited(u64),
    #[error("store unavailable")]
    StoreUnavailable,
    #[error("internal error")]
    Internal,
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid(details) => ApiError::Validation(details),
            ServiceError::Store(StoreError::Duplicate) | ServiceError::Random => {
                tracing::error!(error = %e, "key creation failed");
                ApiError::Internal
            }
            ServiceError::Store(e) => {
                tracing::error!(error = %e, "store operation failed");
                ApiError::StoreUnavailable
            }
        }
    }
}

impl ApiError {
    /// The `error.code` of the answer (also logged in the access log).
    fn code(&self) -> &'static str {
        match self {
            ApiError::Auth(e) => e.code(),
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::Validation(_) => "validation_failed",
            ApiError::Forbidden(_) => "insufficient_scope",
            ApiError::Conflict(code, _) => code,
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::StoreUnavailable => "store_unavailable",
            ApiError::Internal => "internal_error",
        }
    }

    fn reply(&self, request_id: &str) -> Reply {
        let code = self.code();
        let plain = |status, message: &str| {
            Reply::json(status, error_body(code, message, request_id, None))
        };
        match self {
            ApiError::Auth(e) => Reply::gateway_error(*e, request_id),
            ApiError::NotFound => plain(404, "no such resource"),
            ApiError::MethodNotAllowed(allow) => plain(405, &format!("this path accepts {allow}"))
                .with_header("allow", HeaderValue::from_static(allow)),
            ApiError::PayloadTooLarge => plain(413, "the request body exceeds 64 KiB"),
            ApiError::InvalidJson(why) => plain(400, why),
            ApiError::Validation(details) => Reply::json(
                422,
                error_body(
                    code,
                    "some fields are invalid; see details",
                    request_id,
                    Some(&json!(details)),
                ),
            ),
            ApiError::Forbidden(why) => plain(403, why),
            ApiError::Conflict(_, why) => plain(409, why),
            ApiError::RateLimited(retry_after) => plain(
                429,
                "too many management calls; retry after the time in Retry-After",
            )
            .with_header("retry-after", HeaderValue::from(*retry_after)),
            ApiError::StoreUnavailable => {
                plain(503, "the key store is unavailable; try again shortly")
            }
            ApiError::Internal => plain(500, "the request could not be processed"),
        }
    }
}

type ApiResult = Result<Reply, ApiError>;

/// `{"data": [...], "next_cursor": null | "..."}`
#[derive(serde::Serialize)]
struct PageBody<T: serde::Serialize> {
    data: Vec<T>,
    next_cursor: Option<String>,
}

fn json_reply(status: u16, value: &impl serde::Serialize) -> ApiResult {
    serde_json::to_vec(value)
        .map(|body| Reply::json(status, Bytes::from(body)))
        .map_err(|_| ApiError::Internal)
}

/// Who is calling: the admin, or a key (with or without `keys:manage`).
enum Caller {
    Admin,
    Key(Arc<CachedKey>),
}

impl Caller {
    fn actor(&self) -> Actor {
        match self {
            Caller::Admin => Actor::Admin,
            Caller::Key(key) => Actor::Key(key.id.clone()),
        }
    }

    fn owner(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Key(key) => Some(&key.owner),
        }
    }

    /// Whether the caller may see and change `record`: the admin any, a key its owner's.
    fn may_touch(&self, record: &KeyRecord) -> bool {
        self.owner().is_none_or(|owner| owner == record.owner)
    }
}

/// Per-owner limits on management calls; the admin is exempt.
pub struct ManagementLimiters {
    create: Option<KeyedLimiter<String>>,
    list: Option<KeyedLimiter<String>>,
    revoke: Option<KeyedLimiter<String>>,
    signup: Option<KeyedLimiter<String>>,
}

impl ManagementLimiters {
    pub fn new(limits: &ManagementLimits, signup_per_hour: u32) -> Self {
        ManagementLimiters {
            create: KeyedLimiter::new(limits.create_per_hour, 3600),
            list: KeyedLimiter::new(limits.list_per_minute, 60),
            revoke: KeyedLimiter::new(limits.revoke_per_minute, 60),
            signup: KeyedLimiter::new(signup_per_hour, 3600),
        }
    }

    fn check(limiter: &Option<KeyedLimiter<String>>, who: &str) -> Result<(), ApiError> {
        match limiter.as_ref().map(|l| l.check(&who.to_string())) {
            Some(Decision::Limited { retry_after, .. }) => Err(ApiError::RateLimited(retry_after)),
            _ => Ok(()),
        }
    }

    pub fn forget_idle(&self) {
        for limiter in [&self.create, &self.list, &self.revoke, &self.signup]
            .into_iter()
            .flatten()
        {
            limiter.forget_idle();
        }
    }
}

enum Op {
    Create,
    List,
    Get,
    Revoke,
    RevokeByValue,
    Rotate,
    Audit,
    Signup,
    OpenApi,
    Unknown,
}

impl Op {
    fn label(&self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::List => "list",
            Op::Get => "get",
            Op::Revoke => "revoke",
            Op::RevokeByValue => "revoke_by_value",
            Op::Rotate => "rotate",
            Op::Audit => "audit",
            Op::Signup => "signup",
            Op::OpenApi => "openapi",
            Op::Unknown => "unknown",
        }
    }
}

/// The path below the mount, split into segments; `None` for the mount itself.
fn route(rest: &str, method: &Method) -> Result<(Op, Option<String>), ApiError> {
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    let allow = |allowed: &'static str, ok: bool, op: Op, id: Option<String>| {
        if ok {
            Ok((op, id))
        } else {
            Err(ApiError::MethodNotAllowed(allowed))
        }
    };
    match segments.as_slice() {
        ["keys"] => match *method {
            Method::POST => Ok((Op::Create, None)),
            Method::GET => Ok((Op::List, None)),
            _ => Err(ApiError::MethodNotAllowed("GET, POST")),
        },
        ["keys", "revoke"] => allow("POST", *method == Method::POST, Op::RevokeByValue, None),
        ["keys", id] if !id.is_empty() => match *method {
            Method::GET => Ok((Op::Get, Some(id.to_string()))),
            Method::DELETE => Ok((Op::Revoke, Some(id.to_string()))),
            _ => Err(ApiError::MethodNotAllowed("GET, DELETE")),
        },
        ["keys", id, "rotate"] if !id.is_empty() => allow(
            "POST",
            *method == Method::POST,
            Op::Rotate,
            Some(id.to_string()),
        ),
        ["audit"] => allow("GET", *method == Method::GET, Op::Audit, None),
        _ => Err(ApiError::NotFound),
    }
}

/// Answers one management call.
pub async fn serve(
    gateway: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> pingora::Result<()> {
    let mut op = Op::Unknown;
    let result = handle(gateway, session, ctx, &mut op).await;
    let reply = result.unwrap_or_else(|e| {
        if let ApiError::Auth(g) = &e {
            ctx.outcome = g.outcome();
        }
        ctx.error_code = Some(e.code());
        e.reply(&ctx.request_id)
    });
    gateway
        .metrics
        .management_requests
        .with_label_values(&[op.label(), &reply.status.to_string()])
        .inc();
    let close = reply.status == 413 && !session.is_body_done();
    let reply = reply.with_header("cache-control", HeaderValue::from_static("no-store"));
    if close {
        session.set_keepalive(None);
    }
    respond::send(session, reply, &ctx.request_id).await
}

async fn handle(
    gateway: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    op_out: &mut Op,
) -> ApiResult {
    let req = session.req_header();
    let rest = req
        .uri
        .path()
        .strip_prefix(gateway.config.management.path.as_str())
        .unwrap_or_default()
        .to_string();
    let method = req.method.clone();
    let query = parse_query(req.uri.query());

    // The two paths that take no credentials.
    match rest.as_str() {
        "/openapi.json" => {
            *op_out = Op::OpenApi;
            if method != Method::GET {
                return Err(ApiError::MethodNotAllowed("GET"));
            }
            return Ok(Reply::json(200, Bytes::from_static(OPENAPI.as_bytes())));
        }
        "/signup" => {
            *op_out = Op::Signup;
            if !gateway.config.signup.enabled {
                return Err(ApiError::NotFound);
            }
            if method != Method::POST {
                return Err(ApiError::MethodNotAllowed("POST"));
            }
            let body = read_json(session).await?;
            return signup(gateway, session, body).await;
        }
        _ => {}
    }

    let caller = authenticate(gateway, session).await?;
    if let Caller::Key(key) = &caller {
        ctx.key = Some(Arc::clone(key));
    }
    let (op, id) = route(&rest, &method)?;
    let can_manage = match &caller {
        Caller::Admin => true,
        Caller::Key(key) => key.scopes.iter().any(|s| s == MANAGE_SCOPE),
    };
    // A key may revoke itself by value without keys:manage; that check needs the body.
    if !can_manage && !matches!(op, Op::RevokeByValue) {
        return Err(ApiError::Auth(GatewayError::InsufficientScope));
    }
    *op_out = op;
    let limiters = &gateway.management_limiters;
    if let Some(owner) = caller.owner() {
        match op_out {
            Op::Create | Op::Rotate => ManagementLimiters::check(&limiters.create, owner)?,
            Op::List | Op::Get => ManagementLimiters::check(&limiters.list, owner)?,
            Op::Revoke | Op::RevokeByValue => ManagementLimiters::check(&limiters.revoke, owner)?,
            _ => {}
        }
    }
    if let Caller::Key(key) = &caller {
        gateway.usage.record(key.id_number, &key.id, unix_now());
    }
    let client = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string());
    let id = id.unwrap_or_default();

    match op_out {
        Op::Create => {
            let body = read_json(session).await?;
            create(gateway, &caller, body, client).await
        }
        Op::List => list(gateway, &caller, &query).await,
        Op::Get => {
            let key = owned_key(gateway, &caller, &id).await?;
            json_reply(200, &KeyView::new(key.record, key.usage))
        }
        Op::Revoke => {
            let key = owned_key(gateway, &caller, &id).await?;
            revoke(gateway, &caller, &key.record.id, "revoke", client).await
        }
        Op::RevokeByValue => {
            let body = read_json(session).await?;
            revoke_by_value(gateway, &caller, can_manage, body, client).await
        }
        Op::Rotate => {
            let body = read_json(session).await?;
            let key = owned_key(gateway, &caller, &id).await?;
            rotate(gateway, &caller, key.record, body, client).await
        }
        Op::Audit => {
            if !matches!(caller, Caller::Admin) {
                return Err(ApiError::Forbidden("the audit log is for the admin only"));
            }
            audit(gateway, &query).await
        }
        Op::Signup | Op::OpenApi | Op::Unknown => Err(ApiError::NotFound),
    }
}

/// The admin token (`Authorization: Bearer`, compared in constant time) or a valid key.
async fn authenticate(gateway: &Gateway, session: &Session) -> Result<Caller, ApiError> {
    let headers = &session.req_header().headers;
    if let Some(expected) = &gateway.admin_token {
        let presented = headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .filter_map(|v| crate::auth::bearer_token(v.as_bytes()))
            .any(|token| tokens_equal(token, expected));
        if presented {
            return Ok(Caller::Admin);
        }
    }
    match gateway.authenticate(headers).await {
        Ok((key, _)) => Ok(Caller::Key(key)),
        Err(GatewayError::MissingCredentials) if has_foreign_bearer(headers) => {
            // A Bearer token that is neither a key nor the admin token: a wrong admin token.
            Err(ApiError::Auth(GatewayError::InvalidKey))
        }
        Err(e) => Err(ApiError::Auth(e)),
    }
}

fn has_foreign_bearer(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .any(|v| crate::auth::bearer_token(v.as_bytes()).is_some())
}

/// Constant-time comparison; hashing first makes it independent of the lengths too.
fn tokens_equal(presented: &[u8], expected: &[u8]) -> bool {
    let a = Sha256::digest(presented);
    let b = Sha256::digest(expected);
    a.as_slice().ct_eq(b.as_slice()).into()
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// Reads the body as a JSON object, whatever the Content-Type (so `curl -d` works).
async fn read_json(session: &mut Session) -> Result<Map<String, Value>, ApiError> {
    let body = read_body(session).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::InvalidJson(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

async fn read_body(session: &mut Session) -> Result<Bytes, ApiError> {
    let continued = crate::body::continue_if_expected(session)
        .await
        .map_err(|_| ApiError::Internal)?;
    let mut body = BytesMut::new();
    let mut total = 0usize;
    loop {
        let chunk = match session.read_request_body().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => {
                // Where a broken body ends is unknown: what follows must not be read as
                // the next request.
                session.set_keepalive(None);
                return Err(ApiError::InvalidJson("the body could not be read".into()));
            }
        };
        total += chunk.len();
        if total > crate::body::DRAIN_LIMIT {
            return Err(ApiError::PayloadTooLarge);
        }
        if total <= MAX_BODY {
            body.extend_from_slice(&chunk);
        }
    }
    if total > MAX_BODY {
        return Err(ApiError::PayloadTooLarge);
    }
    crate::body::keep_alive_after_continue(session, continued);
    Ok(body.freeze())
}

/// Collects field errors while reading a JSON object strictly.
struct Fields {
    map: Map<String, Value>,
    errors: FieldErrors,
}

impl Fields {
    fn new(map: Map<String, Value>, allowed: &[&str]) -> Self {
        let mut errors = FieldErrors::new();
        for field in map.keys() {
            if !allowed.contains(&field.as_str()) {
                errors
                    .entry(field.clone())
                    .or_default()
                    .push("unknown field".into());
            }
        }
        Fields { map, errors }
    }

    fn bad(&mut self, field: &str, reason: impl Into<String>) {
        self.errors
            .entry(field.to_string())
            .or_default()
            .push(reason.into());
    }

    fn present(&self, field: &str) -> bool {
        self.map.get(field).is_some_and(|v| !v.is_null())
    }

    fn string(&mut self, field: &str) -> Option<String> {
        match self.map.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.bad(field, "must be a string");
                None
            }
        }
    }

    fn integer(&mut self, field: &str, min: i64, max: i64) -> Option<i64> {
        match self.map.get(field) {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(n) if (min..=max).contains(&n) => Some(n),
                Some(_) => {
                    self.bad(field, format!("must be between {min} and {max}"));
                    None
                }
                None => {
                    self.bad(field, "must be an integer");
                    None
                }
            },
        }
    }

    fn strings(&mut self, field: &str) -> Option<Vec<String>> {
        match self.map.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => {
                let out: Option<Vec<String>> = items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect();
                if out.is_none() {
                    self.bad(field, "must be an array of strings");
                }
                out
            }
            Some(_) => {
                self.bad(field, "must be an array of strings");
                None
            }
        }
    }

    fn rate_limit(&mut self) -> Option<RateLimit> {
        match self.map.get("rate_limit") {
            None | Some(Value::Null) => None,
            Some(v) => match serde_json::from_value::<RateLimit>(v.clone()) {
                Ok(rl) => Some(rl),
                Err(_) => {
                    self.bad(
                        "rate_limit",
                        "must be {\"requests\": integer, \"window_seconds\": integer}",
                    );
                    None
                }
            },
        }
    }

    fn object(&mut self, field: &str) -> Option<Map<String, Value>> {
        match self.map.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => {
                self.bad(field, "must be a JSON object");
                None
            }
        }
    }

    fn finish(self) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.errors))
        }
    }
}

async fn create(
    gateway: &Gateway,
    caller: &Caller,
    body: Map<String, Value>,
    client: Option<String>,
) -> ApiResult {
    let mut f = Fields::new(
        body,
        &[
            "name",
            "owner",
            "scopes",
            "expires_at",
            "ttl_seconds",
            "rate_limit",
            "metadata",
        ],
    );
    let name = f.string("name");
    let owner_field = f.string("owner");
    let scopes = f.strings("scopes");
    let expires_text = f.string("expires_at");
    let ttl = f.integer("ttl_seconds", 1, MAX_TTL_SECONDS);
    let rate_limit = f.rate_limit();
    let metadata = f.object("metadata");
    if f.present("expires_at") && f.present("ttl_seconds") {
        f.bad("expires_at", "give expires_at or ttl_seconds, not both");
    }
    let now = unix_now();
    let expires_at = match (expires_text, ttl) {
        (Some(text), _) => match parse_rfc3339(&text) {
            Some(at) if at > now => Some(at),
            Some(_) => {
                f.bad("expires_at", "must be in the future");
                None
            }
            None => {
                f.bad(
                    "expires_at",
                    "must be an RFC 3339 time, e.g. 2026-12-31T00:00:00Z",
                );
                None
            }
        },
        (None, Some(ttl)) => Some(now + ttl),
        (None, None) => None,
    };
    let owner = match (caller, owner_field) {
        (Caller::Admin, Some(owner)) => owner,
        (Caller::Admin, None) => {
            f.bad("owner", "required when the admin creates a key");
            String::new()
        }
        (Caller::Key(key), Some(owner)) if owner != key.owner => {
            f.bad("owner", "only the admin may create keys for another owner");
            key.owner.clone()
        }
        (Caller::Key(key), _) => key.owner.clone(),
    };
    let mut scopes = match (caller, scopes) {
        (_, Some(scopes)) => scopes,
        (Caller::Key(key), None) => key.scopes.clone(),
        (Caller::Admin, None) => Vec::new(),
    };
    scopes.sort();
    scopes.dedup();
    validate_new_key(
        name.as_deref(),
        if owner.is_empty() { "x" } else { &owner },
        &scopes,
        rate_limit,
        metadata.as_ref(),
        &mut f.errors,
    );
    f.finish()?;
    if let Caller::Key(key) = caller
        && !crate::auth::has_scopes(&key.scopes, &scopes)
    {
        return Err(ApiError::Forbidden(
            "a key can only grant scopes it holds itself",
        ));
    }
    let view = gateway
        .service
        .create(
            NewKey {
                name: name.unwrap_or_else(|| DEFAULT_NAME.to_string()),
                owner,
                scopes,
                expires_at,
                rate_limit,
                metadata,
            },
            None,
        )
        .await?;
    gateway
        .service
        .audit(&caller.actor(), "create", Some(&view.id), client)
        .await?;
    json_reply(201, &view)
}

fn page_params(query: &HashMap<String, String>) -> Result<(usize, Option<String>), ApiError> {
    let mut errors = FieldErrors::new();
    let limit = match query.get("limit") {
        None => 100,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                errors
                    .entry("limit".into())
                    .or_default()
                    .push("must be an integer from 1 to 1000".into());
                100
            }
        },
    };
    let cursor = query.get("cursor").cloned();
    if let Some(c) = &cursor
        && ulid::Ulid::from_string(c).is_err()
    {
        errors
            .entry("cursor".into())
            .or_default()
            .push("is not a cursor this API returned".into());
    }
    if errors.is_empty() {
        Ok((limit, cursor))
    } else {
        Err(ApiError::Validation(errors))
    }
}

async fn list(gateway: &Gateway, caller: &Caller, query: &HashMap<String, String>) -> ApiResult {
    let (limit, cursor) = page_params(query)?;
    let owner = match caller {
        Caller::Admin => query.get("owner").map(String::as_str),
        Caller::Key(key) => Some(key.owner.as_str()),
    };
    let page = gateway
        .service
        .list(owner, cursor.as_deref(), limit)
        .await?;
    let data: Vec<KeyView> = page
        .items
        .into_iter()
        .map(|k| KeyView::new(k.record, k.usage))
        .collect();
    json_reply(
        200,
        &PageBody {
            data,
            next_cursor: page.next_cursor,
        },
    )
}

/// The key `id` if the caller may see it; another owner's key is "not found".
async fn owned_key(
    gateway: &Gateway,
    caller: &Caller,
    id: &str,
) -> Result<crate::store::KeyWithUsage, ApiError> {
    match gateway.service.get(id).await? {
        Some(key) if caller.may_touch(&key.record) => Ok(key),
        _ => Err(ApiError::NotFound),
    }
}

async fn revoke(
    gateway: &Gateway,
    caller: &Caller,
    id: &str,
    action: &str,
    client: Option<String>,
) -> ApiResult {
    let record = gateway
        .service
        .revoke(id)
        .await?
        .ok_or(ApiError::NotFound)?;
    gateway
        .service
        .audit(&caller.actor(), action, Some(id), client)
        .await?;
    json_reply(
        200,
        &json!({
            "id": record.id,
            "revoked": true,
            "revoked_at": record.revoked_at.map(rfc3339),
        }),
    )
}

async fn revoke_by_value(
    gateway: &Gateway,
    caller: &Caller,
    can_manage: bool,
    body: Map<String, Value>,
    client: Option<String>,
) -> ApiResult {
    let mut f = Fields::new(body, &["key"]);
    let key = f.string("key");
    if key.is_none() && !f.errors.contains_key("key") {
        f.bad("key", "required");
    }
    f.finish()?;
    let key = key.unwrap_or_default();
    if gateway.format.check(key.as_bytes()).is_err() {
        return Err(ApiError::NotFound);
    }
    let hash = KeyHash::of(key.as_bytes());
    let record = gateway
        .service
        .store()
        .find_by_hash(&hash)
        .await
        .map_err(ServiceError::from)?
        .ok_or(ApiError::NotFound)?;
    let allowed = match caller {
        Caller::Admin => true,
        Caller::Key(own) => own.id == record.id || (can_manage && own.owner == record.owner),
    };
    if !allowed {
        return Err(ApiError::NotFound);
    }
    revoke(gateway, caller, &record.id, "revoke_by_value", client).await
}

async fn rotate(
    gateway: &Gateway,
    caller: &Caller,
    old: KeyRecord,
    body: Map<String, Value>,
    client: Option<String>,
) -> ApiResult {
    let mut f = Fields::new(body, &["grace_seconds"]);
    let grace = f
        .integer("grace_seconds", 0, MAX_GRACE_SECONDS)
        .unwrap_or(0);
    f.finish()?;
    if old.is_revoked() {
        return Err(ApiError::Conflict(
            "key_revoked",
            "a revoked key cannot be rotated",
        ));
    }
    if old.superseded {
        return Err(ApiError::Conflict(
            "key_rotated",
            "this key was already rotated; rotate its successor",
        ));
    }
    if old.expires_at.is_some_and(|at| at <= unix_now()) {
        return Err(ApiError::Conflict(
            "key_expired",
            "an expired key cannot be rotated",
        ));
    }
    // Rotation mints a key with the old one's scopes: the same rule as creation applies.
    if let Caller::Key(key) = caller
        && !crate::auth::has_scopes(&key.scopes, &old.scopes)
    {
        return Err(ApiError::Forbidden(
            "a key can only rotate keys whose scopes it holds itself",
        ));
    }
    let view = gateway.service.rotate(&old, grace).await?;
    gateway
        .service
        .audit(&caller.actor(), "rotate", Some(&old.id), client)
        .await?;
    json_reply(201, &view)
}

async fn audit(gateway: &Gateway, query: &HashMap<String, String>) -> ApiResult {
    let (limit, cursor) = page_params(query)?;
    let mut entries = gateway
        .service
        .store()
        .list_audit(cursor.as_deref(), limit + 1)
        .await
        .map_err(ServiceError::from)?;
    let next_cursor = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|e| e.id.clone())
    } else {
        None
    };
    let data: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            json!({
                "actor": e.actor,
                "action": e.action,
                "key_id": e.key_id,
                "at": rfc3339(e.at),
                "client": e.client,
            })
        })
        .collect();
    json_reply(200, &PageBody { data, next_cursor })
}

async fn signup(gateway: &Gateway, session: &Session, body: Map<String, Value>) -> ApiResult {
    let client = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string());
    ManagementLimiters::check(
        &gateway.management_limiters.signup,
        client.as_deref().unwrap_or("unknown"),
    )?;
    let mut f = Fields::new(body, &["name"]);
    let name = f.string("name");
    let owner = format!("user-{}", crate::keys::new_key_id().to_ascii_lowercase());
    validate_new_key(name.as_deref(), &owner, &[], None, None, &mut f.errors);
    f.finish()?;
    let view = gateway
        .service
        .create(
            NewKey {
                name: name.unwrap_or_else(|| DEFAULT_NAME.to_string()),
                owner,
                scopes: vec![MANAGE_SCOPE.to_string()],
                expires_at: None,
                rate_limit: None,
                metadata: None,
            },
            None,
        )
        .await?;
    gateway
        .service
        .audit(&Actor::Signup, "signup", Some(&view.id), client)
        .await?;
    json_reply(201, &view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        assert!(matches!(
            route("/keys", &Method::POST),
            Ok((Op::Create, None))
        ));
        assert!(matches!(route("/keys", &Method::GET), Ok((Op::List, None))));
        assert!(matches!(
            route("/keys", &Method::PUT),
            Err(ApiError::MethodNotAllowed("GET, POST"))
        ));
        assert!(matches!(
            route("/keys/revoke", &Method::POST),
            Ok((Op::RevokeByValue, None))
        ));
        assert!(matches!(
            route("/keys/abc", &Method::DELETE),
            Ok((Op::Revoke, Some(_)))
        ));
        assert!(matches!(
            route("/keys/abc/rotate", &Method::POST),
            Ok((Op::Rotate, Some(_)))
        ));
        assert!(matches!(
            route("/keys/abc/rotate", &Method::GET),
            Err(ApiError::MethodNotAllowed("POST"))
        ));
        assert!(matches!(
            route("/nope", &Method::GET),
            Err(ApiError::NotFound)
        ));
        assert!(matches!(route("", &Method::GET), Err(ApiError::NotFound)));
        assert!(matches!(
            route("/keys//rotate", &Method::POST),
            Err(ApiError::NotFound)
        ));
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_equal(b"secret", b"secret"));
        assert!(!tokens_equal(b"secret", b"secreT"));
        assert!(!tokens_equal(b"", b"secret"));
    }

    #[test]
    fn openapi_document_describes_exactly_the_served_api() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1"))
        );
        let mut documented: Vec<String> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .expect("path item")
                    .keys()
                    .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                    .map(move |method| format!("{} {path}", method.to_uppercase()))
            })
            .collect();
        documented.sort();
        let served = [
            "DELETE /keys/{id}",
            "GET /audit",
            "GET /keys",
            "GET /keys/{id}",
            "GET /openapi.json",
            "POST /keys",
            "POST /keys/revoke",
            "POST /keys/{id}/rotate",
            "POST /signup",
        ];
        assert_eq!(documented, served);
        // Each documented operation is routed (the two credential-free paths aside).
        for entry in served {
            let (method, path) = entry.split_once(' ').expect("method and path");
            if path == "/openapi.json" || path == "/signup" {
                continue;
            }
            let method: Method = method.parse().expect("method");
            let path = path.replace("{id}", "01KEY");
            assert!(route(&path, &method).is_ok(), "{entry} is not routed");
        }
    }
}
