//! The grammar of scopes and owners, and what holding a scope means.

/// Scope grammar of the contract: `[a-z0-9:._-]{1,64}`.
pub(crate) fn valid_scope(scope: &str) -> bool {
    !scope.is_empty()
        && scope.len() <= 64
        && scope
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b":._-".contains(&b))
}

/// Owner grammar: 1 to 128 characters of `A-Za-z0-9._:@-`.
pub(crate) fn valid_owner(owner: &str) -> bool {
    (1..=128).contains(&owner.len())
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

/// Whether `held` grants every scope in `required`.
pub(crate) fn has_scopes(held: &[String], required: &[String]) -> bool {
    required.iter().all(|scope| held.iter().any(|h| h == scope))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_check() {
        let held = vec!["read".to_string(), "write".to_string()];
        assert!(has_scopes(&held, &[]));
        assert!(has_scopes(&held, &["read".to_string()]));
        assert!(!has_scopes(&held, &["admin".to_string()]));
    }

    #[test]
    fn grammar() {
        assert!(valid_scope("keys:manage"));
        assert!(!valid_scope("UPPER"));
        assert!(!valid_scope(""));
        assert!(valid_owner("alice@example.com"));
        assert!(!valid_owner("bad owner!"));
    }
}
