//! Reading a call's JSON body strictly into a typed request, collecting every bad field
//! (serde would stop at the first; the contract's 422 names them all).

use bytes::Bytes;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::clock::parse_rfc3339;
use crate::keys::RateLimit;
use crate::lifecycle::{FieldErrors, MAX_GRACE_SECONDS, MAX_TTL_SECONDS, add_error};

/// Reads the body as a JSON object, whatever the Content-Type (so `curl -d` works); an
/// empty body is an empty object.
pub(super) fn parse_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::InvalidJson(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

/// Collects field errors while reading a JSON object strictly.
pub(super) struct Fields {
    map: Map<String, Value>,
    pub errors: FieldErrors,
}

impl Fields {
    pub(super) fn new(map: Map<String, Value>, allowed: &[&str]) -> Self {
        let mut errors = FieldErrors::new();
        for field in map.keys() {
            if !allowed.contains(&field.as_str()) {
                add_error(
                    &mut errors,
                    field,
                    crate::hint::unknown_field(field, allowed),
                );
            }
        }
        Fields { map, errors }
    }

    pub(super) fn bad(&mut self, field: &str, reason: impl Into<String>) {
        add_error(&mut self.errors, field, reason);
    }

    fn present(&self, field: &str) -> bool {
        self.map.get(field).is_some_and(|v| !v.is_null())
    }

    pub(super) fn string(&mut self, field: &str) -> Option<String> {
        match self.map.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.bad(field, "must be a string");
                None
            }
        }
    }

    pub(super) fn integer(&mut self, field: &str, min: i64, max: i64) -> Option<i64> {
        let value = self.map.get(field).filter(|v| !v.is_null())?;
        match value.as_i64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(_) => {
                self.bad(field, format!("must be between {min} and {max}"));
                None
            }
            None => {
                self.bad(field, "must be an integer");
                None
            }
        }
    }

    fn strings(&mut self, field: &str) -> Option<Vec<String>> {
        let value = self.map.get(field).filter(|v| !v.is_null())?;
        let items = value.as_array().and_then(|items| {
            items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
        });
        if items.is_none() {
            self.bad(field, "must be an array of strings");
        }
        items
    }

    fn rate_limit(&mut self) -> Option<RateLimit> {
        let value = self.map.get("rate_limit").filter(|v| !v.is_null())?;
        match serde_json::from_value::<RateLimit>(value.clone()) {
            Ok(rl) => Some(rl),
            Err(_) => {
                self.bad(
                    "rate_limit",
                    "must be {\"requests\": integer, \"window_seconds\": integer}",
                );
                None
            }
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

    /// `expires_at` (RFC 3339, in the future) or `ttl_seconds`, never both.
    fn expiry(&mut self, now: i64) -> Option<i64> {
        let text = self.string("expires_at");
        let ttl = self.integer("ttl_seconds", 1, MAX_TTL_SECONDS);
        if self.present("expires_at") && self.present("ttl_seconds") {
            self.bad("expires_at", "give expires_at or ttl_seconds, not both");
        }
        match (text, ttl) {
            (Some(text), _) => match parse_rfc3339(&text) {
                Some(at) if at > now => Some(at),
                Some(_) => {
                    self.bad("expires_at", "must be in the future");
                    None
                }
                None => {
                    let example = "must be an RFC 3339 time, e.g. 2026-12-31T00:00:00Z";
                    self.bad("expires_at", example);
                    None
                }
            },
            (None, Some(ttl)) => Some(now + ttl),
            (None, None) => None,
        }
    }

    pub(super) fn finish(self) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.errors))
        }
    }
}

/// `POST /keys`, as written; the handler applies the caller's rights to it.
pub(super) struct CreateKey {
    pub name: Option<String>,
    pub owner: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub expires_at: Option<i64>,
    pub rate_limit: Option<RateLimit>,
    pub metadata: Option<Map<String, Value>>,
}

impl CreateKey {
    const FIELDS: [&str; 7] = [
        "name",
        "owner",
        "scopes",
        "expires_at",
        "ttl_seconds",
        "rate_limit",
        "metadata",
    ];

    /// The request and the fields collector, which still takes the handler's findings.
    pub(super) fn read(body: Map<String, Value>, now: i64) -> (CreateKey, Fields) {
        let mut f = Fields::new(body, &Self::FIELDS);
        let request = CreateKey {
            name: f.string("name"),
            owner: f.string("owner"),
            scopes: f.strings("scopes"),
            expires_at: f.expiry(now),
            rate_limit: f.rate_limit(),
            metadata: f.object("metadata"),
        };
        (request, f)
    }
}

/// `POST /keys/{id}/rotate`: `{"grace_seconds"?}`.
pub(super) fn read_rotate(body: Map<String, Value>) -> Result<i64, ApiError> {
    let mut f = Fields::new(body, &["grace_seconds"]);
    let grace = f
        .integer("grace_seconds", 0, MAX_GRACE_SECONDS)
        .unwrap_or(0);
    f.finish()?;
    Ok(grace)
}

/// `POST /keys/revoke`: `{"key"}`.
pub(super) fn read_revoke_by_value(body: Map<String, Value>) -> Result<String, ApiError> {
    let mut f = Fields::new(body, &["key"]);
    let key = f.string("key");
    if key.is_none() && !f.errors.contains_key("key") {
        f.bad("key", "required");
    }
    f.finish()?;
    Ok(key.unwrap_or_default())
}

/// `POST /signup`: `{"name"?}`; the handler adds its own findings.
pub(super) fn read_signup(body: Map<String, Value>) -> (Option<String>, Fields) {
    let mut f = Fields::new(body, &["name"]);
    let name = f.string("name");
    (name, f)
}
