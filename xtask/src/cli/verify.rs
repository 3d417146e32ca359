//! `cargo xtask verify`: static checks of staging trees and images; builds nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::Cli;
use crate::config::Config;
use crate::config::diag::display_path;
use crate::formats::oci::OciDir;
use crate::plan::Plan;
use crate::run::layout::Layout;
use crate::steps::verify::{self, Check};

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
    let plan = Plan::new(&config, args.kernels.only())?;
    let mut failed = 0;
    for kp in &plan.kernels {
        let kver = kp.kver();
        let staging = layout.staging_modules(kver);
        let checks = if staging.is_dir() {
            verify::tree(
                &verify::read_dir(&staging)?,
                kver,
                &format!("lib/modules/{kver}/"),
            )
        } else {
            vec![missing(
                "layout",
                format!("no build output: run `cargo xtask build --kernel {kver}`"),
            )]
        };
        failed += report(
            &format!(
                "{kver}: staging tree {}",
                display_path(&layout.staging(kver))
            ),
            &checks,
        );

        let dir = args
            .image
            .clone()
            .unwrap_or_else(|| layout.out.join("images").join(kver));
        let checks = match OciDir::open(&dir) {
            Ok(oci) => verify::image(&oci, &config.image.prefix, kver)?,
            Err(_) => vec![missing(
                "image",
                format!(
                    "no image at {}: run `cargo xtask image --kernel {kver}`",
                    display_path(&dir)
                ),
            )],
        };
        failed += report(&format!("{kver}: image {}", display_path(&dir)), &checks);
    }
    if failed > 0 {
        eprintln!("\n{failed} check(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn missing(name: &'static str, detail: String) -> Check {
    Check {
        name,
        ok: false,
        detail,
    }
}

/// Prints the checks under a heading; returns how many failed.
fn report(heading: &str, checks: &[Check]) -> usize {
    println!("{heading}");
    for c in checks {
        println!(
            "  {:<5} {:<13} {}",
            if c.ok { "ok" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    checks.iter().filter(|c| !c.ok).count()
}
