//! The module graph of `src/` has no cycle: data flows one way, wire -> agent -> readings ->
//! health -> tools -> front ends (docs/architecture.md). Read from the source itself, so a new
//! `use crate::x` that points back up fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its files name with `crate::`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let top = relative
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "main" || top == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let deps = graph.entry(top.clone()).or_default();
            for (i, _) in text.match_indices("crate::") {
                let name: String = text[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    deps.insert(name);
                }
            }
        }
    }
    graph
}

#[test]
fn no_module_imports_one_that_imports_it() {
    let graph = graph();
    assert!(graph.contains_key("tools") && graph["tools"].contains("agent"));
    for start in graph.keys() {
        // Depth-first from `start`, remembering the path, to name the cycle if there is one.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                assert!(
                    next != start,
                    "import cycle: {} -> {start}",
                    path.join(" -> ")
                );
                if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
}

#[test]
fn front_ends_are_not_imported_below_them() {
    let graph = graph();
    for front in ["cli", "mcp", "rpc", "http", "serve", "demo", "top"] {
        for (module, deps) in &graph {
            if ["cli", "mcp", "rpc", "http", "serve", "demo", "top"].contains(&module.as_str()) {
                continue;
            }
            assert!(
                !deps.contains(front),
                "{module} imports the front end {front}"
            );
        }
    }
}
