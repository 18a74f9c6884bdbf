//! The shape of `src/`, checked so that it does not drift: no import
//! circle between the crate's top-level modules, none between the files
//! of one module directory, no source file over 700 lines, and
//! docs/architecture.md naming exactly the modules that exist.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 700;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

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

/// The file's code without comments and without a trailing
/// `#[cfg(test)] mod tests { .. }` (tests may use what they like).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segments named after `prefix` (`crate::`, `super::`):
/// `crate::a::b` gives `a`, `crate::{a, b::c}` gives `a` and `b`.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

/// A circle in `graph`, if there is one, as the nodes around it.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_owned(), 1);
        path.push(n.to_owned());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = path.iter().position(|p| p == m).unwrap_or(0);
                    let mut c = path[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// The top-level module a file belongs to (`src/udp/relay/mod.rs` →
/// `udp`), None for the crate roots.
fn top(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

fn is_test_file(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "tests.rs")
        || p.components().any(|c| c.as_os_str() == "tests")
}

#[test]
fn no_import_circle_between_top_level_modules() {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files.iter().filter(|f| !is_test_file(f)) {
        let rel = f.strip_prefix(&root).unwrap();
        let Some(from) = top(rel) else { continue };
        let deps = graph.entry(from.clone()).or_default();
        for to in names_after(&code(f), "crate::") {
            let exists = root.join(format!("{to}.rs")).exists() || root.join(&to).is_dir();
            if to != from && exists {
                deps.insert(to);
            }
        }
    }
    assert!(graph.len() > 20, "modules read: {graph:?}");
    if let Some(c) = circle(&graph) {
        panic!("import circle between modules of src/: {}", c.join(" -> "));
    }
}

#[test]
fn no_import_circle_between_the_files_of_one_module() {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    // Per directory: its files (mod.rs aside: a parent may re-export what
    // its children define) and what each takes from its siblings.
    let mut dirs: BTreeMap<PathBuf, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for f in files.iter().filter(|f| !is_test_file(f)) {
        let dir = f.parent().unwrap().to_path_buf();
        let stem = f.file_stem().unwrap().to_str().unwrap().to_owned();
        if stem == "mod" || dir == root {
            continue;
        }
        let text = code(f);
        let module: Vec<String> = dir
            .strip_prefix(&root)
            .unwrap()
            .components()
            .map(|c| c.as_os_str().to_str().unwrap().to_owned())
            .collect();
        let mut siblings: BTreeSet<String> = names_after(&text, "super::");
        // `crate::udp::relay` from inside src/udp/ names a sibling too.
        let own = format!("crate::{}::", module.join("::"));
        siblings.extend(names_after(&text, &own));
        let graph = dirs.entry(dir.clone()).or_default();
        let deps = graph.entry(stem.clone()).or_default();
        for s in siblings {
            let exists = dir.join(format!("{s}.rs")).exists() || dir.join(&s).is_dir();
            if s != stem && exists {
                deps.insert(s);
            }
        }
    }
    for (dir, graph) in &dirs {
        if let Some(c) = circle(graph) {
            panic!(
                "import circle between the files of {}: {}",
                dir.display(),
                c.join(" -> ")
            );
        }
    }
}

#[test]
fn no_source_file_is_over_700_lines() {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}

#[test]
fn the_architecture_document_names_the_modules_that_exist() {
    let root = src();
    let doc = std::fs::read_to_string(root.join("../docs/architecture.md")).unwrap();
    // Every `src/...` path it names exists.
    let mut missing = Vec::new();
    let mut rest = doc.as_str();
    while let Some(i) = rest.find("src/") {
        rest = &rest[i + 4..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '/' | '.'))
            .collect();
        let path = path.trim_end_matches(['.', '/']);
        if !path.is_empty() && !root.join(path).exists() {
            missing.push(format!("src/{path}"));
        }
    }
    assert!(missing.is_empty(), "docs/architecture.md names {missing:?}");
    // Every top-level module is named (as `src/x.rs` or `src/x/`, for a
    // module whose children sit in a directory beside or below it).
    let mut modules = BTreeSet::new();
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap();
        modules.insert(name.strip_suffix(".rs").unwrap_or(name).to_owned());
    }
    let unnamed: Vec<&String> = modules
        .iter()
        .filter(|m| !doc.contains(&format!("src/{m}.rs")) && !doc.contains(&format!("src/{m}/")))
        .collect();
    assert!(
        unnamed.is_empty(),
        "docs/architecture.md does not name {unnamed:?}"
    );
}
