//! The hand-offs, generated from the plan: `matrix` and `workflow` for CI, `kmm` for
//! the cluster.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use regex::Regex;

use crate::config::Config;
use crate::config::diag::display_path;
use crate::handoff::kmm;
use crate::handoff::matrix;
use crate::handoff::workflow;
use crate::plan::{Plan, Scope};

#[derive(Args)]
pub(super) struct MatrixArgs {
    /// Only this kernel of kernels.toml.
    #[arg(long, value_name = "KVER")]
    kernel: Option<String>,
    /// Only kernels whose version matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    kernel_regex: Option<String>,
    /// Only kernels whose inputs (toolchain, module sources, kernels.toml entry)
    /// differ from this git revision's.
    #[arg(long, value_name = "REV")]
    changed_since: Option<String>,
    /// Most jobs in the matrix; past it, kernels are grouped into shards.
    #[arg(long, value_name = "N", default_value_t = matrix::GITHUB_MAX_JOBS)]
    max_jobs: usize,
}

pub(super) fn matrix(config: Config, args: &MatrixArgs) -> Result<ExitCode> {
    let plan = Plan::new(&config, args.kernel.as_deref(), Scope::everything())?;
    let re = args
        .kernel_regex
        .as_deref()
        .map(Regex::new)
        .transpose()
        .context("--kernel-regex is not a valid regular expression")?;
    let before = args
        .changed_since
        .as_deref()
        .map(|rev| matrix::inputs_at(&config, rev))
        .transpose()?;
    let m = matrix::matrix(&plan, re.as_ref(), before.as_ref(), args.max_jobs)?;
    println!("{}", serde_json::to_string(&m)?);
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub(super) struct WorkflowArgs {
    /// Do not write: fail when the committed workflow differs from what would be written.
    #[arg(long)]
    check: bool,
}

pub(super) fn workflow(config: Config, args: &WorkflowArgs) -> Result<ExitCode> {
    let path = workflow::path(&config);
    let text = workflow::render(&config);
    if args.check {
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != text {
            eprintln!(
                "{} is out of date: run `cargo xtask workflow`",
                display_path(&path)
            );
            return Ok(ExitCode::FAILURE);
        }
        println!("{} is up to date", display_path(&path));
        return Ok(ExitCode::SUCCESS);
    }
    crate::host::fs::write_atomic(&path, text.as_bytes())?;
    println!("wrote {}", display_path(&path));
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub(super) struct KmmArgs {
    /// Also write a ConfigMap with a Dockerfile that builds the modules in the cluster,
    /// exactly as build-all builds them, and give one Module per kernel the build:
    /// `dtk` starts from OpenShift's Driver Toolkit (DTK_AUTO; no Rust modules),
    /// `builder` from kmodforge's builder image of the kernel (`cargo xtask builders
    /// --push`), for any cluster.
    #[arg(long, value_enum, value_name = "FROM")]
    in_cluster_build: Option<kmm::InCluster>,
    /// One `regexp` kernel mapping per Module instead of a `literal` per kernel.
    #[arg(long)]
    regexp: bool,
    /// KMM's `version`: with it, a node loads a new image only once it is labelled
    /// kmm.node.kubernetes.io/version-module.<namespace>.<module>=<version> (ordered
    /// upgrades). Change it with every new set of images.
    #[arg(long, value_name = "VERSION")]
    version: Option<String>,
    /// Fail unless every image is pinned by the digest kmodforge pushed it under.
    #[arg(long)]
    require_digests: bool,
    /// Write KMM's PreflightValidation for this coming kernel instead, after checking
    /// that every Module has a mapping and a pushed image (or an in-cluster build) for it.
    #[arg(long, value_name = "KVER")]
    preflight: Option<String>,
    /// With --preflight: OpenShift's PreflightValidationOCP.
    #[arg(long, requires = "preflight")]
    ocp: bool,
    /// With --preflight --ocp: the release's Driver Toolkit image, for DTK_AUTO.
    #[arg(long, value_name = "IMAGE", requires = "ocp")]
    dtk_image: Option<String>,
    /// Write the manifests here instead of to standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// The manifests need the build results (the `.ko` names) and, to pin digests, the
/// push records: both are read from `out`.
pub(super) fn kmm(config: Config, out: PathBuf, args: &KmmArgs) -> Result<ExitCode> {
    let plan = Plan::new(&config, None, Scope::image(true))?;
    let layout = crate::run::layout::Layout::new(&out)?;
    let options = kmm::Options {
        regexp: args.regexp,
        in_cluster: args.in_cluster_build,
        version: args.version.clone(),
        require_digests: args.require_digests,
    };
    let handoff = kmm::analyze(&plan, &layout, &options)?;
    let yaml = match &args.preflight {
        Some(kver) => {
            let p = kmm::preflight::Preflight {
                kver: kver.clone(),
                ocp: args.ocp,
                dtk_image: args.dtk_image.clone(),
            };
            kmm::preflight::preflight(&handoff, &p, &options)?
        }
        None => kmm::write::manifests(&handoff, &options)?,
    };
    match &args.output {
        Some(path) => {
            crate::host::fs::write_atomic(path, yaml.as_bytes())?;
            eprintln!("wrote {}", display_path(path));
        }
        None => print!("{yaml}"),
    }
    Ok(ExitCode::SUCCESS)
}
