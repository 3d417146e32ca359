//! `cargo xtask bench`: its flags, and the bench's figures printed as a table (or, with
//! `--json`, as one JSON object). The measuring is in `crate::bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::Cli;
use crate::bench::report::Report;
use crate::bench::{self, Options};
use crate::config::Config;

#[derive(Args)]
pub(super) struct BenchArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,

    /// DKMS and kmodforge rounds, taking turns (A B A B); medians are reported
    /// [default: 2; 1 with --quick].
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,

    /// A Debian *-dkms package of the DKMS oracle to build (repeat it for several)
    /// [default: dahdi, bbswitch, lime-forensics, rtpengine, dpdk-kmods, evdi, tp-smapi].
    #[arg(long = "package", value_name = "DEB")]
    packages: Vec<String>,

    /// Use only the first N packages [default: all; 2 with --quick].
    #[arg(long = "packages", value_name = "N")]
    package_count: Option<usize>,

    /// How many of the project's Debian kernels, 6.1 and 6.12 taking turns
    /// [default: 4; 2 with --quick].
    #[arg(long, value_name = "N")]
    kernels: Option<usize>,

    /// The package built alone on one kernel against DKMS [default: the longest build].
    #[arg(long, value_name = "DEB")]
    large: Option<String>,

    /// How many no-op runs to time [default: 20; 5 with --quick].
    #[arg(long, alias = "runs", value_name = "N")]
    noop_runs: Option<usize>,

    /// Skip the toolchains-from-an-empty-engine section (it takes a few minutes).
    #[arg(long)]
    no_toolchains: bool,

    /// A smoke run: 1 round, 2 packages, 2 kernels, 5 no-op runs. Its figures are
    /// labelled as such.
    #[arg(long)]
    quick: bool,

    /// Keep the scratch folder (projects, DKMS trees, every log, report.json) and print
    /// its path.
    #[arg(long)]
    keep: bool,

    /// Where fetched packages are kept [default: ~/.cache/kmodforge/bench].
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,

    /// First install what the bench needs on the host: dkms and the kernels' headers.
    #[arg(long)]
    install_deps: bool,
}

impl BenchArgs {
    fn options(&self, cli: &Cli) -> Result<Options> {
        let q = |quick: usize, full| if self.quick { quick } else { full };
        Ok(Options {
            rounds: self.rounds.unwrap_or(q(1, 2)),
            packages: self.packages.clone(),
            package_count: self.package_count.or(self.quick.then_some(2)),
            kernels: self.kernels.unwrap_or(q(2, 4)),
            large: self.large.clone(),
            cache: self
                .cache
                .clone()
                .unwrap_or_else(|| crate::run::layout::cache_dir().join("bench")),
            noop_runs: self.noop_runs.unwrap_or(q(5, 20)),
            toolchains: !self.no_toolchains,
            scale: (200, 20),
            keep: self.keep,
            engine: cli.engine,
            exe: std::env::current_exe()?,
        })
    }
}

pub(super) fn run(cli: &Cli, config: Config, args: &BenchArgs) -> Result<ExitCode> {
    let opts = args.options(cli)?;
    if args.install_deps {
        let versions: Vec<String> = config.kernels.iter().map(|k| k.version.clone()).collect();
        crate::host::deps::install_bench(&bench::workload::choose_kernels(
            &versions,
            opts.kernels,
        ))?;
    }
    let report = bench::run(&config, &opts, &|line| eprintln!("bench: {line}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// The report as the table a person reads.
fn table(r: &Report) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    header(r, &mut line);
    sides(r, &mut line);
    singles(r, &mut line);
    incremental(r, &mut line);
    scale(r, &mut line);
    line("targets:".into());
    for t in &r.targets {
        let state = match t.met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "-     ",
        };
        line(format!(
            "  {state} {:<36} {:<38} {}",
            t.name, t.target, t.value
        ));
    }
    out
}

fn load(l: Option<f64>) -> String {
    l.map_or("unknown".into(), |l| format!("{l:.1}"))
}

fn header(r: &Report, line: &mut impl FnMut(String)) {
    let w = &r.workload;
    line(format!(
        "kmodforge bench on {} cores ({} build), load average {} at the start, {} at the end{}",
        r.machine.cores,
        r.machine.profile,
        load(r.machine.load_average_start),
        load(r.machine.load_average),
        if w.reduced {
            format!(
                "\nSMOKE RUN (reduced workload: {} round(s), {} package(s), {} kernel(s)): not the bench's figures",
                w.rounds,
                w.packages.len(),
                w.kernels.len()
            )
        } else {
            String::new()
        }
    ));
    line(format!("kernels: {}", w.kernels.join(", ")));
    line(format!(
        "packages: {} (large: {}), plus the example modules",
        w.packages.join(", "),
        w.large
    ));
    for n in &w.notes {
        line(format!("  note: {n}"));
    }
}

fn sides(r: &Report, line: &mut impl FnMut(String)) {
    line(format!(
        "\n{:<22} {:>9} {:>9} {:>9} {:>10} {:>7} {:>11}",
        "cold build (median)", "wall", "CPU", "limit", "efficiency", "pairs", "builds' CPU"
    ));
    for (name, s) in [("DKMS", &r.dkms), ("kmodforge build-all", &r.kmodforge)] {
        line(format!(
            "{name:<22} {:>8.1}s {:>8.1}s {:>8.1}s {:>10.2} {:>7} {:>10.1}s",
            s.median.wall_s,
            s.median.cpu_s,
            s.median.limit_s,
            s.median.efficiency,
            s.built.len(),
            s.builds_cpu_s
        ));
    }
    line("  (CPU: the whole machine's, /proc/stat, other work included; builds' CPU: the builds' own)".into());
    let rounds: Vec<String> = r
        .dkms
        .rounds
        .iter()
        .zip(&r.kmodforge.rounds)
        .map(|(d, k)| format!("{:.1}/{:.1}", d.wall_s, k.wall_s))
        .collect();
    line(format!(
        "ratio kmodforge/DKMS: {:.2} (rounds, DKMS/kmodforge: {}); outcomes: {}",
        r.ratio,
        rounds.join(", "),
        if r.same_outcomes {
            "the same pairs built".to_string()
        } else {
            format!("DIFFER: {}", r.outcome_differences.join("; "))
        }
    ));
    let p = &r.compile_phases;
    line(format!(
        "kmodforge's {} compiles (last round, summed): container start {:.1} s, copy {:.1} s, make {:.1} s, keep/strip {:.1} s, exit {:.1} s; {:.1} CPU-s",
        p.jobs, p.start_s, p.copy_s, p.make_s, p.keep_s, p.exit_s, p.cpu_s
    ));
}

fn singles(r: &Report, line: &mut impl FnMut(String)) {
    let s = &r.single_large;
    line(format!(
        "\nsingle large package {} on {}: DKMS {:.1} s ({:.1} CPU-s, exit {}), kmodforge {:.1} s ({:.1} CPU-s): ratio {:.2}",
        s.package,
        s.kernel,
        s.dkms.wall_s,
        s.dkms.cpu_s,
        s.dkms_exit,
        s.kmodforge.wall_s,
        s.kmodforge.cpu_s,
        s.ratio
    ));
    if let Some(p) = &s.kmodforge_phases {
        line(format!(
            "  kmodforge's compile: start {:.2} s, copy {:.2} s, make {:.2} s, keep/strip {:.2} s, exit {:.2} s; {:.1} CPU-s over {} objects",
            p.start_s, p.copy_s, p.make_s, p.keep_s, p.exit_s, p.cpu_s, p.objects
        ));
    }
}

fn incremental(r: &Report, line: &mut impl FnMut(String)) {
    let n = &r.noop;
    line(format!(
        "\nno-op build-all: median {:.3} s (min {:.3}, max {:.3}, {} runs), {} engine calls; through `cargo xtask`: median {:.3} s",
        n.median_s, n.min_s, n.max_s, n.runs, n.engine_calls, n.via_cargo_median_s
    ));
    if let Some(t) = &r.touched {
        line(format!(
            "one touched module ({}): {:.1} s, jobs run: {}",
            t.module,
            t.wall_s,
            t.jobs.join(", ")
        ));
    }
    line(format!(
        "peak resident memory of kmodforge: {}",
        r.peak_rss_mib
            .map_or("not measured".into(), |m| format!("{m:.1} MiB"))
    ));
    let i = &r.images;
    line(format!(
        "images: {} in {:.1} s (busybox base {}), {:.2} s per image (layer + image jobs)",
        i.layers.len(),
        i.wall_s,
        i.base_s.map_or("-".into(), |s| format!("{s:.1} s")),
        i.per_image_s
    ));
    for l in &i.layers {
        line(format!(
            "  {}: {} files, {} bytes; layer tar {} bytes (+{:.1} %), gzip {} bytes",
            l.kernel,
            l.files,
            l.files_bytes,
            l.tar_bytes,
            l.overhead * 100.0,
            l.gzip_bytes
        ));
    }
    match &r.toolchains {
        Some(t) => {
            let extra: Vec<String> = t
                .extra
                .iter()
                .map(|(k, s)| format!("{k} {s:.1} s"))
                .collect();
            line(format!(
                "toolchains from an empty engine: base {}, first ({}) {:.1} s; each further kernel: {}",
                t.base_s.map_or("-".into(), |s| format!("{s:.1} s")),
                t.first_kernel,
                t.first_s,
                extra.join(", ")
            ));
        }
        None => line(
            "toolchains from an empty engine: not measured (--no-toolchains, --quick or docker)"
                .into(),
        ),
    }
}

fn scale(r: &Report, line: &mut impl FnMut(String)) {
    let s = &r.scale;
    line(format!(
        "\nsynthetic {} kernels x {} modules ({} jobs), no builds: config {:.3} s, plan {:.3} s, fingerprints {:.3} s, no-op check {:.3} s; total {:.3} s (median of {} runs, slowest {:.3} s)",
        s.kernels,
        s.modules,
        s.jobs,
        s.config_s,
        s.plan_s,
        s.fingerprints_s,
        s.check_s,
        s.total_s,
        s.runs,
        s.slowest_s
    ));
    line(
        "projection from this run's per-job CPU times (a fluid model, other load left out):".into(),
    );
    line("  kmodforge: its scheduler, one jobserver; same jobs 1-by-1: each after the other with make -jN;".into());
    line("  DKMS: its builds one after another, with DKMS's own -j".into());
    line(format!(
        "  {:>5} {:>10} {:>13} {:>7} {:>9} {:>7}",
        "cores", "kmodforge", "same, 1-by-1", "ratio", "DKMS", "ratio"
    ));
    for p in &r.projection {
        let measured = if p.cores == r.machine.cores {
            format!("   (measured here: {:.2})", r.ratio)
        } else {
            String::new()
        };
        line(format!(
            "  {:>5} {:>9.1}s {:>12.1}s {:>7.2} {:>8.1}s {:>7.2}{measured}",
            p.cores, p.kmodforge_s, p.one_at_a_time_s, p.ratio_same_jobs, p.dkms_s, p.ratio
        ));
    }
    line(format!(
        "  to check the 'same, 1-by-1' ratio against: {}",
        r.projection_reference
    ));
    line(String::new());
}
