//! keygate's error envelope, checked one way everywhere: `Content-Type: application/json`
//! and `{"error": {"code", "message", "request_id"[, "details"]}}` (contract section 7).
//!
//! `error_envelope` is the check; `check_error` adds the expected status and code, and
//! `Reply` is a response read whole (by reqwest) with the assertions the tests make on it.

use reqwest::header::HeaderMap;
use serde_json::{Map, Value};

/// What the envelope check reads of a response, however it was received.
pub(crate) trait Received {
    fn status(&self) -> u16;
    fn header(&self, name: &str) -> Option<&str>;
    fn body(&self) -> &[u8];
}

/// Checks that `answer` is keygate's JSON error: `Content-Type: application/json`, a body
/// `{"error": {...}}` whose `code` and `message` are non-empty strings, whose `request_id`
/// is non-empty and equal to the `x-request-id` header, and whose `details`, when present,
/// maps fields to arrays of reasons (strings). Returns the `error` object.
pub(crate) fn error_envelope(answer: &impl Received) -> Result<Map<String, Value>, String> {
    let text = || String::from_utf8_lossy(answer.body()).into_owned();
    let content_type = answer.header("content-type").unwrap_or_default();
    if !content_type.starts_with("application/json") {
        return Err(format!("Content-Type is {content_type:?}; body {}", text()));
    }
    let body: Value = serde_json::from_slice(answer.body())
        .map_err(|e| format!("body is not JSON ({e}): {}", text()))?;
    let Some(error) = body.get("error").and_then(Value::as_object) else {
        return Err(format!("no error object: {body}"));
    };
    for field in ["code", "message", "request_id"] {
        if error
            .get(field)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(format!("no error.{field}: {body}"));
        }
    }
    if answer.header("x-request-id") != error["request_id"].as_str() {
        return Err(format!(
            "x-request-id header {:?} differs from error.request_id: {body}",
            answer.header("x-request-id")
        ));
    }
    if let Some(details) = error.get("details") {
        let well_formed = details.as_object().is_some_and(|fields| {
            fields.values().all(|reasons| {
                reasons
                    .as_array()
                    .is_some_and(|r| r.iter().all(Value::is_string))
            })
        });
        if !well_formed {
            return Err(format!(
                "error.details is not an object of string arrays: {body}"
            ));
        }
    }
    Ok(error.clone())
}

/// `error_envelope`, for an answer that must have `status` and `error.code` `code`.
pub(crate) fn check_error(
    answer: &impl Received,
    status: u16,
    code: &str,
) -> Result<Map<String, Value>, String> {
    if answer.status() != status {
        return Err(format!(
            "expected {status} {code}, got {}: {}",
            answer.status(),
            String::from_utf8_lossy(answer.body())
        ));
    }
    let error = error_envelope(answer)?;
    if error["code"] != code {
        return Err(format!(
            "expected code {code}, got {}",
            Value::Object(error)
        ));
    }
    Ok(error)
}

/// `check_error`, panicking with `what` and the reason; returns the `error` object.
pub(crate) fn assert_error(
    what: &str,
    answer: &impl Received,
    status: u16,
    code: &str,
) -> Map<String, Value> {
    check_error(answer, status, code).unwrap_or_else(|why| panic!("{what}: {why}"))
}

/// The `error.code` of an answer that must be keygate's JSON error (any 4xx or 5xx): panics,
/// with the reason, when the envelope is wrong; "" below 400.
pub(crate) fn code_of(what: &str, answer: &impl Received) -> String {
    if answer.status() < 400 {
        return String::new();
    }
    match error_envelope(answer) {
        Ok(error) => error["code"].as_str().unwrap_or_default().to_string(),
        Err(why) => panic!("{what}: {} {why}", answer.status()),
    }
}

/// A response read whole.
#[derive(Clone)]
pub(crate) struct Reply {
    /// What was asked, for messages (e.g. `GET /keys`).
    pub what: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub bytes: Vec<u8>,
    pub text: String,
    /// The body as JSON; `Null` when it is not JSON.
    pub json: Value,
}

impl Received for Reply {
    fn status(&self) -> u16 {
        self.status
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn body(&self) -> &[u8] {
        &self.bytes
    }
}

impl Reply {
    pub(crate) async fn read(what: impl Into<String>, resp: reqwest::Response) -> Reply {
        let what = what.into();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the body failed: {e:?}"))
            .to_vec();
        Reply {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
            json: serde_json::from_slice(&bytes).unwrap_or_default(),
            bytes,
            what,
        }
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        Received::header(self, name)
    }

    /// Asserts a success status; returns the JSON body.
    pub(crate) fn ok(&self, status: u16) -> &Value {
        assert_eq!(
            self.status, status,
            "{}: status; body {}",
            self.what, self.text
        );
        &self.json
    }

    /// Asserts keygate's error envelope with `status` and `code`; returns `error`.
    pub(crate) fn err(&self, status: u16, code: &str) -> &Value {
        assert_error(&self.what, self, status, code);
        &self.json["error"]
    }

    /// A 422 `validation_failed` naming each of `fields` in `details`; returns `details`.
    pub(crate) fn invalid(&self, fields: &[&str]) -> &Value {
        let error = self.err(422, "validation_failed");
        let details = error["details"]
            .as_object()
            .unwrap_or_else(|| panic!("{}: no details object: {}", self.what, self.text));
        for field in fields {
            let reasons = details.get(*field).and_then(Value::as_array);
            assert!(
                reasons.is_some_and(|r| !r.is_empty() && r.iter().all(Value::is_string)),
                "{}: details does not name {field} with reasons: {}",
                self.what,
                self.text
            );
        }
        &error["details"]
    }
}
