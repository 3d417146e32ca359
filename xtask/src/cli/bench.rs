//! `cargo xtask bench`: figures for the speed targets, measured, never asserted in a
//! test (timings flake; figures inform).

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;

use super::Cli;
use crate::config::Config;

#[derive(Args)]
pub(super) struct BenchArgs {
    /// How many no-op runs to time.
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

/// Runs this very binary as a user would and returns its wall time.
fn timed(args: &[String]) -> Result<Duration> {
    let started = Instant::now();
    let status = Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let elapsed = started.elapsed();
    if !status.success() {
        bail!("`{}` failed; run it by hand to see why", args.join(" "));
    }
    Ok(elapsed)
}

/// Peak resident memory of the last child (kernel's accounting, in KiB).
fn peak_rss_of(args: &[String]) -> Result<u64> {
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stderr)
            .lines()
            .last()
            .unwrap_or("0")
            .trim()
            .parse()
            .unwrap_or(0)),
        _ => Ok(0),
    }
}

pub(super) fn run(cli: &Cli, config: Config, args: &BenchArgs) -> Result<ExitCode> {
    let mut base = vec![
        "--config".to_string(),
        config.path.display().to_string(),
        "--progress".into(),
        "quiet".into(),
    ];
    if let Some(out) = &cli.out {
        base.extend(["--out".into(), out.display().to_string()]);
    }
    if let Some(engine) = cli.engine {
        base.extend(["--engine".into(), engine.to_string()]);
    }
    let build_all: Vec<String> = base
        .iter()
        .cloned()
        .chain(["build-all".to_string()])
        .collect();

    println!("bringing the outputs up to date (not timed)...");
    timed(&build_all)?;
    let mut times: Vec<Duration> = (0..args.runs.max(1))
        .map(|_| timed(&build_all))
        .collect::<Result<_>>()?;
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let jobs = crate::plan::Plan::new(&config, None, crate::plan::Scope::build())?
        .jobs
        .len();
    println!(
        "no-op build-all ({} kernels, {} modules, {jobs} jobs; whole process, {} runs): min {:.1} ms, median {:.1} ms, max {:.1} ms",
        config.kernels.len(),
        config.modules.len(),
        times.len(),
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    );
    let rss = peak_rss_of(&build_all)?;
    if rss > 0 {
        println!(
            "no-op build-all peak resident memory: {:.1} MiB",
            rss as f64 / 1024.0
        );
    } else {
        println!(
            "no-op build-all peak resident memory: not measured (/usr/bin/time is not installed)"
        );
    }
    Ok(ExitCode::SUCCESS)
}
