//! `keygate keys scan`: reports every key of the configured prefix, with a valid
//! checksum, in files, directory trees or standard input, as `path:line: preview`. For CI
//! jobs and pre-commit hooks: exit 1 when it found any, 0 when not, 2 when a path could not
//! be read (and nothing was found).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::keys::scan::Scanner;

/// Directories never worth scanning: a VCS's object store is compressed, and its working
/// tree is what gets scanned.
const SKIPPED_DIRS: [&str; 3] = [".git", ".hg", ".svn"];

#[derive(Default)]
struct Tally {
    found: usize,
    unreadable: usize,
}

pub(super) fn run(prefix: &str, paths: &[PathBuf]) -> ExitCode {
    let scanner = Scanner::new(prefix);
    let mut tally = Tally::default();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if paths.is_empty() || paths.iter().all(|p| p.as_os_str() == "-") {
        let mut data = Vec::new();
        match std::io::stdin().lock().read_to_end(&mut data) {
            Ok(_) => report(&scanner, "<stdin>", &data, &mut out, &mut tally),
            Err(e) => {
                eprintln!("keygate: cannot read standard input: {e}");
                tally.unreadable += 1;
            }
        }
    } else {
        for path in paths {
            walk(&scanner, path, true, &mut out, &mut tally);
        }
    }
    let _ = out.flush();
    if tally.found > 0 {
        eprintln!(
            "keygate: {} key(s) found: revoke them (POST /_keygate/keys/revoke) and remove them",
            tally.found
        );
        ExitCode::from(1)
    } else if tally.unreadable > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// Scans `path`: a file, or a directory recursively (symbolic links inside it are not
/// followed, so a link loop cannot trap the scan; a path given on the command line is).
fn walk(scanner: &Scanner, path: &Path, given: bool, out: &mut impl Write, tally: &mut Tally) {
    let meta = if given {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    };
    let meta = match meta {
        Ok(meta) => meta,
        Err(e) => {
            eprintln!("keygate: {}: {e}", path.display());
            tally.unreadable += 1;
            return;
        }
    };
    if meta.is_dir() {
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) => {
                eprintln!("keygate: {}: {e}", path.display());
                tally.unreadable += 1;
                return;
            }
        };
        let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        // Sorted, so that the report is the same on every run.
        children.sort();
        for child in children {
            let skipped = child
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| SKIPPED_DIRS.contains(&n));
            if !skipped {
                walk(scanner, &child, false, out, tally);
            }
        }
    } else if meta.is_file() {
        match std::fs::read(path) {
            Ok(data) if !Scanner::is_binary(&data) => {
                report(scanner, &path.display().to_string(), &data, out, tally);
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("keygate: {}: {e}", path.display());
                tally.unreadable += 1;
            }
        }
    }
}

fn report(scanner: &Scanner, name: &str, data: &[u8], out: &mut impl Write, tally: &mut Tally) {
    for found in scanner.scan(data) {
        tally.found += 1;
        let _ = writeln!(out, "{name}:{}: {}", found.line, found.preview);
    }
}
