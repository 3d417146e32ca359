//! `cargo xtask image`: build, assemble, load, archive and push kmod images.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::{BuildArgs, Cli, Session, indent};
use crate::config::Config;
use crate::host::process;
use crate::plan::{JobKind, Plan};
use crate::run::progress::Status;
use crate::steps::image::{self, BuiltImage, Provenance};
use crate::steps::publish::{self, Pushed};

#[derive(Args)]
pub(super) struct ImageArgs {
    #[command(flatten)]
    kernels: super::KernelChoice,

    /// Push each image to the registry its name points at.
    #[arg(long)]
    push: bool,

    /// Push even when the registry already holds an image with the same content.
    #[arg(long, requires = "push")]
    force: bool,

    /// Also write each image as an OCI archive: DIR/<tag>.tar.
    #[arg(long, value_name = "DIR")]
    oci_archive: Option<PathBuf>,

    /// Do not load the images into the engine's local storage.
    #[arg(long)]
    no_load: bool,

    #[command(flatten)]
    build: BuildArgs,
}

pub(super) fn run(cli: &Cli, config: Config, args: &ImageArgs) -> Result<ExitCode> {
    let session = Session::open(cli, config, &args.build)?;
    let config = &session.config;
    let plan = Plan::new(config, args.kernels.only())?;
    let provenance = Provenance::detect(&config.root, config.image.source.as_deref())?;
    let report = session.build(&plan, &args.build)?;

    // A kernel gets an image only when its whole staging tree is good.
    let ready: BTreeSet<&str> = report
        .jobs
        .iter()
        .filter(|j| {
            matches!(j.kind, JobKind::Depmod { .. })
                && matches!(j.status, Status::Done | Status::Fresh)
        })
        .filter_map(|j| j.label.kernel.as_deref())
        .collect();
    if provenance.source.is_none() {
        eprintln!(
            "note: no image source known (no git remote): set [image] source in kernels.toml for the org.opencontainers.image.source label"
        );
    }
    let mut failed = 0;
    for kp in &plan.kernels {
        let kver = kp.kver();
        if process::cancelled() {
            break;
        }
        if !ready.contains(kver) {
            eprintln!("error: image for {kver}: not made, its build failed (see above)");
            failed += 1;
            continue;
        }
        let log = session.layout.log(kver, "image");
        let _ = std::fs::remove_file(&log);
        match one(&session, kp.kernel, &provenance, args, &log) {
            Ok(lines) => {
                for l in lines {
                    println!("{kver}: {l}");
                }
            }
            Err(e) => {
                eprintln!("error: image for {kver}: {}", indent(&format!("{e:#}")));
                failed += 1;
            }
        }
    }
    if process::cancelled() {
        return Ok(ExitCode::from(130));
    }
    if failed > 0 {
        eprintln!("\n{failed} of {} images not made", plan.kernels.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes one kernel's image and sends it where the flags say; returns what happened.
fn one(
    session: &Session,
    kernel: &crate::config::Kernel,
    provenance: &Provenance,
    args: &ImageArgs,
    log: &std::path::Path,
) -> Result<Vec<String>> {
    let config = &session.config;
    let built: BuiltImage = image::assemble(
        config,
        kernel,
        &session.engine,
        &session.layout,
        provenance,
        log,
    )?;
    let mut lines = vec![format!("{} {}", built.reference, built.digest)];
    if !args.no_load {
        publish::load(&session.engine, &built, log)?;
        lines.push(format!("loaded into {}'s storage", session.engine.kind));
    }
    if let Some(dir) = &args.oci_archive {
        let path = dir.join(format!("{}.tar", built.tag));
        crate::formats::oci::archive(&built.dir, &path)?;
        lines.push(format!(
            "wrote {}",
            crate::config::diag::display_path(&path)
        ));
    }
    if args.push {
        match publish::push(config, &built, args.force, log)? {
            Pushed::Pushed => lines.push(format!("pushed {}", built.reference)),
            Pushed::Identical(digest) => lines.push(format!(
                "skipped push: {} already holds an image with the same content ({digest}); --force pushes anyway",
                built.reference
            )),
        }
    }
    Ok(lines)
}
