//! Where a compile's time went, kept beside its record whatever the outcome: how long the
//! container took to start and to go away, the copy of the sources, the build command,
//! keeping (checking, stripping) the modules, and the CPU the build used. The driver
//! stamps the phases inside the container (`out/phases`); the host adds when it started
//! and when the engine returned, on the same clock. `cargo xtask bench` reads these to
//! explain a missed target and to project the run onto more cores.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::run::layout::Layout;

/// One compile's phases, in seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Phases {
    /// From the engine's invocation to the driver's first line.
    pub start_s: f64,
    /// The copy of the sources into the build directory (DKMS: both copies, and the two
    /// reads of dkms.conf).
    pub copy_s: f64,
    /// The build command (DKMS: patches, PRE_BUILD, CLEAN and MAKE).
    pub make_s: f64,
    /// Checking, stripping and collecting the modules (DKMS: and POST_BUILD).
    pub keep_s: f64,
    /// From the driver's end to the engine's return.
    pub exit_s: f64,
    /// The whole job as the host saw it, vermagic checks and the copy into place included.
    pub wall_s: f64,
    /// CPU seconds of the driver and every process it waited for (make, the compilers).
    pub cpu_s: f64,
    /// Object files the build left: how many compiler runs a parallel make could spread.
    pub objects: u64,
    /// Whether the build succeeded (or was skipped).
    pub ok: bool,
}

impl Phases {
    pub fn path(layout: &Layout, kver: &str, module: &str) -> PathBuf {
        layout.module_state(kver, module).join("phases.json")
    }

    pub fn load(layout: &Layout, kver: &str, module: &str) -> Option<Phases> {
        crate::host::fs::read_json(&Phases::path(layout, kver, module))
    }

    /// From the driver's `phases` file and the host's start and end times. Phases the
    /// driver never reached (a failure, a skip) count as zero.
    pub fn from_driver(text: &str, invoked: SystemTime, returned: SystemTime) -> Phases {
        let epoch = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let field = |name: &str| -> Option<f64> {
            text.lines()
                .filter_map(|l| l.split_once('\t'))
                .find(|(k, _)| *k == name)
                .and_then(|(_, v)| v.trim().parse().ok())
        };
        let (invoked, returned) = (epoch(invoked), epoch(returned));
        let start = field("start").unwrap_or(invoked);
        let copied = field("copied").unwrap_or(start);
        let built = field("built").unwrap_or(copied);
        let kept = field("kept").unwrap_or(built);
        let last = [start, copied, built, kept]
            .into_iter()
            .fold(start, f64::max);
        let span = |a: f64, b: f64| (b - a).max(0.0);
        let hz = field("ticks_per_second")
            .filter(|h| *h > 0.0)
            .unwrap_or(100.0);
        Phases {
            start_s: span(invoked, start),
            copy_s: span(start, copied),
            make_s: span(copied, built),
            keep_s: span(built, kept),
            exit_s: span(last, returned),
            wall_s: span(invoked, returned),
            cpu_s: field("cpu_ticks").unwrap_or(0.0) / hz,
            objects: field("objects").unwrap_or(0.0) as u64,
            ok: false,
        }
    }

    /// Keeps them for the bench; a failure to write only loses figures.
    pub fn save(&self, layout: &Layout, kver: &str, module: &str) {
        let _ = crate::host::fs::write_json(&Phases::path(layout, kver, module), self);
    }
}

/// The driver's phases file in a compile's output directory, or nothing.
pub fn read_driver(out: &Path) -> String {
    std::fs::read_to_string(out.join("phases")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn phases_are_spans_between_stamps() {
        let at = |s: f64| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s);
        let text = "start\t100.5\ncopied\t100.75\nbuilt\t130.75\nkept\t131.0\n\
                    cpu_ticks\t5500\nticks_per_second\t100\nobjects\t42\n";
        let p = Phases::from_driver(text, at(100.0), at(131.5));
        assert_eq!(
            (p.start_s, p.copy_s, p.make_s, p.keep_s, p.exit_s, p.wall_s),
            (0.5, 0.25, 30.0, 0.25, 0.5, 31.5)
        );
        assert_eq!((p.cpu_s, p.objects), (55.0, 42));
        // A build that failed in make: no "kept", the rest counts from "built".
        let p = Phases::from_driver(
            "start\t100.5\ncopied\t101\nbuilt\t110\n",
            at(100.0),
            at(111.0),
        );
        assert_eq!((p.make_s, p.keep_s, p.exit_s), (9.0, 0.0, 1.0));
        // A container that never ran the driver: all of it is start-up.
        let p = Phases::from_driver("", at(100.0), at(102.0));
        assert_eq!((p.start_s, p.exit_s, p.wall_s), (0.0, 2.0, 2.0));
    }
}
