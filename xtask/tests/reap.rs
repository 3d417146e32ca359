//! A run killed outright (kill -9) leaves its container running; the next run reaps it.
//! Its own test binary: no other kmodforge run may reap it first.

mod common;

use common::*;

#[test]
fn the_next_run_reaps_the_containers_of_a_killed_run() {
    let (p, mut child) = slow_build(K61);
    let pid = child.id();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    // kill -9 gives kmodforge no chance: its `podman run` dies with it (a parent-death
    // signal), the container lives on, until the next run that asks the engine reaps it.
    let left = containers_of("podman", pid);
    assert!(!left.is_empty(), "the container should outlive a kill -9");
    p.write(
        "kernels.toml",
        &format!(
            "{}[[kernel]]\nversion = \"{K61}\"\nmodules = [\"kmf_hello\"]\n",
            toolchains_section()
        ),
    );
    p.run(&["--engine", "podman", "build-all"]).ok();
    assert!(
        containers_of("podman", pid).is_empty(),
        "the killed run's containers were not reaped"
    );
    assert!(
        !p.out().join(".kmodforge/tmp").exists()
            || std::fs::read_dir(p.out().join(".kmodforge/tmp"))
                .unwrap()
                .next()
                .is_none(),
        "the killed run's scratch directories were not cleaned"
    );
}
