//! Listing filters: by state, exact name and scope.

use crate::keys::KeyRecord;

/// What a key is now, for the `state` filter of listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Revoked,
    Expired,
}

impl KeyState {
    pub fn of(record: &KeyRecord, now: i64) -> KeyState {
        if record.is_revoked() {
            KeyState::Revoked
        } else if record.expires_at.is_some_and(|at| at <= now) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }
}

/// Listing filters; every one given must match.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<KeyState>,
    /// The exact name.
    pub name: Option<String>,
    /// A scope the key holds.
    pub scope: Option<String>,
}

impl ListFilter {
    pub(super) fn is_empty(&self) -> bool {
        self.state.is_none() && self.name.is_none() && self.scope.is_none()
    }

    pub(super) fn matches(&self, record: &KeyRecord, now: i64) -> bool {
        self.state
            .is_none_or(|state| KeyState::of(record, now) == state)
            && self.name.as_ref().is_none_or(|name| record.name == *name)
            && self
                .scope
                .as_ref()
                .is_none_or(|scope| record.scopes.contains(scope))
    }
}
