//! `build`/`build-all`: executes a [`Plan`].
//!
//! First every job's fingerprint is computed (reading recipes and module sources only)
//! and compared with the last run's record, so that a run with nothing to do starts no
//! container and asks nothing of the engine. Jobs that must run go to the scheduler;
//! a toolchain is only made ready when some job of its kernel needs it.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Result;

use crate::host::engine::Engine;
use crate::host::fs::{read_json, write_json};
use crate::plan::{JobKind, JobLabel, KernelPlan, Plan};
use crate::run::layout::{Layout, Timings};
use crate::run::progress::{Reporter, Status};
use crate::run::schedule::{self, Task};
use crate::steps::compile::{self, Compile, Record};
use crate::steps::depmod;
use crate::steps::toolchain::{self, Facts};

/// One settled job of a run.
pub struct JobResult {
    pub label: JobLabel,
    pub kind: JobKind,
    pub status: Status,
    pub elapsed: Duration,
    /// The job was run (not settled from its last run's record).
    pub ran: bool,
}

pub struct BuildReport {
    pub jobs: Vec<JobResult>,
}

impl BuildReport {
    pub fn failures(&self) -> impl Iterator<Item = &JobResult> {
        self.jobs
            .iter()
            .filter(|j| matches!(j.status, Status::Failed(_)))
    }

    pub fn not_ok(&self) -> usize {
        self.jobs.iter().filter(|j| j.status.is_failure()).count()
    }
}

/// Per-kernel fingerprints, computed before anything runs.
struct KernelInputs {
    toolchain: String,
    compile: Vec<String>,
    depmod: String,
}

fn inputs(kp: &KernelPlan) -> Result<KernelInputs> {
    let toolchain = toolchain::fingerprint(kp.toolchain, kp.kver())?;
    let mut compile: Vec<String> = Vec::new();
    for m in &kp.modules {
        let deps: Vec<(&str, &str)> = m
            .depends
            .iter()
            .map(|d| {
                (
                    d.as_str(),
                    compile[kp.module_index(d).expect("planned")].as_str(),
                )
            })
            .collect();
        compile.push(compile::fingerprint(m, kp.kver(), &toolchain, &deps)?);
    }
    let pairs: Vec<(&str, &str)> = kp
        .modules
        .iter()
        .zip(&compile)
        .map(|(m, f)| (m.name.as_str(), f.as_str()))
        .collect();
    let depmod = depmod::fingerprint(kp.kver(), &toolchain, &pairs);
    Ok(KernelInputs {
        toolchain,
        compile,
        depmod,
    })
}

/// Which jobs must run: every stale compile and depmod job, and the toolchain (and
/// base) of their kernels. A fresh module another one depends on is not rebuilt: its
/// artifacts are there.
pub fn jobs_to_run(plan: &Plan, stale: &[bool]) -> Vec<bool> {
    let mut needed = vec![false; plan.jobs.len()];
    for i in (0..plan.jobs.len()).rev() {
        let job = &plan.jobs[i];
        if matches!(job.kind, JobKind::Compile { .. } | JobKind::Depmod { .. }) {
            needed[i] = stale[i];
        }
        if needed[i] {
            for &d in &job.deps {
                if matches!(
                    plan.jobs[d].kind,
                    JobKind::Toolchain { .. } | JobKind::Base { .. }
                ) {
                    needed[d] = true;
                }
            }
        }
    }
    needed
}

/// Default guesses, in seconds, for jobs that have never run here.
fn default_estimate(kind: &JobKind) -> f64 {
    match kind {
        JobKind::Base { .. } => 30.0,
        JobKind::Toolchain { .. } => 60.0,
        JobKind::Compile { .. } => 5.0,
        JobKind::Depmod { .. } => 1.0,
    }
}

pub fn build(
    plan: &Plan,
    engine: &Engine,
    layout: &Layout,
    jobs: usize,
    reporter: &dyn Reporter,
) -> Result<BuildReport> {
    let inputs: Vec<KernelInputs> = plan.kernels.iter().map(inputs).collect::<Result<_>>()?;
    let facts: Vec<OnceLock<Facts>> = plan.kernels.iter().map(|_| OnceLock::new()).collect();
    let timings: Timings = read_json(&layout.timings()).unwrap_or_default();

    // What is fresh, and so which toolchains and bases are needed at all.
    let mut fresh: Vec<Option<Status>> = Vec::new();
    for job in &plan.jobs {
        fresh.push(match &job.kind {
            JobKind::Compile { kernel, module } => {
                let kp = &plan.kernels[*kernel];
                Record::fresh(
                    layout,
                    kp.kver(),
                    &kp.modules[*module].name,
                    &inputs[*kernel].compile[*module],
                )
                .map(|r| r.skipped.map_or(Status::Fresh, Status::Skipped))
            }
            JobKind::Depmod { kernel } => depmod::is_fresh(
                layout,
                plan.kernels[*kernel].kver(),
                &inputs[*kernel].depmod,
            )
            .then_some(Status::Fresh),
            JobKind::Toolchain { .. } | JobKind::Base { .. } => None,
        });
    }
    let stale: Vec<bool> = fresh.iter().map(Option::is_none).collect();
    let needed = jobs_to_run(plan, &stale);

    let mut tasks = Vec::new();
    for (i, job) in plan.jobs.iter().enumerate() {
        let label = plan.label(job);
        if !needed[i] {
            tasks.push(Task::settled(
                label,
                job.deps.clone(),
                fresh[i].clone().unwrap_or(Status::Fresh),
            ));
            continue;
        }
        let key = label.to_string();
        let estimate = timings
            .0
            .get(&key)
            .copied()
            .unwrap_or_else(|| default_estimate(&job.kind));
        let log = layout.log(
            label.kernel.as_deref().unwrap_or("_base"),
            &log_name(&job.kind, &label),
        );
        let _ = std::fs::remove_file(&log);
        let (facts, inputs) = (&facts, &inputs);
        let work: schedule::Work = match job.kind.clone() {
            JobKind::Base { base } => Box::new(move |_| {
                match toolchain::ensure_base(
                    engine,
                    &base,
                    plan.config.tls_verify(&base.image),
                    &log,
                ) {
                    Ok(_) => Status::Done,
                    Err(e) => Status::Failed(format!("{e:#}")),
                }
            }),
            JobKind::Toolchain { kernel } => {
                let kp = &plan.kernels[kernel];
                Box::new(move |_| {
                    match toolchain::ensure(
                        engine,
                        layout,
                        plan.config,
                        kp.kernel,
                        &inputs[kernel].toolchain,
                        &log,
                    ) {
                        Ok(f) => {
                            let _ = facts[kernel].set(f);
                            Status::Done
                        }
                        Err(e) => Status::Failed(format!("{e:#}")),
                    }
                })
            }
            JobKind::Compile { kernel, module } => {
                let kp = &plan.kernels[kernel];
                Box::new(move |deps: &[Status]| {
                    let m = kp.modules[module];
                    if let Some(Status::Skipped(_)) =
                        deps.iter().find(|s| matches!(s, Status::Skipped(_)))
                    {
                        return Status::Skipped(format!(
                            "needs {}, which is skipped",
                            m.depends.join(", ")
                        ));
                    }
                    let f = facts[kernel].get().expect("the toolchain job ran first");
                    let compile = Compile {
                        engine,
                        layout,
                        module: m,
                        kver: kp.kver(),
                        image: &f.image,
                        kdir: &f.kernel_source_dir,
                        kernel_has_rust: f.rust,
                        deps: m.depends.iter().map(String::as_str).collect(),
                        fingerprint: &inputs[kernel].compile[module],
                        log: &log,
                    };
                    match compile.run() {
                        Ok(None) => Status::Done,
                        Ok(Some(reason)) => Status::Skipped(reason),
                        Err(e) => Status::Failed(format!("{e:#}")),
                    }
                })
            }
            JobKind::Depmod { kernel } => {
                let kp = &plan.kernels[kernel];
                Box::new(move |_| {
                    let f = facts[kernel].get().expect("the toolchain job ran first");
                    let mut built = Vec::new();
                    for m in &kp.modules {
                        match read_json::<Record>(&Record::path(layout, kp.kver(), &m.name)) {
                            Some(r) if r.skipped.is_none() => {
                                built.push((m.name.clone(), r.modules))
                            }
                            Some(_) => {}
                            None => {
                                return Status::Failed(format!("no build record for {}", m.name));
                            }
                        }
                    }
                    match depmod::run(
                        engine,
                        layout,
                        kp.kver(),
                        &f.image,
                        &built,
                        &inputs[kernel].depmod,
                        &log,
                    ) {
                        Ok(()) => Status::Done,
                        Err(e) => Status::Failed(format!("{e:#}")),
                    }
                })
            }
        };
        tasks.push(Task::run(label, job.deps.clone(), estimate, work));
    }

    if needed.iter().any(|n| *n) {
        engine.check()?;
    }
    let results = schedule::run(tasks, jobs, reporter);

    let mut timings = timings;
    let mut report = BuildReport { jobs: Vec::new() };
    for ((job, (status, elapsed)), ran) in plan.jobs.iter().zip(results).zip(needed) {
        let label = plan.label(job);
        if status == Status::Done {
            timings.0.insert(label.to_string(), elapsed.as_secs_f64());
        }
        report.jobs.push(JobResult {
            label,
            kind: job.kind.clone(),
            status,
            elapsed,
            ran,
        });
    }
    write_json(&layout.timings(), &timings)?;
    Ok(report)
}

fn log_name(kind: &JobKind, label: &JobLabel) -> String {
    match kind {
        JobKind::Base { base } => crate::config::template::normalize_tag(&base.image),
        _ => label.name.clone(),
    }
}

/// Groups a report's results by kernel and job name, for the summary table.
pub fn by_kernel(report: &BuildReport) -> BTreeMap<String, Vec<&JobResult>> {
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

    #[test]
    fn only_stale_jobs_and_their_toolchains_run() {
        let (_d, config) = crate::testing::scratch(
            "[toolchains.deb]\nrecipe = \"images/tc.Containerfile\"\nbase = \"b\"\n[defaults]\ntoolchain = \"deb\"\n\
             [[kernel]]\nversion = \"6.1.0-1-amd64\"\n[[kernel]]\nversion = \"6.1.0-2-amd64\"\n",
            &[("exp", None), ("user", Some("depends = [\"exp\"]\n"))],
        );
        let config = config.unwrap();
        let plan = Plan::new(&config, None).unwrap();
        let labels: Vec<String> = plan
            .jobs
            .iter()
            .map(|j| plan.label(j).to_string())
            .collect();
        let index = |l: &str| labels.iter().position(|x| x == l).unwrap();
        let running = |stale: &[&str]| -> Vec<String> {
            let stale: Vec<bool> = labels.iter().map(|l| stale.contains(&l.as_str())).collect();
            jobs_to_run(&plan, &stale)
                .iter()
                .zip(&labels)
                .filter(|(n, _)| **n)
                .map(|(_, l)| l.clone())
                .collect()
        };
        assert!(
            running(&[]).is_empty(),
            "nothing stale, nothing runs (no toolchain either)"
        );
        // The user changed: not its fresh exporter, not the other kernel.
        assert_eq!(
            running(&["user @ 6.1.0-1-amd64", "depmod @ 6.1.0-1-amd64"]),
            [
                "base b",
                "toolchain @ 6.1.0-1-amd64",
                "user @ 6.1.0-1-amd64",
                "depmod @ 6.1.0-1-amd64"
            ]
        );
        assert!(index("exp @ 6.1.0-1-amd64") < index("user @ 6.1.0-1-amd64"));
    }
}
