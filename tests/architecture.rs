//! The boundaries of docs/architecture.md, checked on the sources: the runtime's folders import
//! each other without cycles, the runtime names no built-in plugin, and the CLI leaves rules
//! to the runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without its `#[cfg(test)]` module and without comments.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The runtime's top-level module a file belongs to: `train` for `src/train/resume.rs`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn runtime_modules_import_each_other_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("umae-runtime/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut modules: BTreeSet<String> = BTreeSet::new();
    for f in &files {
        modules.insert(module_of(&src, f));
    }
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = module_of(&src, f);
        let text = code(f);
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + 7..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if modules.contains(&name) && name != from {
                edges.entry(from.clone()).or_default().insert(name);
            }
        }
    }
    assert!(
        edges.contains_key("train"),
        "the scan sees imports: {edges:?}"
    );
    // Depth-first search for a cycle.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in &modules {
        if let Some(cycle) = visit(m, &edges, &mut Vec::new(), &mut done) {
            panic!("import cycle {}", cycle.join(" -> "));
        }
    }
    // The objective does not know about data parallelism.
    assert!(!edges["step"].contains("exec"), "{:?}", edges["step"]);
}

#[test]
fn the_runtime_names_no_built_in_plugin() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("umae-runtime/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let plugins = [
        "\"vit\"",
        "\"pixels\"",
        "\"mae\"",
        "\"tokens\"",
        "\"uniformity\"",
        "\"random\"",
        "\"blocks.",
    ];
    for f in &files {
        let text = code(f);
        for p in plugins {
            assert!(!text.contains(p), "{} names the plugin {p}", f.display());
        }
    }
}

#[test]
fn the_cli_leaves_rules_to_the_runtime() {
    let cli = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cli/mod.rs");
    let text = code(&cli);
    for rule in [
        "UMAE_EXPERIMENTAL_MULTI_NODE",
        "already holds a run",
        "ExitCode::from(2)",
    ] {
        assert!(
            !text.contains(rule),
            "src/cli/mod.rs decides `{rule}` itself"
        );
    }
}
