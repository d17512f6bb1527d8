//! The cache warm-up's read of a sled store (`KeyStore::warm_set`).

use std::collections::HashSet;

use super::{Trees, decode_usage};
use crate::keys::{KeyRecord, Usage};
use crate::store::{KeyWithUsage, StoreError, WARM_CHUNK, WarmSink};

/// The warm set on its way out: sent a chunk at a time from the blocking pool, counted
/// against the limit.
struct Chunks<'a> {
    out: &'a WarmSink,
    chunk: Vec<KeyWithUsage>,
    sent: usize,
    limit: usize,
    closed: bool,
}

impl Chunks<'_> {
    fn done(&self) -> bool {
        self.sent >= self.limit || self.closed
    }

    fn push(&mut self, key: KeyWithUsage) {
        self.chunk.push(key);
        self.sent += 1;
        if self.chunk.len() == WARM_CHUNK {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.chunk.is_empty() && !self.closed {
            let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(WARM_CHUNK));
            self.closed = self.out.blocking_send(chunk).is_err();
        }
    }
}

impl Trees {
    /// See `KeyStore::warm_set`. The usage tree names every key ever used with its last
    /// use, so the used keys come from one pass over it (their ids and uses only, about 80
    /// bytes a used key while the set is read: the one part held whole), the most
    /// recent `limit` of them sorted first (the rest only if dead keys among those leave
    /// room); never-used keys follow from the end of the key tree (ids sort by creation).
    pub(super) fn warm_set(
        &self,
        now: i64,
        limit: usize,
        out: &WarmSink,
    ) -> Result<(), StoreError> {
        let live = |record: &KeyRecord| {
            !record.is_revoked() && record.expires_at.is_none_or(|at| at > now)
        };
        let mut used = Vec::new();
        for entry in self.usage.iter() {
            let (id, bytes) = entry?;
            used.push((decode_usage(&bytes), id));
        }
        let newest_use_first =
            |a: &(Usage, sled::IVec), b: &(Usage, sled::IVec)| b.0.last_used.cmp(&a.0.last_used);
        let split = limit.min(used.len());
        if split > 0 && split < used.len() {
            used.select_nth_unstable_by(split - 1, newest_use_first);
        }
        let (recent, older) = used.split_at_mut(split);
        recent.sort_unstable_by(newest_use_first);
        let mut chunks = Chunks {
            out,
            chunk: Vec::with_capacity(WARM_CHUNK),
            sent: 0,
            limit,
            closed: false,
        };
        let mut taken = HashSet::with_capacity(split);
        for (usage, id) in recent.iter() {
            if chunks.done() {
                break;
            }
            self.push_if_live(&mut chunks, &mut taken, id, *usage, &live)?;
        }
        if !chunks.done() {
            older.sort_unstable_by(newest_use_first);
            for (usage, id) in older.iter() {
                if chunks.done() {
                    break;
                }
                self.push_if_live(&mut chunks, &mut taken, id, *usage, &live)?;
            }
        }
        for entry in self.keys.iter().rev() {
            if chunks.done() {
                break;
            }
            let (id, bytes) = entry?;
            if taken.contains(&id) {
                continue;
            }
            // A record that does not decode is left for the request path, which reports it.
            let Ok(record) = Self::decode_record(&bytes) else {
                continue;
            };
            if live(&record) {
                chunks.push(self.with_usage(record)?);
            }
        }
        chunks.flush();
        Ok(())
    }

    /// Adds the record `id` names to the warm set when it is live; `taken` remembers every
    /// used key looked at, so the never-used pass skips them.
    fn push_if_live(
        &self,
        chunks: &mut Chunks<'_>,
        taken: &mut HashSet<sled::IVec>,
        id: &sled::IVec,
        usage: Usage,
        live: &impl Fn(&KeyRecord) -> bool,
    ) -> Result<(), StoreError> {
        taken.insert(id.clone());
        if let Some(bytes) = self.keys.get(id)?
            && let Ok(record) = Self::decode_record(&bytes)
            && live(&record)
        {
            chunks.push(KeyWithUsage { record, usage });
        }
        Ok(())
    }
}
