//! `keygate keys scan` (contract section 14): the real binary over a real directory tree
//! and standard input. A planted key is found with its path and line, a key with a wrong
//! checksum and a binary file are not, and the key itself never appears in the output.

use std::io::Write;
use std::process::{Command, Stdio};

use keygate::keys::KeyFormat;

use crate::common::BIN;

fn scan(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(["keys", "scan"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keygate keys scan");
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(stdin.unwrap_or_default().as_bytes())
            .expect("stdin");
    }
    let out = child.wait_with_output().expect("scan output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `key` with its last checksum digit changed.
fn with_wrong_checksum(key: &str) -> String {
    let mut bytes = key.as_bytes().to_vec();
    let last = bytes.len() - 1;
    bytes[last] = if bytes[last] == b'0' { b'1' } else { b'0' };
    String::from_utf8(bytes).expect("ASCII")
}

#[test]
fn a_planted_key_is_found_with_its_line_and_never_printed() {
    let format = KeyFormat::new("kg");
    let key = format.generate().expect("rng");
    let decoy = with_wrong_checksum(&format.generate().expect("rng"));
    let tree = tempfile::tempdir().expect("temp dir");
    let nested = tree.path().join("src/deep/er");
    std::fs::create_dir_all(&nested).expect("dirs");
    let planted = nested.join("settings.py");
    std::fs::write(
        &planted,
        format!("import os\n\n# TODO move to a vault\nAPI_KEY = \"{key}\"\n"),
    )
    .expect("write");
    std::fs::write(tree.path().join("decoy.txt"), format!("x = {decoy}\n")).expect("write");
    let mut binary = b"\x00\x01ELF".to_vec();
    binary.extend_from_slice(key.as_bytes());
    std::fs::write(tree.path().join("blob.bin"), binary).expect("write");
    std::fs::create_dir_all(tree.path().join(".git")).expect("dir");
    std::fs::write(tree.path().join(".git/COMMIT_EDITMSG"), &key).expect("write");

    let root = tree.path().to_str().expect("utf-8");
    let (code, stdout, stderr) = scan(&["--prefix", "kg", root], None);
    assert_eq!(code, 1, "a key found: exit 1; {stdout} {stderr}");
    let expected = format!("{}:4: {}\n", planted.display(), format.preview(&key));
    assert_eq!(stdout, expected, "exactly the planted key, with its line");
    for text in [&stdout, &stderr] {
        assert!(!text.contains(&key), "the key itself was printed");
        assert!(!text.contains(&key[3..45]), "most of the key was printed");
    }

    // The decoy alone: nothing found.
    let decoy_file = tree.path().join("decoy.txt");
    let (code, stdout, _) = scan(
        &["--prefix", "kg", decoy_file.to_str().expect("utf-8")],
        None,
    );
    assert_eq!((code, stdout.as_str()), (0, ""));
    // Another prefix finds nothing in the tree.
    assert_eq!(scan(&["--prefix", "acme", root], None).0, 0);
    // A path that does not exist: exit 2.
    let missing = tree.path().join("missing");
    assert_eq!(
        scan(&["--prefix", "kg", missing.to_str().expect("utf-8")], None).0,
        2
    );
}

#[test]
fn standard_input_is_scanned_with_the_configured_prefix() {
    let format = KeyFormat::new("acme");
    let key = format.generate().expect("rng");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("keygate.toml");
    std::fs::write(
        &config,
        "[keys]\nprefix = \"acme\"\n\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstreams = [\"127.0.0.1:9\"]\n",
    )
    .expect("config");
    let config = config.to_str().expect("utf-8");
    let input = format!("one\ntwo {key} three\n{}\n", with_wrong_checksum(&key));
    let (code, stdout, stderr) = scan(&["--config", config], Some(&input));
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stdout, format!("<stdin>:2: {}\n", format.preview(&key)));
    assert!(!stdout.contains(&key) && !stderr.contains(&key));
    let (code, stdout, _) = scan(&["--config", config, "-"], Some("nothing here\n"));
    assert_eq!((code, stdout.as_str()), (0, ""));
}
