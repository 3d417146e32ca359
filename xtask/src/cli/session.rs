//! What every command that runs the pipeline shares: the engine, the locked output
//! directory, the reporter, Ctrl-C and SIGTERM, and what is printed after a run (the
//! summary table, each job's details, the skips and the failures).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

use super::{BuildArgs, Cli, indent, report, summary};
use crate::config::Config;
use crate::host::deps;
use crate::host::engine::Engine;
use crate::host::process;
use crate::plan::{JobKind, Plan};
use crate::run::layout::{Layout, OutputLock};
use crate::run::pipeline::{self, Options, Report};
use crate::run::progress::{Reporter, Status};

pub(super) struct Session {
    pub config: Config,
    pub engine: Arc<Engine>,
    pub layout: Layout,
    reporter: Box<dyn Reporter>,
    _lock: OutputLock,
}

impl Drop for Session {
    /// After Ctrl-C or SIGTERM, the handler thread starts removing this run's
    /// containers; the main thread must not exit before they are gone, so it removes
    /// them too (again).
    fn drop(&mut self) {
        if process::cancelled() {
            self.engine.remove_run_containers();
        }
    }
}

impl Session {
    pub fn open(cli: &Cli, config: Config, args: &BuildArgs) -> Result<Session> {
        if args.install_deps {
            deps::install(&config.root, true)?;
        }
        let out = cli.out.clone().unwrap_or_else(|| config.root.join("out"));
        let engine = Arc::new(Engine::detect(cli.engine)?);
        let layout = Layout::new(&out)?;
        let reporter = report::reporter(cli.progress);
        let lock = layout.lock(!args.no_wait, |msg| reporter.note(msg))?;
        on_interrupt(engine.clone());
        Ok(Session {
            config,
            engine,
            layout,
            reporter,
            _lock: lock,
        })
    }

    /// The run options the build flags give.
    pub fn options(&self, args: &BuildArgs) -> Options {
        let mut options = Options::default();
        if let Some(j) = args.jobs {
            options.jobs = j;
        }
        options
    }

    /// Runs the plan and prints the summary, each job's details, the skips and every
    /// failure.
    pub fn run(&self, plan: &Plan, options: &Options) -> Result<Report> {
        // Only the commands that compile need the signing key: say what is wrong with it
        // (at its line in kernels.toml) before any job starts.
        let compiles = plan
            .jobs
            .iter()
            .any(|j| matches!(j.kind, JobKind::Compile { .. }));
        if let (Some(signing), true) = (&self.config.signing, compiles) {
            signing.key()?;
        }
        let report = pipeline::run(
            plan,
            &self.engine,
            &self.layout,
            options,
            self.reporter.as_ref(),
        )?;
        if report.jobs.iter().any(|j| j.ran) {
            print!("{}", summary::table(plan, &report));
        } else {
            println!(
                "nothing to do: all {} jobs are up to date",
                report.jobs.len()
            );
        }
        for j in &report.jobs {
            for line in &j.details {
                match (&j.kind, &j.label.kernel) {
                    (JobKind::Verify { .. }, _) | (_, None) => println!("{line}"),
                    (_, Some(k)) => println!("{k}: {line}"),
                }
            }
        }
        for j in &report.jobs {
            if let Status::Skipped(why) = &j.status {
                eprintln!("note: {} skipped: {why}", j.label);
            }
        }
        for j in report.failures() {
            if let Status::Failed(m) = &j.status {
                eprintln!("\nerror: {} failed: {}", j.label, indent(m));
            }
        }
        Ok(report)
    }
}

/// 130 after Ctrl-C or SIGTERM, 1 when a job failed, else 0; says how many failed.
pub(super) fn exit_code(report: &Report) -> ExitCode {
    if process::cancelled() {
        eprintln!("\ninterrupted: containers of this run were removed; finished outputs are kept");
        return ExitCode::from(130);
    }
    let bad = report.not_ok();
    if bad == 0 {
        return ExitCode::SUCCESS;
    }
    let failed = report.failures().count();
    eprintln!(
        "\n{failed} of {} jobs failed ({} not run as a result); every kernel's staging tree holds what built",
        report.jobs.len(),
        bad - failed
    );
    ExitCode::FAILURE
}

/// On Ctrl-C or SIGTERM: stop every program, remove this run's containers; a second
/// signal exits at once.
fn on_interrupt(engine: Arc<Engine>) {
    static ONCE: AtomicBool = AtomicBool::new(false);
    let _ = ctrlc::set_handler(move || {
        if ONCE.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: stopping jobs and removing containers (Ctrl-C again to quit at once)"
        );
        process::cancel_all();
        engine.remove_run_containers();
    });
}
