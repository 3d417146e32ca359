//! `matrix`: the plan as a GitHub Actions matrix, one entry per kernel.
//!
//! Each entry names its kernels (space-separated, so a workflow step loops the same way
//! whether an entry holds one kernel or a shard of many), the image tag KMM will look
//! for, and the toolchain. Past GitHub's limit of 256 jobs per matrix, kernels are
//! grouped into shards. `--changed-since REV` keeps the kernels with a job whose inputs
//! (toolchain recipe and arguments, module sources, image settings, ...) differ from
//! REV's: [`crate::plan::inputs`], the same answer the incremental build uses.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use regex::Regex;
use serde::Serialize;

use crate::config::Config;
use crate::host::process::Cmd;
use crate::plan::{Plan, Scope, inputs};
use crate::steps::image;

/// GitHub Actions runs at most 256 jobs from one matrix.
pub const GITHUB_MAX_JOBS: usize = 256;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Entry {
    /// The job's name: the kernel, or `shard-N` for a group.
    pub name: String,
    /// Space-separated kernel versions.
    pub kernels: String,
    /// The normalized image tags, in the same order.
    pub tags: String,
    /// The toolchains, in the same order.
    pub toolchains: String,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Matrix {
    pub include: Vec<Entry>,
}

/// Builds the matrix of `plan`'s kernels, filtered and sharded. With `before` (the
/// fingerprints of the plan at a revision, by job label), only the kernels with a job
/// whose inputs changed since.
pub fn matrix(
    plan: &Plan,
    kernel_regex: Option<&Regex>,
    before: Option<&BTreeMap<String, String>>,
    max_jobs: usize,
) -> Result<Matrix> {
    let selected: Option<Vec<usize>> = match before {
        Some(before) => {
            let now = inputs::fingerprints(plan)?;
            let changed = inputs::changed(plan, &now, |i| {
                before.get(&plan.label(&plan.jobs[i]).to_string()).cloned()
            });
            Some(inputs::changed_kernels(plan, &changed))
        }
        None => None,
    };
    let mut rows = Vec::new();
    for (k, kp) in plan.kernels.iter().enumerate() {
        if kernel_regex.is_some_and(|re| !re.is_match(kp.kver())) {
            continue;
        }
        if selected.as_ref().is_some_and(|s| !s.contains(&k)) {
            continue;
        }
        let reference = image::reference(plan.config, kp.kver())?;
        let tag = reference
            .rsplit_once(':')
            .map(|(_, t)| t.to_string())
            .unwrap_or_default();
        rows.push((kp.kver().to_string(), tag, kp.toolchain.name.clone()));
    }
    let max_jobs = max_jobs.max(1);
    let per_job = rows.len().div_ceil(max_jobs).max(1);
    let include = rows
        .chunks(per_job)
        .enumerate()
        .map(|(i, chunk)| {
            let join = |f: fn(&(String, String, String)) -> &String| {
                chunk.iter().map(f).cloned().collect::<Vec<_>>().join(" ")
            };
            Entry {
                name: if per_job == 1 {
                    chunk[0].0.clone()
                } else {
                    format!("shard-{i}")
                },
                kernels: join(|r| &r.0),
                tags: join(|r| &r.1),
                toolchains: join(|r| &r.2),
            }
        })
        .collect();
    Ok(Matrix { include })
}

/// The fingerprints of every job (by label) of the whole pipeline at git revision `rev`
/// of the repository holding the config: its kernels.toml, modules/ and images/
/// checked out into a scratch folder.
pub fn inputs_at(config: &Config, rev: &str) -> Result<BTreeMap<String, String>> {
    let root = &config.root;
    let top = Cmd::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "--show-toplevel"])
        .read()
        .context("--changed-since needs the project in a git repository")?;
    let top = Path::new(top.trim());
    let sub = root.strip_prefix(top).unwrap_or(Path::new(""));
    let tmp = tempfile::tempdir()?;
    Cmd::new("git")
        .arg("-C")
        .arg(top)
        .args(["archive", "--format=tar", rev])
        .pipe(Cmd::new("tar").arg("-x").arg("-C").arg(tmp.path()))
        .read()
        .with_context(|| format!("cannot check out {rev}"))?;
    let old_config = match Config::load(&tmp.path().join(sub).join("kernels.toml")) {
        Ok(c) => c,
        // A revision without (valid) kernels.toml changed everything.
        Err(_) => return Ok(BTreeMap::new()),
    };
    let old_plan = Plan::new(&old_config, None, Scope::everything())?;
    Ok(inputs::by_label(
        &old_plan,
        &inputs::fingerprints(&old_plan)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kernels: usize) -> (tempfile::TempDir, Config) {
        let mut text = String::from(
            "[defaults]\ntoolchain = \"deb\"\n[toolchains.deb]\nrecipe = \"images/tc.Containerfile\"\n",
        );
        for i in 0..kernels {
            text.push_str(&format!("[[kernel]]\nversion = \"6.12.{i}+deb12-amd64\"\n"));
        }
        let (d, c) = crate::testing::scratch(&text, &[("m", None)]);
        (d, c.unwrap())
    }

    #[test]
    fn one_entry_per_kernel_with_normalized_tags() {
        let (_d, c) = config(2);
        let plan = Plan::new(&c, None, Scope::everything()).unwrap();
        let m = matrix(&plan, None, None, GITHUB_MAX_JOBS).unwrap();
        assert_eq!(m.include.len(), 2);
        assert_eq!(m.include[0].name, "6.12.0+deb12-amd64");
        assert_eq!(m.include[0].kernels, "6.12.0+deb12-amd64");
        assert_eq!(m.include[0].tags, "6.12.0_deb12-amd64");
        assert_eq!(m.include[0].toolchains, "deb");
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            json.starts_with(r#"{"include":[{"name":"6.12.0+deb12-amd64","#),
            "{json}"
        );
    }

    #[test]
    fn past_the_job_limit_kernels_are_sharded() {
        let (_d, c) = config(600);
        let plan = Plan::new(&c, None, Scope::everything()).unwrap();
        let m = matrix(&plan, None, None, GITHUB_MAX_JOBS).unwrap();
        assert!(m.include.len() <= GITHUB_MAX_JOBS);
        assert_eq!(m.include.len(), 200);
        assert_eq!(m.include[0].name, "shard-0");
        assert_eq!(m.include[0].kernels.split(' ').count(), 3);
        let all: usize = m.include.iter().map(|e| e.kernels.split(' ').count()).sum();
        assert_eq!(all, 600, "every kernel is in exactly one shard");
    }

    #[test]
    fn filters_by_regex_and_by_changed_inputs() {
        let (_d, c) = config(3);
        let plan = Plan::new(&c, None, Scope::everything()).unwrap();
        let re = Regex::new(r"^6\.12\.[12]\+").unwrap();
        let m = matrix(&plan, Some(&re), None, GITHUB_MAX_JOBS).unwrap();
        assert_eq!(
            m.include
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            ["6.12.1+deb12-amd64", "6.12.2+deb12-amd64"]
        );
        let mut before = inputs::by_label(&plan, &inputs::fingerprints(&plan).unwrap());
        before.insert("m @ 6.12.1+deb12-amd64".into(), "something else".into());
        before.retain(|label, _| !label.ends_with("@ 6.12.2+deb12-amd64"));
        let m = matrix(&plan, None, Some(&before), GITHUB_MAX_JOBS).unwrap();
        assert_eq!(
            m.include
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            ["6.12.1+deb12-amd64", "6.12.2+deb12-amd64"]
        );
    }
}
