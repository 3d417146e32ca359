//! `cargo xtask verify`: the static checks of staging trees and images, as jobs of the
//! plan's verify view; builds nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::Cli;
use crate::config::Config;
use crate::host::engine::Engine;
use crate::plan::{Plan, Scope};
use crate::run::layout::Layout;
use crate::run::pipeline::{self, Options};

#[derive(Args)]
pub(super) struct VerifyArgs {
    #[command(flatten)]
    kernels: super::KernelChoice,

    /// Check this OCI image layout instead of <out>/images/<kver>; needs --kernel.
    #[arg(long, value_name = "DIR")]
    image: Option<PathBuf>,
}

pub(super) fn run(cli: &Cli, config: Config, args: &VerifyArgs) -> Result<ExitCode> {
    if args.image.is_some() && args.kernels.only().is_none() {
        anyhow::bail!("--image checks one image: give the kernel it was built for with --kernel");
    }
    let out = cli.out.clone().unwrap_or_else(|| config.root.join("out"));
    let layout = Layout::new(&out)?;
    let plan = Plan::new(&config, args.kernels.only(), Scope::verify())?;
    let options = Options {
        image: args.image.clone(),
        ..Options::default()
    };
    // Verify reads files only: no engine is needed.
    let engine = Engine::detect(cli.engine).unwrap_or_else(|e| Engine::unavailable(&e));
    let reporter = super::report::reporter(super::ProgressMode::Quiet);
    let report = pipeline::run(&plan, &engine, &layout, &options, reporter.as_ref())?;
    let mut failed = 0;
    for j in &report.jobs {
        for line in &j.details {
            println!("{line}");
        }
        failed += usize::from(j.status.is_failure());
    }
    if failed > 0 {
        let checks: usize = report
            .jobs
            .iter()
            .flat_map(|j| &j.details)
            .filter(|l| l.trim_start().starts_with("FAIL"))
            .count();
        eprintln!("\n{checks} check(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
