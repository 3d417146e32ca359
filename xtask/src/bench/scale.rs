//! The no-op check at CI scale, without building anything: a synthetic inventory
//! (200 kernels x 20 modules by default) written to disk as a finished build leaves it
//! (compile records, artifacts, staging trees, depmod records), then timed as a no-op
//! `build-all` runs in-process: read kernels.toml and the module folders, plan,
//! fingerprint every job, check every record. Nothing may be stale: the check must
//! neither start a container nor ask the engine anything.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::bench::cpu::own_cpu_s;
use crate::config::Config;
use crate::host::engine::Engine;
use crate::plan::{JobKind, Plan, Scope, inputs};
use crate::run::layout::Layout;
use crate::run::pipeline::{self, Options};
use crate::run::progress::Silent;
use crate::steps::compile::{Record, Records};
use crate::steps::depmod;

/// Bytes of each synthetic `.ko`: a mid-sized stripped driver module.
const KO_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Scale {
    pub kernels: usize,
    pub modules: usize,
    pub jobs: usize,
    /// Reading kernels.toml and the module folders.
    pub config_s: f64,
    pub plan_s: f64,
    /// Fingerprinting every job once (also part of `check_s`).
    pub fingerprints_s: f64,
    /// The pipeline's no-op run: fingerprints, every record checked, nothing to do.
    pub check_s: f64,
    /// config + plan + check: what a no-op `build-all` spends past start-up.
    pub total_s: f64,
    /// How many times it was timed (these figures are the median run's) and the
    /// slowest run's total.
    pub runs: usize,
    pub slowest_s: f64,
    /// The CPU this process used for them (all threads): less than `total_s` when the
    /// machine was busy with other work, more when the checks ran in parallel.
    pub cpu_s: f64,
}

/// How many times the no-op check is timed: the median is reported (a single run on a
/// shared 2-core machine can be a third slower than the next).
pub const RUNS: usize = 5;

/// Writes the inventory under `dir` and times its no-op check [`RUNS`] times: the run
/// with the median total, and the slowest total.
pub fn measure(dir: &Path, kernels: usize, modules: usize) -> Result<Scale> {
    let path = write_project(dir, kernels, modules)?;
    make_fresh(&path)?;
    let mut runs = (0..RUNS)
        .map(|_| noop(&path, &dir.join("out")))
        .collect::<Result<Vec<_>>>()?;
    runs.sort_by(|a, b| a.total_s.total_cmp(&b.total_s));
    let slowest_s = runs.last().map_or(0.0, |r| r.total_s);
    Ok(Scale {
        kernels,
        modules,
        runs: RUNS,
        slowest_s,
        ..runs.swap_remove(RUNS / 2)
    })
}

/// One no-op `build-all` of the inventory, in process and timed by phase.
fn noop(path: &Path, out: &Path) -> Result<Scale> {
    let (t0, cpu0) = (Instant::now(), own_cpu_s());
    let config = Config::load(path)?;
    let t1 = Instant::now();
    let plan = Plan::new(&config, None, Scope::build())?;
    let (t2, cpu2) = (Instant::now(), own_cpu_s());
    inputs::fingerprints(&plan)?;
    let (t3, cpu3) = (Instant::now(), own_cpu_s());
    let engine = Engine::unavailable(&anyhow::anyhow!(
        "the synthetic inventory has no engine: a no-op check must not need one"
    ));
    let layout = Layout::new(out)?;
    let report = pipeline::run(&plan, &engine, &layout, &Options::default(), &Silent)?;
    let (t4, cpu4) = (Instant::now(), own_cpu_s());
    if let Some(j) = report.jobs.iter().find(|j| j.ran) {
        bail!(
            "the synthetic inventory was not fresh: {} would run (a bench bug)",
            j.label
        );
    }
    let s = |a: Instant, b: Instant| (b - a).as_secs_f64();
    Ok(Scale {
        jobs: plan.jobs.len(),
        config_s: s(t0, t1),
        plan_s: s(t1, t2),
        fingerprints_s: s(t2, t3),
        check_s: s(t3, t4),
        total_s: s(t0, t2) + s(t3, t4),
        cpu_s: (cpu2 - cpu0) + (cpu4 - cpu3),
        ..Scale::default()
    })
}

/// kernels.toml with `kernels` Debian-style kernels and `modules` small C modules.
fn write_project(dir: &Path, kernels: usize, modules: usize) -> Result<std::path::PathBuf> {
    crate::host::fs::fresh_dir(dir)?;
    put(&dir.join("images/tc.Containerfile"), "FROM scratch\n")?;
    let mut toml = String::from(
        "[defaults]\ntoolchain = \"deb\"\n[toolchains.deb]\nrecipe = \"images/tc.Containerfile\"\n",
    );
    for k in 0..kernels {
        toml.push_str(&format!("[[kernel]]\nversion = \"6.1.0-{k}-amd64\"\n"));
    }
    // About the size of the examples' sources.
    let source = "/* a synthetic module */\n".repeat(160);
    for m in 0..modules {
        let name = format!("synth_{m:02}");
        let d = dir.join("modules").join(&name);
        put(&d.join("Kbuild"), format!("obj-m := {name}.o\n"))?;
        put(&d.join(format!("{name}.c")), &source)?;
    }
    let path = dir.join("kernels.toml");
    crate::host::fs::write(&path, toml)?;
    Ok(path)
}

/// Leaves the outputs of a finished build: for every compile its record and artifact,
/// for every kernel its staging tree and depmod record, all matching the fingerprints.
fn make_fresh(path: &Path) -> Result<()> {
    let config = Config::load(path)?;
    let plan = Plan::new(&config, None, Scope::build())?;
    let fingerprints = inputs::fingerprints(&plan)?;
    let layout = Layout::new(&config.root.join("out"))?;
    let ko = vec![0x5au8; KO_BYTES];
    let mut records = std::collections::BTreeMap::new();
    for (job, fp) in plan.jobs.iter().zip(&fingerprints) {
        match job.kind {
            JobKind::Compile { kernel, module } => {
                let kver = plan.kernels[kernel].kver();
                let name = &plan.kernels[kernel].modules[module].name;
                let file = format!("{name}.ko");
                let artifact = layout.artifacts(kver, name).join(&file);
                put(&artifact, &ko)?;
                // The unstripped twin a real build keeps beside it (depmod reads it).
                let twin = layout.artifacts(kver, name).join("unstripped").join(&file);
                link(&artifact, &twin)?;
                link(&artifact, &layout.staging_modules(kver).join(&file))?;
                let record = Record {
                    fingerprint: fp.clone(),
                    modules: vec![file],
                    location: String::new(),
                    skipped: None,
                    package: None,
                    bytes: KO_BYTES as u64,
                    unstripped_bytes: KO_BYTES as u64,
                };
                records
                    .entry(kver)
                    .or_insert_with(Records::default)
                    .0
                    .insert(name.clone(), record);
            }
            JobKind::Depmod { kernel } => {
                let kver = plan.kernels[kernel].kver();
                let moddir = layout.staging_modules(kver);
                for f in [
                    "modules.dep",
                    "modules.alias",
                    "modules.symbols",
                    "modules.dep.bin",
                ] {
                    put(&moddir.join(f), "synthetic\n")?;
                }
                depmod::record(&layout, kver, fp)?;
            }
            _ => {}
        }
    }
    for (kver, r) in records {
        r.save(&layout, kver)?;
    }
    Ok(())
}

/// Links `to` to the file `from`, making `to`'s folder first.
fn link(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        crate::host::fs::create_dir_all(dir)?;
    }
    std::fs::hard_link(from, to)
        .with_context(|| format!("cannot link {} to {}", to.display(), from.display()))
}

/// Writes a file, making its folder first.
fn put(path: &Path, data: impl AsRef<[u8]>) -> Result<()> {
    if let Some(dir) = path.parent() {
        crate::host::fs::create_dir_all(dir)?;
    }
    crate::host::fs::write(path, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small inventory is fresh as written: its no-op check runs nothing and asks no
    /// engine (an engine-less run fails if any job would run).
    #[test]
    fn a_synthetic_inventory_is_fresh_without_an_engine() {
        let dir = tempfile::tempdir().unwrap();
        let s = measure(dir.path(), 3, 2).unwrap();
        assert_eq!((s.kernels, s.modules, s.runs), (3, 2, RUNS));
        assert!(s.slowest_s >= s.total_s);
        // Per kernel: a toolchain, 2 compiles and depmod at least.
        assert!(s.jobs >= 3 * 4, "{} jobs", s.jobs);
        assert!(s.total_s > 0.0);
    }
}
