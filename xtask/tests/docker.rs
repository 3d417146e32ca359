//! The same build and image through the docker engine (a real dockerd).

mod common;

use std::fs;
use std::process::Command;

use common::*;

#[test]
fn docker_builds_the_same_modules_and_loads_the_image() {
    let daemon = dockerd();
    let p = Project::new(&[]);
    p.write(
        "kernels.toml",
        &format!(
            "{}[[kernel]]\nversion = \"{K61}\"\n[image]\nbase = \"busybox\"\nname = \"localhost/kmodforge-test/docker:${{KERNEL_FULL_VERSION}}\"\n",
            toolchains_section()
        ),
    );
    let xtask = |args: &[&str]| {
        let mut cmd = p.xtask(&[&["--engine", "docker"], args].concat());
        if let Some(host) = &daemon.host {
            cmd.env("DOCKER_HOST", host);
        }
        run(cmd)
    };
    let r = xtask(&["build-all"]).ok();
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
    // The jobs ran through docker (the log starts with the engine's command line).
    let log = fs::read_to_string(p.out().join("logs").join(K61).join("kmf_hello.log")).unwrap();
    assert!(
        log.lines().next().unwrap().contains("docker run --rm"),
        "{log}"
    );

    // The image goes into docker's storage, and KMM's init command copies the tree out.
    let r = xtask(&["image", "--kernel", K61]).ok();
    assert!(
        r.stdout.contains("loaded into docker's storage"),
        "{}",
        r.all()
    );
    let copy = tempfile::tempdir().unwrap();
    let mut docker = Command::new("docker");
    if let Some(host) = &daemon.host {
        docker.env("DOCKER_HOST", host);
    }
    let init =
        format!("mkdir -p /tmp/opt/lib/modules; cp -R /opt/lib/modules/{K61} /tmp/opt/lib/modules");
    let status = docker
        .args(["run", "--rm", "-v"])
        .arg(format!("{}:/tmp/opt", copy.path().display()))
        .args([
            &format!("localhost/kmodforge-test/docker:{K61}"),
            "/bin/sh",
            "-c",
            &init,
        ])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        snapshot(&copy.path().join("lib/modules").join(K61))
            .into_iter()
            .map(|(_, d)| d)
            .collect::<Vec<_>>(),
        snapshot(&dir)
            .into_iter()
            .map(|(_, d)| d)
            .collect::<Vec<_>>()
    );
}
