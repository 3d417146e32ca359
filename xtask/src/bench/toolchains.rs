//! A first run from an empty engine: how long the base image takes, the first kernel's
//! toolchain, and each further kernel's toolchain on top of those made (what adding a
//! kernel to kernels.toml costs). It runs in a podman storage of the bench's own
//! (`CONTAINERS_STORAGE_CONF` and `CONTAINERS_CONF` pointing into the scratch folder),
//! so the machine's images are neither used nor touched, and that storage is removed
//! afterwards. The times are the jobs' own, from the run's timings.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::bench::workload::{KernelEntry, Project};
use crate::bench::xtask::Xtask;
use crate::config::Config;
use crate::host::engine::EngineKind;
use crate::host::process::Cmd;
use crate::run::layout::Timings;

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Toolchains {
    /// The recipes' base image, made from the Debian archive.
    pub base_s: Option<f64>,
    pub first_kernel: String,
    pub first_s: f64,
    /// Each further kernel's toolchain, made after the first.
    pub extra: Vec<(String, f64)>,
    /// The slowest of `extra`.
    pub extra_max_s: Option<f64>,
}

/// A podman storage in `dir`: the environment that points podman at it.
pub fn storage_env(dir: &Path) -> Result<Vec<(String, String)>> {
    let storage = dir.join("storage.conf");
    let containers = dir.join("containers.conf");
    crate::host::fs::create_dir_all(dir)?;
    crate::host::fs::write(
        &storage,
        format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n",
            dir.display()
        ),
    )?;
    crate::host::fs::write(
        &containers,
        format!("[engine]\ntmp_dir = \"{}/libpod-tmp\"\n", dir.display()),
    )?;
    Ok(vec![
        (
            "CONTAINERS_STORAGE_CONF".into(),
            storage.display().to_string(),
        ),
        ("CONTAINERS_CONF".into(), containers.display().to_string()),
    ])
}

/// Builds `module` for the first of `kernels` from an empty storage, then adds the
/// others, one job at a time so each toolchain's time is its own.
pub fn measure(
    exe: &Path,
    config: &Config,
    kernels: &[String],
    module: &(String, PathBuf),
    dir: &Path,
) -> Result<Toolchains> {
    let first = kernels
        .first()
        .context("no kernel to make a toolchain for")?;
    let env = storage_env(&dir.join("engine"))?;
    let xtask = Xtask {
        exe: exe.to_path_buf(),
        engine: Some(EngineKind::Podman),
        path_first: None,
        env: env.clone(),
        cargo_workspace: None,
    };
    let entry = |k: &String| KernelEntry {
        version: k.clone(),
        modules: Some(vec![module.0.clone()]),
    };
    let result = (|| {
        let project = Project::create(
            &dir.join("project"),
            config,
            &[entry(first)],
            std::slice::from_ref(module),
        )?;
        let timings = |log: &str| -> Result<Timings> {
            crate::host::fs::read_json(&project.out.join(".kmodforge/timings.json"))
                .with_context(|| format!("the run logged in {log} left no timings"))
        };
        xtask.run(&project, &["build-all"], &dir.join("first.log"))?;
        let first_run = timings("first.log")?;
        project.set_kernels(config, &kernels.iter().map(entry).collect::<Vec<_>>())?;
        xtask.run(&project, &["build-all", "-j", "1"], &dir.join("extra.log"))?;
        Ok(summarize(
            &first_run,
            &timings("extra.log")?,
            first,
            &kernels[1..],
        ))
    })();
    let mut reset = Cmd::new("podman").args(["system", "reset", "--force"]);
    for (k, v) in &env {
        reset = reset.env(k, v);
    }
    let _ = reset.run_logged(&dir.join("reset.log"), None);
    let _ = std::fs::remove_dir_all(dir.join("engine"));
    result
}

/// The base and first toolchain's times from the first run's timings, the others' from
/// the second run's (which finds the base made: its own base time is a look-up).
pub fn summarize(
    first_run: &Timings,
    second: &Timings,
    first: &str,
    others: &[String],
) -> Toolchains {
    let toolchain = |t: &Timings, k: &str| t.0.get(&format!("toolchain @ {k}")).copied();
    let extra: Vec<(String, f64)> = others
        .iter()
        .filter_map(|k| toolchain(second, k).map(|s| (k.clone(), s)))
        .collect();
    Toolchains {
        base_s: first_run
            .0
            .iter()
            .find(|(k, _)| k.starts_with("base "))
            .map(|(_, v)| *v),
        first_kernel: first.to_string(),
        first_s: toolchain(first_run, first).unwrap_or(0.0),
        extra_max_s: extra.iter().map(|e| e.1).reduce(f64::max),
        extra,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolchain_times_come_from_the_timings() {
        let timings = |pairs: &[(&str, f64)]| {
            let mut t = Timings::default();
            for (k, v) in pairs {
                t.0.insert(k.to_string(), *v);
            }
            t
        };
        let first = timings(&[
            ("base localhost/kmodforge/debian:bookworm", 30.0),
            ("toolchain @ a", 25.0),
            ("kmf_hello @ a", 1.0),
        ]);
        let second = timings(&[
            ("base localhost/kmodforge/debian:bookworm", 0.1),
            ("toolchain @ a", 25.0),
            ("toolchain @ b", 9.0),
            ("toolchain @ c", 14.0),
        ]);
        let s = summarize(&first, &second, "a", &["b".into(), "c".into()]);
        assert_eq!((s.base_s, s.first_s), (Some(30.0), 25.0));
        assert_eq!(s.extra, [("b".to_string(), 9.0), ("c".to_string(), 14.0)]);
        assert_eq!(s.extra_max_s, Some(14.0));
    }
}
