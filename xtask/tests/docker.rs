//! The same build through the docker engine (a real dockerd).

mod common;

use std::fs;

use common::*;

#[test]
fn docker_builds_the_same_modules() {
    let daemon = dockerd();
    let p = Project::new(&[K61]);
    let mut cmd = p.xtask(&["--engine", "docker", "build-all"]);
    if let Some(host) = &daemon.host {
        cmd.env("DOCKER_HOST", host);
    }
    let r = run(cmd).ok();
    let dir = p.moddir(K61);
    for m in [
        "kmf_export",
        "kmf_hello",
        "kmf_nested",
        "kmf_param",
        "kmf_user",
    ] {
        let ko = dir.join(format!("{m}.ko"));
        assert!(
            modinfo(&ko, "vermagic").starts_with(&format!("{K61} ")),
            "{m}\n{}",
            r.all()
        );
    }
    let dep = fs::read_to_string(dir.join("modules.dep")).unwrap();
    assert!(
        dep.lines().any(|l| l == "kmf_user.ko: kmf_export.ko"),
        "{dep}"
    );
    // The toolchain was built by docker itself (its log shows the engine's command).
    let log = fs::read_to_string(p.out().join("logs").join(K61).join("kmf_hello.log")).unwrap();
    assert!(
        log.lines().next().unwrap().contains("docker run --rm"),
        "{log}"
    );
}
