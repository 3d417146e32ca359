//! The command line: flags, dispatch, and everything that prints.

mod bench;
mod handoff;
mod image;
mod report;
mod rust_analyzer;
mod session;
mod summary;
mod test;
mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ToolchainSource};
use crate::host::deps;
use crate::host::engine::EngineKind;
use crate::host::process;
use crate::plan::{Plan, Scope};
pub use report::ProgressMode;
use session::Session;

const ABOUT: &str = "kmodforge: build out-of-tree kernel modules into KMM kmod images";
const LONG_ABOUT: &str = "\
kmodforge: build out-of-tree kernel modules into KMM kmod images.

kernels.toml lists the kernels to support (as `uname -r` prints them) and the
toolchain image that builds for each; modules/ holds the modules (C or
Rust-for-Linux). `build-all` compiles every module for every kernel in containers and
runs depmod; `image` packages a kernel's modules as the OCI image KMM loads
(<prefix>/lib/modules/<kver>/).";

#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about = ABOUT, long_about = LONG_ABOUT, version)]
struct Cli {
    /// The inventory to read; modules/ and images/ are found beside it.
    #[arg(long, global = true, env = "KMODFORGE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Container engine [default: podman if on PATH, else docker].
    #[arg(long, global = true, env = "KMODFORGE_ENGINE", value_enum)]
    engine: Option<EngineKind>,

    /// Output directory [default: out/ beside kernels.toml].
    #[arg(long, global = true, env = "KMODFORGE_OUT", value_name = "DIR")]
    out: Option<PathBuf>,

    /// How to show progress.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    progress: ProgressMode,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build every module for every kernel in kernels.toml, then run depmod per kernel.
    ///
    /// Jobs run in parallel in the kernels' toolchain containers (no network, sources
    /// read-only). Unchanged inputs are not rebuilt; one failed job does not stop the
    /// others. Logs: <out>/logs/<kver>/<job>.log.
    BuildAll(BuildArgs),
    /// Build every module for one kernel, then run depmod for it.
    Build {
        /// The kernel version, exactly as listed in kernels.toml.
        #[arg(long, value_name = "KVER")]
        kernel: String,
        #[command(flatten)]
        args: BuildArgs,
    },
    /// Package kernels' modules as kmod images (building them first if needed).
    ///
    /// One reproducible OCI image per kernel: [image] base (ubi-minimal by default) plus
    /// one layer holding <prefix>/lib/modules/<kver>/ with every .ko and depmod's
    /// files. It is written to <out>/images/<kver>/ (an OCI layout) and loaded into the
    /// engine's storage; --oci-archive writes a file too, --push sends it to its
    /// registry (skipped when the registry already holds the same content).
    /// SOURCE_DATE_EPOCH sets every time in the image (default: the last commit's).
    Image(image::ImageArgs),
    /// Build each kernel's builder image for `kmm --in-cluster-build builder`.
    ///
    /// The kernel's toolchain, the extra packages its modules need, and the kernel's own
    /// modules at /lib/modules/<kver>: what the in-cluster build starts from on a
    /// cluster without OpenShift's Driver Toolkit. Named by [kmm] builder (default: the
    /// image name's repository with -builder); --push sends it to its registry.
    Builders(image::BuildersArgs),
    /// Boot each kernel under QEMU and load its image's modules the way KMM does.
    ///
    /// The kernel is the exact one the image was built for (Debian's linux-image package,
    /// or the one a toolchain built). An initramfs replays KMM's worker: it copies
    /// <prefix>/lib/modules/<kver> out of the image's own tree, then runs `modprobe -vd`
    /// and `modprobe -rvd` (kmod's) for every module, with [test] parameters from
    /// module.toml. A module passes when it loads with its dependencies, shows in
    /// /proc/modules, leaves no Oops/BUG/WARNING/"Unknown symbol" in the kernel log, and
    /// unloads. The kernel boots with its [[kernel]] boot-args from kernels.toml (e.g.
    /// module.sig_enforce=1); a module refused for its signature is said to be. Uses KVM
    /// when /dev/kvm is usable. Console: <out>/logs/<kver>/qemu-console.log.
    Test(test::TestArgs),
    /// Check staging trees and images statically (no build, no boot).
    ///
    /// Layout (<prefix>/lib/modules/<kver>/), every .ko's vermagic against the kernel,
    /// depmod's files present and modules.dep current (each module with the transitive
    /// closure of its modinfo `depends`, all in the tree), with [signing] every module's
    /// signature against the certificate (host openssl), and sh, mkdir and cp in the
    /// image for KMM's worker. Exits non-zero on any problem.
    Verify(verify::VerifyArgs),
    /// Write modules/<name>/rust-project.json for a Rust module, for editors.
    ///
    /// Runs the kernel's own `make rust-analyzer` in a Rust-enabled kernel's toolchain,
    /// copies the sources it refers to (the kernel's Rust crates, the Rust library) to
    /// <out>/.kmodforge/kernels/<kver>/rust-analyzer/ and points the file at them.
    RustAnalyzer(rust_analyzer::RustAnalyzerArgs),
    /// Print the plan as a GitHub Actions matrix (JSON for fromJSON), one entry per kernel.
    ///
    /// Each entry has `name`, `kernels`, `tags` (as KMM normalizes them) and `toolchains`;
    /// past --max-jobs (GitHub's limit, 256) kernels are grouped into shards, so
    /// `kernels` may list several, space-separated.
    Matrix(handoff::MatrixArgs),
    /// Write .github/workflows/kmods.yml from kernels.toml (or --check it).
    Workflow(handoff::WorkflowArgs),
    /// Write the KMM manifests for the images: one Module per top-level module folder.
    ///
    /// Each Module loads the .ko files its folder (and the folders it depends on) built,
    /// with its [test] parameters, on every kernel it built for; so the current build
    /// results are needed (`cargo xtask build-all` first). Images kmodforge pushed from
    /// the current inputs are pinned by digest, so nodes reload when an image changes.
    /// The selector and tolerations come from [kmm] in kernels.toml.
    Kmm(handoff::KmmArgs),
    /// Measure kmodforge against DKMS on real packages, and at CI scale on paper.
    ///
    /// Fetches real Debian *-dkms packages (apt-get download) into a cache, and builds
    /// them with the example modules for the project's Debian kernels in a scratch
    /// project of its own (your out/ is not touched): Debian's dkms on the host and
    /// `build-all` taking turns, each from nothing, with wall time and the machine's CPU
    /// (/proc/stat); then one large package alone, the no-op run, one touched module,
    /// the images, toolchains from an empty engine, a synthetic 200 x 20 inventory's
    /// no-op check, and a projection to 16 and 64 cores. Needs dkms and the kernels'
    /// headers on the host (--install-deps). Takes about half an hour; --quick is a smoke
    /// run. Other work on the machine skews every figure.
    Bench(bench::BenchArgs),
    /// Print the plan: each kernel, its toolchain, and the modules built for it.
    Plan,
    /// Show (or install, with apt-get) the host packages kmodforge and its tests use.
    Deps {
        /// Install what is missing (as root, or through sudo).
        #[arg(long)]
        install: bool,
        /// Include what the test suite needs (a second engine, QEMU, a registry...).
        #[arg(long)]
        tests: bool,
    },
}

#[derive(Args)]
struct BuildArgs {
    /// How many jobs run at once [default: the number of CPUs].
    #[arg(short, long, value_name = "N")]
    jobs: Option<usize>,

    /// Fail at once, instead of waiting, when another run holds the output directory.
    #[arg(long)]
    no_wait: bool,

    /// First install the host packages kmodforge and its tests need (apt-get, npm).
    #[arg(long)]
    install_deps: bool,

    /// Give a kernel a staging tree (and an image) only when every one of its modules
    /// built, as a CI gate would; by default every kernel ships what built.
    #[arg(long)]
    all_or_nothing: bool,
}

/// `--kernel <kver>` or `--all`, for the commands that work per kernel.
#[derive(Args)]
struct KernelChoice {
    /// One kernel, as listed in kernels.toml.
    #[arg(
        long,
        value_name = "KVER",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    kernel: Option<String>,

    /// Every kernel in kernels.toml.
    #[arg(long)]
    all: bool,
}

impl KernelChoice {
    /// The one kernel asked for; `None` is all of them.
    fn only(&self) -> Option<&str> {
        self.kernel.as_deref()
    }
}

/// The workspace root, found at run time: `cargo xtask` runs the binary with the
/// workspace's `CARGO_MANIFEST_DIR` (xtask/), even when the binary was built in another
/// checkout that shares the target directory; run directly, the current directory's
/// workspace (the nearest folder with a kernels.toml).
fn project_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
        let dir = PathBuf::from(dir);
        if let Some(root) = dir.parent().filter(|r| r.join("kernels.toml").is_file()) {
            return Ok(root.to_path_buf());
        }
    }
    let cwd = std::env::current_dir()?;
    cwd.ancestors()
        .find(|d| d.join("kernels.toml").is_file())
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no kernels.toml in {} or a folder above it\n  help: run kmodforge in its workspace, or give --config FILE",
                cwd.display()
            )
        })
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = run(cli);
    crate::bench::xtask::write_own_usage();
    match result {
        Ok(code) => code,
        Err(_) if process::cancelled() => {
            eprintln!(
                "interrupted: containers of this run were removed; finished outputs are kept"
            );
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Command::Deps { install, tests } = cli.command {
        let root = match &cli.config {
            Some(c) => std::path::absolute(c)?
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            None => project_root()?,
        };
        if install {
            deps::install(&root, tests)?;
        }
        println!("{}", deps::report(&root, tests));
        return Ok(if deps::complete(&root, tests) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let config_path = match &cli.config {
        Some(path) => path.clone(),
        None => project_root()?.join("kernels.toml"),
    };
    let config = Config::load(&config_path)?;
    match &cli.command {
        Command::BuildAll(args) => build_command(&cli, config, None, args),
        Command::Build { kernel, args } => build_command(&cli, config, Some(kernel), args),
        Command::Image(args) => image::run(&cli, config, args),
        Command::Builders(args) => image::builders(&cli, config, args),
        Command::Test(args) => test::run(&cli, config, args),
        Command::Verify(args) => verify::run(&cli, config, args),
        Command::RustAnalyzer(args) => rust_analyzer::run(&cli, config, args),
        Command::Matrix(args) => handoff::matrix(config, args),
        Command::Workflow(args) => handoff::workflow(config, args),
        Command::Kmm(args) => {
            let out = cli.out.clone().unwrap_or_else(|| config.root.join("out"));
            handoff::kmm(config, out, args)
        }
        Command::Bench(args) => bench::run(&cli, config, args),
        Command::Plan => {
            print_plan(&Plan::new(&config, None, Scope::build())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Deps { .. } => unreachable!("handled above"),
    }
}

fn build_command(
    cli: &Cli,
    config: Config,
    kernel: Option<&str>,
    args: &BuildArgs,
) -> Result<ExitCode> {
    let session = Session::open(cli, config, args)?;
    let scope = Scope {
        all_or_nothing: args.all_or_nothing,
        ..Scope::build()
    };
    let plan = Plan::new(&session.config, kernel, scope)?;
    let report = session.run(&plan, &session.options(args))?;
    if report.not_ok() == 0 {
        println!(
            "staging trees: {}",
            crate::config::diag::display_path(&session.layout.out)
        );
    }
    Ok(session::exit_code(&report))
}

fn indent(text: &str) -> String {
    text.replace('\n', "\n  ")
}

fn print_plan(plan: &Plan) {
    for kp in &plan.kernels {
        let tc = match &kp.toolchain.source {
            ToolchainSource::Recipe(r) => {
                format!(
                    "recipe {}",
                    crate::config::diag::display_path(&r.containerfile)
                )
            }
            ToolchainSource::Image(i) => format!("image {i}"),
        };
        println!("{}  (toolchain {}: {tc})", kp.kver(), kp.toolchain.name);
        for m in &kp.modules {
            let deps = if m.depends.is_empty() {
                String::new()
            } else {
                format!(" (needs {})", m.depends.join(", "))
            };
            println!("  build {}{deps}", m.name);
        }
        for m in &kp.excluded {
            println!("  not built: {}", m.name);
        }
    }
    println!("{} jobs", plan.jobs.len());
}
