//! The wall clock in Unix seconds, and RFC 3339 as the API and the CLI write times.

use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// RFC 3339 UTC with whole seconds, e.g. `2026-11-23T10:30:00Z`.
pub(crate) fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Parses an RFC 3339 time with any offset and fraction into Unix seconds.
pub(crate) fn parse_rfc3339(text: &str) -> Option<i64> {
    OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_whole_second_utc() {
        assert_eq!(rfc3339(1_795_429_800), "2026-11-23T10:30:00Z");
        assert_eq!(
            parse_rfc3339("2026-11-23T11:30:00.75+01:00"),
            Some(1_795_429_800)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
