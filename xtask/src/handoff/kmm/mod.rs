//! `kmm`: the KMM manifests for the images, a function of the repository.
//!
//! One Module per top-level module folder (one no other folder depends on), named
//! `<[kmm] name>-<folder>`. Its `moduleName` and `modulesLoadingOrder` are the `.ko`
//! files the folder and its dependencies really built ([`load`]), so the output needs
//! the current build results: without them `kmm` says which are missing and stops.
//! Kernels a folder is skipped for (a Rust module and a kernel without Rust, a DKMS
//! BUILD_EXCLUSIVE) get no mapping. Each mapping is a `literal` with the image KMM
//! resolves for that kernel, pinned by digest when kmodforge pushed it from the current
//! inputs. With `--in-cluster-build` ([`dockerfile`]) and `[kmm.sign]`, exactly one
//! Module per kernel builds and signs the kernel's image; the others use it.

pub mod crd;
pub mod dockerfile;
pub mod load;
pub mod preflight;
pub mod write;

use std::collections::BTreeSet;

use anyhow::{Result, bail};

use crate::config::Config;
use crate::config::modules::{Language, Module};
use crate::plan::{JobKind, Plan, inputs};
use crate::run::layout::Layout;
use crate::run::results::{Outcome, Results};
use crate::steps::compile::Records;
use crate::steps::publish::PushRecord;

use self::load::{Folder, LoadSpec};

/// KMM's admission webhook refuses a Module whose name and namespace together are
/// longer than this (40 in every released 2.x; 41 only since 2.7).
pub const NAME_AND_NAMESPACE_MAX: usize = 40;

/// Where the in-cluster build starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InCluster {
    /// OpenShift: `FROM ${DTK_AUTO}`, the release's Driver Toolkit (no Rust).
    Dtk,
    /// Any cluster: kmodforge's builder image for the kernel (`cargo xtask builders`).
    Builder,
}

pub struct Options {
    /// One `regexp` mapping per Module instead of a `literal` per kernel.
    pub regexp: bool,
    pub in_cluster: Option<InCluster>,
    /// KMM's `version`, for ordered upgrades.
    pub version: Option<String>,
    /// Refuse when an image's digest is not known (not pushed from the current inputs).
    pub require_digests: bool,
}

/// One KMM Module: a top-level folder, what it loads, and the kernels it is mapped to.
pub struct KmmModule<'a> {
    pub folder: &'a Module,
    pub name: String,
    pub spec: LoadSpec,
    /// Plan kernel indices.
    pub kernels: Vec<usize>,
}

/// Everything the manifests say, worked out from the plan and the build results.
pub struct Handoff<'a> {
    pub plan: &'a Plan<'a>,
    pub modules: Vec<KmmModule<'a>>,
    /// Per plan kernel: the image reference and, when known, its pushed digest.
    pub images: Vec<(String, Option<String>)>,
    /// Per plan kernel: every `.ko` of its tree, as `<location>/<file>`.
    pub trees: Vec<Vec<String>>,
    /// Lines for the header: what is left out and why.
    pub notes: Vec<String>,
}

/// Folders no other folder depends on: each gets a Module of its own.
fn top_level(config: &Config) -> Vec<&Module> {
    let needed: BTreeSet<&str> = config
        .modules
        .iter()
        .flat_map(|m| m.depends.iter().map(String::as_str))
        .collect();
    config
        .modules
        .iter()
        .filter(|m| !needed.contains(m.name.as_str()))
        .collect()
}

/// `m` and every folder it depends on, `m` first.
fn closure<'c>(config: &'c Config, m: &'c Module) -> Vec<&'c Module> {
    let mut out = vec![m];
    let mut i = 0;
    while i < out.len() {
        for d in &out[i].depends {
            if let Some(dep) = config.module(d)
                && !out.iter().any(|o| o.name == dep.name)
            {
                out.push(dep);
            }
        }
        i += 1;
    }
    out
}

/// Reads the build results and works out every Module; stops, naming them, when build
/// results are missing.
pub fn analyze<'a>(plan: &'a Plan<'a>, layout: &Layout, options: &Options) -> Result<Handoff<'a>> {
    let results = Results::read(plan, layout)?;
    let mut missing = Vec::new();
    let mut notes = Vec::new();
    let mut modules = Vec::new();
    for m in top_level(plan.config) {
        if options.in_cluster == Some(InCluster::Dtk) && m.language == Language::Rust {
            notes.push(format!(
                "{}: left out, the Driver Toolkit has no Rust",
                m.name
            ));
            continue;
        }
        let Some(km) = module(plan, layout, &results, m, &mut missing, &mut notes)? else {
            continue;
        };
        modules.push(km);
    }
    if options.in_cluster.is_some() && plan.config.signing.is_some() {
        notes.push(
            "the in-cluster build does not sign: [signing]'s key stays here; KMM signs in the cluster with [kmm.sign]".into(),
        );
    }
    if !missing.is_empty() {
        bail!(
            "the manifests name the .ko files each module built, and these have no current build:\n  {}\n  help: run `cargo xtask build-all` (a module that cannot build for a kernel is excluded from it with `kernels` in its module.toml)",
            missing.join("\n  ")
        );
    }
    check_names(plan.config, &modules)?;
    Ok(Handoff {
        images: images(plan, layout, options, &mut notes)?,
        trees: trees(plan, &results),
        plan,
        modules,
        notes,
    })
}

/// The Module of top-level folder `m`: its kernels and load spec, the same on every
/// kernel. `None` when no kernel has it.
fn module<'a>(
    plan: &'a Plan,
    layout: &Layout,
    results: &Results,
    m: &'a Module,
    missing: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<Option<KmmModule<'a>>> {
    let mut kernels = Vec::new();
    let mut spec: Option<(LoadSpec, &str)> = None;
    for (k, kp) in plan.kernels.iter().enumerate() {
        let folders = closure(plan.config, m);
        let mut built = Vec::new();
        for f in &folders {
            match results.of(plan, k, &f.name) {
                Some(Outcome::Built { .. }) => built.push(*f),
                Some(Outcome::Skipped(why)) if f.name == m.name => {
                    notes.push(format!("{}: not mapped to {}: {why}", m.name, kp.kver()));
                }
                Some(Outcome::NotBuilt) => missing.push(format!("{} for {}", f.name, kp.kver())),
                _ => {}
            }
        }
        if built.len() != folders.len() {
            continue;
        }
        let records = Records::load(layout, kp.kver());
        let this = kernel_spec(layout, kp.kver(), &records, &built)?;
        match &spec {
            Some((first, at)) if *first != this => bail!(
                "{} builds different modules for {at} ({}) and {} ({}): KMM loads the same ones on every kernel\n  help: set [kmm] module in its module.toml, or split the folder",
                m.name,
                first.order.join(", "),
                kp.kver(),
                this.order.join(", ")
            ),
            Some(_) => {}
            None => spec = Some((this, kp.kver())),
        }
        kernels.push(k);
    }
    let Some((spec, _)) = spec else {
        return Ok(None);
    };
    Ok(Some(KmmModule {
        name: module_name(plan.config, m),
        folder: m,
        spec,
        kernels,
    }))
}

/// The load spec of `folders[0]` with the others, from what they built for `kver`.
fn kernel_spec(
    layout: &Layout,
    kver: &str,
    records: &Records,
    folders: &[&Module],
) -> Result<LoadSpec> {
    let mut read = Vec::new();
    for f in folders {
        let record = records
            .get(&f.name)
            .ok_or_else(|| anyhow::anyhow!("no build record of {} for {kver}", f.name))?;
        read.push(Folder {
            module: f,
            kos: load::kos(layout, kver, &f.name, record)?,
        });
    }
    let (top, deps) = read.split_first().expect("a folder and its dependencies");
    load::spec(top, deps).map_err(anyhow::Error::msg)
}

/// The Module's name: module.toml's `[kmm] name`, else `<[kmm] name>-<folder>` made a
/// Kubernetes name.
pub fn module_name(config: &Config, m: &Module) -> String {
    if let Some(name) = &m.kmm.name {
        return name.clone();
    }
    let folder: String = m
        .name
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("{}-{}", config.kmm.name, folder.trim_matches('-'))
}

fn check_names(config: &Config, modules: &[KmmModule]) -> Result<()> {
    let ns = &config.kmm.namespace;
    let mut problems = Vec::new();
    for m in modules {
        let file = crate::config::diag::display_path(&m.folder.dir.join("module.toml"));
        if !crate::config::kmm::is_dns_label(&m.name) {
            problems.push(format!(
                "{file}: the Module name {:?} is not a valid Kubernetes name",
                m.name
            ));
        } else if m.name.len() + ns.len() > NAME_AND_NAMESPACE_MAX {
            problems.push(format!(
                "the Module {} in namespace {ns} is {} characters together; KMM's webhook allows {NAME_AND_NAMESPACE_MAX}\n  help: shorten [kmm] name or namespace in kernels.toml, or set [kmm] name in {file}",
                m.name,
                m.name.len() + ns.len()
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for m in modules {
        if !seen.insert(&m.name) {
            problems.push(format!(
                "two Modules are named {}: set [kmm] name in a module.toml",
                m.name
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// Each kernel's image reference, with the digest of its push when that push was made
/// from the current inputs.
fn images(
    plan: &Plan,
    layout: &Layout,
    options: &Options,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, Option<String>)>> {
    let push_plan = Plan::new(plan.config, None, crate::plan::Scope::image(true))?;
    let fingerprints = inputs::fingerprints(&push_plan)?;
    let mut out = Vec::new();
    let mut unpinned = Vec::new();
    for kp in &plan.kernels {
        let reference = crate::steps::image::reference(plan.config, kp.kver())?;
        let fp = push_plan
            .jobs
            .iter()
            .zip(&fingerprints)
            .find_map(|(j, fp)| match j.kind {
                JobKind::Push { kernel } if push_plan.kernels[kernel].kver() == kp.kver() => {
                    Some(fp)
                }
                _ => None,
            });
        let digest = fp
            .and_then(|fp| PushRecord::fresh(layout, kp.kver(), fp, &reference))
            .map(|r| r.digest);
        if digest.is_none() && options.in_cluster.is_none() {
            unpinned.push(kp.kver().to_string());
        }
        out.push((reference, digest));
    }
    if !unpinned.is_empty() {
        let what = format!(
            "images not pinned by digest (not pushed from the current inputs): {}",
            unpinned.join(", ")
        );
        if options.require_digests {
            bail!("{what}\n  help: run `cargo xtask image --push`, then `cargo xtask kmm` again");
        }
        notes.push(what);
    }
    Ok(out)
}

/// Every `.ko` each kernel's tree holds, as `<location>/<file>`.
fn trees(plan: &Plan, results: &Results) -> Vec<Vec<String>> {
    plan.kernels
        .iter()
        .enumerate()
        .map(|(k, kp)| {
            let mut files = Vec::new();
            for m in &kp.modules {
                if let Some(Outcome::Built { modules, location }) = results.of(plan, k, &m.name) {
                    for f in modules {
                        let rel = std::path::Path::new(location).join(f);
                        files.push(rel.to_string_lossy().into_owned());
                    }
                }
            }
            files.sort();
            files
        })
        .collect()
}

/// How KMM loads folder `m` on `kver`, from the last build's records, when `m` is a
/// top-level folder that built there with what it depends on.
pub fn load_spec(config: &Config, layout: &Layout, kver: &str, m: &Module) -> Option<LoadSpec> {
    if !top_level(config).iter().any(|t| t.name == m.name) {
        return None;
    }
    let folders = closure(config, m);
    let records = Records::load(layout, kver);
    let built = folders
        .iter()
        .all(|f| records.get(&f.name).is_some_and(|r| r.skipped.is_none()));
    built
        .then(|| kernel_spec(layout, kver, &records, &folders).ok())
        .flatten()
}
