//! The store failing under a running gateway: its directory is on a small tmpfs that is
//! then filled, so every store write fails with ENOSPC. Management writes must answer 503
//! `store_unavailable`, and admitted traffic with cached keys must keep flowing.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::common::*;

const ADMIN: &str = "store-faults-admin-token-padded-";

/// A tmpfs mounted for the test, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> SmallDisk {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (CI runs as root)"
        );
        SmallDisk { path, _dir: dir }
    }

    /// Writes zeros until the disk is full.
    fn fill(&self) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M"])
            .arg(format!("of={}", self.path.join("filler").display()))
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_management_writes_while_traffic_flows() {
    let disk = SmallDisk::mount(64);
    let upstream = Upstream::start("u").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    // The store on the small disk; everything else (logs, config) stays in the temp dir.
    config.write();
    let text = std::fs::read_to_string(config.path()).expect("config");
    let store_line = format!("path = \"{}\"", config.store_path().display());
    let on_disk = format!("path = \"{}\"", disk.path.join("store").display());
    std::fs::write(config.path(), text.replace(&store_line, &on_disk)).expect("config");
    let config_path = config.path();
    let (_, key) = create_key(&config_path, "alice", &[], None);

    // Start with the rewritten config (Gateway::start would write the original again).
    let mut child = Command::new(BIN)
        .args(["serve", "--config", config_path.to_str().expect("path")])
        .env("KEYGATE_ADMIN_TOKEN", ADMIN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn keygate");
    let base = config.base_url();
    let c = client();
    let ready = eventually(Duration::from_secs(20), || {
        let c = c.clone();
        let url = format!("{}/healthz", config.admin_url());
        async move { c.get(&url).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    assert!(ready, "keygate did not start");

    // The key is admitted, and so cached.
    let resp = c
        .get(format!("{base}/x"))
        .header("x-api-key", &key)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);

    disk.fill();

    // Writes land in space sled already holds until it needs more: create until one fails.
    let mut refused = None;
    for attempt in 0..3000 {
        let create = c
            .post(format!("{base}/_keygate/keys"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({"owner": "bob", "metadata": {"pad": "x".repeat(3000)}}))
            .send()
            .await
            .expect("create");
        match error_code(create).await {
            (201, _) => continue,
            (status, code) => {
                assert_eq!(
                    (status, code.as_str()),
                    (503, "store_unavailable"),
                    "a failed write is answered 503 store_unavailable (attempt {attempt})"
                );
                refused = Some(attempt);
                break;
            }
        }
    }
    assert!(refused.is_some(), "no write failed on a full disk");

    for _ in 0..50 {
        let resp = c
            .get(format!("{base}/x"))
            .header("x-api-key", &key)
            .send()
            .await
            .expect("request");
        assert_eq!(
            resp.status(),
            200,
            "admitted traffic keeps flowing on a full disk"
        );
    }

    let _ = child.kill();
    let _ = child.wait();
}
