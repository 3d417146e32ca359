//! After a full build: the no-op `build-all` (whole process; engine stand-ins on PATH
//! count every call to podman or docker, which must stay at none), one touched module
//! (which jobs ran, how long), and the images (time, and each added layer's size
//! against the files it holds).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::bench::cpu;
use crate::bench::image::{self, LayerSize};
use crate::bench::workload::{KernelEntry, Project};
use crate::bench::xtask::{self, Xtask};
use crate::config::Config;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Noop {
    pub runs: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// Calls to podman or docker during the no-op runs.
    pub engine_calls: usize,
    pub peak_rss_kib: Option<u64>,
    /// The median through `cargo xtask`, as a user runs it (cargo's start-up included).
    pub via_cargo_median_s: f64,
}

/// Restricts `project` to the pairs that built (a failed job is retried by every run,
/// so a no-op needs none), settles it, then times `runs` no-op runs.
pub fn noop(
    x: &Xtask,
    config: &Config,
    project: &Project,
    built: &[(String, String)],
    kernels: &[String],
    runs: usize,
    scratch: &Path,
) -> Result<Noop> {
    settle(config, project, built, kernels, x, scratch)?;
    let calls = scratch.join("engine-calls");
    let shims = scratch.join("engine-stand-ins");
    xtask::engine_stand_ins(&shims, &calls)?;
    let counted = Xtask {
        path_first: Some(shims),
        ..x.clone()
    };
    let (times, peak) = noop_runs(&counted, project, runs, scratch, "noop")?;
    let via_cargo = Xtask {
        cargo_workspace: Some(config.root.clone()),
        ..counted
    };
    let (cargo_times, _) = noop_runs(&via_cargo, project, runs, scratch, "noop-cargo")?;
    let engine_calls = std::fs::read_to_string(&calls)
        .map(|t| t.lines().count())
        .unwrap_or(0);
    Ok(Noop {
        runs: times.len(),
        median_s: cpu::median(&times),
        min_s: times.iter().copied().fold(f64::INFINITY, f64::min),
        max_s: times.iter().copied().fold(0.0, f64::max),
        engine_calls,
        peak_rss_kib: peak,
        via_cargo_median_s: cpu::median(&cargo_times),
    })
}

/// Restricts `project` to the pairs that built and runs it once, so the next run has
/// nothing to do.
fn settle(
    config: &Config,
    project: &Project,
    built: &[(String, String)],
    kernels: &[String],
    x: &Xtask,
    scratch: &Path,
) -> Result<()> {
    let entries: Vec<KernelEntry> = kernels
        .iter()
        .map(|k| KernelEntry {
            version: k.clone(),
            modules: Some(
                built
                    .iter()
                    .filter(|(_, kv)| kv == k)
                    .map(|(m, _)| m.clone())
                    .collect(),
            ),
        })
        .filter(|e| e.modules.as_ref().is_some_and(|m| !m.is_empty()))
        .collect();
    project.set_kernels(config, &entries)?;
    x.run(project, &["build-all"], &scratch.join("noop-settle.log"))?;
    Ok(())
}

/// `runs` no-op runs' wall times and the largest peak memory; any job started fails.
fn noop_runs(
    x: &Xtask,
    project: &Project,
    runs: usize,
    scratch: &Path,
    name: &str,
) -> Result<(Vec<f64>, Option<u64>)> {
    let mut times = Vec::new();
    let mut peak = None;
    for i in 0..runs.max(1) {
        let log = scratch.join(format!("{name}-{i}.log"));
        let run = x.run(project, &["build-all"], &log)?;
        anyhow::ensure!(
            run.started.is_empty() && !run.failed_jobs,
            "the no-op run {i} started jobs ({}); see {}",
            run.started.join(", "),
            log.display()
        );
        times.push(run.wall_s);
        peak = peak.max(run.usage.map(|u| u.max_rss_kib));
    }
    Ok((times, peak))
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Touched {
    pub module: String,
    pub wall_s: f64,
    /// The jobs the run started.
    pub jobs: Vec<String>,
    /// Every job started was the module's, its kernels' depmod or their toolchain look-up.
    pub only_its_jobs: bool,
}

/// Edits one C file of `module` (a comment) and times the `build-all` that follows.
pub fn touched(x: &Xtask, project: &Project, module: &str, scratch: &Path) -> Result<Touched> {
    let dir = project.module_dir(module);
    let file = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "c"))
        .with_context(|| format!("{module} has no .c file at its top to touch"))?;
    let mut text = crate::host::fs::read_to_string(&file)?;
    text.push_str("\n/* touched by cargo xtask bench */\n");
    crate::host::fs::write(&file, text)?;
    let run = x.run(project, &["build-all"], &scratch.join("touched.log"))?;
    let only_its_jobs = run.started.iter().all(|j| {
        let name = j.split(" @ ").next().unwrap_or(j);
        name == module || name == "depmod" || name == "toolchain" || name.starts_with("base ")
    });
    Ok(Touched {
        module: module.to_string(),
        wall_s: run.wall_s,
        jobs: run.started,
        only_its_jobs,
    })
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Images {
    /// `image --all --no-load` as a whole.
    pub wall_s: f64,
    /// The busybox base made once for every image (from the Debian archive).
    pub base_s: Option<f64>,
    /// Per image: its layer and its image job, on average.
    pub per_image_s: f64,
    pub layers: Vec<LayerSize>,
    /// The largest `overhead` of the layers.
    pub max_overhead: f64,
}

/// Makes every kernel's image (not loaded into the engine) and measures the layers.
pub fn images(x: &Xtask, project: &Project, kernels: &[String], scratch: &Path) -> Result<Images> {
    let mut with_epoch = Xtask {
        exe: x.exe.clone(),
        engine: x.engine,
        path_first: None,
        env: x.env.clone(),
        cargo_workspace: None,
    };
    with_epoch
        .env
        .push(("SOURCE_DATE_EPOCH".into(), "1700000000".into()));
    let run = with_epoch.run(
        project,
        &["image", "--all", "--no-load"],
        &scratch.join("image.log"),
    )?;
    anyhow::ensure!(
        !run.failed_jobs,
        "the images failed; see {}",
        scratch.join("image.log").display()
    );
    let timings = xtask::outputs(project)?.timings;
    let mut layers = Vec::new();
    let mut per = Vec::new();
    for k in kernels {
        let dir = project.out.join("images").join(k);
        if dir.join("index.json").is_file() {
            layers.push(image::added_layer(&dir, k)?);
            let t = |job: &str| {
                timings
                    .0
                    .get(&format!("{job} @ {k}"))
                    .copied()
                    .unwrap_or(0.0)
            };
            per.push(t("layer") + t("image"));
        }
    }
    Ok(Images {
        wall_s: run.wall_s,
        base_s: timings.0.get("image base").copied(),
        per_image_s: per.iter().sum::<f64>() / per.len().max(1) as f64,
        max_overhead: layers.iter().map(|l| l.overhead).fold(0.0, f64::max),
        layers,
    })
}
