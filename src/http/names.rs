//! The header names keygate writes, built once: a name given as a string is parsed,
//! lowercased and copied into a fresh allocation on every insert.

use http::HeaderName;

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const KEY: HeaderName = HeaderName::from_static("key");
pub(crate) const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub(crate) const X_KEYGATE_OWNER: HeaderName = HeaderName::from_static("x-keygate-owner");
pub(crate) const X_KEYGATE_SCOPES: HeaderName = HeaderName::from_static("x-keygate-scopes");
pub(crate) const X_KEYGATE_METADATA: HeaderName = HeaderName::from_static("x-keygate-metadata");
pub(crate) const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub(crate) const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub(crate) const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
