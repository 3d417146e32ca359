//! `cargo xtask image`: the build, then each kernel's kmod image (loaded, archived,
//! pushed as the flags say): a view of the one plan.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::session::{Session, exit_code};
use super::{BuildArgs, Cli};
use crate::config::Config;
use crate::plan::{Plan, Scope};

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
    let scope = Scope {
        all_or_nothing: args.build.all_or_nothing,
        ..Scope::image(args.push)
    };
    let plan = Plan::new(&session.config, args.kernels.only(), scope)?;
    let mut options = session.options(&args.build);
    options.load = !args.no_load;
    options.oci_archive = args.oci_archive.clone();
    options.force_push = args.force;
    if session.config.image.source.is_none()
        && crate::steps::image::Provenance::detect(&session.config.root, None)?
            .source
            .is_none()
    {
        eprintln!(
            "note: no image source known (no git remote): set [image] source in kernels.toml for the org.opencontainers.image.source label"
        );
    }
    let report = session.run(&plan, &options)?;
    Ok(exit_code(&report))
}

#[derive(Args)]
pub(super) struct BuildersArgs {
    #[command(flatten)]
    kernels: super::KernelChoice,

    /// Push each builder image to the registry its name ([kmm] builder) points at.
    #[arg(long)]
    push: bool,

    #[command(flatten)]
    build: BuildArgs,
}

/// `cargo xtask builders`: each kernel's builder image, for `kmm --in-cluster-build
/// builder`.
pub(super) fn builders(cli: &Cli, config: Config, args: &BuildersArgs) -> Result<ExitCode> {
    let session = Session::open(cli, config, &args.build)?;
    let plan = Plan::new(
        &session.config,
        args.kernels.only(),
        Scope::builders(args.push),
    )?;
    let report = session.run(&plan, &session.options(&args.build))?;
    Ok(exit_code(&report))
}
