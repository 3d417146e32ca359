//! Executes a [`Plan`], whatever view of the pipeline it is.
//!
//! First every job's fingerprint is computed (reading recipes and module sources only)
//! and compared with the last run's records, so that a run with nothing to do starts no
//! container and asks nothing of the engine. Jobs that must run go to the scheduler;
//! a toolchain (or a base) is only made ready when some job of its kernel needs it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::host::engine::Engine;
use crate::host::fs::{read_json, write_json};
use crate::plan::inputs;
use crate::plan::{JobKind, JobLabel, Plan};
use crate::run::jobs::Context;
use crate::run::layout::{Layout, Timings};
use crate::run::progress::{Reporter, Status};
use crate::run::schedule::{self, Task};
use crate::steps::image::Provenance;

/// How a run goes, beyond which jobs it has.
#[derive(Clone, Debug)]
pub struct Options {
    /// How many jobs run at once.
    pub jobs: usize,
    /// Load each image into the engine's local storage.
    pub load: bool,
    /// Also write each image as `<dir>/<tag>.tar`.
    pub oci_archive: Option<PathBuf>,
    /// Push even when the registry holds the same content.
    pub force_push: bool,
    /// How long a boot may take.
    pub boot_timeout: Duration,
    /// Test or verify this OCI layout instead of kmodforge's own.
    pub image: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            load: true,
            oci_archive: None,
            force_push: false,
            boot_timeout: Duration::from_secs(300),
            image: None,
        }
    }
}

/// One settled job of a run.
pub struct JobResult {
    pub label: JobLabel,
    pub kind: JobKind,
    pub status: Status,
    pub elapsed: Duration,
    /// The job was run (not settled from its last run's record).
    pub ran: bool,
    /// What it has to tell (an image's digest, a push, the checks of verify).
    pub details: Vec<String>,
}

pub struct Report {
    pub jobs: Vec<JobResult>,
}

impl Report {
    pub fn failures(&self) -> impl Iterator<Item = &JobResult> {
        self.jobs
            .iter()
            .filter(|j| matches!(j.status, Status::Failed(_)))
    }

    pub fn not_ok(&self) -> usize {
        self.jobs.iter().filter(|j| j.status.is_failure()).count()
    }

    /// The results of kernel `kver`'s jobs, in plan order.
    pub fn of_kernel<'r>(&'r self, kver: &'r str) -> impl Iterator<Item = &'r JobResult> {
        self.jobs
            .iter()
            .filter(move |j| j.label.kernel.as_deref() == Some(kver))
    }
}

/// Which jobs must run: every stale job that keeps a record (compile, depmod, layer),
/// every job whose work is its point (image, push, load test, verify), and the
/// toolchain, base and image base those need. A fresh module another one depends on is
/// not rebuilt: its artifacts are there.
pub fn jobs_to_run(plan: &Plan, stale: &[bool]) -> Vec<bool> {
    let mut needed = vec![false; plan.jobs.len()];
    for i in (0..plan.jobs.len()).rev() {
        let job = &plan.jobs[i];
        needed[i] |= match job.kind {
            JobKind::Compile { .. } | JobKind::Depmod { .. } | JobKind::Layer { .. } => stale[i],
            JobKind::Image { .. }
            | JobKind::Push { .. }
            | JobKind::LoadTest { .. }
            | JobKind::Verify { .. }
            | JobKind::Builder { .. }
            | JobKind::BuilderPush { .. } => true,
            JobKind::Base { .. }
            | JobKind::Toolchain { .. }
            | JobKind::Packages { .. }
            | JobKind::ImageBase => false,
        };
        if needed[i] {
            for &d in job.deps.iter().chain(&job.after) {
                if matches!(
                    plan.jobs[d].kind,
                    JobKind::Toolchain { .. }
                        | JobKind::Packages { .. }
                        | JobKind::Base { .. }
                        | JobKind::ImageBase
                ) {
                    needed[d] = true;
                }
            }
        }
    }
    needed
}

/// Default guesses, in seconds, for jobs that have never run here (a build from empty
/// outputs, as in CI): a compile by the size of its sources, so that the largest
/// package starts first, not last with every core but one idle behind it.
fn default_estimate(plan: &Plan, kind: &JobKind) -> f64 {
    match kind {
        JobKind::Base { .. } => 30.0,
        JobKind::Toolchain { .. } => 60.0,
        JobKind::Packages { .. } => 20.0,
        JobKind::Compile { kernel, module } => {
            compile_estimate(&plan.kernels[*kernel].modules[*module].dir)
        }
        JobKind::Depmod { .. } | JobKind::Layer { .. } | JobKind::Verify { .. } => 1.0,
        JobKind::ImageBase | JobKind::Image { .. } | JobKind::Push { .. } => 3.0,
        JobKind::LoadTest { .. } => 30.0,
        JobKind::Builder { .. } => 60.0,
        JobKind::BuilderPush { .. } => 30.0,
    }
}

/// A second, plus about 12 s per MB of C, assembly and Rust sources: what dahdi's
/// 4.7 MB took on one core here (60 CPU-seconds).
fn compile_estimate(dir: &std::path::Path) -> f64 {
    let bytes: u64 = crate::run::fingerprint::walk_files(dir)
        .unwrap_or_default()
        .iter()
        .filter(|f| {
            f.extension()
                .is_some_and(|e| e == "c" || e == "S" || e == "rs")
        })
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    1.0 + bytes as f64 / 80_000.0
}

/// Whether the job talks to the container engine when it runs.
fn uses_engine(kind: &JobKind) -> bool {
    !matches!(kind, JobKind::Layer { .. } | JobKind::Verify { .. })
}

pub fn run(
    plan: &Plan,
    engine: &Engine,
    layout: &Layout,
    options: &Options,
    reporter: &dyn Reporter,
) -> Result<Report> {
    let fingerprints = inputs::fingerprints(plan)?;
    let makes_layers = plan
        .jobs
        .iter()
        .any(|j| matches!(j.kind, JobKind::Layer { .. }));
    let provenance = if makes_layers {
        Some(Provenance::detect(
            &plan.config.root,
            plan.config.image.source.as_deref(),
        )?)
    } else {
        None
    };
    let cx = Context::new(plan, engine, layout, options, fingerprints, provenance);

    // What is fresh, and so which toolchains and bases are needed at all.
    let fresh = fresh_in_parallel(&cx, plan.jobs.len());
    let stale: Vec<bool> = fresh.iter().map(Option::is_none).collect();
    let needed = jobs_to_run(plan, &stale);
    let timings: Timings = read_json(&layout.timings()).unwrap_or_default();
    let tasks = tasks(&cx, &fresh, &needed, &timings);
    if plan
        .jobs
        .iter()
        .zip(&needed)
        .any(|(j, n)| *n && uses_engine(&j.kind))
    {
        engine.check()?;
    }
    let results = schedule::run(tasks, options.jobs, cx.jobserver.as_ref(), reporter);
    report(&cx, results, needed, timings)
}

/// Every job's state from its record, read on as many threads as there are CPUs: a
/// no-op run of a large inventory is thousands of small reads, each independent.
fn fresh_in_parallel(cx: &Context, n: usize) -> Vec<Option<Status>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(8);
    let chunk = n.div_ceil(threads).max(64);
    std::thread::scope(|s| {
        let parts: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|start| {
                s.spawn(move || {
                    (start..(start + chunk).min(n))
                        .map(|i| cx.fresh(i))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("a freshness check does not panic"))
            .collect()
    })
}

fn tasks<'s>(
    cx: &'s Context<'s>,
    fresh: &[Option<Status>],
    needed: &[bool],
    timings: &Timings,
) -> Vec<Task<'s>> {
    let plan = cx.plan;
    let mut tasks = Vec::new();
    for (i, job) in plan.jobs.iter().enumerate() {
        let label = plan.label(job);
        let waits = (job.deps.clone(), job.after.clone());
        if !needed[i] {
            let status = fresh[i].clone().unwrap_or(Status::Fresh);
            tasks.push(Task::settled(label, waits, status));
            continue;
        }
        let estimate = timings
            .0
            .get(&label.to_string())
            .copied()
            .unwrap_or_else(|| default_estimate(plan, &job.kind));
        let _ = std::fs::remove_file(cx.log(i));
        tasks.push(Task::run(
            label,
            waits,
            estimate,
            move |deps: &[Status]| cx.work(i, deps),
        ));
    }
    tasks
}

fn report(
    cx: &Context,
    results: Vec<(Status, Duration)>,
    needed: Vec<bool>,
    mut timings: Timings,
) -> Result<Report> {
    let plan = cx.plan;
    let mut details = std::mem::take(&mut *cx.details.lock().unwrap_or_else(|e| e.into_inner()));
    let mut jobs = Vec::new();
    for (i, ((job, (status, elapsed)), ran)) in
        plan.jobs.iter().zip(results).zip(needed).enumerate()
    {
        let label = plan.label(job);
        if status == Status::Done {
            timings.0.insert(label.to_string(), elapsed.as_secs_f64());
        }
        jobs.push(JobResult {
            label,
            kind: job.kind.clone(),
            status,
            elapsed,
            ran,
            details: details.remove(&i).unwrap_or_default(),
        });
    }
    // Timings only order the next run: failing to keep them (a full disk) must not cost
    // the user this run's summary and errors.
    let _ = write_json(&cx.layout.timings(), &timings);
    Ok(Report { jobs })
}

/// Groups a report's results by kernel and job name, for the summary table.
pub fn by_kernel(report: &Report) -> BTreeMap<String, Vec<&JobResult>> {
    let mut map: BTreeMap<String, Vec<&JobResult>> = BTreeMap::new();
    for j in &report.jobs {
        if let Some(k) = &j.label.kernel {
            map.entry(k.clone()).or_default().push(j);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Scope;

    #[test]
    fn only_stale_jobs_and_their_toolchains_run() {
        let (_d, config) = crate::testing::scratch(
            "[toolchains.deb]\nrecipe = \"images/tc.Containerfile\"\nbase = \"b\"\n[defaults]\ntoolchain = \"deb\"\n\
             [[kernel]]\nversion = \"6.1.0-1-amd64\"\n[[kernel]]\nversion = \"6.1.0-2-amd64\"\n",
            &[("exp", None), ("user", Some("depends = [\"exp\"]\n"))],
        );
        let config = config.unwrap();
        let running = |scope: Scope, stale: &[&str]| -> Vec<String> {
            let plan = Plan::new(&config, None, scope).unwrap();
            let labels: Vec<String> = plan
                .jobs
                .iter()
                .map(|j| plan.label(j).to_string())
                .collect();
            let stale: Vec<bool> = labels.iter().map(|l| stale.contains(&l.as_str())).collect();
            jobs_to_run(&plan, &stale)
                .iter()
                .zip(&labels)
                .filter(|(n, _)| **n)
                .map(|(_, l)| l.clone())
                .collect()
        };
        assert!(
            running(Scope::build(), &[]).is_empty(),
            "nothing stale, nothing runs (no toolchain either)"
        );
        // The user changed: not its fresh exporter, not the other kernel.
        assert_eq!(
            running(
                Scope::build(),
                &["user @ 6.1.0-1-amd64", "depmod @ 6.1.0-1-amd64"]
            ),
            [
                "base b",
                "toolchain @ 6.1.0-1-amd64",
                "user @ 6.1.0-1-amd64",
                "depmod @ 6.1.0-1-amd64"
            ]
        );
        // A load test always runs, with its kernel's toolchain; the fresh layer does not.
        assert_eq!(
            running(Scope::test(), &[]),
            [
                "base b",
                "toolchain @ 6.1.0-1-amd64",
                "test @ 6.1.0-1-amd64",
                "toolchain @ 6.1.0-2-amd64",
                "test @ 6.1.0-2-amd64"
            ]
        );
        // Images need the image base, never the toolchains when the trees are fresh.
        assert_eq!(
            running(Scope::image(false), &[]),
            [
                "image base",
                "image @ 6.1.0-1-amd64",
                "image @ 6.1.0-2-amd64"
            ]
        );
    }
}
