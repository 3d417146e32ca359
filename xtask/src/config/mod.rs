//! Configuration: kernels.toml (this file), the module folders ([`modules`]),
//! diagnostics at file:line:col ([`diag`]) and KMM's templates ([`template`]).
//!
//! kernels.toml: the kernels to build for, the toolchains that build them, and defaults.
//!
//! Parsing is strict (unknown keys are errors) and every problem is reported at its
//! `file:line:col`. The result, [`Config`], is fully validated: later steps never see a
//! kernel without a toolchain or a module name that is not a folder in `modules/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

pub mod diag;
pub mod dkms;
pub mod envsubst;
pub mod firmware;
pub mod kmm;
pub mod modules;
pub mod signing;
pub mod template;

use anyhow::Result;
use regex::Regex;
use serde::Deserialize;
use toml::Spanned;

pub use self::kmm::KmmSettings;
use self::modules::Module;
use crate::config::diag::{Diagnostic, Diagnostics, Location, Source, display_path};
use crate::config::template::Vars;

/// The validated contents of kernels.toml plus the modules found beside it.
#[derive(Debug)]
pub struct Config {
    /// The kernels.toml file itself.
    pub path: PathBuf,
    /// The folder that holds kernels.toml, `modules/` and `images/`.
    pub root: PathBuf,
    pub kernels: Vec<Kernel>,
    pub toolchains: BTreeMap<String, Toolchain>,
    pub modules: Vec<Module>,
    pub image: ImageSettings,
    pub kmm: KmmSettings,
    /// TLS opt-ins by registry host (`host` or `host:port`).
    pub registries: BTreeMap<String, RegistryTls>,
    /// The key and certificate every module is signed with (`[signing]`).
    pub signing: Option<signing::Signing>,
}

/// How kmod images are named and made (`[image]`).
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// The image reference, a template with KMM's variables; its tag is normalized
    /// the way KMM normalizes it.
    pub name: String,
    /// Where `lib/modules/<kver>/` goes in the image (KMM's `dirName`).
    pub prefix: String,
    pub base: ImageBase,
    /// `org.opencontainers.image.source`; default: the git remote `origin`.
    pub source: Option<String>,
    /// Where Debian's static busybox comes from (the busybox base, the load test's
    /// initramfs): a suite and APT source lines (none: mmdebstrap's default mirror).
    pub busybox_suite: String,
    pub busybox_sources: Vec<String>,
    /// When the image gets KMM's link `<prefix>/lib/modules/<kver>/host ->
    /// /lib/modules/<kver>` to the node's in-tree modules.
    pub host_link: HostLink,
}

/// `[image] host-link`: KMM's way for modules that need the kernel's own modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostLink {
    /// When a module of the tree depends on a module the tree does not hold.
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageBase {
    /// An image from local storage or a registry (ubi-minimal by default).
    Reference(String),
    /// `scratch` plus Debian's static busybox providing `sh`, `mkdir` and `cp`, made by
    /// kmodforge from the Debian archive.
    Busybox,
}

/// KMM's `registryTLS` for one registry; both default to false (verified HTTPS).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RegistryTls {
    /// Plain HTTP.
    #[serde(default)]
    pub insecure: bool,
    /// HTTPS without certificate verification.
    #[serde(default)]
    pub insecure_skip_tls_verify: bool,
}

pub const UBI_MINIMAL: &str = "registry.access.redhat.com/ubi9/ubi-minimal:latest";
pub const DEFAULT_IMAGE_NAME: &str = "localhost/kmodforge/${MOD_NAME}:${KERNEL_FULL_VERSION}";

/// One kernel to build for.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The full version string, as `uname -r` prints it.
    pub version: String,
    /// Name of the toolchain (a key of `[toolchains]`).
    pub toolchain: String,
    /// When set, only these modules are built for this kernel.
    pub modules: Option<BTreeSet<String>>,
    /// Where the kernel's `version` is written, for errors found later (a missing
    /// headers package, say).
    pub at: Location,
    /// Extra kernel command-line arguments of the node (`module.sig_enforce=1`, say),
    /// which the load test boots the kernel with.
    pub boot_args: Vec<String>,
}

/// A DTK-style image: one kernel's headers, its compiler, make and kmod.
#[derive(Debug, Clone)]
pub struct Toolchain {
    pub name: String,
    pub source: ToolchainSource,
    /// Where the kernel's build tree (kernel-devel) is inside the image; may use
    /// `${KERNEL_FULL_VERSION}`.
    pub kernel_source_dir: String,
    /// Its kernels are built with CONFIG_RUST and it holds their Rust toolchain, so Rust
    /// modules are built for them (checked against the kernel's config when probed).
    pub rust: bool,
}

#[derive(Debug, Clone)]
pub enum ToolchainSource {
    /// A Containerfile that kmodforge builds once per kernel, with the build arg
    /// `KERNEL_FULL_VERSION` (and `BASE_IMAGE` when a base is given).
    Recipe(Recipe),
    /// A prebuilt image reference (the real Driver Toolkit, say); may use KMM's
    /// kernel variables.
    Image(String),
}

#[derive(Debug, Clone)]
pub struct Recipe {
    pub containerfile: PathBuf,
    /// The build context: the folder that holds the Containerfile.
    pub context: PathBuf,
    pub base: Option<Base>,
    pub build_args: BTreeMap<String, String>,
}

/// The image a recipe starts `FROM`, passed to it as the build arg `BASE_IMAGE`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Base {
    pub image: String,
    /// How to make `image` from the Debian archive when it is not in local storage;
    /// without it the engine pulls `image` from its registry.
    pub bootstrap: Option<Bootstrap>,
}

/// An mmdebstrap run that makes a base image without any container registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Bootstrap {
    /// The Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// APT source lines; empty means mmdebstrap's default mirror.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Extra packages to put in the base.
    #[serde(default)]
    pub include: Vec<String>,
    /// mmdebstrap's `--variant`.
    #[serde(default = "default_variant")]
    pub variant: String,
}

fn default_variant() -> String {
    "apt".into()
}

pub const DEFAULT_KERNEL_SOURCE_DIR: &str = "/lib/modules/${KERNEL_FULL_VERSION}/build";

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFile {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    toolchains: BTreeMap<String, Spanned<RawToolchain>>,
    #[serde(default)]
    kernel: Vec<Spanned<RawKernel>>,
    #[serde(default)]
    image: RawImage,
    #[serde(default)]
    kmm: kmm::RawKmm,
    #[serde(default)]
    registries: BTreeMap<Spanned<String>, RegistryTls>,
    signing: Option<Spanned<signing::RawSigning>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawImage {
    name: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    host_link: Option<HostLink>,
    base: Option<Spanned<String>>,
    source: Option<String>,
    busybox: Option<RawBusybox>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawBusybox {
    #[serde(default = "default_suite")]
    suite: String,
    #[serde(default)]
    sources: Vec<String>,
}

fn default_suite() -> String {
    "bookworm".into()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDefaults {
    toolchain: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawToolchain {
    recipe: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    base: Option<Spanned<String>>,
    bootstrap: Option<Spanned<Bootstrap>>,
    #[serde(default)]
    build_args: BTreeMap<String, String>,
    kernel_source_dir: Option<Spanned<String>>,
    #[serde(default)]
    rust: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawKernel {
    version: Spanned<String>,
    toolchain: Option<Spanned<String>>,
    modules: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    boot_args: Vec<Spanned<String>>,
}

static KVER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[0-9]+\.[0-9]+[A-Za-z0-9._+~-]*$").unwrap());
static TOOLCHAIN_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9][a-z0-9_-]*$").unwrap());

impl Config {
    /// Reads kernels.toml at `path` and the modules in `modules/` beside it.
    pub fn load(path: &Path) -> Result<Config> {
        let path = std::path::absolute(path)?;
        let source = Source::read(&path)?;
        let root = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let modules = modules::discover(&root.join("modules"))?;
        Ok(Config::from_source(&source, &root, modules)?)
    }

    fn from_source(
        source: &Source,
        root: &Path,
        modules: Vec<Module>,
    ) -> Result<Config, Diagnostics> {
        let raw: RawFile = source.parse()?;
        let mut diags = Diagnostics::default();
        let toolchains = toolchains(source, root, &raw, &mut diags);
        let module_names: BTreeSet<&str> = modules.iter().map(|m| m.name.as_str()).collect();
        let kernels = kernels(source, &raw, &module_names, &mut diags);
        let image = image_settings(source, &raw.image, &mut diags);
        let kmm = kmm::settings(source, &raw.kmm, &image.name, &mut diags);
        check_image_names(source, &raw, &kernels, &image, &kmm, &mut diags);
        let registries = registries(source, &raw.registries, &mut diags);
        let signing = signing::settings(source, root, raw.signing.as_ref(), &mut diags);
        diags.into_result()?;
        let config = Config {
            path: source.path.clone(),
            root: root.to_path_buf(),
            kernels,
            toolchains,
            modules,
            image,
            kmm,
            registries,
            signing,
        };
        config.check_module_selection()?;
        Ok(config)
    }

    pub fn kernel(&self, kver: &str) -> Result<&Kernel> {
        self.kernels
            .iter()
            .find(|k| k.version == kver)
            .ok_or_else(|| {
                let known: Vec<&str> = self.kernels.iter().map(|k| k.version.as_str()).collect();
                anyhow::anyhow!(
                    "kernel {kver:?} is not listed in {}\n  help: listed kernels: {}",
                    display_path(&self.path),
                    known.join(", ")
                )
            })
    }

    /// Whether certificates of the registry `reference` names are verified: yes unless
    /// kernels.toml opts that registry into plain HTTP or into skipping verification.
    pub fn tls_verify(&self, reference: &str) -> bool {
        self.registries
            .get(crate::config::template::registry_host(reference))
            .is_none_or(|t| !t.insecure && !t.insecure_skip_tls_verify)
    }

    pub fn module(&self, name: &str) -> Option<&Module> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// The modules to build for `kernel`, in dependency order (exporters before users).
    pub fn modules_for(&self, kernel: &Kernel) -> Vec<&Module> {
        let mut out: Vec<&Module> = Vec::new();
        for m in modules::dependency_order(&self.modules) {
            if self.selects(kernel, m) {
                out.push(m);
            }
        }
        out
    }

    /// Why `module`, though selected for `kernel`, cannot be built for it: a Rust module
    /// for a kernel whose toolchain does not say `rust = true`. Known from the
    /// configuration alone, so the plan, the matrix and the KMM manifests agree on it
    /// on every machine.
    pub fn cannot_build(&self, kernel: &Kernel, module: &Module) -> Option<String> {
        let tc = &self.toolchains[&kernel.toolchain];
        (module.language == modules::Language::Rust && !tc.rust).then(|| {
            format!(
                "kernel {} was built without CONFIG_RUST (its toolchain {} does not set rust = true)",
                kernel.version, tc.name
            )
        })
    }

    /// Whether `module` is built for `kernel`: the kernel's `modules` list and the
    /// module's `kernels` expression both allow it.
    pub fn selects(&self, kernel: &Kernel, module: &Module) -> bool {
        kernel
            .modules
            .as_ref()
            .is_none_or(|s| s.contains(&module.name))
            && module
                .kernels
                .as_ref()
                .is_none_or(|re| re.is_match(&kernel.version))
    }

    /// A module built for a kernel needs the modules it depends on built for it too.
    fn check_module_selection(&self) -> Result<(), Diagnostics> {
        let mut diags = Diagnostics::default();
        for k in &self.kernels {
            for m in self.modules_for(k) {
                for dep in &m.depends {
                    let dep_mod = self
                        .module(dep)
                        .expect("depends are validated on discovery");
                    if !self.selects(k, dep_mod) {
                        let why = if k.modules.as_ref().is_some_and(|s| !s.contains(dep)) {
                            format!("add {dep:?} to the kernel's modules list at {}", k.at)
                        } else {
                            format!(
                                "widen the `kernels` expression in {}",
                                display_path(&dep_mod.dir.join("module.toml"))
                            )
                        };
                        diags.push(
                            Diagnostic::new(format!(
                                "{}: module {} depends on {dep}, which is not built for kernel {}",
                                k.at, m.name, k.version
                            ))
                            .help(why),
                        );
                    }
                }
            }
        }
        diags.into_result()
    }
}

/// The `[toolchains]`, each checked; the default toolchain must be one of them.
fn toolchains(
    source: &Source,
    root: &Path,
    raw: &RawFile,
    diags: &mut Diagnostics,
) -> BTreeMap<String, Toolchain> {
    let mut toolchains = BTreeMap::new();
    for (name, t) in &raw.toolchains {
        if !TOOLCHAIN_NAME.is_match(name) {
            diags.push(
                source
                    .error(&t.span(), format!("toolchain name {} is not valid", shown(name)))
                    .help("use lowercase letters, digits, '-' and '_' (it becomes part of an image name)"),
            );
            continue;
        }
        match toolchain(source, root, name, t) {
            Ok(tc) => {
                toolchains.insert(name.clone(), tc);
            }
            Err(d) => diags.push(d),
        }
    }
    share_bootstraps(&mut toolchains, diags);
    if let Some(t) = &raw.defaults.toolchain
        && !raw.toolchains.contains_key(t.get_ref())
    {
        diags.push(unknown_toolchain(source, t, &raw.toolchains));
    }
    toolchains
}

/// The `[[kernel]]` entries, each checked; none twice (not even in another case).
fn kernels(
    source: &Source,
    raw: &RawFile,
    module_names: &BTreeSet<&str>,
    diags: &mut Diagnostics,
) -> Vec<Kernel> {
    if raw.kernel.is_empty() {
        diags.push(
            Diagnostic::new(format!("{} lists no kernels", display_path(&source.path)))
                .help("add a [[kernel]] table with version = \"<uname -r of the kernel>\""),
        );
    }
    let mut seen: BTreeMap<String, (String, Location)> = BTreeMap::new();
    let mut kernels = Vec::new();
    for k in &raw.kernel {
        let Some(kernel) = kernel(source, raw, k, module_names, diags) else {
            continue;
        };
        let version = &k.get_ref().version;
        if let Some((first, at)) = seen.get(&kernel.version.to_lowercase()) {
            let what = if *first == kernel.version {
                format!("kernel {} is listed twice", kernel.version)
            } else {
                format!(
                    "kernel {} differs from kernel {first} only in case",
                    kernel.version
                )
            };
            diags.push(
                source
                    .error(&version.span(), what)
                    .help(format!("it is first listed at {at}; remove one of the two")),
            );
            continue;
        }
        seen.insert(
            kernel.version.to_lowercase(),
            (kernel.version.clone(), kernel.at.clone()),
        );
        kernels.push(kernel);
    }
    kernels
}

/// The longest version `uname -r` can print (the kernel's `__NEW_UTS_LEN`).
const KVER_MAX: usize = 64;

/// One `[[kernel]]`: a version string, its toolchain, and its module list.
fn kernel(
    source: &Source,
    raw: &RawFile,
    k: &Spanned<RawKernel>,
    module_names: &BTreeSet<&str>,
    diags: &mut Diagnostics,
) -> Option<Kernel> {
    let version = &k.get_ref().version;
    let kver = version.get_ref().trim();
    let problem = if kver.is_empty() {
        Some(("kernel version is empty".to_string(), "write the full version string that `uname -r` prints on the node, e.g. \"6.1.0-47-amd64\"".to_string()))
    } else if kver.len() > KVER_MAX {
        Some((
            format!(
                "kernel version {} is {} characters long",
                shown(kver),
                kver.len()
            ),
            format!(
                "`uname -r` prints at most {KVER_MAX}: write the version exactly as the node prints it"
            ),
        ))
    } else if !KVER.is_match(kver) {
        Some((
            format!("{} is not a kernel version string", shown(kver)),
            "write the full version string that `uname -r` prints, e.g. \"6.12.117+deb12-amd64\" or \"5.14.0-427.13.1.el9_4.x86_64\"".to_string(),
        ))
    } else {
        None
    };
    if let Some((what, help)) = problem {
        diags.push(source.error(&version.span(), what).help(help));
        return None;
    }
    let default_toolchain = raw.defaults.toolchain.as_ref();
    let toolchain = match k.get_ref().toolchain.as_ref().or(default_toolchain) {
        Some(t) if raw.toolchains.contains_key(t.get_ref()) => t.get_ref().clone(),
        Some(t) => {
            // A bad default is reported once, with the toolchains.
            if k.get_ref().toolchain.is_some() {
                diags.push(unknown_toolchain(source, t, &raw.toolchains));
            }
            return None;
        }
        None => {
            diags.push(
                source
                    .error(&k.span(), format!("kernel {kver} has no toolchain"))
                    .help("set toolchain = \"<name>\" here or in [defaults]"),
            );
            return None;
        }
    };
    let modules = k.get_ref().modules.as_ref().map(|list| {
        let mut set = BTreeSet::new();
        for m in list {
            match check_module_ref(source, m, module_names) {
                Ok(()) => {
                    set.insert(m.get_ref().clone());
                }
                Err(d) => diags.push(d),
            }
        }
        set
    });
    Some(Kernel {
        version: kver.to_string(),
        toolchain,
        modules,
        at: source.location(&version.span()),
        boot_args: boot_args(source, &k.get_ref().boot_args, diags),
    })
}

/// What the load test sets on the kernel's command line itself.
const TEST_BOOT_ARGS: [&str; 4] = ["console=", "panic=", "init=", "rdinit="];

/// `boot-args`: one kernel command-line argument per string, none that the load test
/// sets itself (its serial console, its /init).
fn boot_args(source: &Source, args: &[Spanned<String>], diags: &mut Diagnostics) -> Vec<String> {
    let mut out = Vec::new();
    for a in args {
        let arg = a.get_ref();
        let problem = if arg.is_empty() || arg.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            Some(format!("boot argument {} is not one word", shown(arg)))
        } else {
            TEST_BOOT_ARGS
                .iter()
                .find(|p| arg.starts_with(*p))
                .map(|p| {
                    format!(
                        "boot argument {} sets {p}, which the load test sets itself",
                        shown(arg)
                    )
                })
        };
        match problem {
            Some(what) => diags.push(source.error(&a.span(), what).help(
                "give one kernel command-line argument per string, e.g. boot-args = [\"module.sig_enforce=1\"]",
            )),
            None => out.push(arg.clone()),
        }
    }
    out
}

/// `[registries."host[:port]"]`: each key must be a registry host, as an image
/// reference names it (no scheme, no path, a port that exists).
fn registries(
    source: &Source,
    raw: &BTreeMap<Spanned<String>, RegistryTls>,
    diags: &mut Diagnostics,
) -> BTreeMap<String, RegistryTls> {
    let mut out = BTreeMap::new();
    for (key, tls) in raw {
        let host = key.get_ref();
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) if !n.contains(':') => (n, Some(p)),
            _ => (host.as_str(), None),
        };
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if host.contains("://") || host.contains('/') || !name_ok || !port_ok {
            diags.push(
                source
                    .error(&key.span(), format!("{} is not a registry host", shown(host)))
                    .help("write the host as image names have it, e.g. \"registry.example.com\" or \"127.0.0.1:5000\": no scheme, no path, a port from 1 to 65535"),
            );
            continue;
        }
        out.insert(host.clone(), tls.clone());
    }
    out
}

/// A value as errors show it: quoted, and cut when long (a config value can be huge).
pub fn shown(value: &str) -> String {
    const MAX: usize = 80;
    if value.chars().count() <= MAX {
        return format!("{value:?}");
    }
    let cut: String = value.chars().take(MAX).collect();
    format!("{cut:?}... ({} characters)", value.chars().count())
}

/// A base image's `bootstrap` is written once: every toolchain on the same base uses
/// it. Two different bootstraps for one base image are an error.
fn share_bootstraps(toolchains: &mut BTreeMap<String, Toolchain>, diags: &mut Diagnostics) {
    let mut by_image: BTreeMap<String, (String, Bootstrap)> = BTreeMap::new();
    for (name, tc) in toolchains.iter() {
        if let ToolchainSource::Recipe(Recipe {
            base:
                Some(Base {
                    image,
                    bootstrap: Some(b),
                }),
            ..
        }) = &tc.source
        {
            match by_image.get(image) {
                Some((other, b2)) if b2 != b => diags.push(
                    Diagnostic::new(format!(
                        "toolchains {other} and {name} bootstrap the same base image {image} differently"
                    ))
                    .help("keep one [toolchains.<name>.bootstrap] table for it"),
                ),
                _ => {
                    by_image.insert(image.clone(), (name.clone(), b.clone()));
                }
            }
        }
    }
    for tc in toolchains.values_mut() {
        if let ToolchainSource::Recipe(Recipe {
            base: Some(base), ..
        }) = &mut tc.source
            && base.bootstrap.is_none()
            && let Some((_, b)) = by_image.get(&base.image)
        {
            base.bootstrap = Some(b.clone());
        }
    }
}

fn toolchain(
    source: &Source,
    root: &Path,
    name: &str,
    t: &Spanned<RawToolchain>,
) -> Result<Toolchain, Diagnostic> {
    let raw = t.get_ref();
    let kernel_source_dir = match &raw.kernel_source_dir {
        Some(dir) => {
            check_template(source, dir, &Vars::kernel("1.2.3"))?;
            dir.get_ref().clone()
        }
        None => DEFAULT_KERNEL_SOURCE_DIR.to_string(),
    };
    let source_kind = match (&raw.recipe, &raw.image) {
        (Some(recipe), None) => {
            let containerfile = root.join(recipe.get_ref());
            check_recipe(root, &containerfile)
                .map_err(|(what, help)| source.error(&recipe.span(), what).help(help))?;
            let base = match (&raw.base, &raw.bootstrap) {
                (Some(image), bootstrap) => Some(Base {
                    image: image.get_ref().clone(),
                    bootstrap: bootstrap.as_ref().map(|b| b.get_ref().clone()),
                }),
                (None, Some(b)) => {
                    return Err(source
                        .error(
                            &b.span(),
                            "`bootstrap` needs `base`, the name to give the image it makes",
                        )
                        .help("add base = \"localhost/kmodforge/debian:bookworm\""));
                }
                (None, None) => None,
            };
            ToolchainSource::Recipe(Recipe {
                context: containerfile.parent().unwrap_or(root).to_path_buf(),
                containerfile,
                base,
                build_args: raw.build_args.clone(),
            })
        }
        (None, Some(image)) => {
            if raw.base.is_some() || raw.bootstrap.is_some() || !raw.build_args.is_empty() {
                return Err(source.error(
                    &t.span(),
                    format!("toolchain {name:?} is a prebuilt image: `base`, `bootstrap` and `build-args` only apply to a `recipe`"),
                ));
            }
            check_template(source, image, &Vars::kernel("1.2.3"))?;
            ToolchainSource::Image(image.get_ref().clone())
        }
        (Some(_), Some(image)) => {
            return Err(source
                .error(
                    &image.span(),
                    format!("toolchain {name:?} has both `recipe` and `image`"),
                )
                .help("a toolchain is either built from a recipe or a prebuilt image: keep one"));
        }
        (None, None) => {
            return Err(source
                .error(&t.span(), format!("toolchain {name:?} has neither `recipe` nor `image`"))
                .help("set recipe = \"images/<file>.Containerfile\" or image = \"<registry>/<image>:<tag>\""));
        }
    };
    Ok(Toolchain {
        name: name.to_string(),
        source: source_kind,
        kernel_source_dir,
        rust: raw.rust,
    })
}

fn image_settings(source: &Source, raw: &RawImage, diags: &mut Diagnostics) -> ImageSettings {
    let name =
        match &raw.name {
            Some(n) => {
                if let Err(e) = check_image_template(n.get_ref()) {
                    diags.push(source.error(&n.span(), e).help(
                        "e.g. name = \"quay.io/example/${MOD_NAME}:${KERNEL_FULL_VERSION}\"",
                    ));
                }
                n.get_ref().clone()
            }
            None => DEFAULT_IMAGE_NAME.to_string(),
        };
    let prefix = match &raw.prefix {
        Some(p) => {
            let path = Path::new(p.get_ref());
            let ok = path.is_absolute()
                && path
                    .components()
                    .skip(1)
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
                && path.components().count() > 1;
            if !ok {
                diags.push(
                    source
                        .error(
                            &p.span(),
                            format!("prefix {:?} is not an absolute path below /", p.get_ref()),
                        )
                        .help("KMM's default is \"/opt\""),
                );
            }
            p.get_ref().trim_end_matches('/').to_string()
        }
        None => "/opt".to_string(),
    };
    let base = match raw.base.as_ref().map(|b| b.get_ref().as_str()) {
        Some("busybox") => ImageBase::Busybox,
        Some(other) => ImageBase::Reference(other.to_string()),
        None => ImageBase::Reference(UBI_MINIMAL.to_string()),
    };
    ImageSettings {
        name,
        prefix,
        base,
        source: raw.source.clone(),
        busybox_suite: raw
            .busybox
            .as_ref()
            .map_or_else(default_suite, |b| b.suite.clone()),
        host_link: raw.host_link.unwrap_or(HostLink::Auto),
        busybox_sources: raw
            .busybox
            .as_ref()
            .map(|b| b.sources.clone())
            .unwrap_or_default(),
    }
}

/// An image name template uses only the variables KMM defines for `containerImage`
/// (KMM would make any other one empty) and resolves to a valid reference.
pub fn check_image_template(template: &str) -> Result<(), String> {
    let known: Vec<&str> = envsubst::KERNEL_VARS
        .into_iter()
        .chain(envsubst::MODULE_VARS)
        .collect();
    if let Some(unknown) = envsubst::referenced(template)
        .into_iter()
        .find(|n| !known.contains(&n.as_str()))
    {
        return Err(format!(
            "${unknown} is not one of KMM's variables (KMM would substitute an empty string); known: ${}",
            known.join(", $")
        ));
    }
    let resolved = envsubst::kmm_resolve(template, "6.12.117+deb12-amd64", Some(("m", "ns")))?;
    template::image_reference(&resolved).map(drop)
}

/// What KMM makes of the image name for each kernel is a valid image reference, and KMM
/// can map the kernel at all (its version has three fields): reported at the kernel.
fn check_image_names(
    source: &Source,
    raw: &RawFile,
    kernels: &[Kernel],
    image: &ImageSettings,
    kmm: &KmmSettings,
    diags: &mut Diagnostics,
) {
    let templates = std::iter::once(("[image] name", &image.name))
        .chain(std::iter::once(("[kmm] builder", &kmm.builder)))
        .chain(kmm.sign.iter().map(|s| ("[kmm.sign] image", &s.image)));
    let templates: Vec<(&str, &String)> = templates.collect();
    for k in kernels {
        let Some(raw_kernel) = raw
            .kernel
            .iter()
            .find(|r| r.get_ref().version.get_ref().trim() == k.version)
        else {
            continue;
        };
        for (what, template) in &templates {
            let resolved =
                envsubst::kmm_resolve(template, &k.version, Some((&kmm.name, &kmm.namespace)))
                    .and_then(|r| template::image_reference(&r));
            if let Err(e) = resolved {
                diags.push(
                    source
                        .error(&raw_kernel.get_ref().version.span(), format!("for kernel {}, {what}: {e}", shown(&k.version)))
                        .help("KMM substitutes the kernel version normalized (characters outside [A-Za-z0-9._-] become '_') and needs major.minor.patch"),
                );
                break;
            }
        }
    }
}

/// A recipe is a Containerfile inside the project: its folder is sent to the engine as
/// the build context, so a recipe elsewhere would ship that folder (`/etc`, a home).
fn check_recipe(root: &Path, containerfile: &Path) -> Result<(), (String, String)> {
    let shown = display_path(containerfile);
    let help = "give a Containerfile path relative to kernels.toml, inside its folder, e.g. \"images/toolchain-debian.Containerfile\"";
    if containerfile.is_dir() {
        return Err((
            format!("recipe {shown} is a directory, not a Containerfile"),
            help.into(),
        ));
    }
    if !containerfile.is_file() {
        return Err((format!("recipe {shown} does not exist"), help.into()));
    }
    let real = std::fs::canonicalize(containerfile);
    let project = std::fs::canonicalize(root);
    match (real, project) {
        (Ok(real), Ok(project)) if real.starts_with(&project) => Ok(()),
        _ => Err((
            format!(
                "recipe {shown} is outside the project folder {}",
                display_path(root)
            ),
            help.into(),
        )),
    }
}

fn check_template(source: &Source, t: &Spanned<String>, vars: &Vars) -> Result<(), Diagnostic> {
    vars.expand(t.get_ref())
        .map(drop)
        .map_err(|e| source.error(&t.span(), e))
}

fn unknown_toolchain(
    source: &Source,
    name: &Spanned<String>,
    toolchains: &BTreeMap<String, Spanned<RawToolchain>>,
) -> Diagnostic {
    let known: Vec<&str> = toolchains.keys().map(String::as_str).collect();
    source
        .error(
            &name.span(),
            format!("no toolchain named {:?}", name.get_ref()),
        )
        .help(if known.is_empty() {
            "define it in a [toolchains.<name>] table".to_string()
        } else {
            format!("defined toolchains: {}", known.join(", "))
        })
}

/// A module named in kernels.toml must be a valid name and a folder in `modules/`.
fn check_module_ref(
    source: &Source,
    name: &Spanned<String>,
    known: &BTreeSet<&str>,
) -> Result<(), Diagnostic> {
    let n = name.get_ref();
    if let Err(why) = modules::check_name(n) {
        return Err(source.error(&name.span(), why));
    }
    if !known.contains(n.as_str()) {
        return Err(source
            .error(&name.span(), format!("no module named {n:?} in modules/"))
            .help(format!(
                "modules found: {}",
                known.iter().copied().collect::<Vec<_>>().join(", ")
            )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(
        kernels_toml: &str,
        modules: &[(&str, Option<&str>)],
    ) -> (tempfile::TempDir, Result<Config>) {
        crate::testing::scratch(kernels_toml, modules)
    }

    const TC: &str =
        "[defaults]\ntoolchain = \"deb\"\n[toolchains.deb]\nrecipe = \"images/tc.Containerfile\"\n";

    fn err_of(kernels_toml: &str, modules: &[(&str, Option<&str>)]) -> String {
        let (_d, cfg) = project(kernels_toml, modules);
        format!("{:#}", cfg.unwrap_err())
    }

    #[test]
    fn loads_a_valid_inventory() {
        let text = format!(
            "{TC}[toolchains.dtk]\nimage = \"quay.io/dtk:${{KERNEL_XYZ}}\"\n\
             [[kernel]]\nversion = \"6.1.0-47-amd64\"\n\
             [[kernel]]\nversion = \"6.12.117+deb12-amd64\"\ntoolchain = \"dtk\"\nmodules = [\"a\"]\n"
        );
        let (_d, cfg) = project(
            &text,
            &[("a", None), ("b", Some("kernels = '^6\\.1\\.'\n"))],
        );
        let cfg = cfg.unwrap();
        assert_eq!(cfg.kernels.len(), 2);
        assert_eq!(cfg.kernels[0].toolchain, "deb");
        assert_eq!(cfg.kernels[1].toolchain, "dtk");
        let names = |k: &Kernel| {
            cfg.modules_for(k)
                .iter()
                .map(|m| m.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&cfg.kernels[0]), ["a", "b"]);
        assert_eq!(names(&cfg.kernels[1]), ["a"]);
        assert_eq!(cfg.kernels[1].at.line, 10);
    }

    #[test]
    fn syntax_errors_point_at_line_and_column() {
        let e = err_of(
            &format!("{TC}[[kernel]]\nversion = \"6.1.0-47-amd64\n"),
            &[],
        );
        assert!(e.contains("kernels.toml:6:"), "{e}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors() {
        let e = err_of(
            &format!("{TC}[[kernel]]\nverison = \"6.1.0-47-amd64\"\n"),
            &[],
        );
        assert!(
            e.contains("kernels.toml:6:1") && e.contains("unknown field `verison`"),
            "{e}"
        );
        let e = err_of(&format!("{TC}[[kernel]]\nversion = 6\n"), &[]);
        assert!(
            e.contains("kernels.toml:6:11") && e.contains("expected a string"),
            "{e}"
        );
    }

    #[test]
    fn empty_and_duplicate_versions_are_errors() {
        let e = err_of(&format!("{TC}[[kernel]]\nversion = \"\"\n"), &[]);
        assert!(
            e.contains("kernels.toml:6:11: kernel version is empty"),
            "{e}"
        );
        let e = err_of(
            &format!(
                "{TC}[[kernel]]\nversion = \"6.1.0-47-amd64\"\n[[kernel]]\nversion = \"6.1.0-47-amd64\"\n"
            ),
            &[],
        );
        assert!(
            e.contains("kernels.toml:8:11: kernel 6.1.0-47-amd64 is listed twice"),
            "{e}"
        );
        assert!(
            e.contains("first listed at") && e.contains("kernels.toml:6:11"),
            "{e}"
        );
        let e = err_of(&format!("{TC}[[kernel]]\nversion = \"linux 6.1\"\n"), &[]);
        assert!(e.contains("is not a kernel version string"), "{e}");
        assert!(err_of(TC, &[]).contains("lists no kernels"));
    }

    #[test]
    fn module_references_are_checked() {
        let k =
            |m: &str| format!("{TC}[[kernel]]\nversion = \"6.1.0-47-amd64\"\nmodules = [{m}]\n");
        let e = err_of(&k("\"../evil\""), &[("a", None)]);
        assert!(
            e.contains("kernels.toml:7:12") && e.contains("not a valid module name"),
            "{e}"
        );
        let e = err_of(&k("\"a/b\""), &[("a", None)]);
        assert!(e.contains("not a valid module name"), "{e}");
        let e = err_of(&k("\"nope\""), &[("a", None)]);
        assert!(
            e.contains("no module named \"nope\"") && e.contains("modules found: a"),
            "{e}"
        );
    }

    #[test]
    fn toolchain_references_are_checked() {
        let e = err_of(
            &format!("{TC}[[kernel]]\nversion = \"6.1.0-47-amd64\"\ntoolchain = \"rhel\"\n"),
            &[],
        );
        assert!(
            e.contains("kernels.toml:7:13: no toolchain named \"rhel\""),
            "{e}"
        );
        assert!(e.contains("defined toolchains: deb"), "{e}");
        let e = err_of(
            "[toolchains.x]\nrecipe = \"images/missing\"\n[[kernel]]\nversion = \"6.1.0-1-amd64\"\ntoolchain = \"x\"\n",
            &[],
        );
        assert!(
            e.contains("kernels.toml:2:10: recipe ") && e.contains("images/missing does not exist"),
            "{e}"
        );
        let e = err_of(
            "[toolchains.x]\n[[kernel]]\nversion = \"6.1.0-1-amd64\"\ntoolchain = \"x\"\n",
            &[],
        );
        assert!(e.contains("neither `recipe` nor `image`"), "{e}");
        let e = err_of(
            "[toolchains.x]\nimage = \"q/dtk:${KERNEL}\"\n[[kernel]]\nversion = \"6.1.0-1-amd64\"\ntoolchain = \"x\"\n",
            &[],
        );
        assert!(
            e.contains("kernels.toml:2:9: unknown variable ${KERNEL}"),
            "{e}"
        );
    }

    #[test]
    fn boot_args_are_one_word_each_and_not_the_load_tests_own() {
        let k = |args: &str| {
            format!("{TC}[[kernel]]\nversion = \"6.1.0-47-amd64\"\nboot-args = [{args}]\n")
        };
        let (_d, cfg) = project(&k("\"module.sig_enforce=1\", \"quiet\""), &[]);
        assert_eq!(
            cfg.unwrap().kernels[0].boot_args,
            ["module.sig_enforce=1", "quiet"]
        );
        let e = err_of(&k("\"a b\""), &[]);
        assert!(
            e.contains("kernels.toml:7:14: boot argument \"a b\" is not one word"),
            "{e}"
        );
        let e = err_of(&k("\"quiet\", \"console=tty0\""), &[]);
        assert!(
            e.contains("sets console=, which the load test sets itself"),
            "{e}"
        );
    }

    #[test]
    fn a_dependency_excluded_for_a_kernel_is_an_error() {
        let text = format!("{TC}[[kernel]]\nversion = \"6.1.0-47-amd64\"\nmodules = [\"user\"]\n");
        let e = err_of(
            &text,
            &[("exp", None), ("user", Some("depends = [\"exp\"]\n"))],
        );
        assert!(
            e.contains("module user depends on exp, which is not built for kernel 6.1.0-47-amd64"),
            "{e}"
        );
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let e = err_of(
            &format!(
                "{TC}[[kernel]]\nversion = \"\"\n[[kernel]]\nversion = \"6.1\"\ntoolchain = \"nope\"\n"
            ),
            &[],
        );
        assert!(e.contains("(2 problems)"), "{e}");
    }
}
