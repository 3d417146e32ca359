//! How the pipeline reports what it does. The engine speaks only through [`Reporter`];
//! the terminal view (indicatif) and plain CI lines live in the CLI layer.

use std::time::Duration;

use crate::plan::JobLabel;

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Ran and succeeded.
    Done,
    /// Inputs unchanged since a successful run: nothing to do.
    Fresh,
    /// Deliberately not built (e.g. a Rust module for a kernel without CONFIG_RUST).
    Skipped(String),
    /// Ran and failed; the message names the command, status, log and its tail.
    Failed(String),
    /// Not run because a job it needs failed.
    DepFailed(String),
    /// Not run, or stopped, because the user interrupted the run.
    Cancelled,
}

impl Status {
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Status::Failed(_) | Status::DepFailed(_) | Status::Cancelled
        )
    }

    /// A word or two for tables and progress lines.
    pub fn short(&self) -> &'static str {
        match self {
            Status::Done => "ok",
            Status::Fresh => "fresh",
            Status::Skipped(_) => "skipped",
            Status::Failed(_) => "FAILED",
            Status::DepFailed(_) => "not built",
            Status::Cancelled => "cancelled",
        }
    }
}

pub trait Reporter: Sync {
    /// A run is about to start `to_run` jobs; `fresh` more need nothing.
    fn start(&self, to_run: usize, fresh: usize);
    fn job_started(&self, job: &JobLabel);
    fn job_finished(&self, job: &JobLabel, status: &Status, elapsed: Duration);
    /// A line for the user that is not about one job.
    fn note(&self, message: &str);
    /// All jobs are settled; clear any live display.
    fn finish(&self);
}

/// Reports nothing: for tests and for callers that print their own summary.
pub struct Silent;

impl Reporter for Silent {
    fn start(&self, _: usize, _: usize) {}
    fn job_started(&self, _: &JobLabel) {}
    fn job_finished(&self, _: &JobLabel, _: &Status, _: Duration) {}
    fn note(&self, _: &str) {}
    fn finish(&self) {}
}
