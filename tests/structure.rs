//! The shape of `src/`, checked: no module depends on another that depends back on it (at the
//! top, between the folders; inside each folder, between its files), no file's code (its
//! tests aside) is longer than about 600 lines, and the pure steps name no client.
//!
//! Dependencies are read with syn from every path and `use` outside test modules: `crate::a::b`
//! and `super::x` resolve to the module that defines the item, following `pub use`
//! re-exports, so a child that reaches a sibling through its parent's re-export counts too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use syn::visit::Visit;

/// A module, as its path from the crate root: `["export", "writer"]`.
type Module = Vec<String>;
/// Each module and the modules it uses.
type Graph = BTreeMap<Module, BTreeSet<Module>>;

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
/// The longest a file's code may be (tests aside).
const MAX_CODE_LINES: usize = 600;

struct Source {
    module: Module,
    file: PathBuf,
    ast: syn::File,
}

/// Every module file under `src/` but test modules (`lib.rs` and `main.rs` aside).
fn sources() -> Result<Vec<Source>> {
    let all = all_sources()?;
    let mut tests: BTreeSet<Module> = BTreeSet::new();
    let lib = std::fs::read_to_string(format!("{SRC}/lib.rs"))?;
    let mut n = Names::default();
    n.visit_file(&syn::parse_file(&lib)?);
    tests.extend(n.test_modules.into_iter().map(|t| vec![t]));
    for s in &all {
        let mut n = Names::default();
        n.visit_file(&s.ast);
        for t in n.test_modules {
            let mut m = s.module.clone();
            m.push(t);
            tests.insert(m);
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| !tests.iter().any(|t| s.module.starts_with(t)))
        .collect())
}

/// Every module file under `src/` (`lib.rs` and `main.rs` aside).
fn all_sources() -> Result<Vec<Source>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from(SRC)];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir:?}"))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(SRC)?;
            let mut module: Module = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if module.last().is_some_and(|l| l == "mod") {
                module.pop();
            }
            if module == ["lib"] || module == ["main"] {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let ast = syn::parse_file(&text).with_context(|| format!("parsing {path:?}"))?;
            out.push(Source {
                module,
                file: path,
                ast,
            });
        }
    }
    out.sort_by(|a, b| a.module.cmp(&b.module));
    Ok(out)
}

fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

/// Every path a module's non-test code names, as written (`crate::x::y`, `super::z`), and its
/// `pub use` re-exports (the name they give → the path they name).
#[derive(Default)]
struct Names {
    paths: Vec<Vec<String>>,
    reexports: BTreeMap<String, Vec<String>>,
    /// Modules declared `#[cfg(test)] mod x;`, whose files are tests.
    test_modules: Vec<String>,
}

impl<'ast> Visit<'ast> for Names {
    fn visit_item(&mut self, i: &'ast syn::Item) {
        let attrs = match i {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Impl(m) => &m.attrs,
            _ => return syn::visit::visit_item(self, i),
        };
        if is_test(attrs) {
            if let syn::Item::Mod(m) = i
                && m.content.is_none()
            {
                self.test_modules.push(m.ident.to_string());
            }
            return;
        }
        if let syn::Item::Use(u) = i {
            let public = matches!(u.vis, syn::Visibility::Public(_));
            let mut found = Vec::new();
            use_paths(&u.tree, &mut Vec::new(), &mut found);
            for (alias, path) in found {
                if public {
                    self.reexports.insert(alias, path.clone());
                }
                self.paths.push(path);
            }
            return;
        }
        syn::visit::visit_item(self, i);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segs.first().is_some_and(|s| s == "crate" || s == "super") {
            self.paths.push(segs);
        }
        syn::visit::visit_path(self, p);
    }
}

/// The paths a use tree names, with the name each is known by.
fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<(String, Vec<String>)>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let name = n.ident.to_string();
            let mut path = prefix.clone();
            if name != "self" {
                path.push(name.clone());
            }
            let alias = path.last().cloned().unwrap_or(name);
            out.push((alias, path));
        }
        syn::UseTree::Rename(r) => {
            let mut path = prefix.clone();
            path.push(r.ident.to_string());
            out.push((r.rename.to_string(), path));
        }
        syn::UseTree::Glob(_) => out.push(("*".into(), prefix.clone())),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_paths(t, prefix, out);
            }
        }
    }
}

struct Crate {
    modules: BTreeSet<Module>,
    reexports: BTreeMap<Module, BTreeMap<String, Vec<String>>>,
}

impl Crate {
    /// `path` as written in `from`, from the crate root.
    fn absolute(&self, from: &Module, path: &[String]) -> Option<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        let mut rest = path;
        match rest.first().map(String::as_str) {
            Some("crate") => rest = &rest[1..],
            Some("super") => {
                out = from.clone();
                while rest.first().is_some_and(|s| s == "super") {
                    out.pop()?;
                    rest = &rest[1..];
                }
            }
            _ => return None,
        }
        out.extend(rest.iter().cloned());
        Some(out)
    }

    /// The module that defines what `path` (from the root) names: the longest module prefix,
    /// followed through `pub use` re-exports.
    fn resolve(&self, path: &[String], depth: usize) -> Option<Module> {
        let known = (1..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|p| self.modules.contains(p))?;
        if depth < 8
            && let Some(next) = path.get(known.len())
            && let Some(target) = self.reexports.get(&known).and_then(|r| r.get(next))
            && let Some(abs) = self.absolute(&known, target)
            && let Some(m) = self.resolve(&abs, depth + 1)
        {
            return Some(m);
        }
        Some(known)
    }
}

/// Module → the modules it uses (other than itself and its ancestors).
fn dependencies() -> Result<(Vec<Source>, Graph)> {
    let sources = sources()?;
    let mut names = BTreeMap::new();
    for s in &sources {
        let mut n = Names::default();
        n.visit_file(&s.ast);
        names.insert(s.module.clone(), n);
    }
    let krate = Crate {
        modules: sources.iter().map(|s| s.module.clone()).collect(),
        reexports: names
            .iter()
            .map(|(m, n)| (m.clone(), n.reexports.clone()))
            .collect(),
    };
    let mut deps: Graph = BTreeMap::new();
    for (module, n) in &names {
        let entry = deps.entry(module.clone()).or_default();
        for path in &n.paths {
            let Some(abs) = krate.absolute(module, path) else {
                continue;
            };
            let Some(target) = krate.resolve(&abs, 0) else {
                continue;
            };
            if &target != module && !module.starts_with(&target) {
                entry.insert(target);
            }
        }
    }
    Ok((sources, deps))
}

/// Sibling edges: for `a` using `b`, the children of their closest common ancestor that hold
/// each (none when one holds the other).
fn sibling_edges(deps: &Graph) -> Graph {
    let mut out: Graph = BTreeMap::new();
    for (a, targets) in deps {
        for b in targets {
            let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
            if common == a.len() || common == b.len() {
                continue; // one is the other's ancestor
            }
            out.entry(a[..=common].to_vec())
                .or_default()
                .insert(b[..=common].to_vec());
        }
    }
    out
}

/// A cycle in `graph`, if any, as the modules along it.
fn cycle(graph: &Graph) -> Option<Vec<Module>> {
    fn visit(
        m: &Module,
        graph: &Graph,
        state: &mut BTreeMap<Module, u8>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        state.insert(m.clone(), 1);
        stack.push(m.clone());
        for next in graph.get(m).into_iter().flatten() {
            match state.get(next) {
                Some(1) => {
                    let start = stack.iter().position(|s| s == next).unwrap_or(0);
                    let mut c = stack[start..].to_vec();
                    c.push(next.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, graph, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(m.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        if !state.contains_key(m)
            && let Some(c) = visit(m, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

fn show(c: &[Module]) -> String {
    c.iter()
        .map(|m| m.join("::"))
        .collect::<Vec<_>>()
        .join(" -> ")
}

#[test]
fn no_module_depends_on_one_that_depends_back_on_it() -> Result<()> {
    let (_, deps) = dependencies()?;
    let siblings = sibling_edges(&deps);
    let top: BTreeMap<&Module, &BTreeSet<Module>> =
        siblings.iter().filter(|(m, _)| m.len() == 1).collect();
    println!("folders and what they use:");
    for (m, uses) in &top {
        let uses: Vec<String> = uses.iter().map(|u| u.join("::")).collect();
        println!("  {:<10} -> {}", m.join("::"), uses.join(", "));
    }
    if let Some(c) = cycle(&siblings) {
        bail!("a module cycle: {}", show(&c));
    }
    Ok(())
}

#[test]
fn the_test_of_cycles_finds_one() -> Result<()> {
    let m = |s: &str| -> Module { s.split("::").map(str::to_string).collect() };
    let deps = BTreeMap::from([
        (m("backend::consul"), BTreeSet::from([m("export::plan")])),
        (m("export::writer"), BTreeSet::from([m("backend")])),
    ]);
    let siblings = sibling_edges(&deps);
    let c = cycle(&siblings).context("the cycle backend <-> export")?;
    assert_eq!(show(&c), "backend -> export -> backend");
    Ok(())
}

/// Code lines of a file: up to its test module (a file that is a test module counts 0).
fn code_lines(s: &Source) -> Result<usize> {
    if s.module.last().is_some_and(|l| l == "tests") {
        return Ok(0);
    }
    let text = std::fs::read_to_string(&s.file)?;
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|w| w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod tests"))
        .unwrap_or(lines.len());
    Ok(lines[..end].len())
}

#[test]
fn no_file_holds_more_than_about_600_lines_of_code() -> Result<()> {
    let (sources, _) = dependencies()?;
    let mut long = Vec::new();
    for s in &sources {
        let n = code_lines(s)?;
        if n > MAX_CODE_LINES {
            long.push(format!("{} ({n} lines)", rel(&s.file)));
        }
    }
    if !long.is_empty() {
        bail!(
            "files whose code (tests aside) is longer than {MAX_CODE_LINES} lines: {}",
            long.join(", ")
        );
    }
    Ok(())
}

fn rel(p: &Path) -> String {
    p.strip_prefix(concat!(env!("CARGO_MANIFEST_DIR"), "/"))
        .unwrap_or(p)
        .display()
        .to_string()
}

/// The pure steps: what they may not name.
const PURE: [&str; 10] = [
    "model",
    "api",
    "export::desired",
    "export::plan",
    "export::records",
    "import::hold",
    "import::render",
    "status::catalog",
    "status::registration",
    "status::conditions",
];
const CLIENTS: [&str; 7] = [
    "kube::Client",
    "kube::Api",
    "kube::api::Api",
    "reqwest",
    "etcd_client",
    "zookeeper_client",
    "tokio::net",
];

#[test]
fn the_pure_steps_take_no_client() -> Result<()> {
    let (sources, _) = dependencies()?;
    let pure = |m: &Module| {
        let name = m.join("::");
        PURE.iter()
            .any(|p| name == *p || name.starts_with(&format!("{p}::")))
            || (m.first().is_some_and(|f| f == "backend")
                && m.last().is_some_and(|l| l == "layout"))
    };
    let mut found = Vec::new();
    for s in sources.iter().filter(|s| pure(&s.module)) {
        let text = std::fs::read_to_string(&s.file)?;
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for c in CLIENTS {
            if code.contains(c) {
                found.push(format!("{} names {c}", rel(&s.file)));
            }
        }
    }
    if !found.is_empty() {
        bail!("pure steps that name a client: {}", found.join("; "));
    }
    Ok(())
}
