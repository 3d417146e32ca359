//! `modules/`: one folder per module, with its Kbuild (or Makefile) and an optional
//! `module.toml` that says what kmodforge cannot guess.
//!
//! ```toml
//! language = "rust"                 # "c" (default) or "rust"; guessed from *.rs files
//! kernels = '^6\.12\.'              # only kernels whose version matches (DKMS BUILD_EXCLUSIVE_KERNEL)
//! depends = ["kmf_export"]          # modules whose exported symbols this one uses
//! make = ["make", "-C", "${kernel_source_dir}", "M=${module_dir}", "modules"]  # DKMS MAKE[]
//! built-modules = ["src/foo.ko"]    # where the .ko files land (DKMS BUILT_MODULE_LOCATION)
//! [test]
//! parameters = ["greeting=hello"]   # module parameters for the load test
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use anyhow::{Context, Result};
use regex::Regex;
use serde::Deserialize;
use toml::Spanned;

use crate::config::diag::{Diagnostic, Diagnostics, Source, display_path};
use crate::config::template::Vars;

/// The file in a module folder that holds its metadata.
pub const MANIFEST: &str = "module.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    C,
    Rust,
}

#[derive(Debug, Clone)]
pub struct Module {
    /// The folder name; also the name the plan, logs and summary use.
    pub name: String,
    pub dir: PathBuf,
    pub language: Language,
    /// Only kernels whose version matches are built.
    pub kernels: Option<Regex>,
    /// Modules (folders) whose exported symbols this module uses.
    pub depends: Vec<String>,
    /// The build command (argv); `None` is `make -C ${kernel_source_dir} M=${module_dir} modules`.
    pub make: Option<Vec<String>>,
    /// Paths of the built `.ko` files relative to the module folder; `None` takes
    /// every `.ko` the build leaves in the folder tree.
    pub built_modules: Option<Vec<String>>,
    pub test: ModuleTest,
}

/// What the QEMU load test passes to the module.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModuleTest {
    /// `name=value` module parameters for modprobe.
    #[serde(default)]
    pub parameters: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawModule {
    language: Option<Language>,
    kernels: Option<Spanned<String>>,
    #[serde(default)]
    depends: Vec<Spanned<String>>,
    make: Option<Spanned<Vec<String>>>,
    built_modules: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    test: ModuleTest,
}

static NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$").unwrap());

/// Module names are folder names: letters, digits, `_` and `-`, so never a path.
pub fn check_name(name: &str) -> Result<(), String> {
    if NAME.is_match(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid module name: a module is a folder directly in modules/, \
             named with letters, digits, '_' and '-' only (no '/', no '..')"
        ))
    }
}

/// The variables a module's `make` command may use.
pub fn make_vars(kver: &str, kernel_source_dir: &str, module_dir: &str) -> Vars {
    Vars::kernel(kver)
        .set("kernelver", kver)
        .set("kernel_source_dir", kernel_source_dir)
        .set("module_dir", module_dir)
}

/// Reads every module folder in `dir`, sorted by name. Hidden folders and plain files
/// (a README, say) are passed over.
pub fn discover(dir: &Path) -> Result<Vec<Module>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut diags = Diagnostics::default();
    let mut modules = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", display_path(dir)))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.file_type()?.is_dir() {
            continue;
        }
        match load(&entry.path(), &name) {
            Ok(m) => modules.push(m),
            Err(d) => diags.0.extend(d.0),
        }
    }
    let names: BTreeSet<String> = modules.iter().map(|m| m.name.clone()).collect();
    for m in &modules {
        for dep in &m.depends {
            if !names.contains(dep) {
                diags.push(Diagnostic::new(format!(
                    "{}: module {} depends on {dep:?}, which is not a folder in modules/",
                    display_path(&m.dir.join(MANIFEST)),
                    m.name
                )));
            }
        }
    }
    if let Some(cycle) = find_cycle(&modules) {
        diags.push(Diagnostic::new(format!(
            "modules depend on each other in a cycle: {}",
            cycle.join(" -> ")
        )));
    }
    diags.into_result()?;
    Ok(modules)
}

fn load(dir: &Path, name: &str) -> Result<Module, Diagnostics> {
    check_name(name).map_err(|e| Diagnostic::new(format!("{}: {e}", display_path(dir))))?;
    if !dir.join("Kbuild").is_file() && !dir.join("Makefile").is_file() {
        return Err(Diagnostic::new(format!("{} has no Kbuild or Makefile", display_path(dir)))
            .help(format!(
                "a module folder needs a Kbuild file (e.g. `obj-m := {name}.o`) or a Makefile; see README.md, \"Modules\""
            ))
            .into());
    }
    let manifest = dir.join(MANIFEST);
    let (raw, source) = if manifest.is_file() {
        let source = Source::read(&manifest).map_err(|e| Diagnostic::new(format!("{e:#}")))?;
        (source.parse::<RawModule>()?, Some(source))
    } else {
        (RawModule::default(), None)
    };
    let mut diags = Diagnostics::default();
    let at = |span: std::ops::Range<usize>, msg: String| -> Diagnostic {
        source
            .as_ref()
            .expect("spans only come from a manifest")
            .error(&span, msg)
    };

    let kernels = match &raw.kernels {
        Some(re) => match Regex::new(re.get_ref()) {
            Ok(r) => Some(r),
            Err(e) => {
                let first_line = e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                diags.push(
                    at(
                        re.span(),
                        format!("`kernels` is not a valid regular expression: {first_line}"),
                    )
                    .help("it is matched against each kernel version, e.g. '^6\\.12\\.'"),
                );
                None
            }
        },
        None => None,
    };
    let mut depends = Vec::new();
    for d in &raw.depends {
        match check_name(d.get_ref()) {
            Ok(()) if d.get_ref() == name => {
                diags.push(at(d.span(), format!("module {name} depends on itself")))
            }
            Ok(()) => depends.push(d.get_ref().clone()),
            Err(e) => diags.push(at(d.span(), e)),
        }
    }
    if let Some(make) = &raw.make {
        if make.get_ref().is_empty() {
            diags.push(at(
                make.span(),
                "`make` is empty: give the command and its arguments".into(),
            ));
        }
        for arg in make.get_ref() {
            if let Err(e) = make_vars("1.2.3", "/k", "/m").expand(arg) {
                diags.push(at(make.span(), e).help("the variables are ${kernelver}, ${kernel_source_dir}, ${module_dir} and KMM's ${KERNEL_*}"));
            }
        }
    }
    let mut built_modules = None;
    if let Some(list) = &raw.built_modules {
        let mut paths = Vec::new();
        for p in list {
            let path = Path::new(p.get_ref());
            let inside = path.is_relative()
                && path
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !inside || !p.get_ref().ends_with(".ko") {
                diags.push(at(
                    p.span(),
                    format!(
                        "{:?} is not a path to a .ko file inside the module folder",
                        p.get_ref()
                    ),
                ));
            } else {
                paths.push(p.get_ref().clone());
            }
        }
        built_modules = Some(paths);
    }
    diags.into_result()?;

    let language = raw.language.unwrap_or_else(|| {
        if has_rust_sources(dir) {
            Language::Rust
        } else {
            Language::C
        }
    });
    Ok(Module {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        language,
        kernels,
        depends,
        make: raw.make.map(Spanned::into_inner),
        built_modules,
        test: raw.test,
    })
}

fn has_rust_sources(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "rs"))
        })
        .unwrap_or(false)
}

/// Modules sorted so that every module comes after the modules it depends on; ties by name.
pub fn dependency_order(modules: &[Module]) -> Vec<&Module> {
    let by_name: BTreeMap<&str, &Module> = modules.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    fn visit<'a>(
        m: &'a Module,
        by_name: &BTreeMap<&str, &'a Module>,
        done: &mut BTreeSet<&'a str>,
        out: &mut Vec<&'a Module>,
    ) {
        if !done.insert(m.name.as_str()) {
            return;
        }
        for d in &m.depends {
            if let Some(dep) = by_name.get(d.as_str()) {
                visit(dep, by_name, done, out);
            }
        }
        out.push(m);
    }
    for m in by_name.values() {
        visit(m, &by_name, &mut done, &mut out);
    }
    out
}

fn find_cycle(modules: &[Module]) -> Option<Vec<String>> {
    let by_name: BTreeMap<&str, &Module> = modules.iter().map(|m| (m.name.as_str(), m)).collect();
    fn walk<'a>(
        name: &'a str,
        by_name: &BTreeMap<&str, &'a Module>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = path.iter().position(|n| *n == name) {
            let mut cycle: Vec<String> = path[pos..].iter().map(|s| s.to_string()).collect();
            cycle.push(name.to_string());
            return Some(cycle);
        }
        let m = by_name.get(name)?;
        path.push(name);
        for d in &m.depends {
            if let Some(c) = walk(d, by_name, path) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    by_name
        .keys()
        .find_map(|n| walk(n, &by_name, &mut Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree(mods: &[(&str, Option<&str>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, manifest) in mods {
            let m = dir.path().join(name);
            fs::create_dir_all(&m).unwrap();
            fs::write(m.join("Kbuild"), "obj-m := x.o\n").unwrap();
            if let Some(t) = manifest {
                fs::write(m.join(MANIFEST), t).unwrap();
            }
        }
        dir
    }

    fn err(mods: &[(&str, Option<&str>)]) -> String {
        let d = tree(mods);
        format!("{:#}", discover(d.path()).unwrap_err())
    }

    #[test]
    fn discovers_sorted_modules_with_defaults() {
        let d = tree(&[
            ("b", None),
            ("a", Some("language = \"rust\"\ndepends = [\"b\"]\n")),
        ]);
        fs::write(d.path().join("README.md"), "not a module").unwrap();
        fs::create_dir(d.path().join(".hidden")).unwrap();
        let mods = discover(d.path()).unwrap();
        let names: Vec<_> = mods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(mods[0].language, Language::Rust);
        assert_eq!(mods[1].language, Language::C);
        let order: Vec<_> = dependency_order(&mods)
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(order, ["b", "a"]);
    }

    #[test]
    fn a_folder_without_kbuild_or_makefile_is_an_error() {
        let d = tree(&[]);
        fs::create_dir(d.path().join("empty")).unwrap();
        let e = format!("{:#}", discover(d.path()).unwrap_err());
        assert!(e.contains("empty has no Kbuild or Makefile"), "{e}");
    }

    #[test]
    fn bad_names_regexes_and_paths_point_at_module_toml() {
        let e = err(&[("a", Some("kernels = '^6\\.(1'\n"))]);
        assert!(
            e.contains("module.toml:1:11: `kernels` is not a valid regular expression"),
            "{e}"
        );
        let e = err(&[("a", Some("depends = [\"../b\"]\n"))]);
        assert!(
            e.contains("module.toml:1:12") && e.contains("not a valid module name"),
            "{e}"
        );
        let e = err(&[("a", Some("depends = [\"zzz\"]\n"))]);
        assert!(
            e.contains("depends on \"zzz\", which is not a folder"),
            "{e}"
        );
        let e = err(&[(
            "a",
            Some("built-modules = [\"../x.ko\", \"/abs.ko\", \"y.o\"]\n"),
        )]);
        assert_eq!(e.matches("is not a path to a .ko file").count(), 3, "{e}");
        let e = err(&[("a", Some("make = [\"make\", \"KVER=${kver}\"]\n"))]);
        assert!(e.contains("unknown variable ${kver}"), "{e}");
        let e = err(&[("a", Some("langauge = \"c\"\n"))]);
        assert!(
            e.contains("module.toml:1:1") && e.contains("unknown field `langauge`"),
            "{e}"
        );
        let e = err(&[("a", Some("language = \"go\"\n"))]);
        assert!(e.contains("unknown variant `go`"), "{e}");
    }

    #[test]
    fn dependency_cycles_are_errors() {
        let e = err(&[
            ("a", Some("depends = [\"b\"]\n")),
            ("b", Some("depends = [\"a\"]\n")),
        ]);
        assert!(e.contains("cycle: a -> b -> a"), "{e}");
    }

    #[test]
    fn names_are_folder_names() {
        assert!(check_name("kmf_hello-2").is_ok());
        for bad in ["", "..", "a/b", "a b", ".x", "é"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
