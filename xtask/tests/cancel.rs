//! Cancelling (Ctrl-C, SIGTERM) stops every program kmodforge started, even one it was
//! starting at that very moment. Its own test binary: the cancel is process-wide.

use std::path::Path;
use std::time::{Duration, Instant};

use xtask::host::process::{Cmd, Failure, cancel_all, process_error};

/// Processes whose command line holds `marker`.
fn alive(marker: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(marker) {
            out.push(format!("{} {text}", e.file_name().to_string_lossy()));
        }
    }
    out
}

#[test]
fn a_program_started_during_a_cancel_does_not_escape() {
    // SAFETY: set before any other thread of this test binary runs.
    unsafe { std::env::set_var("KMODFORGE_TEST_SPAWN_DELAY_MS", "800") };
    let marker = format!("600.{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sleep.log");
    let worker = {
        let (marker, log) = (marker.clone(), log.clone());
        std::thread::spawn(move || {
            Cmd::new("sleep")
                .arg(&marker)
                .run_logged(Path::new(&log), None)
        })
    };
    // The worker has checked the cancel flag and is about to start `sleep`.
    std::thread::sleep(Duration::from_millis(200));
    cancel_all();
    let started = Instant::now();
    while !worker.is_finished() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let escaped = alive(&marker);
    for p in &escaped {
        let pid = p.split_whitespace().next().unwrap();
        let _ = std::process::Command::new("kill")
            .args(["-9", pid])
            .status();
    }
    assert!(
        worker.is_finished() && escaped.is_empty(),
        "a program started during the cancel escaped it: {escaped:?}"
    );
    let err = worker.join().unwrap().unwrap_err();
    let p = process_error(&err).expect("a process error");
    assert_eq!(p.failure, Failure::Cancelled, "{err:#}");
    // And nothing starts after a cancel.
    let err = Cmd::new("true").read().unwrap_err();
    assert_eq!(process_error(&err).unwrap().failure, Failure::Cancelled);
}
