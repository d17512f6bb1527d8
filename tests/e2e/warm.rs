//! The cache warm-up (`store.cache_warm_keys`): a gateway that starts on a store of keys
//! caches them in the background, so a key's first request is a cache hit and reads no
//! store on the request path. Revoked keys are not warmed; with the warm-up off, the first
//! request is a miss (what the warm-up saves).

use std::time::Duration;

use crate::common::cluster::Instance;
use crate::common::tls::metric;
use crate::common::*;

const HIT: &str = "keygate_key_cache_lookups_total{result=\"hit\"}";
const MISS: &str = "keygate_key_cache_lookups_total{result=\"miss\"}";
const STORE_READS: &str = "keygate_store_reads_total";

/// Waits for the warm-up's log line and returns it.
async fn warmed(stderr: impl Fn() -> String) -> String {
    let found = eventually(Duration::from_secs(15), || {
        let text = stderr();
        async move { text.contains("key cache warmed") }
    })
    .await;
    assert!(found, "no warm-up logged; stderr:\n{}", stderr());
    stderr()
        .lines()
        .find(|line| line.contains("key cache warmed"))
        .unwrap_or_default()
        .to_string()
}

async fn get(base: &str, key: &str) -> u16 {
    status_with_key(&client(), &format!("{base}/work"), key).await
}

#[tokio::test]
async fn keys_stored_before_a_start_are_hits_on_first_use() {
    let upstream = Upstream::start("warm").await;
    let mut config = GatewayConfig::single_route(&[upstream.addr]);
    let path = config.write();
    let (_, alice) = create_key(&path, "alice", &[], None);
    let (_, bob) = create_key(&path, "bob", &[], None);
    let (revoked, carol) = create_key(&path, "carol", &[], None);
    let id = revoked["id"].as_str().expect("id");
    let out = keygate(&[
        "keys",
        "revoke",
        "--config",
        path.to_str().expect("path"),
        id,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let stderr_path = config.dir.path().join("stderr.log");
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    {
        let gateway = Gateway::start(&config).await;
        let line = warmed(stderr).await;
        assert!(line.contains("keys=2"), "two live keys warmed: {line}");
        assert_eq!(get(&gateway.base, &alice).await, 200);
        assert_eq!(get(&gateway.base, &bob).await, 200);
        assert_eq!(metric(&gateway.admin, HIT).await, 2.0);
        assert_eq!(metric(&gateway.admin, MISS).await, 0.0);
        assert_eq!(metric(&gateway.admin, STORE_READS).await, 0.0);
        assert_eq!(get(&gateway.base, &carol).await, 401, "revoked stays out");
        assert_eq!(upstream.count(), 2);
    }

    // The same store with the warm-up off: the first request reads the store.
    config.store_extra = "cache_warm_keys = 0".into();
    let gateway = Gateway::start(&config).await;
    assert_eq!(get(&gateway.base, &alice).await, 200);
    assert_eq!(metric(&gateway.admin, MISS).await, 1.0);
    assert_eq!(metric(&gateway.admin, STORE_READS).await, 1.0);
}

/// On PostgreSQL the warm-up runs once the invalidation listener LISTENs (which clears the
/// cache), so keys another gateway created before this one started are hits here.
#[tokio::test]
async fn a_gateway_joining_a_shared_store_starts_with_its_keys_cached() {
    let upstream = Upstream::start("warm-pg").await;
    let db = pg::fresh_database();
    let first = Instance::start(&db, upstream.addr).await;
    let (_, key) = first.create_key("alice").await;

    let joining = Instance::start(&db, upstream.addr).await;
    let line = warmed(|| joining.stderr()).await;
    assert!(line.contains("keys=1"), "{line}");
    assert_eq!(joining.call(&key).await.0, 200);
    assert_eq!(joining.cache_hits().await, 1);
    assert_eq!(metric(&joining.gateway.admin, STORE_READS).await, 0.0);
}
