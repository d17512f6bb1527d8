//! What only sled has: its snapshot, written when a database opens.

use super::*;
use crate::keys::KeyFormat;

/// The log position of the newest snapshot sled wrote in `dir` (`snap.<LSN in hex>`),
/// which is where its next open starts replaying the log.
fn newest_snapshot(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .expect("store dir")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            u64::from_str_radix(name.strip_prefix("snap.")?, 16).ok()
        })
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_snapshots_a_bulk_load_and_keeps_every_record() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("open");
    let before = newest_snapshot(dir.path()).unwrap_or(0);
    let format = KeyFormat::new("kg");
    let records: Vec<KeyRecord> = (0..2000)
        .map(|_| KeyRecord::for_key(&format, &format.generate().expect("rng"), "bulk", 0))
        .collect();
    store.import(&records).await.expect("import");
    assert_eq!(
        newest_snapshot(dir.path()).unwrap_or(0),
        before,
        "sled snapshots only on open"
    );
    store.checkpoint().expect("checkpoint");
    let after = newest_snapshot(dir.path()).expect("a snapshot");
    assert!(
        after > before,
        "the snapshot covers the load: {after:x} > {before:x}"
    );

    let reopened = SledStore::reopen(dir.path()).expect("reopen");
    assert_eq!(reopened.count().await.expect("count"), 2000);
    let last = records.last().expect("records");
    let found = reopened
        .find_by_hash(&last.key_hash().expect("hash"))
        .await
        .expect("read");
    assert_eq!(found.as_ref(), Some(last));
}
