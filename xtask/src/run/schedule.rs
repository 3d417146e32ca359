//! Runs a graph of jobs on a bounded number of threads, longest path first.
//!
//! Workers live in `std::thread::scope` and send their results to the calling thread,
//! which alone talks to the [`Reporter`]. A failed job never stops the scheduler: the
//! jobs that need it are marked [`Status::DepFailed`], all others still run; a job that
//! panics is a failed job (its worker still reports, so the run never waits forever).

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::host::process;
use crate::plan::JobLabel;
use crate::run::jobserver::Jobserver;
use crate::run::progress::{Reporter, Status};

/// A task's work: receives the statuses of its `deps`, then of its `after` tasks.
pub type Work<'s> = Box<dyn FnOnce(&[Status]) -> Status + Send + 's>;

pub struct Task<'s> {
    pub label: JobLabel,
    /// Tasks that must succeed first; each index smaller than this task's.
    pub deps: Vec<usize>,
    /// Tasks that must settle first, successfully or not.
    pub after: Vec<usize>,
    /// Expected seconds, for ordering (the longest remaining path starts first).
    pub estimate: f64,
    work: Option<Work<'s>>,
    settled: Option<Status>,
}

impl<'s> Task<'s> {
    /// A task to run; `work` receives its dependencies' statuses.
    pub fn run(
        label: JobLabel,
        (deps, after): (Vec<usize>, Vec<usize>),
        estimate: f64,
        work: impl FnOnce(&[Status]) -> Status + Send + 's,
    ) -> Task<'s> {
        Task {
            label,
            deps,
            after,
            estimate,
            work: Some(Box::new(work)),
            settled: None,
        }
    }

    /// A task whose outcome is already known (its outputs are fresh, say).
    pub fn settled(
        label: JobLabel,
        (deps, after): (Vec<usize>, Vec<usize>),
        status: Status,
    ) -> Task<'s> {
        Task {
            label,
            deps,
            after,
            estimate: 0.0,
            work: None,
            settled: Some(status),
        }
    }

    fn waits_for(&self) -> impl Iterator<Item = &usize> {
        self.deps.iter().chain(&self.after)
    }
}

/// What workers and the token helper tell the scheduling thread.
enum Msg {
    Done(usize, Status, Duration),
    Token,
}

/// The outcome of each task, in task order, with the time it ran. With a jobserver,
/// the first running task holds the implicit token and every other one a token from
/// the pipe, so the makes inside jobs only get the cores no job holds.
pub fn run(
    tasks: Vec<Task<'_>>,
    jobs: usize,
    jobserver: Option<&Jobserver>,
    reporter: &dyn Reporter,
) -> Vec<(Status, Duration)> {
    let mut s = Scheduler::new(tasks, jobs.max(1), jobserver);
    let to_run = s.tasks.iter().filter(|t| t.work.is_some()).count();
    reporter.start(to_run, s.tasks.len() - to_run);
    let (tx, rx) = mpsc::channel::<Msg>();
    let (want_tx, want_rx) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        if let Some(js) = jobserver {
            let tx = tx.clone();
            scope.spawn(move || {
                while want_rx.recv().is_ok() {
                    if js.acquire().is_ok() && tx.send(Msg::Token).is_err() {
                        let _ = js.release();
                    }
                }
            });
        }
        loop {
            s.settle_without_running(reporter);
            for (i, work, deps) in s.start_ready(&want_tx) {
                reporter.job_started(&s.tasks[i].label);
                let tx = tx.clone();
                scope.spawn(move || {
                    let t = Instant::now();
                    let status = catch_unwind(AssertUnwindSafe(|| work(&deps)))
                        .unwrap_or_else(|panic| Status::Failed(panicked(panic.as_ref())));
                    let _ = tx.send(Msg::Done(i, status, t.elapsed()));
                });
            }
            if s.running == 0 {
                break;
            }
            match rx.recv().expect("a worker always reports") {
                Msg::Done(i, status, elapsed) => s.finished(i, status, elapsed, reporter),
                Msg::Token => {
                    s.tokens += 1;
                    s.wanted = false;
                }
            }
        }
        s.give_back_tokens(&rx);
        drop(want_tx);
    });
    reporter.finish();
    s.results
        .into_iter()
        .map(|r| r.expect("every task settles"))
        .collect()
}

fn panicked(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    format!("kmodforge panicked in this job: {what} (a bug: please report it)")
}

struct Scheduler<'s, 'j> {
    tasks: Vec<Task<'s>>,
    priority: Vec<f64>,
    results: Vec<Option<(Status, Duration)>>,
    started: Vec<bool>,
    running: usize,
    limit: usize,
    jobserver: Option<&'j Jobserver>,
    /// Tokens taken from the pipe. Running tasks need one each but the first (which
    /// runs on the implicit token); like cargo, tokens are not tied to a task, so
    /// the last task running never holds one a make inside it could use.
    tokens: usize,
    /// A token was asked of the helper thread and has not come yet.
    wanted: bool,
}

impl<'s, 'j> Scheduler<'s, 'j> {
    fn new(
        tasks: Vec<Task<'s>>,
        limit: usize,
        jobserver: Option<&'j Jobserver>,
    ) -> Scheduler<'s, 'j> {
        let n = tasks.len();
        Scheduler {
            priority: critical_path(&tasks),
            tasks,
            results: vec![None; n],
            started: vec![false; n],
            running: 0,
            limit,
            jobserver,
            tokens: 0,
            wanted: false,
        }
    }

    /// Whether one more task may start now: the first runs on the implicit token,
    /// each further one needs a spare token; without one, asks the helper for one.
    fn has_token(&mut self, want: &mpsc::Sender<()>) -> bool {
        if self.jobserver.is_none() || self.running == 0 || self.tokens > self.running - 1 {
            return true;
        }
        if !self.wanted && want.send(()).is_ok() {
            self.wanted = true;
        }
        false
    }

    /// At the end: waits for a token still coming (adding one to the pipe first, as a
    /// killed make may have taken tokens it never gave back) and returns what it holds.
    fn give_back_tokens(&mut self, rx: &mpsc::Receiver<Msg>) {
        let Some(js) = self.jobserver else { return };
        if self.wanted {
            let _ = js.release();
            while let Ok(msg) = rx.recv() {
                if matches!(msg, Msg::Token) {
                    break;
                }
            }
            self.wanted = false;
        }
        for _ in 0..self.tokens {
            let _ = js.release();
        }
        self.tokens = 0;
    }

    fn ready(&self, i: usize) -> bool {
        !self.started[i]
            && self.tasks[i]
                .waits_for()
                .all(|d| self.results[*d].is_some())
    }

    /// Settles everything that can be settled without running: known outcomes, tasks
    /// whose dependencies failed, and everything once the run is cancelled.
    fn settle_without_running(&mut self, reporter: &dyn Reporter) {
        let mut progressed = true;
        while progressed {
            progressed = false;
            for i in 0..self.tasks.len() {
                if !self.ready(i) {
                    continue;
                }
                let failed_dep = self.tasks[i]
                    .deps
                    .iter()
                    .find(|d| self.results[**d].as_ref().is_some_and(|r| r.0.is_failure()));
                let status = if let Some(d) = failed_dep {
                    Some(Status::DepFailed(format!(
                        "needs {}, which did not succeed",
                        self.tasks[*d].label
                    )))
                } else if process::cancelled() {
                    Some(Status::Cancelled)
                } else {
                    self.tasks[i].settled.take()
                };
                if let Some(status) = status {
                    self.started[i] = true;
                    if status != Status::Fresh {
                        reporter.job_finished(&self.tasks[i].label, &status, Duration::ZERO);
                    }
                    self.results[i] = Some((status, Duration::ZERO));
                    progressed = true;
                }
            }
        }
    }

    /// The most urgent ready tasks, as many as there are free threads (and tokens),
    /// marked started. Tokens no ready task needs go back to the pipe.
    fn start_ready(&mut self, want: &mpsc::Sender<()>) -> Vec<(usize, Work<'s>, Vec<Status>)> {
        let ready: BTreeSet<(u64, std::cmp::Reverse<usize>)> = (0..self.tasks.len())
            .filter(|&i| self.ready(i))
            .map(|i| ((self.priority[i] * 1000.0) as u64, std::cmp::Reverse(i)))
            .collect();
        let mut out = Vec::new();
        for (_, std::cmp::Reverse(i)) in ready.into_iter().rev() {
            if self.running >= self.limit || !self.has_token(want) {
                break;
            }
            let work = self.tasks[i]
                .work
                .take()
                .expect("an unsettled task has work");
            let deps: Vec<Status> = self.tasks[i]
                .waits_for()
                .map(|d| self.results[*d].as_ref().expect("settled").0.clone())
                .collect();
            self.started[i] = true;
            self.running += 1;
            out.push((i, work, deps));
        }
        let waiting = (0..self.tasks.len()).any(|i| self.ready(i));
        if let (Some(js), false) = (self.jobserver, waiting) {
            let needed = self.running.saturating_sub(1);
            while self.tokens > needed {
                let _ = js.release();
                self.tokens -= 1;
            }
        }
        out
    }

    fn finished(&mut self, i: usize, status: Status, elapsed: Duration, reporter: &dyn Reporter) {
        self.running -= 1;
        let status = if process::cancelled() && status.is_failure() {
            Status::Cancelled
        } else {
            status
        };
        reporter.job_finished(&self.tasks[i].label, &status, elapsed);
        self.results[i] = Some((status, elapsed));
    }
}

/// For each task, its estimate plus the longest chain of tasks that wait for it.
fn critical_path(tasks: &[Task<'_>]) -> Vec<f64> {
    let mut longest: Vec<f64> = tasks.iter().map(|t| t.estimate).collect();
    for i in (0..tasks.len()).rev() {
        for &d in tasks[i].waits_for() {
            longest[d] = longest[d].max(tasks[d].estimate + longest[i]);
        }
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::progress::Silent;
    use std::sync::Mutex;

    fn label(name: &str) -> JobLabel {
        JobLabel {
            kernel: None,
            name: name.into(),
        }
    }

    #[test]
    fn a_failure_spares_independent_jobs_and_marks_dependents() {
        let tasks = vec![
            Task::run(label("a"), (vec![], vec![]), 1.0, |_| {
                Status::Failed("boom".into())
            }),
            Task::run(label("b"), (vec![0], vec![]), 1.0, |_| Status::Done),
            Task::run(label("c"), (vec![], vec![]), 1.0, |_| Status::Done),
            Task::settled(label("d"), (vec![2], vec![]), Status::Fresh),
            Task::run(label("e"), (vec![1], vec![]), 1.0, |_| Status::Done),
        ];
        let out: Vec<Status> = run(tasks, 2, None, &Silent)
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(out[0], Status::Failed("boom".into()));
        assert!(matches!(&out[1], Status::DepFailed(m) if m.contains("needs a")));
        assert_eq!(out[2], Status::Done);
        assert_eq!(out[3], Status::Fresh);
        assert!(matches!(&out[4], Status::DepFailed(m) if m.contains("needs b")));
    }

    #[test]
    fn dependencies_see_their_inputs_and_longest_path_goes_first() {
        let order = Mutex::new(Vec::new());
        let record = |name: &'static str| {
            let order = &order;
            move |deps: &[Status]| {
                order.lock().unwrap().push(name);
                assert!(
                    deps.iter()
                        .all(|d| *d == Status::Done || *d == Status::Skipped("s".into()))
                );
                Status::Done
            }
        };
        let tasks = vec![
            Task::run(label("short"), (vec![], vec![]), 1.0, record("short")),
            Task::run(
                label("long-head"),
                (vec![], vec![]),
                1.0,
                record("long-head"),
            ),
            Task::run(
                label("long-tail"),
                (vec![1], vec![]),
                50.0,
                record("long-tail"),
            ),
        ];
        let out = run(tasks, 1, None, &Silent);
        assert!(out.iter().all(|r| r.0 == Status::Done));
        assert_eq!(*order.lock().unwrap(), ["long-head", "long-tail", "short"]);
    }

    #[test]
    fn a_panicking_job_fails_and_the_others_finish() {
        let tasks = vec![
            Task::run(label("boom"), (vec![], vec![]), 1.0, |_| {
                panic!("index out of range")
            }),
            Task::run(label("after-boom"), (vec![0], vec![]), 1.0, |_| {
                Status::Done
            }),
            Task::run(
                label("soft"),
                (vec![], vec![0]),
                1.0,
                |deps: &[Status]| {
                    assert!(matches!(deps[0], Status::Failed(_)));
                    Status::Done
                },
            ),
            Task::run(label("other"), (vec![], vec![]), 1.0, |_| Status::Done),
        ];
        let out: Vec<Status> = run(tasks, 2, None, &Silent)
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert!(
            matches!(&out[0], Status::Failed(m) if m.contains("panicked") && m.contains("index out of range")),
            "{out:?}"
        );
        assert!(matches!(out[1], Status::DepFailed(_)));
        assert_eq!(
            out[2],
            Status::Done,
            "a soft dependency's failure is tolerated"
        );
        assert_eq!(out[3], Status::Done);
    }

    #[test]
    fn with_a_jobserver_the_last_job_running_gets_every_token() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let js = Jobserver::new(2).unwrap();
        let first_done = Arc::new(AtomicBool::new(false));
        let seen = Mutex::new(Vec::new());
        let (js_ref, seen_ref) = (&js, &seen);
        let done = first_done.clone();
        let tasks = vec![
            Task::run(label("short"), (vec![], vec![]), 10.0, move |_| {
                // Both run: the second holds the pipe's one token.
                std::thread::sleep(Duration::from_millis(300));
                seen_ref
                    .lock()
                    .unwrap()
                    .push(("both running", js_ref.available()));
                done.store(true, Ordering::SeqCst);
                Status::Done
            }),
            Task::run(label("long"), (vec![], vec![]), 1.0, move |_| {
                while !first_done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                // Alone now: the token it started with went back for its make to take.
                std::thread::sleep(Duration::from_millis(300));
                seen_ref.lock().unwrap().push(("alone", js_ref.available()));
                Status::Done
            }),
        ];
        let out = run(tasks, 2, Some(&js), &Silent);
        assert!(out.iter().all(|r| r.0 == Status::Done));
        assert_eq!(*seen.lock().unwrap(), [("both running", 0), ("alone", 1)]);
        assert_eq!(js.available(), 1, "every token is back in the pipe");
    }

    #[test]
    fn never_runs_more_than_the_limit_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let now = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let tasks: Vec<Task> = (0..8)
            .map(|i| {
                let (now, peak) = (&now, &peak);
                Task::run(label(&format!("t{i}")), (vec![], vec![]), 1.0, move |_| {
                    let c = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(c, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    now.fetch_sub(1, Ordering::SeqCst);
                    Status::Done
                })
            })
            .collect();
        run(tasks, 3, None, &Silent);
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert!(peak.load(Ordering::SeqCst) >= 2, "jobs should overlap");
    }
}
