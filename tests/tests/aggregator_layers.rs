//! The aggregator's layers, checked from its sources: the hub crate builds without any
//! I/O crate, no module of the aggregator imports one that imports it back (directly or
//! through others), and no non-test source file outgrows what one reader can hold.
//!
//! Modules are read from the files (`foo.rs`, `foo/mod.rs`); references are the
//! `crate::`, `super::` and `self::` paths in them, outside `#[cfg(test)]` items. A
//! reference from `a::b::c` to `a::d::e` is an edge `b → d` among the children of `a`;
//! a module using its own ancestors or descendants is not an edge (a parent declares and
//! re-exports its children).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The largest non-test source file, in lines.
const MAX_LINES: usize = 800;

/// Crates that do I/O: the hub must reach none of them.
const IO_CRATES: &[&str] = &[
    "tokio",
    "tokio-stream",
    "tokio-rustls",
    "tonic",
    "hyper",
    "hyper-util",
    "h2",
    "axum",
    "tower",
    "rusqlite",
    "libsqlite3-sys",
    "mio",
    "socket2",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The aggregator's library crates: (name, src directory).
fn crates() -> Vec<(&'static str, PathBuf)> {
    let root = workspace();
    vec![
        ("sonde-aggregator", root.join("aggregator/src")),
        ("sonde-hub", root.join("aggregator/hub/src")),
    ]
}

#[test]
fn the_hub_crate_depends_on_no_io_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "tree",
            "-p",
            "sonde-hub",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p sonde-hub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let reached: BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| IO_CRATES.contains(name))
        .collect();
    assert!(
        reached.is_empty(),
        "sonde-hub reaches I/O crates {reached:?}; `cargo tree -p sonde-hub -e normal -i <crate>` shows through what"
    );
}

#[test]
fn no_module_of_the_aggregator_imports_one_that_imports_it_back() {
    let mut cycles = Vec::new();
    for (name, src) in crates() {
        let modules = read_modules(&src);
        assert!(!modules.is_empty(), "no sources under {}", src.display());
        for cycle in find_cycles(&modules) {
            cycles.push(format!("{name}: {}", cycle.join(" → ")));
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn no_non_test_source_file_of_the_aggregator_is_over_the_limit() {
    let mut long = Vec::new();
    for (_, src) in crates() {
        for module in read_modules(&src).values() {
            if module.lines > MAX_LINES {
                long.push(format!(
                    "{} ({} lines)",
                    module.file.display(),
                    module.lines
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines outside tests: {long:?}"
    );
}

struct Module {
    file: PathBuf,
    /// Lines outside `#[cfg(test)]` items.
    lines: usize,
    /// Every path the module names through `crate::`, `super::` or `self::`, absolute.
    references: Vec<Vec<String>>,
}

/// Every non-test module under `src`, by its path from the crate root.
fn read_modules(src: &Path) -> BTreeMap<Vec<String>, Module> {
    let mut files = Vec::new();
    walk(src, &mut files);
    files.sort();
    let mut test_files = BTreeSet::new();
    let mut modules = BTreeMap::new();
    // Two passes: the first finds the files declared as `#[cfg(test)] mod x;`.
    let mut read = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap().to_path_buf();
        if rel == Path::new("main.rs") {
            continue; // the binary: a crate of its own on top of the library
        }
        let path = module_path(&rel);
        let text = std::fs::read_to_string(&file).unwrap();
        let (code, test_mods) = strip_tests(&text);
        for m in test_mods {
            let mut p = path.clone();
            p.push(m);
            test_files.insert(p);
        }
        read.push((file, path, code));
    }
    for (file, path, code) in read {
        if path.last().is_some_and(|last| last == "tests")
            || test_files.iter().any(|t| path.starts_with(t))
        {
            continue;
        }
        let references = references(&code, &path);
        modules.insert(
            path,
            Module {
                file,
                lines: code.lines().count(),
                references,
            },
        );
    }
    modules
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The text without its `#[cfg(test)]` items, and the names of the modules declared
/// under `#[cfg(test)]` in other files.
fn strip_tests(text: &str) -> (String, Vec<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    let mut test_mods = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "#[cfg(test)]" {
            i += 1;
            while i < lines.len() && lines[i].trim().starts_with("#[") {
                i += 1;
            }
            if i >= lines.len() {
                break;
            }
            let item = lines[i].trim();
            if let Some(rest) = item.strip_prefix("mod ").or(item.strip_prefix("pub mod "))
                && let Some(name) = rest.strip_suffix(';')
            {
                test_mods.push(name.trim().to_string());
                i += 1;
                continue;
            }
            // A module at column 0 (as rustfmt leaves it) ends at the first `}` there;
            // braces inside its strings do not count.
            if !lines[i].starts_with(' ') && lines[i].trim_end().ends_with('{') {
                while i < lines.len() && lines[i] != "}" {
                    i += 1;
                }
                i += 1;
                continue;
            }
            // Another item with a body: skip to where its braces close.
            let mut depth = 0i64;
            let mut opened = false;
            while i < lines.len() {
                for c in lines[i].chars() {
                    match c {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                i += 1;
                if (opened && depth <= 0) || (!opened && lines[i - 1].trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        out.push_str(lines[i]);
        out.push('\n');
        i += 1;
    }
    (out, test_mods)
}

/// The absolute paths named in `code`, the source of the module at `here`.
fn references(code: &str, here: &[String]) -> Vec<Vec<String>> {
    let code: String = code
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start_of_word = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':');
        if start_of_word {
            for (prefix, base) in [
                ("crate::", Some(Vec::new())),
                (
                    "super::",
                    here.split_last().map(|(_, parent)| parent.to_vec()),
                ),
                ("self::", Some(here.to_vec())),
            ] {
                if bytes[i..].starts_with(prefix.as_bytes()) {
                    let mut base = base.unwrap_or_default();
                    let mut j = i + prefix.len();
                    // super::super::
                    while prefix == "super::" && bytes[j..].starts_with(b"super::") {
                        base.pop();
                        j += "super::".len();
                    }
                    parse_tree(&code, &mut j, base, &mut out);
                    i = j;
                    break;
                }
            }
        }
        i += 1;
    }
    out
}

/// Parses a use tree (`a::b`, `a::{b, c::d}`) at `*at`, pushing each full path.
fn parse_tree(code: &str, at: &mut usize, mut base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let bytes = code.as_bytes();
    loop {
        skip_space(bytes, at);
        if *at < bytes.len() && bytes[*at] == b'{' {
            *at += 1;
            loop {
                skip_space(bytes, at);
                if *at >= bytes.len() {
                    return;
                }
                if bytes[*at] == b'}' {
                    *at += 1;
                    return;
                }
                if bytes[*at] == b',' {
                    *at += 1;
                    continue;
                }
                let before = *at;
                parse_tree(code, at, base.clone(), out);
                if *at == before {
                    *at += 1; // not a path (`*`, `self`): move on
                }
            }
        }
        let start = *at;
        while *at < bytes.len() && (bytes[*at].is_ascii_alphanumeric() || bytes[*at] == b'_') {
            *at += 1;
        }
        if *at == start {
            out.push(base);
            return;
        }
        let ident = &code[start..*at];
        if ident != "self" {
            base.push(ident.to_string());
        }
        if bytes[*at..].starts_with(b"::") {
            *at += 2;
            continue;
        }
        out.push(base);
        return;
    }
}

fn skip_space(bytes: &[u8], at: &mut usize) {
    while *at < bytes.len() && bytes[*at].is_ascii_whitespace() {
        *at += 1;
    }
}

/// Every cycle among siblings, as the modules along it.
fn find_cycles(modules: &BTreeMap<Vec<String>, Module>) -> Vec<Vec<String>> {
    // parent -> (child -> children it uses)
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, module) in modules {
        for reference in &module.references {
            // The longest prefix of the reference that is a module.
            let to = (0..=reference.len())
                .rev()
                .map(|n| reference[..n].to_vec())
                .find(|p| modules.contains_key(p))
                .unwrap_or_default();
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // an ancestor or a descendant
            }
            graphs
                .entry(from[..common].to_vec())
                .or_default()
                .entry(from[common].clone())
                .or_default()
                .insert(to[common].clone());
        }
    }
    let mut cycles = Vec::new();
    for (parent, graph) in &graphs {
        let mut seen = BTreeSet::new();
        for start in graph.keys() {
            let mut stack = vec![start.clone()];
            dfs(graph, &mut stack, &mut seen, &mut cycles, parent);
        }
    }
    cycles
}

fn dfs(
    graph: &BTreeMap<String, BTreeSet<String>>,
    stack: &mut Vec<String>,
    done: &mut BTreeSet<String>,
    cycles: &mut Vec<Vec<String>>,
    parent: &[String],
) {
    let node = stack.last().unwrap().clone();
    if done.contains(&node) {
        return;
    }
    for next in graph.get(&node).into_iter().flatten() {
        if let Some(pos) = stack.iter().position(|n| n == next) {
            let mut cycle: Vec<String> = stack[pos..]
                .iter()
                .chain(std::iter::once(next))
                .map(|m| {
                    let mut p = parent.to_vec();
                    p.push(m.clone());
                    p.join("::")
                })
                .collect();
            cycle.dedup();
            cycles.push(cycle);
        } else if !done.contains(next) {
            stack.push(next.clone());
            dfs(graph, stack, done, cycles, parent);
            stack.pop();
        }
    }
    done.insert(node);
}

#[test]
fn the_reference_reader_sees_grouped_and_relative_paths() {
    let here = vec!["remote_write".to_string(), "queue".to_string()];
    let refs = references(
        "use crate::storage::{Store, history::{a, b}};\nuse super::tail::Tail;\n// crate::not::this\nlet x = crate::merge::up(1);\n",
        &here,
    );
    let refs: Vec<String> = refs.iter().map(|r| r.join("::")).collect();
    assert_eq!(
        refs,
        [
            "storage::Store",
            "storage::history::a",
            "storage::history::b",
            "remote_write::tail::Tail",
            "merge::up",
        ]
    );
    let (code, mods) = strip_tests(
        "fn a() {}\n#[cfg(test)]\nmod tests;\n#[cfg(test)]\nmod inline {\n    use crate::x;\n}\nfn b() {}\n",
    );
    assert_eq!(code, "fn a() {}\nfn b() {}\n");
    assert_eq!(mods, ["tests"]);
}
