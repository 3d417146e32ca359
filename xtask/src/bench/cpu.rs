//! CPU accounting: what a run cost the whole machine, containers included.
//!
//! A container's processes are not kmodforge's children (the engine's monitor is their
//! parent), so their CPU time never reaches `getrusage`. The kernel's own count in
//! `/proc/stat` sees everything: busy time is user + nice + system + irq + softirq (in
//! clock ticks; guest time is already inside user). That total divided by the cores is
//! the best wall time any scheduler could reach for the work done: the run's *limit*,
//! and limit / wall is how close it came (its *efficiency*). Everything else running on
//! the machine counts too, so figures taken on a shared machine are skewed.

use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Busy clock ticks of all CPUs from `/proc/stat`'s `cpu` line.
pub fn busy_ticks(proc_stat: &str) -> Option<u64> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq ...
    Some(v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?)
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// CPUs online.
pub fn cores() -> usize {
    // SAFETY: sysconf only reads a value.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The 1-minute load average, to say how busy the machine was.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn read_busy() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    busy_ticks(&text).context("/proc/stat has no `cpu` line kmodforge can read")
}

/// What one timed piece of work cost.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Measured {
    pub wall_s: f64,
    /// Busy CPU seconds of the whole machine while it ran.
    pub cpu_s: f64,
    /// `cpu_s / cores`: the wall time a perfect scheduler would need for that CPU.
    pub limit_s: f64,
    /// `limit_s / wall_s`.
    pub efficiency: f64,
}

impl Measured {
    pub fn new(wall_s: f64, cpu_s: f64, cores: usize) -> Measured {
        let limit_s = cpu_s / cores.max(1) as f64;
        Measured {
            wall_s,
            cpu_s,
            limit_s,
            efficiency: if wall_s > 0.0 { limit_s / wall_s } else { 0.0 },
        }
    }

    /// The median of each figure over several rounds (efficiency from the medians).
    pub fn median_of(rounds: &[Measured], cores: usize) -> Measured {
        let wall = median(&rounds.iter().map(|m| m.wall_s).collect::<Vec<_>>());
        let cpu = median(&rounds.iter().map(|m| m.cpu_s).collect::<Vec<_>>());
        Measured::new(wall, cpu, cores)
    }
}

/// Runs `work` and measures its wall time and the machine's CPU meanwhile.
pub fn measure<T>(work: impl FnOnce() -> Result<T>) -> Result<(T, Measured)> {
    let (busy, started) = (read_busy()?, Instant::now());
    let out = work()?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = read_busy()?.saturating_sub(busy) as f64 / ticks_per_second();
    Ok((out, Measured::new(wall, cpu, cores())))
}

/// A process's own resource use, as `getrusage(RUSAGE_SELF)` gives it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OwnUsage {
    pub max_rss_kib: u64,
    pub user_s: f64,
    pub system_s: f64,
}

/// Resource use as `getrusage(who)` gives it (`RUSAGE_SELF`, `RUSAGE_CHILDREN`).
pub fn usage(who: libc::c_int) -> Option<OwnUsage> {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(OwnUsage {
        max_rss_kib: ru.ru_maxrss as u64,
        user_s: secs(ru.ru_utime),
        system_s: secs(ru.ru_stime),
    })
}

/// CPU seconds (user + system) of this process's waited-for children so far: a
/// program run on the host (DKMS and its make) with everything it waited for.
pub fn children_cpu_s() -> f64 {
    usage(libc::RUSAGE_CHILDREN).map_or(0.0, |u| u.user_s + u.system_s)
}

/// User and system CPU seconds of this process so far.
pub fn own_cpu_s() -> f64 {
    usage(libc::RUSAGE_SELF).map_or(0.0, |u| u.user_s + u.system_s)
}

/// The median (the mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_is_user_nice_system_irq_softirq() {
        let stat = "cpu  1024370 5 350968 473143 10608 7 4522 2164 0 0\n\
                    cpu0 512185 2 175484 236571 5304 3 2261 1082 0 0\nintr 1 2 3\n";
        assert_eq!(busy_ticks(stat), Some(1024370 + 5 + 350968 + 7 + 4522));
        assert_eq!(
            busy_ticks("cpu0 1 2 3 4 5 6 7\n"),
            None,
            "only the total line"
        );
        assert_eq!(busy_ticks("cpu  1 2 x\n"), None);
    }

    #[test]
    fn median_of_odd_even_and_nothing() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn limit_and_efficiency() {
        let m = Measured::new(100.0, 190.0, 2);
        assert_eq!((m.limit_s, m.efficiency), (95.0, 0.95));
        let med = Measured::median_of(&[m.clone(), Measured::new(120.0, 200.0, 2), m], 2);
        assert_eq!((med.wall_s, med.cpu_s), (100.0, 190.0));
    }
}
