//! The management API, mounted under `management.path` on the proxy listener. A call
//! reads top to bottom in `answer`: parse the call, authenticate the caller, authorize and
//! spend the caller's budget, read the body, then one handler (`handlers`), which leaves
//! the rules of keys to `keys::lifecycle`. `serve` is the one place that writes the answer.

mod call;
mod caller;
mod console;
mod error;
mod fields;
mod handlers;
mod openapi;
mod verify;
pub(crate) mod views;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderValue;
use pingora::proxy::Session;
use serde_json::Map;

use crate::clock::unix_now;
use crate::config::{Config, ManagementLimits};
use crate::error::GatewayError;
use crate::gateway::{RequestCtx, management_rest};
use crate::lifecycle::Lifecycle;
use crate::metrics::Outcome;
use crate::ratelimit::{
    FAILURE_WINDOW, FailureThrottle, ManagementBudget, ManagementLimiters, client_bucket,
};
use crate::session::body::{BodyError, read_management_body};
use crate::session::respond::{self, Reply};
use crate::state::Shared;
use call::{Call, KeyedCall};
use caller::Caller;
use error::ApiError;
use handlers::{ApiResult, Request};

/// The management API's own state, next to the state it shares with the request path.
pub(crate) struct Management {
    shared: Arc<Shared>,
    keys: Lifecycle,
    /// The admin token's bytes; None = no admin access.
    admin_token: Option<Vec<u8>>,
    /// What the configuration in force decides; swapped by a reload.
    settings: ArcSwap<Settings>,
}

/// The parts of the management API a reload changes: its limits, the OpenAPI document
/// and the console.
struct Settings {
    limits: (ManagementLimits, u32),
    limiters: Arc<ManagementLimiters>,
    /// Clients that keep presenting wrong credentials are slowed down.
    failures: Arc<FailureThrottle>,
    /// The OpenAPI document as served (it lists sign-up only when that is on).
    openapi: Bytes,
    console: console::Console,
}

impl Settings {
    /// The settings of `config`; budgets and throttles whose limits did not change keep
    /// their state from `running`.
    fn new(config: &Config, running: Option<&Settings>) -> Self {
        let limits = (config.management.limits, config.signup.per_client_per_hour);
        let limiters = match running {
            Some(running) if running.limits == limits => Arc::clone(&running.limiters),
            _ => Arc::new(ManagementLimiters::new(&limits.0, limits.1)),
        };
        let failures_per_minute = limits.0.auth_failures_per_minute;
        let failures = match running {
            Some(running) if running.limits.0.auth_failures_per_minute == failures_per_minute => {
                Arc::clone(&running.failures)
            }
            _ => Arc::new(FailureThrottle::new(failures_per_minute)),
        };
        Settings {
            limits,
            limiters,
            failures,
            openapi: openapi::document(config.signup.enabled),
            console: console::Console::new(config.console.enabled, &config.management.path),
        }
    }
}

impl Management {
    pub(crate) fn new(shared: Arc<Shared>, admin_token: Option<Vec<u8>>) -> Self {
        let settings = Settings::new(&shared.live().config, None);
        Management {
            keys: Lifecycle::new(
                Arc::clone(&shared.cache),
                Arc::clone(&shared.usage),
                shared.auth.format().clone(),
            ),
            settings: ArcSwap::from_pointee(settings),
            admin_token,
            shared,
        }
    }

    /// Takes the limits, sign-up, console and OpenAPI of a reloaded configuration.
    pub(crate) fn apply(&self, config: &Config) {
        let settings = Settings::new(config, Some(&self.settings.load()));
        self.settings.store(Arc::new(settings));
    }

    /// Deletes keys revoked or expired longer than `keys.purge_revoked_after_days` ago.
    pub(crate) async fn purge_dead_keys(&self) {
        let Some(after) = self.shared.live().config.keys.purge_revoked_after else {
            return;
        };
        let before = unix_now() - i64::try_from(after.as_secs()).unwrap_or(i64::MAX);
        match self.keys.purge(before).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "purged revoked and expired keys"),
            Err(e) => tracing::warn!(error = %e, "purging revoked and expired keys failed"),
        }
    }

    /// Drops the state of budgets that have fully recovered.
    pub(crate) fn forget_idle_limits(&self) {
        self.settings.load().limiters.forget_idle();
    }

    /// Answers one management call.
    pub(crate) async fn serve(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let req = session.req_header();
        let live = Arc::clone(&ctx.live);
        let base = &live.config.management.path;
        let rest = management_rest(base, req.uri.path(), false)
            .unwrap_or_default()
            .to_string();
        let call = Call::parse(&rest, &req.method, live.config.signup.enabled);
        let label = call.as_ref().map_or("unknown", Call::label);
        let settings = self.settings.load_full();
        let reply = self
            .answer(&rest, call, session, ctx, &settings)
            .await
            .unwrap_or_else(|e| {
                ctx.outcome = e.outcome();
                ctx.error_code = Some(e.code());
                match label {
                    "console" => console::with_security_headers(e.reply(ctx.request_id.as_str())),
                    _ => e.reply(ctx.request_id.as_str()),
                }
            });
        let status = reply.status.to_string();
        let counter = &self.shared.metrics.management_requests;
        counter.with_label_values(&[label, &status]).inc();
        if reply.status == 413 && !session.is_body_done() {
            session.set_keepalive(None);
        }
        // Console files set their own; every API answer holds data.
        let reply = if reply.headers.contains_key(http::header::CACHE_CONTROL) {
            reply
        } else {
            reply.with_header(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            )
        };
        respond::send(session, reply, &ctx.request_id).await
    }

    async fn answer(
        &self,
        rest: &str,
        call: Result<Call, ApiError>,
        session: &mut Session,
        ctx: &mut RequestCtx,
        settings: &Settings,
    ) -> ApiResult {
        let deadline = ctx.live.config.server.header_read_timeout;
        let call = match call {
            Ok(Call::OpenApi) => return Ok(Reply::json(200, settings.openapi.clone())),
            Ok(Call::Signup) => return self.signup(session, ctx.client, settings, deadline).await,
            Ok(Call::Console(file)) => {
                let req = session.req_header();
                let reply = settings.console.answer(&file, &req.method, &req.headers);
                // No credential is read: the load is public, whoever then signs in.
                ctx.outcome = Outcome::Public;
                return reply;
            }
            Ok(Call::Keyed(call)) => Ok(call),
            // A path that takes no credentials says what is wrong without asking for them.
            Err(e) if Call::is_public_path(rest) => return Err(e),
            Err(e) => Err(e),
        };
        let caller = self
            .authenticate(session, ctx.client, &settings.failures)
            .await?;
        // A key's allowlist holds on the management API as on any route, except for a key
        // revoking itself by value: whoever found a leaked key may kill it from anywhere
        // (the handler holds a key revoking another one to its allowlist).
        let self_revoke = matches!(call, Ok(KeyedCall::RevokeByValue));
        if !self_revoke && caller.key().is_some_and(|key| !key.admits_from(ctx.client)) {
            return Err(GatewayError::IpNotAllowed.into());
        }
        ctx.key = caller.key().cloned();
        let call = call?;
        authorize(&call, &caller)?;
        spend(&self.shared, &call, &caller, &settings.limiters).await?;
        // Usage counts management calls too (contract section 6: "proxied or management").
        if let Some(key) = caller.key() {
            self.shared
                .usage
                .record(key.id_number, &key.id, unix_now(), None);
        }
        let body = if call.takes_body() {
            let body = read_json(session, deadline).await?;
            // A body may take its time: a key revoked or expired meanwhile acts no more.
            if let Caller::Key(_) = caller {
                let headers = &session.req_header().headers;
                self.shared.auth.authenticate(headers).await?;
            }
            body
        } else {
            Map::new()
        };
        let request = Request {
            shared: &self.shared,
            keys: &self.keys,
            limiters: &settings.limiters,
            actor: caller.actor(),
            caller: &caller,
            client: ctx.client.map(|ip| ip.to_string()),
            query: parse_query(session.req_header().uri.query()),
            body,
        };
        dispatch(call, request).await
    }

    /// The caller, unless its client has presented too many wrong credentials lately (then
    /// 429, whatever it presents now, so that guessing cannot tell right from wrong).
    async fn authenticate(
        &self,
        session: &Session,
        client: Option<IpAddr>,
        failures: &FailureThrottle,
    ) -> Result<Caller, ApiError> {
        if client.is_some_and(|ip| failures.is_blocked(ip)) {
            let retry_after = FAILURE_WINDOW.as_secs();
            return Err(GatewayError::RateLimited { retry_after }.into());
        }
        let headers = &session.req_header().headers;
        let token = self.admin_token.as_deref();
        let caller = Caller::authenticate(headers, token, &self.shared.auth).await;
        if let (Err(e), Some(ip)) = (&caller, client)
            && e.is_wrong_credential()
        {
            failures.record_failure(ip);
        }
        caller
    }

    async fn signup(
        &self,
        session: &mut Session,
        client: Option<IpAddr>,
        settings: &Settings,
        deadline: std::time::Duration,
    ) -> ApiResult {
        let body = read_json(session, deadline).await?;
        // Per IPv4 address or IPv6 /64: one host can rotate through its whole /64.
        let bucket =
            client.map_or_else(|| "unknown".to_string(), |ip| client_bucket(ip).to_string());
        let limiters = &settings.limiters;
        handlers::spend(&self.shared, limiters, ManagementBudget::Signup, &bucket).await?;
        handlers::signup(&self.keys, client.map(|ip| ip.to_string()), body).await
    }
}

/// A key's call spends its owner's budget for that kind of call; the admin's none.
async fn spend(
    shared: &Shared,
    call: &KeyedCall,
    caller: &Caller,
    limiters: &ManagementLimiters,
) -> Result<(), ApiError> {
    match (call.budget(), caller.owner()) {
        (Some(budget), Some(owner)) => handlers::spend(shared, limiters, budget, owner).await,
        _ => Ok(()),
    }
}

/// Without `keys:manage` a key may only revoke itself by value; the audit log is the
/// admin's alone.
fn authorize(call: &KeyedCall, caller: &Caller) -> Result<(), ApiError> {
    if *call == KeyedCall::Verify {
        return if verify::may_verify(caller) {
            Ok(())
        } else {
            Err(crate::error::GatewayError::InsufficientScope.into())
        };
    }
    if !caller.can_manage() && *call != KeyedCall::RevokeByValue {
        return Err(crate::error::GatewayError::InsufficientScope.into());
    }
    if *call == KeyedCall::Audit && !matches!(caller, Caller::Admin) {
        return Err(ApiError::Forbidden("the audit log is for the admin only"));
    }
    // A key refilling its own (or a sibling's) quota would make quotas bind nobody.
    if matches!(call, KeyedCall::RefillQuota(_)) && !matches!(caller, Caller::Admin) {
        return Err(ApiError::Forbidden("only the admin refills quotas"));
    }
    Ok(())
}

async fn dispatch(call: KeyedCall, request: Request<'_>) -> ApiResult {
    match call {
        KeyedCall::Create => handlers::create(request).await,
        KeyedCall::List => handlers::list(request).await,
        KeyedCall::Get(id) => handlers::get(request, &id).await,
        KeyedCall::Revoke(id) => handlers::revoke(request, &id).await,
        KeyedCall::RevokeByValue => handlers::revoke_by_value(request).await,
        KeyedCall::Rotate(id) => handlers::rotate(request, &id).await,
        KeyedCall::Update(id) => handlers::update(request, &id).await,
        KeyedCall::RefillQuota(id) => handlers::refill_quota(request, &id).await,
        KeyedCall::Audit => handlers::audit(request).await,
        KeyedCall::Verify => verify::verify(request).await,
    }
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The call's JSON body, which must arrive whole within `deadline` (Pingora's own timeout
/// is per read, so a body trickled a byte at a time would otherwise never time out).
async fn read_json(
    session: &mut Session,
    deadline: std::time::Duration,
) -> Result<Map<String, serde_json::Value>, ApiError> {
    let read = tokio::time::timeout(deadline, read_management_body(session)).await;
    let body = match read {
        Ok(body) => body,
        Err(_) => {
            session.set_keepalive(None);
            return Err(GatewayError::BodyTimeout.into());
        }
    };
    let body = body.map_err(|e| match e {
        BodyError::TooLarge => ApiError::PayloadTooLarge,
        BodyError::Unreadable => ApiError::InvalidJson("the body could not be read".into()),
        BodyError::Continue => GatewayError::Internal.into(),
    })?;
    fields::parse_object(&body)
}
