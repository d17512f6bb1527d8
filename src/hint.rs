//! "Did you mean": the nearest known name for a mistyped one, for `keygate check` and the
//! management API's 422 details alike.

/// How many edits a known name may be from the unknown one to be suggested.
const MAX_HINT_DISTANCE: usize = 2;

/// The known name nearest to `name`: at most `MAX_HINT_DISTANCE` edits away, and fewer
/// edits than half the longer name's length (so that `zz` suggests nothing).
pub(crate) fn nearest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::osa_distance(name, k), *k))
        .filter(|&(d, k)| d <= MAX_HINT_DISTANCE && 2 * d < k.len().max(name.len()))
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// `unknown field`, with the nearest known field when there is one.
pub(crate) fn unknown_field(name: &str, known: &[&str]) -> String {
    match nearest(name, known) {
        Some(known) => format!("unknown field; did you mean \"{known}\"?"),
        None => "unknown field".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_names_are_suggested_far_ones_not() {
        assert_eq!(nearest("scope", &["scopes", "name"]), Some("scopes"));
        assert_eq!(nearest("listne", &["listen", "threads"]), Some("listen"));
        assert_eq!(nearest("zzz", &["name", "owner"]), None);
        assert_eq!(
            unknown_field("ttl", &["ttl_seconds"]),
            "unknown field".to_string()
        );
    }
}
