//! Scale on paper: the jobs this machine ran, replayed on more cores under each tool's
//! model, from their recorded times.
//!
//! A job is a serial part (starting, copying, configure, linking: one core whatever is
//! free) and a parallel part (a make's compiler runs) that spreads over up to `width`
//! cores (its object files). kmodforge's model is its scheduler: longest remaining path
//! first, at most `cores` jobs at once, one make jobserver with `cores` tokens, so each
//! running job holds a core and spare cores go to the parallel parts of running jobs.
//! DKMS's model is one build after another, each make given `-j<cores>` (when DKMS
//! passes it one at all). The simulation is fluid (cores divide continuously), so it
//! is an estimate, not a promise: it leaves out I/O, memory and the engine's own cost.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::bench::cpu::median;
use crate::bench::dkms::DkmsBuild;
use crate::bench::xtask::Outputs;
use crate::plan::{JobKind, Plan};

#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub label: String,
    pub serial_s: f64,
    pub parallel_s: f64,
    /// How many cores the parallel part can use at most (at least 1).
    pub width: usize,
    /// Jobs that must finish first; each index smaller than this job's.
    pub deps: Vec<usize>,
}

impl Job {
    /// Its time alone on `cores` cores.
    pub fn alone_s(&self, cores: usize) -> f64 {
        self.serial_s + self.parallel_s / cores.min(self.width).max(1) as f64
    }
}

/// Splits a job measured alone on `cores` cores (wall `wall_s`, CPU `cpu_s`) into a
/// serial and a parallel part: `wall = s + p/cores`, `cpu = s + p`. Contention (wall
/// above CPU) reads as serial.
pub fn split(wall_s: f64, cpu_s: f64, cores: usize) -> (f64, f64) {
    if cores < 2 {
        return (wall_s, 0.0);
    }
    let n = cores as f64;
    let p = ((cpu_s - wall_s) * n / (n - 1.0)).clamp(0.0, cpu_s.max(0.0));
    ((wall_s - p / n).max(0.0), p)
}

/// DKMS's model: one job after another.
pub fn one_at_a_time(jobs: &[Job], cores: usize) -> f64 {
    jobs.iter().map(|j| j.alone_s(cores)).sum()
}

/// kmodforge's model: the makespan of list scheduling with a shared jobserver.
pub fn list_schedule(jobs: &[Job], cores: usize) -> f64 {
    let cores = cores.max(1);
    let priority = critical_path(jobs, cores);
    let mut serial: Vec<f64> = jobs.iter().map(|j| j.serial_s).collect();
    let mut parallel: Vec<f64> = jobs.iter().map(|j| j.parallel_s).collect();
    let mut state = vec![State::Waiting; jobs.len()];
    let mut now = 0.0;
    loop {
        start_ready(jobs, &priority, &mut state, cores);
        let running: Vec<usize> = (0..jobs.len())
            .filter(|&i| state[i] == State::Running)
            .collect();
        if running.is_empty() {
            return now;
        }
        let rates = rates(jobs, &running, &serial, cores);
        let dt = running
            .iter()
            .zip(&rates)
            .map(|(&i, r)| {
                if serial[i] > EPS {
                    serial[i]
                } else {
                    parallel[i] / r
                }
            })
            .fold(f64::INFINITY, f64::min);
        now += dt;
        for (&i, r) in running.iter().zip(&rates) {
            if serial[i] > EPS {
                serial[i] -= dt;
            } else {
                parallel[i] -= dt * r;
            }
            if serial[i] <= EPS && parallel[i] <= EPS {
                state[i] = State::Done;
            }
        }
    }
}

const EPS: f64 = 1e-9;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Done,
}

/// Starts the most urgent ready jobs while fewer than `cores` run.
fn start_ready(jobs: &[Job], priority: &[f64], state: &mut [State], cores: usize) {
    let mut ready: Vec<usize> = (0..jobs.len())
        .filter(|&i| {
            state[i] == State::Waiting && jobs[i].deps.iter().all(|&d| state[d] == State::Done)
        })
        .collect();
    ready.sort_by(|a, b| priority[*b].total_cmp(&priority[*a]).then(a.cmp(b)));
    let running = state.iter().filter(|s| **s == State::Running).count();
    for i in ready.into_iter().take(cores.saturating_sub(running)) {
        state[i] = State::Running;
    }
}

/// Each running job's cores: one each; the spare ones shared out evenly among the jobs
/// in their parallel part, none past its width.
fn rates(jobs: &[Job], running: &[usize], serial: &[f64], cores: usize) -> Vec<f64> {
    let mut rate = vec![1.0; running.len()];
    let mut spare = cores.saturating_sub(running.len()) as f64;
    let mut open: Vec<usize> = (0..running.len())
        .filter(|&k| serial[running[k]] <= EPS && jobs[running[k]].width > 1)
        .collect();
    while spare > EPS && !open.is_empty() {
        let share = spare / open.len() as f64;
        let mut still = Vec::new();
        for k in open {
            let room = jobs[running[k]].width as f64 - rate[k];
            let take = room.min(share);
            rate[k] += take;
            spare -= take;
            if room - take > EPS {
                still.push(k);
            }
        }
        open = still;
    }
    rate
}

/// Each job's time alone plus the longest chain of jobs that wait for it.
fn critical_path(jobs: &[Job], cores: usize) -> Vec<f64> {
    let mut longest: Vec<f64> = jobs.iter().map(|j| j.alone_s(cores)).collect();
    for i in (0..jobs.len()).rev() {
        for &d in &jobs[i].deps {
            longest[d] = longest[d].max(jobs[d].alone_s(cores) + longest[i]);
        }
    }
    longest
}

/// Projected wall times on one number of cores.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Projected {
    pub cores: usize,
    /// kmodforge's jobs under its scheduler.
    pub kmodforge_s: f64,
    /// The same jobs one after another, every make given `-j<cores>`: the setup of the
    /// 16-core reference measurement (DKMS's model with a parallel make everywhere).
    pub one_at_a_time_s: f64,
    /// DKMS's builds as DKMS runs them (its `-j` only where its MAKE starts with make).
    pub dkms_s: f64,
    /// `kmodforge_s / one_at_a_time_s`: what the reference's 0.31-0.33 is.
    pub ratio_same_jobs: f64,
    /// `kmodforge_s / dkms_s`.
    pub ratio: f64,
}

pub fn project(kmodforge: &[Job], dkms: &[Job], cores: usize) -> Projected {
    let k = list_schedule(kmodforge, cores);
    let same = one_at_a_time(kmodforge, cores);
    let d = one_at_a_time(dkms, cores);
    let over = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Projected {
        cores,
        kmodforge_s: k,
        one_at_a_time_s: same,
        dkms_s: d,
        ratio_same_jobs: over(k, same),
        ratio: over(k, d),
    }
}

/// DKMS's jobs from its builds (every round; per pair the median wall and CPU),
/// split by how DKMS ran them on `cores` cores, each as wide as `width` says. Their
/// sizes are CPU seconds, as kmodforge's are: other work on the machine, which
/// stretches wall times, is left out of both.
pub fn dkms_jobs(
    builds: &[DkmsBuild],
    cores: usize,
    width: impl Fn(&str, &str) -> usize,
) -> Vec<Job> {
    let mut pairs: BTreeMap<(String, String), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for b in builds {
        let e = pairs
            .entry((b.package.clone(), b.kernel.clone()))
            .or_default();
        e.0.push(b.wall_s);
        e.1.push(b.cpu_s);
    }
    pairs
        .into_iter()
        .map(|((m, k), (wall, cpu))| {
            let c = median(&cpu);
            let (_, p) = split(median(&wall), c, cores);
            Job {
                width: width(&m, &k).max(1),
                label: format!("{m} @ {k}"),
                serial_s: (c - p).max(0.0),
                parallel_s: p,
                deps: vec![],
            }
        })
        .collect()
}

/// How much of a (module folder, kernel) build spreads over cores, from a measurement
/// of it running alone: DKMS's build on this machine, or kmodforge's single-large run.
pub fn parallel_fraction(wall_s: f64, cpu_s: f64, cores: usize) -> f64 {
    let (_, p) = split(wall_s, cpu_s, cores);
    if cpu_s > 0.0 { p / cpu_s } else { 0.0 }
}

/// kmodforge's jobs as its plan links them: a compile is its container's overhead and
/// the serial part of its make, then the parallel part (`fraction` of the make's CPU)
/// as wide as its objects; every other job (toolchain look-up, depmod) is serial, as
/// long as it took.
pub fn kmodforge_jobs(
    plan: &Plan,
    outputs: &Outputs,
    fraction: impl Fn(&str, &str) -> f64,
) -> Vec<Job> {
    plan.jobs
        .iter()
        .map(|job| {
            let label = plan.label(job);
            let deps: Vec<usize> = job.deps.iter().chain(&job.after).copied().collect();
            let took = outputs
                .timings
                .0
                .get(&label.to_string())
                .copied()
                .unwrap_or(0.0);
            let phases = match (&job.kind, &label.kernel) {
                (JobKind::Compile { .. }, Some(k)) => outputs
                    .phases
                    .iter()
                    .find(|((m, kv), _)| *m == label.name && kv == k)
                    .map(|(_, p)| p),
                _ => None,
            };
            let (serial_s, parallel_s, width) = match phases {
                Some(p) => {
                    let make = p.cpu_s.max(0.0);
                    let f = fraction(&label.name, label.kernel.as_deref().unwrap_or(""));
                    let overhead = p.start_s + p.copy_s + p.keep_s + p.exit_s;
                    (
                        overhead + make * (1.0 - f),
                        make * f,
                        p.objects.max(1) as usize,
                    )
                }
                None => (took, 0.0, 1),
            };
            Job {
                label: label.to_string(),
                serial_s,
                parallel_s,
                width,
                deps,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(serial_s: f64, parallel_s: f64, width: usize, deps: &[usize]) -> Job {
        Job {
            label: String::new(),
            serial_s,
            parallel_s,
            width,
            deps: deps.to_vec(),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn a_measured_job_splits_into_serial_and_parallel() {
        // 10 s serial and 20 CPU-s spread on 2 cores: 20 s wall, 30 s CPU.
        let (s, p) = split(20.0, 30.0, 2);
        assert!(close(s, 10.0) && close(p, 20.0), "{s} {p}");
        assert_eq!(split(10.0, 8.0, 2), (10.0, 0.0), "contention is serial");
        assert_eq!(split(10.0, 10.0, 1), (10.0, 0.0));
    }

    #[test]
    fn one_at_a_time_adds_each_job_alone() {
        let jobs = [job(1.0, 8.0, 4, &[]), job(2.0, 6.0, 1, &[])];
        assert!(close(one_at_a_time(&jobs, 16), 1.0 + 2.0 + 2.0 + 6.0));
    }

    #[test]
    fn independent_serial_jobs_fill_the_cores() {
        let jobs: Vec<Job> = (0..4).map(|_| job(3.0, 0.0, 1, &[])).collect();
        assert!(close(list_schedule(&jobs, 2), 6.0));
        assert!(close(list_schedule(&jobs, 4), 3.0));
        assert!(close(list_schedule(&jobs, 64), 3.0));
    }

    #[test]
    fn a_lone_job_gets_the_spare_cores_up_to_its_width() {
        // A toolchain (1 s), then a wide build and a narrow one, then depmod.
        let jobs = [
            job(1.0, 0.0, 1, &[]),
            job(1.0, 12.0, 8, &[0]),
            job(2.0, 0.0, 1, &[0]),
            job(0.5, 0.0, 1, &[1, 2]),
        ];
        // 4 cores: at t=1 both start; at t=2 the wide one's parallel part gets 3 cores
        // while the narrow one runs (until t=3), then 4: 3 + (12 - 3) / 4 = 5.25; +0.5.
        assert!(
            close(list_schedule(&jobs, 4), 5.75),
            "{}",
            list_schedule(&jobs, 4)
        );
        // 1 core: everything in a row.
        assert!(close(list_schedule(&jobs, 1), 1.0 + 13.0 + 2.0 + 0.5));
        // The longest chain goes first: with one core and two free jobs, the long one.
        let p = critical_path(&jobs, 1);
        assert!(p[1] > p[2]);
    }

    #[test]
    fn the_projection_compares_both_models() {
        let k = [job(1.0, 4.0, 4, &[]), job(1.0, 4.0, 4, &[])];
        let p = project(&k, &k, 4);
        // kmodforge: both at once, each with 2 cores for its parallel part: 1 + 4/2.
        // One after another: 2 x (1 + 4/4).
        assert!(close(p.kmodforge_s, 3.0) && close(p.dkms_s, 4.0), "{p:?}");
        assert!(close(p.one_at_a_time_s, 4.0) && close(p.ratio_same_jobs, 0.75));
        assert!(close(p.ratio, 0.75));
    }
}
