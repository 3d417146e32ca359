//! Runs a graph of jobs on a bounded number of threads, longest path first.
//!
//! Workers live in `std::thread::scope` and send their results to the calling thread,
//! which alone talks to the [`Reporter`]. A failed job never stops the scheduler: the
//! jobs that need it are marked [`Status::DepFailed`], all others still run.

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::host::process;
use crate::plan::JobLabel;
use crate::run::progress::{Reporter, Status};

pub type Work<'s> = Box<dyn FnOnce(&[Status]) -> Status + Send + 's>;

pub struct Task<'s> {
    pub label: JobLabel,
    /// Indices of tasks that must settle first; each smaller than this task's index.
    pub deps: Vec<usize>,
    /// Expected seconds, for ordering (the longest remaining path starts first).
    pub estimate: f64,
    work: Option<Work<'s>>,
    settled: Option<Status>,
}

impl<'s> Task<'s> {
    /// A task to run; `work` receives its dependencies' statuses.
    pub fn run(
        label: JobLabel,
        deps: Vec<usize>,
        estimate: f64,
        work: impl FnOnce(&[Status]) -> Status + Send + 's,
    ) -> Task<'s> {
        Task {
            label,
            deps,
            estimate,
            work: Some(Box::new(work)),
            settled: None,
        }
    }

    /// A task whose outcome is already known (its outputs are fresh, say).
    pub fn settled(label: JobLabel, deps: Vec<usize>, status: Status) -> Task<'s> {
        Task {
            label,
            deps,
            estimate: 0.0,
            work: None,
            settled: Some(status),
        }
    }
}

/// The outcome of each task, in task order, with the time it ran.
pub fn run(
    mut tasks: Vec<Task<'_>>,
    jobs: usize,
    reporter: &dyn Reporter,
) -> Vec<(Status, Duration)> {
    let n = tasks.len();
    let priority = critical_path(&tasks);
    let mut results: Vec<Option<(Status, Duration)>> = vec![None; n];
    let mut started = vec![false; n];
    let to_run = tasks.iter().filter(|t| t.work.is_some()).count();
    reporter.start(to_run, n - to_run);

    let (tx, rx) = mpsc::channel::<(usize, Status, Duration)>();
    std::thread::scope(|scope| {
        let mut running = 0usize;
        loop {
            // Settle everything that can be settled without running: known outcomes and
            // tasks whose dependencies failed.
            let mut progressed = true;
            while progressed {
                progressed = false;
                for i in 0..n {
                    if started[i] || !tasks[i].deps.iter().all(|d| results[*d].is_some()) {
                        continue;
                    }
                    let failed_dep = tasks[i]
                        .deps
                        .iter()
                        .find(|d| results[**d].as_ref().is_some_and(|r| r.0.is_failure()));
                    let status = if let Some(d) = failed_dep {
                        Some(Status::DepFailed(format!(
                            "needs {}, which did not succeed",
                            tasks[*d].label
                        )))
                    } else if process::cancelled() {
                        Some(Status::Cancelled)
                    } else {
                        tasks[i].settled.take()
                    };
                    if let Some(status) = status {
                        started[i] = true;
                        if status != Status::Fresh {
                            reporter.job_finished(&tasks[i].label, &status, Duration::ZERO);
                        }
                        results[i] = Some((status, Duration::ZERO));
                        progressed = true;
                    }
                }
            }

            // Start the most urgent ready tasks while threads are free.
            let ready: BTreeSet<(u64, std::cmp::Reverse<usize>)> = (0..n)
                .filter(|&i| !started[i] && tasks[i].deps.iter().all(|d| results[*d].is_some()))
                .map(|i| ((priority[i] * 1000.0) as u64, std::cmp::Reverse(i)))
                .collect();
            for (_, std::cmp::Reverse(i)) in ready.into_iter().rev() {
                if running >= jobs.max(1) {
                    break;
                }
                let work = tasks[i].work.take().expect("an unsettled task has work");
                let deps: Vec<Status> = tasks[i]
                    .deps
                    .iter()
                    .map(|d| results[*d].as_ref().unwrap().0.clone())
                    .collect();
                started[i] = true;
                running += 1;
                reporter.job_started(&tasks[i].label);
                let tx = tx.clone();
                scope.spawn(move || {
                    let t = Instant::now();
                    let status = work(&deps);
                    let _ = tx.send((i, status, t.elapsed()));
                });
            }

            if running == 0 {
                break;
            }
            if let Ok((i, status, elapsed)) = rx.recv() {
                running -= 1;
                let status = if process::cancelled() && status.is_failure() {
                    Status::Cancelled
                } else {
                    status
                };
                reporter.job_finished(&tasks[i].label, &status, elapsed);
                results[i] = Some((status, elapsed));
            }
        }
    });
    reporter.finish();
    results
        .into_iter()
        .map(|r| r.expect("every task settles"))
        .collect()
}

/// For each task, its estimate plus the longest chain of tasks that wait for it.
fn critical_path(tasks: &[Task<'_>]) -> Vec<f64> {
    let mut longest: Vec<f64> = tasks.iter().map(|t| t.estimate).collect();
    for i in (0..tasks.len()).rev() {
        for &d in &tasks[i].deps {
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
            Task::run(label("a"), vec![], 1.0, |_| Status::Failed("boom".into())),
            Task::run(label("b"), vec![0], 1.0, |_| Status::Done),
            Task::run(label("c"), vec![], 1.0, |_| Status::Done),
            Task::settled(label("d"), vec![2], Status::Fresh),
            Task::run(label("e"), vec![1], 1.0, |_| Status::Done),
        ];
        let out: Vec<Status> = run(tasks, 2, &Silent).into_iter().map(|r| r.0).collect();
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
            Task::run(label("short"), vec![], 1.0, record("short")),
            Task::run(label("long-head"), vec![], 1.0, record("long-head")),
            Task::run(label("long-tail"), vec![1], 50.0, record("long-tail")),
        ];
        let out = run(tasks, 1, &Silent);
        assert!(out.iter().all(|r| r.0 == Status::Done));
        assert_eq!(*order.lock().unwrap(), ["long-head", "long-tail", "short"]);
    }

    #[test]
    fn never_runs_more_than_the_limit_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let now = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let tasks: Vec<Task> = (0..8)
            .map(|i| {
                let (now, peak) = (&now, &peak);
                Task::run(label(&format!("t{i}")), vec![], 1.0, move |_| {
                    let c = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(c, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    now.fetch_sub(1, Ordering::SeqCst);
                    Status::Done
                })
            })
            .collect();
        run(tasks, 3, &Silent);
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert!(peak.load(Ordering::SeqCst) >= 2, "jobs should overlap");
    }
}
