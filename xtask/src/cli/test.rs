//! `cargo xtask test`: boot each kernel under QEMU and load its image's modules as KMM
//! does; a pass/fail table per module.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;

use super::session::{Session, exit_code};
use super::{BuildArgs, Cli};
use crate::plan::{JobKind, Plan, Scope};
use crate::run::progress::Status;
use crate::steps::loadtest::{self, Report};

#[derive(Args)]
pub(super) struct TestArgs {
    #[command(flatten)]
    kernels: super::KernelChoice,

    /// Test this OCI image layout (e.g. `skopeo copy docker://... oci:DIR`) instead of
    /// the one kmodforge builds; needs --kernel.
    #[arg(long, value_name = "DIR")]
    image: Option<PathBuf>,

    /// Seconds a boot may take before QEMU is killed.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,

    #[command(flatten)]
    build: BuildArgs,
}

pub(super) fn run(cli: &Cli, config: crate::config::Config, args: &TestArgs) -> Result<ExitCode> {
    if args.image.is_some() && args.kernels.only().is_none() {
        bail!("--image tests one image: give the kernel it was built for with --kernel");
    }
    let session = Session::open(cli, config, &args.build)?;
    // With --image, nothing is built: the given image is tested.
    let scope = match &args.image {
        Some(_) => Scope {
            test: true,
            ..Scope::default()
        },
        None => Scope {
            all_or_nothing: args.build.all_or_nothing,
            ..Scope::test()
        },
    };
    let plan = Plan::new(&session.config, args.kernels.only(), scope)?;
    let mut options = session.options(&args.build);
    options.boot_timeout = Duration::from_secs(args.timeout);
    options.image = args.image.clone();
    let report = session.run(&plan, &options)?;

    let mut rows = Vec::new();
    for j in &report.jobs {
        if let (JobKind::LoadTest { kernel }, true) = (&j.kind, j.ran) {
            let kver = plan.kernels[*kernel].kver();
            let booted = matches!(j.status, Status::Done | Status::Failed(_));
            if let Some(r) = booted
                .then(|| Report::load(&session.layout, kver))
                .flatten()
            {
                rows.extend(r.verdicts.into_iter().map(|v| (kver.to_string(), v)));
            }
        }
    }
    print!("{}", table(&rows));
    let failed = rows.iter().filter(|(_, v)| v.failed()).count();
    if failed > 0 {
        eprintln!("\n{failed} load test failure(s)");
    }
    Ok(exit_code(&report))
}

fn table(rows: &[(String, loadtest::Verdict)]) -> String {
    let yes = |b: bool| if b { "ok" } else { "-" };
    let mut lines = vec![[
        "kernel".to_string(),
        "module".into(),
        "load".into(),
        "unload".into(),
        "result".into(),
        "reason".into(),
    ]];
    for (k, v) in rows {
        lines.push([
            k.clone(),
            v.module.clone(),
            yes(v.loaded).into(),
            yes(v.unloaded).into(),
            v.result().into(),
            v.reason.clone().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = (0..5)
            .map(|c| format!("{:<w$}", l[c], w = widths[c]))
            .collect();
        out.push_str(format!("{}  {}", cells.join("  "), l[5]).trim_end());
        out.push('\n');
    }
    out
}
