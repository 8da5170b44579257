//! The layers of ARCHITECTURE.md, held by the source itself: no module of the data path
//! imports the configuration or control side, and no two of the daemon's modules import each
//! other (directly or around a cycle). Read from `src/` as text: every `crate::NAME` outside
//! test code is an import of module NAME.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The modules of the data path, and those above them that they must not import.
const DATA_PATH: [&str; 5] = ["iothread", "engine", "virtq", "blk", "qos"];
const ABOVE: [&str; 6] = ["export", "daemon", "control", "cli", "serve", "config_file"];

/// Top-level module → the top-level modules its non-test code names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // BLKPLANE_SRC_DIR: another tree's src/, to see what these tests say of it.
    let src = std::env::var_os("BLKPLANE_SRC_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let rel = path.strip_prefix(&src).unwrap().to_string_lossy().to_string();
        let module = rel.split(['/', '.']).next().unwrap().to_string();
        if !rel.ends_with(".rs")
            || rel.ends_with("_tests.rs")
            || ["main", "lib"].contains(&module.as_str())
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests sit at the end of a file, after `#[cfg(test)] mod tests`.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let names = graph.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String =
                code[i + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            let is_module = src.join(&name).is_dir() || src.join(format!("{name}.rs")).exists();
            if is_module && !name.is_empty() && name != module {
                names.insert(name);
            }
        }
    }
    graph
}

#[test]
fn the_data_path_imports_nothing_above_it() {
    let graph = imports();
    for module in DATA_PATH {
        let up: Vec<&String> =
            graph[module].iter().filter(|m| ABOVE.contains(&m.as_str())).collect();
        assert!(up.is_empty(), "{module} imports {up:?}, above it");
    }
}

#[test]
fn no_modules_import_each_other_in_a_cycle() {
    let graph = imports();
    // Depth-first search; a module met again on the current path closes a cycle.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(i) = path.iter().position(|p| *p == m) {
            panic!("an import cycle: {} -> {m}", path[i..].join(" -> "));
        }
        if !done.insert(m) {
            return;
        }
        path.push(m);
        for next in graph.get(m).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
    assert!(graph.len() > 15, "read too few modules: {graph:?}");
}
