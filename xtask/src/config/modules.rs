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
//! parameters = ["greeting=hello"]   # module parameters: the load test's and KMM's
//! needs-hardware = true             # its init fails without its device
//! [kmm]
//! module = "foo"                    # the .ko KMM loads by name (moduleName)
//! name = "foo-driver"               # the KMM Module's name
//! [firmware]
//! dir = "firmware"                  # firmware files, relative to the firmware root
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use anyhow::{Context, Result};
use regex::Regex;
use serde::Deserialize;
use toml::Spanned;

use crate::config::diag::{Diagnostic, Diagnostics, Location, Source, display_path};
use crate::config::dkms::{self, DKMS_CONF, DkmsConf};
use crate::config::firmware;
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
    /// Modules (folders) whose exported symbols this module uses: module.toml's
    /// `depends`, or a DKMS package's BUILD_DEPENDS.
    pub depends: Vec<String>,
    pub build: Build,
    /// Extra packages its toolchain needs (pkg-config, perl, lib*-dev...).
    pub packages: Vec<Package>,
    pub test: ModuleTest,
    pub kmm: ModuleKmm,
    /// `[firmware] dir`, absolute: a folder of the module folder whose tree is relative
    /// to the firmware root. The image holds it at
    /// [`crate::steps::image::firmware_dir`]; [`firmware::files`] lists it.
    pub firmware: Option<PathBuf>,
}

/// module.toml's `[kmm]`: what the folder's KMM Module says, where kmodforge's choice
/// does not fit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModuleKmm {
    /// The `.ko` KMM loads by name (`moduleName`); by default the one named like the
    /// folder, or the folder's only one.
    pub module: Option<String>,
    /// The Module's name; by default `<[kmm] name>-<folder>`.
    pub name: Option<String>,
}

/// How a module folder is built.
#[derive(Debug, Clone)]
pub enum Build {
    /// A module of kmodforge's own (module.toml).
    Kbuild {
        /// The build command (argv); `None` is `make -C ${kernel_source_dir}
        /// M=${module_dir} modules`.
        make: Option<Vec<String>>,
        /// Paths of the built `.ko` files relative to the module folder; `None` takes
        /// every `.ko` the build leaves in the folder tree.
        built_modules: Option<Vec<String>>,
        /// `strip -g` the modules (the default, as DKMS does).
        strip: bool,
    },
    /// A DKMS package: dkms.conf says how, read for real in the compile container.
    Dkms(DkmsConf),
}

/// A package the module's toolchain needs, and where module.toml asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub at: Location,
}

impl Module {
    /// The file that describes the module: dkms.conf for a DKMS package, else
    /// module.toml (which may not exist).
    pub fn metadata_file(&self) -> PathBuf {
        match &self.build {
            Build::Dkms(c) => c.path.clone(),
            Build::Kbuild { .. } => self.dir.join(MANIFEST),
        }
    }
}

/// What the QEMU load test passes to the module.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModuleTest {
    /// `name=value` module parameters for modprobe.
    #[serde(default)]
    pub parameters: Vec<String>,
    /// Modules whose init fails without their device (`true`: all of the folder's):
    /// the load test shows "needs hardware" for them instead of a failure.
    #[serde(default)]
    pub needs_hardware: NeedsHardware,
}

/// `needs-hardware = true`, or a list of module names.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum NeedsHardware {
    All(bool),
    These(Vec<String>),
}

impl Default for NeedsHardware {
    fn default() -> Self {
        NeedsHardware::All(false)
    }
}

impl NeedsHardware {
    /// Whether module `name` (`-` and `_` alike) is marked.
    pub fn covers(&self, name: &str) -> bool {
        let norm = |s: &str| s.trim_end_matches(".ko").replace('-', "_");
        match self {
            NeedsHardware::All(all) => *all,
            NeedsHardware::These(list) => list.iter().any(|m| norm(m) == norm(name)),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawModule {
    language: Option<Spanned<Language>>,
    kernels: Option<Spanned<String>>,
    depends: Option<Spanned<Vec<Spanned<String>>>>,
    make: Option<Spanned<Vec<String>>>,
    built_modules: Option<Spanned<Vec<Spanned<String>>>>,
    strip: Option<Spanned<bool>>,
    #[serde(default)]
    toolchain: RawToolchainNeeds,
    #[serde(default)]
    test: ModuleTest,
    #[serde(default)]
    kmm: ModuleKmm,
    firmware: Option<RawFirmware>,
}

/// `[firmware]`: where the module's firmware files are.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFirmware {
    dir: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawToolchainNeeds {
    #[serde(default)]
    packages: Vec<Spanned<String>>,
}

static NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9_.+~-]*$").unwrap());

/// Module names are folder names: letters, digits, `_`, `-`, `.`, `+` and `~` (a DKMS
/// package folder is `<name>-<version>`, e.g. `dpdk-kmods-0~20220829+git`), so never a path.
pub fn check_name(name: &str) -> Result<(), String> {
    if NAME.is_match(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid module name: a module is a folder directly in modules/, \
             named with letters, digits and '_', '-', '.', '+', '~' (no '/', no '..', not starting with '.' or '-')"
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
        if name.starts_with('.') {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_symlink() && entry.path().is_dir() {
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            diags.push(
                Diagnostic::new(format!(
                    "{} is a symbolic link to {}: a module is a folder in modules/ itself",
                    display_path(&entry.path()),
                    target.display()
                ))
                .help("move or copy the folder into modules/"),
            );
            continue;
        }
        if !kind.is_dir() {
            continue;
        }
        match load(&entry.path(), &name) {
            Ok(m) => modules.push(m),
            Err(d) => diags.0.extend(d.0),
        }
    }
    resolve_build_depends(&mut modules, &mut diags);
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

/// module.toml, parsed, with its source for positions (an empty one when absent).
fn read_manifest(dir: &Path) -> Result<(RawModule, Option<Source>), Diagnostics> {
    let manifest = dir.join(MANIFEST);
    if !manifest.is_file() {
        return Ok((RawModule::default(), None));
    }
    let source = Source::read(&manifest).map_err(|e| Diagnostic::new(format!("{e:#}")))?;
    Ok((source.parse::<RawModule>()?, Some(source)))
}

/// The target of the symbolic link `rel` in module folder `dir` when it stays inside the
/// folder (relative, and never climbing out); otherwise an error naming the link: its
/// target would be a file of whatever machine reads it.
pub fn link_inside(dir: &Path, rel: &Path) -> Result<PathBuf> {
    let link = dir.join(rel);
    let target = std::fs::read_link(&link)
        .with_context(|| format!("cannot read the link {}", display_path(&link)))?;
    let mut depth: i64 = rel.components().count() as i64 - 1;
    let mut inside = target.is_relative();
    for c in target.components() {
        match c {
            std::path::Component::ParentDir => depth -= 1,
            std::path::Component::Normal(_) => depth += 1,
            _ => {}
        }
        inside &= depth >= 0;
    }
    if !inside {
        anyhow::bail!(
            "{} is a symbolic link to {}, outside its module folder: kmodforge does not follow it into a build or an image\n  help: copy the file into the folder, or remove the link",
            display_path(&link),
            target.display()
        );
    }
    Ok(target)
}

/// Every symbolic link in a module folder stays inside it.
fn check_links(dir: &Path) -> Result<(), Diagnostics> {
    let files = crate::run::fingerprint::walk_module_files(dir)
        .map_err(|e| Diagnostics(vec![Diagnostic::new(format!("{e:#}"))]))?;
    let mut diags = Diagnostics::default();
    for rel in files {
        if dir.join(&rel).is_symlink()
            && let Err(e) = link_inside(dir, &rel)
        {
            diags.push(Diagnostic::new(format!("{e:#}")));
        }
    }
    diags.into_result()
}

fn load(dir: &Path, name: &str) -> Result<Module, Diagnostics> {
    check_name(name).map_err(|e| Diagnostic::new(format!("{}: {e}", display_path(dir))))?;
    check_links(dir)?;
    let (raw, source) = read_manifest(dir)?;
    let source = source.unwrap_or_else(|| Source {
        path: dir.join(MANIFEST),
        text: String::new(),
    });
    let mut diags = Diagnostics::default();
    let kernels = kernels(&raw, &source, &mut diags);
    let conf = dir.join(DKMS_CONF);
    let build = if conf.is_file() {
        dkms_build(&raw, &source, dkms::read_static(&conf), &mut diags)
    } else {
        kbuild(&raw, &source, dir, name, &mut diags)
    };
    let depends = depends(&raw, &source, name, &mut diags);
    let packages = packages(&raw, &source, &mut diags);
    let firmware = firmware_dir(&raw, &source, dir, &mut diags);
    diags.into_result()?;
    let language = match (&build, &raw.language) {
        (Build::Dkms(_), _) => Language::C,
        (_, Some(l)) => *l.get_ref(),
        _ if has_rust_sources(dir) => Language::Rust,
        _ => Language::C,
    };
    Ok(Module {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        language,
        kernels,
        depends,
        build,
        packages,
        test: raw.test,
        kmm: raw.kmm,
        firmware,
    })
}

fn kernels(raw: &RawModule, source: &Source, diags: &mut Diagnostics) -> Option<Regex> {
    let re = raw.kernels.as_ref()?;
    match Regex::new(re.get_ref()) {
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
                source
                    .error(
                        &re.span(),
                        format!("`kernels` is not a valid regular expression: {first_line}"),
                    )
                    .help("it is matched against each kernel version, e.g. '^6\\.12\\.'"),
            );
            None
        }
    }
}

fn depends(raw: &RawModule, source: &Source, name: &str, diags: &mut Diagnostics) -> Vec<String> {
    let mut out = Vec::new();
    for d in raw.depends.iter().flat_map(|d| d.get_ref()) {
        match check_name(d.get_ref()) {
            Ok(()) if d.get_ref() == name => {
                diags.push(source.error(&d.span(), format!("module {name} depends on itself")))
            }
            Ok(()) => out.push(d.get_ref().clone()),
            Err(e) => diags.push(source.error(&d.span(), e)),
        }
    }
    out
}

/// `[firmware] dir`: a folder inside the module folder that holds at least one file, and
/// no link out of the module folder. KMM's init container runs `cp -R
/// <firmwarePath>/*`, which fails on an empty folder.
fn firmware_dir(
    raw: &RawModule,
    source: &Source,
    dir: &Path,
    diags: &mut Diagnostics,
) -> Option<PathBuf> {
    let d = &raw.firmware.as_ref()?.dir;
    let rel = Path::new(d.get_ref());
    let inside = !d.get_ref().is_empty()
        && rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    let path = dir.join(rel);
    let problem = if !inside {
        format!(
            "firmware dir {:?} is not a folder inside the module folder",
            d.get_ref()
        )
    } else if !path.is_dir() {
        format!(
            "firmware dir {:?} does not exist in {} (or is not a folder)",
            d.get_ref(),
            display_path(dir)
        )
    } else {
        match firmware::files(dir, &path) {
            Ok(files) if files.is_empty() => format!(
                "firmware dir {:?} holds no file: KMM's `cp -R <firmwarePath>/*` fails on an empty folder",
                d.get_ref()
            ),
            Ok(_) => return Some(path),
            Err(e) => format!("firmware dir {:?}: {e}", d.get_ref()),
        }
    };
    diags.push(source.error(&d.span(), problem).help(
        "`dir` is a folder of the module folder (e.g. \"firmware\") laid out as the module requests its files: \
         firmware/vendor/fw.bin is request_firmware(\"vendor/fw.bin\"); links in it must stay inside the module folder",
    ));
    None
}

/// A module of kmodforge's own: its make command and where the `.ko` files land.
fn kbuild(
    raw: &RawModule,
    source: &Source,
    dir: &Path,
    name: &str,
    diags: &mut Diagnostics,
) -> Build {
    if raw.make.is_none() && !dir.join("Kbuild").is_file() && !dir.join("Makefile").is_file() {
        diags.push(
            Diagnostic::new(format!("{} has no Kbuild or Makefile", display_path(dir))).help(
                format!(
                    "a module folder needs a Kbuild file (e.g. `obj-m := {name}.o`), a Makefile, \
                 a `make` command in module.toml, or a dkms.conf; see README.md, \"Modules\""
                ),
            ),
        );
    }
    if let Some(make) = &raw.make {
        if make.get_ref().is_empty() {
            diags.push(source.error(
                &make.span(),
                "`make` is empty: give the command and its arguments",
            ));
        }
        for arg in make.get_ref() {
            if let Err(e) = make_vars("1.2.3", "/k", "/m").expand(arg) {
                diags.push(source.error(&make.span(), e).help(
                    "the variables are ${kernelver}, ${kernel_source_dir}, ${module_dir} and KMM's ${KERNEL_*}",
                ));
            }
        }
    }
    let built_modules = raw.built_modules.as_ref().map(|list| {
        let mut paths = Vec::new();
        for p in list.get_ref() {
            let path = Path::new(p.get_ref());
            let inside = path.is_relative()
                && path
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            if inside && p.get_ref().ends_with(".ko") {
                paths.push(p.get_ref().clone());
            } else {
                diags.push(source.error(
                    &p.span(),
                    format!(
                        "{:?} is not a path to a .ko file inside the module folder",
                        p.get_ref()
                    ),
                ));
            }
        }
        paths
    });
    Build::Kbuild {
        make: raw.make.as_ref().map(|m| m.get_ref().clone()),
        built_modules,
        strip: raw.strip.as_ref().is_none_or(|s| *s.get_ref()),
    }
}

/// A DKMS package: what module.toml may not say beside its dkms.conf.
fn dkms_build(raw: &RawModule, source: &Source, conf: DkmsConf, diags: &mut Diagnostics) -> Build {
    let conflicts: [(Option<std::ops::Range<usize>>, &str, &str); 5] = [
        (raw.make.as_ref().map(|m| m.span()), "make", "MAKE"),
        (
            raw.built_modules.as_ref().map(|m| m.span()),
            "built-modules",
            "BUILT_MODULE_NAME and BUILT_MODULE_LOCATION",
        ),
        (raw.strip.as_ref().map(|m| m.span()), "strip", "STRIP"),
        (
            raw.depends.as_ref().map(|m| m.span()),
            "depends",
            "BUILD_DEPENDS",
        ),
        (
            raw.language.as_ref().map(|m| m.span()),
            "language",
            "its sources (a DKMS package builds with its own Makefile)",
        ),
    ];
    for (span, key, directive) in conflicts {
        if let Some(span) = span {
            diags.push(
                source
                    .error(
                        &span,
                        format!(
                            "`{key}` conflicts with {}, which builds this package",
                            display_path(&conf.path)
                        ),
                    )
                    .help(format!(
                        "dkms.conf says it with {directive}; remove `{key}` from module.toml"
                    )),
            );
        }
    }
    if let (Some(span), true) = (
        raw.kernels.as_ref().map(|k| k.span()),
        conf.exclusive_kernel,
    ) {
        diags.push(
            source
                .error(
                    &span,
                    format!(
                        "`kernels` conflicts with BUILD_EXCLUSIVE_KERNEL in {}",
                        display_path(&conf.path)
                    ),
                )
                .help("keep one of the two"),
        );
    }
    Build::Dkms(conf)
}

static PACKAGE_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9][a-z0-9+.-]+$").unwrap());

fn packages(raw: &RawModule, source: &Source, diags: &mut Diagnostics) -> Vec<Package> {
    let mut out: Vec<Package> = Vec::new();
    for p in &raw.toolchain.packages {
        if !PACKAGE_NAME.is_match(p.get_ref()) {
            diags.push(
                source
                    .error(
                        &p.span(),
                        format!("{:?} is not a package name", p.get_ref()),
                    )
                    .help("give Debian package names, e.g. \"pkg-config\" or \"libelf-dev\""),
            );
        } else if !out.iter().any(|q| &q.name == p.get_ref()) {
            out.push(Package {
                name: p.get_ref().clone(),
                at: source.location(&p.span()),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
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

/// A DKMS package's BUILD_DEPENDS names other packages: the folders whose dkms.conf
/// has that PACKAGE_NAME (or, failing that, of that name) become its `depends`.
fn resolve_build_depends(modules: &mut [Module], diags: &mut Diagnostics) {
    let by_package: BTreeMap<String, String> = modules
        .iter()
        .map(|m| match &m.build {
            Build::Dkms(c) => (
                c.package_name.clone().unwrap_or_else(|| m.name.clone()),
                m.name.clone(),
            ),
            Build::Kbuild { .. } => (m.name.clone(), m.name.clone()),
        })
        .collect();
    for m in modules.iter_mut() {
        let Build::Dkms(conf) = &m.build else {
            continue;
        };
        for dep in &conf.build_depends {
            let folder = by_package
                .get(dep)
                .or_else(|| by_package.values().find(|f| *f == dep));
            match folder {
                Some(f) if *f != m.name => m.depends.push(f.clone()),
                Some(_) => {}
                None => diags.push(
                    Diagnostic::new(format!(
                        "{}: BUILD_DEPENDS names {dep:?}, which is no package in modules/ (by PACKAGE_NAME or folder name)",
                        display_path(&conf.path)
                    ))
                    .help("add that DKMS package's folder to modules/, or remove it from BUILD_DEPENDS"),
                ),
            }
        }
    }
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
    fn firmware_is_a_folder_of_files_inside_the_module_folder() {
        let d = tree(&[("a", Some("[firmware]\ndir = \"fw\"\n")), ("b", None)]);
        fs::create_dir_all(d.path().join("a/fw/a")).unwrap();
        fs::write(d.path().join("a/fw/a/x.bin"), "x").unwrap();
        let mods = discover(d.path()).unwrap();
        assert_eq!(
            mods[0].firmware.as_deref(),
            Some(d.path().join("a/fw").as_path())
        );
        assert!(mods[0].firmware.as_ref().unwrap().is_absolute());
        assert_eq!(mods[1].firmware, None);
    }

    #[test]
    fn bad_firmware_dirs_point_at_module_toml() {
        let fw = |dir: &str| format!("[firmware]\ndir = \"{dir}\"\n");
        for bad in ["../b", "/lib/firmware", "", ".", "fw/../../b"] {
            let e = err(&[("a", Some(&fw(bad))), ("b", None)]);
            assert!(
                e.contains("module.toml:2:7")
                    && e.contains("is not a folder inside the module folder"),
                "{bad}: {e}"
            );
        }
        let e = err(&[("a", Some(&fw("firmware")))]);
        assert!(
            e.contains("module.toml:2:7: firmware dir \"firmware\" does not exist"),
            "{e}"
        );
        assert!(
            e.contains("help: `dir` is a folder of the module folder (e.g. \"firmware\") laid out"),
            "{e}"
        );

        // Hidden files (an editor's, a .gitkeep) are not firmware.
        let d = tree(&[("a", Some(&fw("firmware")))]);
        fs::create_dir_all(d.path().join("a/firmware/a")).unwrap();
        fs::write(d.path().join("a/firmware/a/.gitkeep"), "").unwrap();
        let e = format!("{:#}", discover(d.path()).unwrap_err());
        assert!(
            e.contains("holds no file: KMM's `cp -R <firmwarePath>/*` fails on an empty folder"),
            "{e}"
        );

        std::os::unix::fs::symlink("/etc/hostname", d.path().join("a/firmware/a/host.bin"))
            .unwrap();
        let e = format!("{:#}", discover(d.path()).unwrap_err());
        assert!(
            e.contains("a/firmware/a/host.bin is a symbolic link to /etc/hostname, outside its module folder"),
            "{e}"
        );

        let e = err(&[("a", Some("[firmware]\ndir = \"fw\"\nfiles = [\"x\"]\n"))]);
        assert!(
            e.contains("module.toml:3:1") && e.contains("unknown field `files`"),
            "{e}"
        );
        let e = err(&[("a", Some("[firmware]\n"))]);
        assert!(e.contains("missing field `dir`"), "{e}");
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
        assert!(check_name("evdi-1.14.1+dfsg").is_ok());
        for bad in ["", "..", "a/b", "a b", ".x", "é", "-x"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
