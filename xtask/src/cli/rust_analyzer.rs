//! `cargo xtask rust-analyzer --module <name>`: rust-project.json for editors.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;

use super::{BuildArgs, Cli, Session};
use crate::config::Config;
use crate::config::modules::Language;
use crate::steps::toolchain;

#[derive(Args)]
pub(super) struct RustAnalyzerArgs {
    /// The Rust module (a folder in modules/).
    #[arg(long, value_name = "NAME")]
    module: String,

    /// The kernel to take the Rust metadata from [default: the first Rust-enabled
    /// kernel in kernels.toml that builds the module].
    #[arg(long, value_name = "KVER")]
    kernel: Option<String>,

    #[command(flatten)]
    build: BuildArgs,
}

pub(super) fn run(cli: &Cli, config: Config, args: &RustAnalyzerArgs) -> Result<ExitCode> {
    let session = Session::open(cli, config, &args.build)?;
    let config = &session.config;
    let Some(module) = config.module(&args.module) else {
        let rust: Vec<&str> = config
            .modules
            .iter()
            .filter(|m| m.language == Language::Rust)
            .map(|m| m.name.as_str())
            .collect();
        bail!(
            "no module named {:?} in modules/\n  help: Rust modules: {}",
            args.module,
            rust.join(", ")
        );
    };
    if module.language != Language::Rust {
        bail!(
            "{} is a C module: rust-analyzer is for Rust modules (language = \"rust\")",
            module.name
        );
    }
    let candidates: Vec<_> = match &args.kernel {
        Some(k) => vec![config.kernel(k)?],
        None => config
            .kernels
            .iter()
            .filter(|k| config.selects(k, module))
            .collect(),
    };
    for kernel in candidates {
        let tc = &config.toolchains[&kernel.toolchain];
        let log = session.layout.log(&kernel.version, "rust-analyzer");
        let _ = std::fs::remove_file(&log);
        session.engine.check()?;
        let fingerprint = toolchain::fingerprint(tc, &kernel.version)?;
        let facts = toolchain::ensure(
            &session.engine,
            &session.layout,
            config,
            kernel,
            &fingerprint,
            &log,
        )?;
        if !facts.rust {
            if args.kernel.is_some() {
                bail!(
                    "kernel {} was built without CONFIG_RUST: rust-analyzer needs a Rust-enabled kernel",
                    kernel.version
                );
            }
            continue;
        }
        let path = crate::steps::rust_analyzer::generate(
            &session.engine,
            &session.layout,
            module,
            &kernel.version,
            &facts.image,
            &facts.kernel_source_dir,
            &log,
        )?;
        println!(
            "wrote {} (kernel {})",
            crate::config::diag::display_path(&path),
            kernel.version
        );
        return Ok(ExitCode::SUCCESS);
    }
    bail!(
        "no kernel in kernels.toml that builds {} was built with CONFIG_RUST",
        module.name
    )
}
