//! The bench's figures as one object: the keys issue 14 asks for at the top level (what
//! `--json` prints), every section's details below them, and each target with whether
//! this run met it. The CLI prints it as a table.

use serde::Serialize;

use crate::bench::Options;
use crate::bench::compare::{Rounds, Side, SingleLarge};
use crate::bench::cpu;
use crate::bench::incremental::{Images, Noop, Touched};
use crate::bench::projection::Projected;
use crate::bench::scale::Scale;
use crate::bench::toolchains::Toolchains;
use crate::bench::workload::{DEFAULT_PACKAGES, Package};

/// A measurement taken on 16 cores (issue 14) to check the projection against: 13 real
/// DKMS packages x 2 Debian kernels with plain make.
pub const REFERENCE_16_CORES: &str = "16 cores, 13 DKMS packages x 2 kernels, plain make: one after another with make -j16 \
     (DKMS's model) 70-81 s, one shared jobserver 22-27 s: ratio 0.31-0.33";

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub dkms_wall_s: f64,
    pub kmodforge_wall_s: f64,
    /// kmodforge's wall time over DKMS's.
    pub ratio: f64,
    /// kmodforge's limit (CPU / cores) over its wall time.
    pub efficiency: f64,
    pub dkms_efficiency: f64,
    pub single_large_ratio: f64,
    /// The no-op `build-all` through `cargo xtask` (median).
    pub noop_s: f64,
    pub plan_200x20_s: f64,
    pub toolchain_extra_kernel_s: Option<f64>,
    pub touched_module_s: Option<f64>,
    /// The largest resident memory of the kmodforge process in any run.
    pub peak_rss_mib: Option<f64>,
    pub image_layer_overhead: f64,
    pub image_s: f64,
    pub same_outcomes: bool,
    pub pairs_built: usize,
    pub machine: Machine,
    pub workload: Workload,
    pub dkms: Side,
    pub kmodforge: Side,
    pub outcome_differences: Vec<String>,
    pub compile_phases: PhaseTotals,
    pub single_large: SingleLarge,
    pub noop: Noop,
    pub touched: Option<Touched>,
    pub images: Images,
    pub toolchains: Option<Toolchains>,
    pub scale: Scale,
    pub projection: Vec<Projected>,
    pub projection_reference: &'static str,
    pub targets: Vec<Target>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    /// The 1-minute load average when the bench started.
    pub load_average_start: Option<f64>,
    /// The 1-minute load average when the bench ended: anything above 0 that was not the
    /// bench skews the figures.
    pub load_average: Option<f64>,
    /// `debug` when run through `cargo xtask` (what users run), else `release`.
    pub profile: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub kernels: Vec<String>,
    pub packages: Vec<String>,
    pub large: String,
    pub rounds: usize,
    /// Fewer rounds, packages or kernels than the full bench: a smoke run.
    pub reduced: bool,
    pub notes: Vec<String>,
}

/// Where kmodforge's compiles spent their time in the last round, summed over jobs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseTotals {
    pub jobs: usize,
    pub start_s: f64,
    pub copy_s: f64,
    pub make_s: f64,
    pub keep_s: f64,
    pub exit_s: f64,
    pub cpu_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: &'static str,
    pub target: &'static str,
    pub value: String,
    /// `None` when not measured in this run.
    pub met: Option<bool>,
}

/// Everything the sections measured.
pub struct Parts<'a> {
    pub opts: &'a Options,
    pub load_start: Option<f64>,
    pub kernels: &'a [String],
    pub packages: &'a [Package],
    pub large: &'a Package,
    pub notes: Vec<String>,
    pub rounds: Rounds,
    pub single: SingleLarge,
    pub noop: Noop,
    pub touched: Option<Touched>,
    pub images: Images,
    pub toolchains: Option<Toolchains>,
    pub scale: Scale,
    pub projections: Vec<Projected>,
}

pub fn assemble(p: Parts) -> Report {
    let (d, k) = (&p.rounds.dkms.median, &p.rounds.kmodforge.median);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let peak = p.rounds.peak_rss_kib.max(p.noop.peak_rss_kib).map(mib);
    let mut r = Report {
        dkms_wall_s: d.wall_s,
        kmodforge_wall_s: k.wall_s,
        ratio: k.wall_s / d.wall_s.max(f64::MIN_POSITIVE),
        efficiency: k.efficiency,
        dkms_efficiency: d.efficiency,
        single_large_ratio: p.single.ratio,
        noop_s: p.noop.via_cargo_median_s,
        plan_200x20_s: p.scale.total_s,
        toolchain_extra_kernel_s: p.toolchains.as_ref().and_then(|t| t.extra_max_s),
        touched_module_s: p.touched.as_ref().map(|t| t.wall_s),
        peak_rss_mib: peak,
        image_layer_overhead: p.images.max_overhead,
        image_s: p.images.per_image_s,
        same_outcomes: p.rounds.differences.is_empty(),
        pairs_built: p.rounds.kmodforge.built.len(),
        machine: Machine {
            cores: cpu::cores(),
            load_average_start: p.load_start,
            load_average: cpu::load_average(),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        },
        workload: workload(&p),
        compile_phases: phase_totals(&p.rounds),
        dkms: p.rounds.dkms.clone(),
        kmodforge: p.rounds.kmodforge.clone(),
        outcome_differences: p.rounds.differences.clone(),
        single_large: p.single,
        noop: p.noop,
        touched: p.touched,
        images: p.images,
        toolchains: p.toolchains,
        scale: p.scale,
        projection: p.projections,
        projection_reference: REFERENCE_16_CORES,
        targets: Vec::new(),
    };
    r.targets = targets(&r);
    r
}

fn workload(p: &Parts) -> Workload {
    let o = p.opts;
    Workload {
        kernels: p.kernels.to_vec(),
        packages: p.packages.iter().map(|x| x.deb.clone()).collect(),
        large: p.large.deb.clone(),
        rounds: o.rounds,
        reduced: o.rounds < 2 || p.kernels.len() < 4 || p.packages.len() < DEFAULT_PACKAGES.len(),
        notes: p.notes.clone(),
    }
}

fn phase_totals(rounds: &Rounds) -> PhaseTotals {
    let mut t = PhaseTotals::default();
    for (_, p) in &rounds.outputs.phases {
        t.jobs += 1;
        t.start_s += p.start_s;
        t.copy_s += p.copy_s;
        t.make_s += p.make_s;
        t.keep_s += p.keep_s;
        t.exit_s += p.exit_s;
        t.cpu_s += p.cpu_s;
    }
    t
}

/// Issue 14's targets, each against this run's figure.
pub fn targets(r: &Report) -> Vec<Target> {
    let t = |name, target, value: String, met: Option<bool>| Target {
        name,
        target,
        value,
        met,
    };
    vec![
        t(
            "cold build vs DKMS",
            "<= 0.75 of DKMS's wall, same outcomes",
            format!(
                "{:.2}{}",
                r.ratio,
                if r.same_outcomes {
                    ""
                } else {
                    " (outcomes differ)"
                }
            ),
            Some(r.ratio <= 0.75 && r.same_outcomes),
        ),
        t(
            "efficiency",
            ">= 0.95",
            format!("{:.3}", r.efficiency),
            Some(r.efficiency >= 0.95),
        ),
        t(
            "single large package",
            "<= 1.1 of DKMS's time",
            format!("{:.2}", r.single_large_ratio),
            Some(r.single_large_ratio <= 1.1),
        ),
        t(
            "no-op build-all",
            "< 0.3 s, no engine call",
            format!(
                "{:.3} s via cargo xtask, {} engine calls",
                r.noop_s, r.noop.engine_calls
            ),
            Some(r.noop_s < 0.3 && r.noop.engine_calls == 0),
        ),
        t(
            "one touched module",
            "only its jobs run",
            r.touched.as_ref().map_or("not measured".into(), |x| {
                let own = x.jobs.iter().filter(|j| j.starts_with(&x.module)).count();
                format!(
                    "{own} compiles + {} (depmod, image checks), {:.1} s",
                    x.jobs.len() - own,
                    x.wall_s
                )
            }),
            r.touched.as_ref().map(|x| x.only_its_jobs),
        ),
        t(
            "image layer overhead",
            "< 10 % of its files",
            format!("{:.1} %", r.image_layer_overhead * 100.0),
            Some(r.image_layer_overhead < 0.10),
        ),
        t(
            "plan + no-op check, 200 x 20",
            "< 0.1 s",
            format!("{:.3} s", r.plan_200x20_s),
            Some(r.plan_200x20_s < 0.1),
        ),
        t(
            "each additional kernel's toolchain",
            "< 15 s",
            r.toolchain_extra_kernel_s
                .map_or("not measured".into(), |s| format!("{s:.1} s")),
            r.toolchain_extra_kernel_s.map(|s| s < 15.0),
        ),
    ]
}
