//! The shape of `src/`, checked from its `use crate::` paths (test modules excluded):
//! every top-level module uses only modules that `lib.rs`'s layout map lists above it (so
//! the folders form no cycle), the map names exactly the modules `lib.rs` declares, the
//! files form no cycle among themselves either, and no file is over 600 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with its module path (`gateway::ctx`; `""` for lib.rs).
fn modules(dir: &Path, prefix: &str, out: &mut BTreeMap<String, PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let join = |name: &str| {
            if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}::{name}")
            }
        };
        if path.is_dir() {
            modules(&path, &join(&name), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let module = match name.as_str() {
                "lib" | "mod" => prefix.to_string(),
                "main" if prefix.is_empty() => continue,
                _ => join(&name),
            };
            out.insert(module, path);
        }
    }
}

/// The file's code without its `#[cfg(test)]` tail (test modules sit at the end) and
/// without comments.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read source");
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    code.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules `crate::` paths in `code` name, each resolved to the longest known module.
fn crate_uses(code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut uses = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        for len in (1..=segments.len()).rev() {
            let candidate = segments[..len].join("::");
            if known.contains(&candidate) {
                uses.insert(candidate);
                break;
            }
        }
    }
    uses
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = BTreeMap::new();
    modules(&src_dir(), "", &mut files);
    let known: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(module, path)| {
            let mut uses = crate_uses(&code_of(path), &known);
            uses.remove(module);
            (module.clone(), uses)
        })
        .collect()
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or_default()
}

/// The module names of `lib.rs`'s "Layout" map, in order.
fn layout_map() -> Vec<String> {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).expect("lib.rs");
    lib.lines()
        .filter_map(|line| line.strip_prefix("//! - `"))
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn folders_use_only_what_the_layout_map_lists_above_them() {
    let order = layout_map();
    let rank = |m: &str| order.iter().position(|o| o == m);
    let mut wrong = Vec::new();
    for (module, uses) in graph() {
        let Some(from) = rank(top(&module)) else {
            continue;
        };
        for used in uses {
            let to = top(&used);
            if to == top(&module) {
                continue;
            }
            // `cli` sits on `app`; both are the top floor.
            match rank(to) {
                Some(to_rank) if to_rank < from => {}
                _ => wrong.push(format!("{module} uses {used}")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "edges pointing up the layout map:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_layout_map_names_every_module_of_lib_rs() {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).expect("lib.rs");
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|line| line.trim().strip_suffix(';'))
        .filter_map(|line| line.strip_prefix("pub mod ").or(line.strip_prefix("mod ")))
        .map(str::to_string)
        .collect();
    let mapped: BTreeSet<String> = layout_map().into_iter().collect();
    assert_eq!(declared, mapped);
}

#[test]
fn files_form_no_import_cycle() {
    let graph = graph();
    // Depth-first search; a module met again while still on the path closes a cycle.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        let cycle = visit(node, &graph, &mut Vec::new(), &mut done);
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap_or_default().join(" -> ")
        );
    }
}

#[test]
fn no_source_file_is_over_600_lines() {
    let mut files = BTreeMap::new();
    modules(&src_dir(), "", &mut files);
    let long: Vec<String> = files
        .values()
        .filter_map(|path| {
            let lines = std::fs::read_to_string(path).expect("read").lines().count();
            (lines > MAX_FILE_LINES).then(|| format!("{}: {lines}", path.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_FILE_LINES} lines: {long:?}"
    );
}
