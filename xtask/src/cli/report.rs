//! Progress on the terminal: a live indicatif view when stderr is a terminal, one plain
//! line per event otherwise (CI logs, pipes). Both implement the engine's [`Reporter`].

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::plan::JobLabel;
use crate::run::progress::{Reporter, Status};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A live view on a terminal, plain lines otherwise (and when $CI is set).
    Auto,
    /// One line per event.
    Plain,
    /// Only warnings, errors and the summary.
    Quiet,
}

pub fn reporter(mode: ProgressMode) -> Box<dyn Reporter> {
    let live = mode == ProgressMode::Auto
        && std::io::stderr().is_terminal()
        && std::env::var_os("CI").is_none();
    match mode {
        ProgressMode::Quiet => Box::new(Plain {
            started: Instant::now(),
            quiet: true,
        }),
        _ if live => Box::new(Live::new()),
        _ => Box::new(Plain {
            started: Instant::now(),
            quiet: false,
        }),
    }
}

/// One line per event, with the time since the run started.
struct Plain {
    started: Instant,
    quiet: bool,
}

impl Plain {
    fn line(&self, text: &str) {
        eprintln!("[{:>6.1}s] {text}", self.started.elapsed().as_secs_f64());
    }
}

impl Reporter for Plain {
    fn start(&self, to_run: usize, fresh: usize) {
        if !self.quiet {
            self.line(&format!("{to_run} jobs to run, {fresh} up to date"));
        }
    }
    fn job_started(&self, job: &JobLabel) {
        if !self.quiet {
            self.line(&format!("start     {job}"));
        }
    }
    fn job_finished(&self, job: &JobLabel, status: &Status, elapsed: Duration) {
        if !self.quiet || status.is_failure() {
            self.line(&format!(
                "{:<9} {job} ({:.1}s)",
                status.short(),
                elapsed.as_secs_f64()
            ));
        }
    }
    fn note(&self, message: &str) {
        self.line(message);
    }
    fn finish(&self) {}
}

/// A bar for the whole run and a spinner per running job.
struct Live {
    multi: MultiProgress,
    total: ProgressBar,
    running: Mutex<BTreeMap<JobLabel, ProgressBar>>,
    failed: Mutex<usize>,
}

impl Live {
    fn new() -> Live {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let total = multi.add(ProgressBar::new(0));
        total.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise:.dim} [{bar:30.cyan/blue}] {pos}/{len} jobs  {msg}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        total.enable_steady_tick(Duration::from_millis(200));
        Live {
            multi,
            total,
            running: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(0),
        }
    }

    fn update_message(&self) {
        let running = self.running.lock().unwrap().len();
        let failed = *self.failed.lock().unwrap();
        let mut msg = format!("{running} running");
        if failed > 0 {
            msg.push_str(&format!(", {failed} failed"));
        }
        self.total.set_message(msg);
    }
}

impl Reporter for Live {
    fn start(&self, to_run: usize, fresh: usize) {
        self.total.set_length(to_run as u64);
        if fresh > 0 {
            let _ = self.multi.println(format!("{fresh} jobs up to date"));
        }
    }
    fn job_started(&self, job: &JobLabel) {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("  {spinner:.green} {msg} {elapsed:.dim}")
                .expect("static template"),
        );
        bar.set_message(job.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        self.running.lock().unwrap().insert(job.clone(), bar);
        self.update_message();
    }
    fn job_finished(&self, job: &JobLabel, status: &Status, elapsed: Duration) {
        if let Some(bar) = self.running.lock().unwrap().remove(job) {
            bar.finish_and_clear();
            self.multi.remove(&bar);
            self.total.inc(1);
        }
        if status.is_failure() {
            *self.failed.lock().unwrap() += 1;
        }
        let mark = match status {
            Status::Done => "✓",
            Status::Fresh | Status::Skipped(_) => "-",
            _ => "✗",
        };
        let _ = self.multi.println(format!(
            "{mark} {:<9} {job} ({:.1}s)",
            status.short(),
            elapsed.as_secs_f64()
        ));
        self.update_message();
    }
    fn note(&self, message: &str) {
        let _ = self.multi.println(message);
    }
    fn finish(&self) {
        self.total.finish_and_clear();
    }
}
