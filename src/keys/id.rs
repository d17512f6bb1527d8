//! Identifiers of keys and audit entries: ULIDs, strictly increasing within this process
//! (`ulid::Generator` continues the same millisecond from the previous id), so listings and
//! the audit log order exactly by creation.

use std::sync::Mutex;

use ulid::{Generator, Ulid};

/// A fresh id. Not on the request path: the lock is uncontended.
pub fn new_key_id() -> String {
    static GENERATOR: Mutex<Generator> = Mutex::new(Generator::new());
    let mut generator = GENERATOR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // 2^80 ids in one millisecond overflow; then the id is random in the same millisecond,
    // which is still unique, only no longer ordered.
    let id = match generator.generate() {
        Ok(id) => id,
        Err(overflow) => overflow.commit_overflow_random(),
    };
    id.to_string()
}

/// A ULID that need not be ordered (request ids).
pub fn new_ulid() -> Ulid {
    Ulid::generate()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_strictly_increase() {
        let ids: Vec<String> = (0..10_000).map(|_| new_key_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }
}
