//! Side by side on the same work: DKMS and kmodforge taking turns (A B A B ...), each
//! round from nothing (a fresh DKMS tree; kmodforge's `build-all` from empty outputs
//! with the toolchains present), and the case where one job runs alone: the large
//! package on one kernel.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::bench::cpu::{self, Measured};
use crate::bench::dkms::{self, DkmsBuild, DkmsPackage, Tree};
use crate::bench::workload::{KernelEntry, Package, Project};
use crate::bench::xtask::{self, Outputs, Xtask, XtaskRun};
use crate::config::Config;
use crate::steps::compile::Phases;

/// One side's rounds and what they built.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Side {
    /// Medians over the rounds.
    #[serde(flatten)]
    pub median: Measured,
    pub rounds: Vec<Measured>,
    /// The (module folder, kernel) pairs built in the last round.
    pub built: Vec<(String, String)>,
    /// CPU seconds of the builds themselves in the last round (DKMS and what it ran;
    /// kmodforge's compile containers), without any other work on the machine.
    pub builds_cpu_s: f64,
}

/// What the rounds leave for the later sections.
pub struct Rounds {
    pub dkms: Side,
    pub kmodforge: Side,
    /// Pairs built by one side only.
    pub differences: Vec<String>,
    pub dkms_builds: Vec<Vec<DkmsBuild>>,
    pub outputs: Outputs,
    pub peak_rss_kib: Option<u64>,
}

/// Alternates `rounds` DKMS rounds and kmodforge rounds on `project`.
pub fn alternate(
    x: &Xtask,
    project: &Project,
    packages: &[DkmsPackage],
    kernels: &[String],
    rounds: usize,
    scratch: &Path,
    say: &dyn Fn(&str),
) -> Result<Rounds> {
    let (mut d, mut k) = (Side::default(), Side::default());
    let mut dkms_builds = Vec::new();
    let mut peak: Option<u64> = None;
    let mut outputs = None;
    for r in 1..=rounds.max(1) {
        say(&format!("round {r}: DKMS"));
        let log = scratch.join(format!("dkms-round-{r}.log"));
        let (builds, m) = dkms::round(&scratch.join("dkms"), packages, kernels, &log)?;
        say(&format!("  {:.1} s wall, {:.1} CPU-s", m.wall_s, m.cpu_s));
        d.rounds.push(m);
        dkms_builds.push(builds);
        say(&format!("round {r}: kmodforge build-all"));
        let (run, m) = kmodforge_round(
            x,
            project,
            &scratch.join(format!("kmodforge-round-{r}.log")),
        )?;
        say(&format!("  {:.1} s wall, {:.1} CPU-s", m.wall_s, m.cpu_s));
        k.rounds.push(m);
        peak = peak.max(run.usage.map(|u| u.max_rss_kib));
        outputs = Some(xtask::outputs(project)?);
    }
    let outputs = outputs.expect("at least one round");
    let cores = cpu::cores();
    d.median = Measured::median_of(&d.rounds, cores);
    k.median = Measured::median_of(&k.rounds, cores);
    let last = dkms_builds.last().map_or(&[][..], Vec::as_slice);
    d.built = built_by_dkms(last);
    d.builds_cpu_s = last.iter().map(|b| b.cpu_s).sum();
    k.built = outputs.built.clone();
    k.builds_cpu_s = outputs.phases.iter().map(|(_, p)| p.cpu_s).sum();
    let differences = differences(&d.built, &k.built);
    Ok(Rounds {
        dkms: d,
        kmodforge: k,
        differences,
        dkms_builds,
        outputs,
        peak_rss_kib: peak,
    })
}

/// `build-all` from empty outputs, timed with the machine's CPU.
fn kmodforge_round(x: &Xtask, project: &Project, log: &Path) -> Result<(XtaskRun, Measured)> {
    if project.out.exists() {
        std::fs::remove_dir_all(&project.out)?;
    }
    cpu::measure(|| x.run(project, &["build-all"], log))
}

fn built_by_dkms(builds: &[DkmsBuild]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = builds
        .iter()
        .filter(|b| b.built())
        .map(|b| (b.package.clone(), b.kernel.clone()))
        .collect();
    out.sort();
    out
}

/// The pairs one side built and the other did not, said in words.
pub fn differences(dkms: &[(String, String)], kmodforge: &[(String, String)]) -> Vec<String> {
    let d: BTreeSet<&(String, String)> = dkms.iter().collect();
    let k: BTreeSet<&(String, String)> = kmodforge.iter().collect();
    let only = |a: &BTreeSet<&(String, String)>, b: &BTreeSet<&(String, String)>, who: &str| {
        a.difference(b)
            .map(|(m, kv)| format!("{m} @ {kv}: built by {who} only"))
            .collect::<Vec<_>>()
    };
    let mut out = only(&d, &k, "DKMS");
    out.extend(only(&k, &d, "kmodforge"));
    out
}

/// The large package alone on one kernel, each side once (DKMS first).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SingleLarge {
    pub package: String,
    pub kernel: String,
    pub dkms: Measured,
    pub dkms_exit: i32,
    pub kmodforge: Measured,
    /// Where kmodforge's time went (the compile's phases).
    pub kmodforge_phases: Option<Phases>,
    pub ratio: f64,
}

pub fn single_large(
    x: &Xtask,
    config: &Config,
    large: &Package,
    kernel: &str,
    scratch: &Path,
    say: &dyn Fn(&str),
) -> Result<SingleLarge> {
    say(&format!("single large package: {} on {kernel}", large.deb));
    let pkg = DkmsPackage {
        label: large.folder.clone(),
        name: large.name.clone(),
        version: large.version.clone(),
        source: large.source.clone(),
    };
    let log = scratch.join("single-dkms.log");
    let tree = Tree::fresh(
        &scratch.join("single-dkms"),
        std::slice::from_ref(&pkg),
        &log,
    )?;
    let (build, dkms) = cpu::measure(|| tree.build(&pkg, kernel))?;
    say(&format!(
        "  DKMS {:.1} s wall, {:.1} CPU-s",
        dkms.wall_s, dkms.cpu_s
    ));
    let project = Project::create(
        &scratch.join("single"),
        config,
        &[KernelEntry {
            version: kernel.to_string(),
            modules: None,
        }],
        &[(large.folder.clone(), large.source.clone())],
    )?;
    let (_, kmodforge) = kmodforge_round(x, &project, &scratch.join("single-kmodforge.log"))?;
    say(&format!(
        "  kmodforge {:.1} s wall, {:.1} CPU-s",
        kmodforge.wall_s, kmodforge.cpu_s
    ));
    let phases = xtask::outputs(&project)?
        .phases
        .into_iter()
        .next()
        .map(|(_, p)| p);
    Ok(SingleLarge {
        package: large.deb.clone(),
        kernel: kernel.to_string(),
        ratio: kmodforge.wall_s / dkms.wall_s.max(f64::MIN_POSITIVE),
        dkms,
        dkms_exit: build.exit,
        kmodforge,
        kmodforge_phases: phases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_outcomes_are_named() {
        let p = |m: &str, k: &str| (m.to_string(), k.to_string());
        let d = [p("a", "1"), p("b", "1")];
        let k = [p("a", "1"), p("c", "2")];
        assert_eq!(
            differences(&d, &k),
            [
                "b @ 1: built by DKMS only",
                "c @ 2: built by kmodforge only"
            ]
        );
        assert!(differences(&d, &d).is_empty());
    }
}
