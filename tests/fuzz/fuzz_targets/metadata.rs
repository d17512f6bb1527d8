//! Key validation on arbitrary JSON metadata: never panics, and NUL characters (which
//! PostgreSQL's jsonb cannot hold) are refused exactly when a string or object key holds
//! one.
#![no_main]

use keygate::lifecycle::{FieldErrors, validate_new_key};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Object(meta)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let mut errors = FieldErrors::new();
    validate_new_key(None, "owner", &[], None, Some(&meta), &mut errors);
    let nul_refused = errors
        .get("metadata")
        .is_some_and(|reasons| reasons.iter().any(|r| r.contains("NUL")));
    assert_eq!(nul_refused, holds_nul(&Value::Object(meta)));
});
