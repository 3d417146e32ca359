//! The kmodforge side: this very binary run as a user runs it, as a whole process, in a
//! scratch project. What it did is read back from its progress lines (the jobs it
//! started), its records (which pairs built, where each compile's time went) and its
//! own resource use, which it writes at exit when `KMODFORGE_RUSAGE_FILE` names a file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::bench::cpu::OwnUsage;
use crate::bench::workload::Project;
use crate::config::Config;
use crate::host::engine::EngineKind;
use crate::host::process::{Cmd, process_error, which};
use crate::plan::{JobKind, Plan, Scope};
use crate::run::layout::{Layout, Timings};
use crate::run::results::{Outcome, Results};
use crate::steps::compile::Phases;

/// The environment variable that asks kmodforge to write its own resource use at exit.
pub const RUSAGE_ENV: &str = "KMODFORGE_RUSAGE_FILE";

/// Writes this process's resource use to the file `KMODFORGE_RUSAGE_FILE` names, if any
/// (called as kmodforge exits).
pub fn write_own_usage() {
    let Some(path) = std::env::var_os(RUSAGE_ENV) else {
        return;
    };
    let Some(usage) = crate::bench::cpu::usage(libc::RUSAGE_SELF) else {
        return;
    };
    let _ = crate::host::fs::write_json(Path::new(&path), &usage);
}

/// How the bench runs kmodforge.
#[derive(Clone, Default)]
pub struct Xtask {
    pub exe: PathBuf,
    pub engine: Option<EngineKind>,
    /// A folder put first on PATH (the engine stand-ins that count calls).
    pub path_first: Option<PathBuf>,
    /// Extra environment (a separate engine storage, say).
    pub env: Vec<(String, String)>,
    /// Run as a user types it, `cargo xtask` in this workspace, instead of `exe`
    /// directly (cargo's own start-up counted).
    pub cargo_workspace: Option<PathBuf>,
}

/// What one run of kmodforge did.
#[derive(Clone, Debug, Default)]
pub struct XtaskRun {
    pub wall_s: f64,
    /// The jobs it started, as its progress lines name them.
    pub started: Vec<String>,
    /// It exited 1: some job failed (a package that does not build for a kernel).
    pub failed_jobs: bool,
    pub usage: Option<OwnUsage>,
}

impl Xtask {
    /// Runs `cargo xtask <args>` on `project` with plain progress into `log`.
    pub fn run(&self, project: &Project, args: &[&str], log: &Path) -> Result<XtaskRun> {
        let usage_file = log.with_extension("rusage.json");
        let _ = std::fs::remove_file(&usage_file);
        let _ = std::fs::remove_file(log);
        let mut cmd = match &self.cargo_workspace {
            Some(ws) => Cmd::new("cargo").arg("xtask").dir(ws),
            None => Cmd::new(&self.exe),
        }
        .arg("--config")
        .arg(&project.config)
        .arg("--out")
        .arg(&project.out)
        .args(["--progress", "plain"]);
        if let Some(e) = self.engine {
            cmd = cmd.arg("--engine").arg(e.to_string());
        }
        cmd = cmd.args(args).env(RUSAGE_ENV, &usage_file);
        for (k, v) in &self.env {
            cmd = cmd.env(k, v);
        }
        if let Some(dir) = &self.path_first {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd = cmd.env("PATH", format!("{}:{path}", dir.display()));
        }
        let started = Instant::now();
        let result = cmd.run_logged(log, None);
        let wall_s = started.elapsed().as_secs_f64();
        let failed_jobs = match &result {
            Ok(()) => false,
            Err(e) if process_error(e).and_then(|p| p.code()) == Some(1) => true,
            Err(e) => return Err(anyhow::anyhow!("{e:#}")).context("kmodforge did not finish"),
        };
        Ok(XtaskRun {
            wall_s,
            started: started_jobs(&std::fs::read_to_string(log).unwrap_or_default()),
            failed_jobs,
            usage: crate::host::fs::read_json(&usage_file),
        })
    }
}

/// The jobs a plain-progress log says were started.
pub fn started_jobs(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            l.split_once("] start     ")
                .map(|(_, j)| j.trim().to_string())
        })
        .collect()
}

/// Stand-ins for podman and docker that note each call in `calls`, then run the real
/// program: a no-op run must leave `calls` empty.
pub fn engine_stand_ins(dir: &Path, calls: &Path) -> Result<()> {
    crate::host::fs::create_dir_all(dir)?;
    for name in ["podman", "docker"] {
        let Some(real) = which(name) else { continue };
        let script = format!(
            "#!/bin/sh\necho \"{name} $*\" >> '{}'\nexec '{}' \"$@\"\n",
            calls.display(),
            real.display()
        );
        let path = dir.join(name);
        crate::host::fs::write(&path, script)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {} executable", path.display()))?;
    }
    Ok(())
}

/// What a build of `project` left: the (module folder, kernel) pairs built from the
/// current inputs, every compile's phases, and every job's time.
pub struct Outputs {
    pub built: Vec<(String, String)>,
    pub phases: Vec<((String, String), Phases)>,
    pub timings: Timings,
}

pub fn outputs(project: &Project) -> Result<Outputs> {
    let config = Config::load(&project.config)?;
    let plan = Plan::new(&config, None, Scope::build())?;
    let layout = Layout::new(&project.out)?;
    let results = Results::read(&plan, &layout)?;
    let mut built = Vec::new();
    let mut phases = Vec::new();
    for job in &plan.jobs {
        let JobKind::Compile { kernel, module } = job.kind else {
            continue;
        };
        let kp = &plan.kernels[kernel];
        let (name, kver) = (kp.modules[module].name.clone(), kp.kver().to_string());
        if matches!(results.outcomes[kernel][module], Outcome::Built { .. }) {
            built.push((name.clone(), kver.clone()));
        }
        if let Some(p) = Phases::load(&layout, &kver, &name) {
            phases.push(((name, kver), p));
        }
    }
    let timings = crate::host::fs::read_json(&layout.timings()).unwrap_or_default();
    Ok(Outputs {
        built,
        phases,
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn started_jobs_come_from_progress_lines() {
        let log = "$ xtask build-all\n[   0.6s] 3 jobs to run, 0 up to date\n\
                   [   0.6s] start     kmf_hello @ 6.1.0-47-amd64\n\
                   [   1.9s] ok        kmf_hello @ 6.1.0-47-amd64 (1.3s)\n\
                   [   1.9s] start     depmod @ 6.1.0-47-amd64\n";
        assert_eq!(
            started_jobs(log),
            ["kmf_hello @ 6.1.0-47-amd64", "depmod @ 6.1.0-47-amd64"]
        );
    }
}
