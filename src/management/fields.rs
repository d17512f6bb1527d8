//! Reading a call's JSON body strictly into a typed request, collecting every bad field
//! (serde would stop at the first; the contract's 422 names them all).

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::error::ApiError;
use crate::clock::parse_rfc3339;
use crate::keys::{KeyPatch, Quota, QuotaPeriod, RateLimit};
use crate::lifecycle::{FieldErrors, MAX_GRACE_SECONDS, MAX_TTL_SECONDS, add_error};

/// Reads the body as a JSON object, whatever the Content-Type (so `curl -d` works); an
/// empty body is an empty object. A key repeated in any object is refused: parsers keep
/// either the first or the last, so a proxy in front and keygate could read different
/// requests.
pub(super) fn parse_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Strict>(body).map(|strict| strict.0) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::InvalidJson(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

/// A JSON value in which no object repeats a key.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON has no NaN or infinity, so every parsed float is a number.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "the field \"{key}\" appears twice"
                )));
            }
            let Strict(value) = map.next_value()?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
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
        self.map.contains_key(field)
    }

    /// The field's value; None when absent. `null` is refused (leave an optional field out
    /// instead), except by the readers that go through `nullable`.
    fn value(&mut self, field: &str) -> Option<Value> {
        match self.map.get(field) {
            None => None,
            Some(Value::Null) => {
                self.bad(field, "must not be null; leave the field out instead");
                None
            }
            Some(value) => Some(value.clone()),
        }
    }

    pub(super) fn string(&mut self, field: &str) -> Option<String> {
        match self.value(field)? {
            Value::String(s) => Some(s),
            _ => {
                self.bad(field, "must be a string");
                None
            }
        }
    }

    pub(super) fn integer(&mut self, field: &str, min: i64, max: i64) -> Option<i64> {
        let value = self.value(field)?;
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
        let value = self.value(field)?;
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

    /// A field that may be `null` (to remove what it sets): None when absent, `Some(None)`
    /// for `null`, else what `read` makes of it (None, with an error, when malformed).
    fn nullable<T>(
        &mut self,
        field: &str,
        read: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Option<T>> {
        match self.map.get(field).map(Value::is_null) {
            None => None,
            Some(true) => Some(None),
            Some(false) => read(self).map(Some),
        }
    }

    fn rate_limit(&mut self) -> Option<RateLimit> {
        let value = self.value("rate_limit")?;
        match serde_json::from_value::<RateLimit>(value) {
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

    /// `{"requests": 1..=10^12, "period": "day" | "month" | "total"}`.
    fn quota(&mut self) -> Option<Quota> {
        let value = self.value("quota")?;
        let read = |value: &Value| {
            let object = value.as_object()?;
            if object.keys().any(|k| k != "requests" && k != "period") {
                return None;
            }
            let requests = object.get("requests")?.as_u64()?;
            let period = QuotaPeriod::parse(object.get("period")?.as_str()?)?;
            (1..=Quota::MAX_REQUESTS)
                .contains(&requests)
                .then_some(Quota { requests, period })
        };
        let quota = read(&value);
        if quota.is_none() {
            self.bad(
                "quota",
                format!(
                    "must be {{\"requests\": an integer from 1 to {}, \"period\": \"day\", \"month\" or \"total\"}}",
                    Quota::MAX_REQUESTS
                ),
            );
        }
        quota
    }

    fn object(&mut self, field: &str) -> Option<Map<String, Value>> {
        match self.value(field)? {
            Value::Object(m) => Some(m),
            _ => {
                self.bad(field, "must be a JSON object");
                None
            }
        }
    }

    /// An RFC 3339 time in the future.
    fn future_time(&mut self, field: &str, now: i64) -> Option<i64> {
        let text = self.string(field)?;
        match parse_rfc3339(&text) {
            Some(at) if at > now => Some(at),
            Some(_) => {
                self.bad(field, "must be in the future");
                None
            }
            None => {
                let example = "must be an RFC 3339 time, e.g. 2026-12-31T00:00:00Z";
                self.bad(field, example);
                None
            }
        }
    }

    /// `expires_at` (RFC 3339, in the future) or `ttl_seconds`, never both.
    fn expiry(&mut self, now: i64) -> Option<i64> {
        let at = self.future_time("expires_at", now);
        let ttl = self.integer("ttl_seconds", 1, MAX_TTL_SECONDS);
        if self.present("expires_at") && self.present("ttl_seconds") {
            self.bad("expires_at", "give expires_at or ttl_seconds, not both");
        }
        at.or(ttl.map(|ttl| now + ttl))
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
    pub allowed_ips: Vec<String>,
    pub quota: Option<Quota>,
}

impl CreateKey {
    const FIELDS: [&str; 9] = [
        "name",
        "owner",
        "scopes",
        "expires_at",
        "ttl_seconds",
        "rate_limit",
        "metadata",
        "allowed_ips",
        "quota",
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
            allowed_ips: f.strings("allowed_ips").unwrap_or_default(),
            quota: f.quota(),
        };
        (request, f)
    }
}

/// `PATCH /keys/{id}`, as written (not yet checked against the key rules or the caller's
/// rights). `null` removes `metadata`, `rate_limit`, `expires_at`, `allowed_ips` and
/// `quota`.
pub(super) fn read_patch(body: Map<String, Value>, now: i64) -> (KeyPatch, Fields) {
    const FIELDS: [&str; 7] = [
        "name",
        "scopes",
        "metadata",
        "rate_limit",
        "expires_at",
        "allowed_ips",
        "quota",
    ];
    let mut f = Fields::new(body, &FIELDS);
    let patch = KeyPatch {
        name: f.string("name"),
        scopes: f.strings("scopes"),
        metadata: f.nullable("metadata", |f| f.object("metadata")),
        rate_limit: f.nullable("rate_limit", Fields::rate_limit),
        expires_at: f.nullable("expires_at", |f| f.future_time("expires_at", now)),
        allowed_ips: f
            .nullable("allowed_ips", |f| f.strings("allowed_ips"))
            .map(Option::unwrap_or_default),
        quota: f.nullable("quota", Fields::quota),
        refill_quota: false,
    };
    (patch, f)
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

/// `POST /keys/verify`: `{"key", "scopes"?}`; returns the key and the scopes asked for.
pub(super) fn read_verify(body: Map<String, Value>) -> Result<(String, Vec<String>), ApiError> {
    let mut f = Fields::new(body, &["key", "scopes"]);
    let key = f.string("key");
    if key.is_none() && !f.errors.contains_key("key") {
        f.bad("key", "required");
    }
    let scopes = f.strings("scopes").unwrap_or_default();
    f.finish()?;
    Ok((key.unwrap_or_default(), scopes))
}

/// `POST /signup`: `{"name"?}`; the handler adds its own findings.
pub(super) fn read_signup(body: Map<String, Value>) -> (Option<String>, Fields) {
    let mut f = Fields::new(body, &["name"]);
    let name = f.string("name");
    (name, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Map<String, Value>, ApiError> {
        parse_object(&Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        for text in [
            r#"{"owner": "a", "owner": "b"}"#,
            r#"{"metadata": {"x": 1, "x": 2}}"#,
            r#"{"a": [{"k": 1, "k": 1}]}"#,
        ] {
            assert!(
                matches!(parse(text), Err(ApiError::InvalidJson(_))),
                "{text}"
            );
        }
        let fine =
            parse(r#"{"a": 1.5, "b": [true, null, "x", -3, 18446744073709551615], "c": {"a": 1}}"#);
        let map = fine.expect("valid");
        assert_eq!(map["b"][4], serde_json::json!(18446744073709551615u64));
        assert_eq!(map["a"], serde_json::json!(1.5));
    }

    #[test]
    fn null_is_refused_and_named() {
        let map = parse(r#"{"metadata": null, "grace_seconds": null}"#).expect("valid");
        let mut f = Fields::new(map, &["metadata", "grace_seconds"]);
        assert!(f.object("metadata").is_none());
        assert!(f.integer("grace_seconds", 0, 10).is_none());
        assert_eq!(f.errors.len(), 2);
    }
}
