//! `cargo xtask bench`: kmodforge against DKMS on the same real work on this machine,
//! how close each comes to what the hardware allows, and kmodforge on paper at CI scale.
//! Figures inform; nothing here is asserted by a test (timings flake).
//!
//! The parts, in the order a run goes through them:
//! - [`workload`]: the real Debian `*-dkms` packages (fetched at run time), the example
//!   modules, the Debian kernels, and the bench's scratch projects;
//! - [`compare`]: DKMS ([`dkms`]) and kmodforge ([`xtask`]) taking turns from nothing,
//!   with the machine's CPU from [`cpu`]; then the large package alone;
//! - [`incremental`]: the no-op run, one touched module, the images ([`image`]);
//! - [`toolchains`]: a first run from an empty engine, and each further kernel's cost;
//! - [`scale`]: the no-op check of a synthetic 200 x 20 inventory;
//! - [`projection`]: the recorded jobs replayed on 16 and 64 cores under each tool's model.

pub mod compare;
pub mod cpu;
pub mod dkms;
pub mod image;
pub mod incremental;
pub mod projection;
pub mod report;
pub mod scale;
pub mod toolchains;
pub mod workload;
pub mod xtask;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::Config;
use crate::host::engine::EngineKind;
use crate::plan::{Plan, Scope};
use report::Report;
use workload::{KernelEntry, Package, Project};
use xtask::Xtask;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// DKMS and kmodforge rounds, taking turns.
    pub rounds: usize,
    /// Debian packages of the oracle to use (empty: the defaults).
    pub packages: Vec<String>,
    /// Use only the first this many of them.
    pub package_count: Option<usize>,
    /// How many of the project's Debian kernels.
    pub kernels: usize,
    /// The package for the single-large comparison (default: the longest build).
    pub large: Option<String>,
    /// Where fetched packages are kept.
    pub cache: PathBuf,
    pub noop_runs: usize,
    /// Measure toolchains from an empty engine (podman only).
    pub toolchains: bool,
    /// The synthetic inventory's kernels and modules.
    pub scale: (usize, usize),
    /// Keep the scratch folder (its logs) instead of removing it.
    pub keep: bool,
    pub engine: Option<EngineKind>,
    /// This binary.
    pub exe: PathBuf,
}

/// The parts of the workload every section uses.
struct Setup {
    kernels: Vec<String>,
    packages: Vec<Package>,
    large: Package,
    project: Project,
    dkms: Vec<dkms::DkmsPackage>,
    notes: Vec<String>,
}

/// Runs every section and returns the figures; `say` reports progress.
pub fn run(config: &Config, opts: &Options, say: &dyn Fn(&str)) -> Result<Report> {
    let scratch = tempfile::Builder::new()
        .prefix("kmodforge-bench-")
        .tempdir()
        .context("cannot make the bench's scratch folder")?;
    let dir = scratch.path().to_path_buf();
    say(&format!("scratch folder: {}", dir.display()));
    let result = sections(config, opts, &dir, say);
    if let Ok(report) = &result {
        crate::host::fs::write_json(&dir.join("report.json"), report)?;
    }
    if opts.keep || result.is_err() {
        let kept = scratch.keep();
        say(&format!("kept {} (its logs say more)", kept.display()));
    }
    result
}

fn sections(config: &Config, opts: &Options, dir: &Path, say: &dyn Fn(&str)) -> Result<Report> {
    let load_start = cpu::load_average();
    let setup = setup(config, opts, dir, say)?;
    let x = Xtask {
        exe: opts.exe.clone(),
        engine: opts.engine,
        path_first: None,
        env: vec![],
        cargo_workspace: None,
    };
    say("making the toolchains (not timed)");
    x.run(&setup.project, &["build-all"], &dir.join("prepare.log"))?;
    let rounds = compare::alternate(
        &x,
        &setup.project,
        &setup.dkms,
        &setup.kernels,
        opts.rounds,
        dir,
        say,
    )?;
    let large_kernel = large_kernel(&setup.large, &setup.kernels);
    let single = compare::single_large(&x, config, &setup.large, &large_kernel, dir, say)?;
    // Before the no-op section narrows the project to what built.
    let projections = projections(&setup, &rounds, &single)?;
    say("no-op runs, one touched module, images");
    let noop = incremental::noop(
        &x,
        config,
        &setup.project,
        &rounds.kmodforge.built,
        &setup.kernels,
        opts.noop_runs,
        dir,
    )?;
    let touched = touched_module(config, &rounds.kmodforge.built, &setup.kernels)
        .map(|m| incremental::touched(&x, &setup.project, &m, dir))
        .transpose()?;
    let images = incremental::images(&x, &setup.project, &setup.kernels, dir)?;
    let toolchains = toolchains(config, opts, &setup, dir, say)?;
    say(&format!(
        "synthetic inventory: {} kernels x {} modules",
        opts.scale.0, opts.scale.1
    ));
    let scale = scale::measure(&dir.join("scale"), opts.scale.0, opts.scale.1)?;
    Ok(report::assemble(report::Parts {
        opts,
        load_start,
        kernels: &setup.kernels,
        packages: &setup.packages,
        large: &setup.large,
        notes: setup.notes.clone(),
        rounds,
        single,
        noop,
        touched,
        images,
        toolchains,
        scale,
        projections,
    }))
}

fn setup(config: &Config, opts: &Options, dir: &Path, say: &dyn Fn(&str)) -> Result<Setup> {
    let versions: Vec<String> = config.kernels.iter().map(|k| k.version.clone()).collect();
    let kernels = workload::choose_kernels(&versions, opts.kernels);
    anyhow::ensure!(
        !kernels.is_empty(),
        "{} lists no Debian kernel (a version ending in -amd64) to compare on",
        crate::config::diag::display_path(&config.path)
    );
    check_host(&kernels)?;
    let oracle = workload::oracle()?;
    let chosen = workload::choose_packages(&oracle, &opts.packages, opts.package_count)?;
    let mut packages = Vec::new();
    for p in &chosen {
        say(&format!(
            "package {} (cache: {})",
            p.deb,
            opts.cache.display()
        ));
        packages.push(workload::fetch(p, &opts.cache)?);
    }
    let large = workload::large(&packages, opts.large.as_deref())?.clone();
    let (mut dkms, notes) = dkms::examples(config, &dir.join("dkms-examples"))?;
    dkms.extend(packages.iter().map(|p| dkms::DkmsPackage {
        label: p.folder.clone(),
        name: p.name.clone(),
        version: p.version.clone(),
        source: p.source.clone(),
    }));
    let mut modules: Vec<(String, PathBuf)> = config
        .modules
        .iter()
        .map(|m| (m.name.clone(), m.dir.clone()))
        .collect();
    modules.extend(
        packages
            .iter()
            .map(|p| (p.folder.clone(), p.source.clone())),
    );
    let entries: Vec<KernelEntry> = kernels
        .iter()
        .map(|k| KernelEntry {
            version: k.clone(),
            modules: None,
        })
        .collect();
    let project = Project::create(&dir.join("project"), config, &entries, &modules)?;
    Ok(Setup {
        kernels,
        packages,
        large,
        project,
        dkms,
        notes,
    })
}

/// DKMS and the kernels' headers must be on the host; says what to install otherwise.
fn check_host(kernels: &[String]) -> Result<()> {
    let missing = crate::host::deps::bench_missing(kernels);
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "the bench compares with Debian's DKMS on this host and needs {}\n  help: `cargo xtask bench --install-deps`, or `{}`",
        missing.join(", "),
        crate::host::deps::apt_line(&missing)
    )
}

/// The first kernel the large package builds on, as the oracle says (else the first).
fn large_kernel(large: &Package, kernels: &[String]) -> String {
    kernels
        .iter()
        .find(|k| large.built_on.iter().any(|b| b == *k))
        .unwrap_or(&kernels[0])
        .clone()
}

/// An example module that built for every kernel, to touch.
fn touched_module(
    config: &Config,
    built: &[(String, String)],
    kernels: &[String],
) -> Option<String> {
    config
        .modules
        .iter()
        .map(|m| &m.name)
        .find(|m| {
            kernels
                .iter()
                .all(|k| built.iter().any(|(b, kv)| b == *m && kv == k))
        })
        .cloned()
}

fn toolchains(
    config: &Config,
    opts: &Options,
    setup: &Setup,
    dir: &Path,
    say: &dyn Fn(&str),
) -> Result<Option<toolchains::Toolchains>> {
    if !opts.toolchains || opts.engine == Some(EngineKind::Docker) {
        return Ok(None);
    }
    let Some(module) = config
        .modules
        .iter()
        .find(|m| m.depends.is_empty() && m.language == crate::config::modules::Language::C)
    else {
        return Ok(None);
    };
    say("toolchains from an empty engine (a podman storage of the bench's own)");
    toolchains::measure(
        &opts.exe,
        config,
        &setup.kernels,
        &(module.name.clone(), module.dir.clone()),
        &dir.join("toolchains"),
    )
    .map(Some)
}

/// The recorded jobs replayed on this machine's cores (to check the model against the
/// measurement), on 16 and on 64.
fn projections(
    setup: &Setup,
    rounds: &compare::Rounds,
    single: &compare::SingleLarge,
) -> Result<Vec<projection::Projected>> {
    let cores = cpu::cores();
    let config = Config::load(&setup.project.config)?;
    let plan = Plan::new(&config, None, Scope::build())?;
    let builds: Vec<dkms::DkmsBuild> = rounds.dkms_builds.concat();
    let alone = single
        .kmodforge_phases
        .as_ref()
        .map(|p| (p.make_s, p.cpu_s));
    let fraction = |m: &str, k: &str| -> f64 {
        if let (true, Some((wall, cpu))) = (m == setup.large.folder, alone) {
            return projection::parallel_fraction(wall, cpu, cores);
        }
        let same: Vec<&dkms::DkmsBuild> = builds
            .iter()
            .filter(|b| b.package == m && b.kernel == k)
            .collect();
        let wall = cpu::median(&same.iter().map(|b| b.wall_s).collect::<Vec<_>>());
        let c = cpu::median(&same.iter().map(|b| b.cpu_s).collect::<Vec<_>>());
        projection::parallel_fraction(wall, c, cores)
    };
    let width = |m: &str, k: &str| {
        rounds
            .outputs
            .phases
            .iter()
            .find(|((pm, pk), _)| pm == m && pk == k)
            .map_or(1, |(_, p)| p.objects as usize)
    };
    let kjobs = projection::kmodforge_jobs(&plan, &rounds.outputs, fraction);
    let djobs = projection::dkms_jobs(&builds, cores, width);
    Ok([cores, 16, 64]
        .into_iter()
        .map(|n| projection::project(&kjobs, &djobs, n))
        .collect())
}
