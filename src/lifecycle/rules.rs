//! The rules of a key's fields, shared by create, patch, sign-up and the CLI: every bad
//! field is named, with every reason it is bad.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::keys::scope::{valid_owner, valid_scope};
use crate::keys::{KeyPatch, MAX_ALLOWED_IPS, RateLimit, parse_cidr};

pub const MAX_SCOPES: usize = 32;
pub const MAX_METADATA_BYTES: usize = 4096;
pub const MAX_TTL_SECONDS: i64 = 10 * 365 * 86_400;
pub const MAX_GRACE_SECONDS: i64 = 604_800;
pub const MAX_NAME_CHARS: usize = 100;

/// Field -> reasons, for 422 `validation_failed` details.
pub type FieldErrors = BTreeMap<String, Vec<String>>;

/// Adds `reason` to `field`'s reasons.
pub fn add_error(errors: &mut FieldErrors, field: &str, reason: impl Into<String>) {
    errors
        .entry(field.to_string())
        .or_default()
        .push(reason.into());
}

/// Checks the fields of a new key; every bad field is named.
pub fn validate_new_key(
    name: Option<&str>,
    owner: &str,
    scopes: &[String],
    rate_limit: Option<RateLimit>,
    metadata: Option<&Map<String, Value>>,
    errors: &mut FieldErrors,
) {
    if let Some(name) = name {
        validate_name(name, errors);
    }
    // An owner already found missing is not also reported malformed.
    if !errors.contains_key("owner") && !valid_owner(owner) {
        add_error(
            errors,
            "owner",
            "must be 1 to 128 characters of A-Za-z0-9._:@-",
        );
    }
    validate_scopes(scopes, errors);
    if let Some(rl) = rate_limit {
        validate_rate_limit(rl, errors);
    }
    if let Some(meta) = metadata {
        validate_metadata(meta, errors);
    }
}

fn validate_name(name: &str, errors: &mut FieldErrors) {
    let chars = name.chars().count();
    if !(1..=MAX_NAME_CHARS).contains(&chars) {
        let reason = format!("must be 1 to {MAX_NAME_CHARS} characters");
        add_error(errors, "name", reason);
    } else if name.chars().any(char::is_control) {
        add_error(errors, "name", "must not contain control characters");
    }
}

fn validate_scopes(scopes: &[String], errors: &mut FieldErrors) {
    if scopes.len() > MAX_SCOPES {
        add_error(errors, "scopes", format!("at most {MAX_SCOPES} scopes"));
    }
    if scopes.iter().any(|s| !valid_scope(s)) {
        let reason = "each scope is 1 to 64 characters of a-z0-9:._-";
        add_error(errors, "scopes", reason);
    }
}

fn validate_rate_limit(rl: RateLimit, errors: &mut FieldErrors) {
    if rl.requests == 0 || rl.requests > RateLimit::MAX_REQUESTS {
        let max = RateLimit::MAX_REQUESTS;
        add_error(
            errors,
            "rate_limit",
            format!("requests must be between 1 and {max}"),
        );
    }
    if rl.window_seconds == 0 || rl.window_seconds > RateLimit::MAX_WINDOW_SECONDS {
        let max = RateLimit::MAX_WINDOW_SECONDS;
        let reason = format!("window_seconds must be between 1 and {max}");
        add_error(errors, "rate_limit", reason);
    }
}

fn validate_metadata(meta: &Map<String, Value>, errors: &mut FieldErrors) {
    let text = serde_json::to_string(meta).unwrap_or_default();
    if text.len() > MAX_METADATA_BYTES {
        let reason = format!("must be at most {MAX_METADATA_BYTES} bytes of JSON");
        add_error(errors, "metadata", reason);
    }
    // PostgreSQL's jsonb cannot hold NUL; refuse it on every backend alike.
    if map_holds_nul(meta) {
        add_error(errors, "metadata", "must not contain NUL characters");
    }
}

/// Whether a NUL character is in any string of `value`, object keys included.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map_holds_nul(map),
        _ => false,
    }
}

fn map_holds_nul(map: &Map<String, Value>) -> bool {
    map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v))
}

/// Checks a patch as `validate_new_key` checks a new key, field by field, and normalises
/// it (scopes sorted and deduplicated, CIDRs with their host bits cleared).
pub fn check_patch(patch: &mut KeyPatch, errors: &mut FieldErrors) {
    if let Some(name) = &patch.name {
        validate_name(name, errors);
    }
    if let Some(scopes) = &mut patch.scopes {
        validate_scopes(scopes, errors);
        scopes.sort();
        scopes.dedup();
    }
    if let Some(Some(rl)) = patch.rate_limit {
        validate_rate_limit(rl, errors);
    }
    if let Some(Some(meta)) = &patch.metadata {
        validate_metadata(meta, errors);
    }
    if let Some(cidrs) = &mut patch.allowed_ips {
        *cidrs = normalized_cidrs(cidrs, errors);
    }
}

/// `allowed_ips` with each entry normalised (`10.1.2.3/8` is `10.0.0.0/8`, an address is
/// its /32 or /128), duplicates dropped; every malformed entry is reported.
pub fn normalized_cidrs(cidrs: &[String], errors: &mut FieldErrors) -> Vec<String> {
    if cidrs.len() > MAX_ALLOWED_IPS {
        let reason = format!("at most {MAX_ALLOWED_IPS} CIDRs");
        add_error(errors, "allowed_ips", reason);
    }
    let mut out = Vec::with_capacity(cidrs.len());
    for text in cidrs {
        match parse_cidr(text) {
            Some(net) => out.push(net.to_string()),
            None => add_error(
                errors,
                "allowed_ips",
                format!(
                    "{text:?} is not a CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32) or an IP address"
                ),
            ),
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_in_metadata_is_refused() {
        for meta in [
            serde_json::json!({"note": "a\u{0}b"}),
            serde_json::json!({"a\u{0}": 1}),
            serde_json::json!({"deep": [1, {"x": ["\u{0}"]}]}),
        ] {
            let mut errors = FieldErrors::new();
            validate_new_key(None, "alice", &[], None, meta.as_object(), &mut errors);
            assert!(errors.contains_key("metadata"), "{meta}: {errors:?}");
        }
    }

    /// The text `\u0000` (a backslash, then `u0000`) is not a NUL character: it used to be
    /// refused because the check searched the escaped JSON text.
    #[test]
    fn escaped_looking_text_in_metadata_is_kept() {
        let mut errors = FieldErrors::new();
        let meta = serde_json::json!({"path": "C:\\u0000\\dir", "\\u0000": "key"});
        validate_new_key(None, "alice", &[], None, meta.as_object(), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn validation_names_every_bad_field() {
        let mut errors = FieldErrors::new();
        validate_new_key(
            Some(""),
            "bad owner!",
            &["UPPER".to_string()],
            Some(RateLimit {
                requests: 0,
                window_seconds: 1,
            }),
            None,
            &mut errors,
        );
        let fields: Vec<&str> = errors.keys().map(String::as_str).collect();
        assert_eq!(fields, ["name", "owner", "rate_limit", "scopes"]);
    }
}
