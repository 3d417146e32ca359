//! The real build pipeline: podman, toolchains made from the Debian archive, real
//! kernel headers, real kbuild and depmod.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use common::*;

const MODULES: &[&str] = &[
    "kmf_export",
    "kmf_fw",
    "kmf_hello",
    "kmf_nested",
    "kmf_param",
    "kmf_user",
];

#[test]
fn builds_every_module_for_a_61_and_a_612_kernel_then_only_what_changed() {
    require("podman", "podman");
    let p = Project::new(&[K61, K612]);
    let first = p.run(&["--engine", "podman", "build-all"]).ok();

    for kver in [K61, K612] {
        let dir = p.moddir(kver);
        for m in MODULES {
            let ko = dir.join(format!("{m}.ko"));
            assert!(ko.is_file(), "{} missing\n{}", ko.display(), first.all());
            let vermagic = modinfo(&ko, "vermagic");
            assert!(
                vermagic.starts_with(&format!("{kver} ")),
                "{m} for {kver} has vermagic {vermagic:?}"
            );
        }
        let dep = fs::read_to_string(dir.join("modules.dep")).unwrap();
        assert!(
            dep.lines().any(|l| l == "kmf_user.ko: kmf_export.ko"),
            "modules.dep of {kver}:\n{dep}"
        );
        assert!(
            dep.lines().any(|l| l == "kmf_hello.ko:"),
            "modules.dep of {kver}:\n{dep}"
        );
        for f in [
            "modules.dep.bin",
            "modules.alias",
            "modules.alias.bin",
            "modules.symbols",
            "modules.symbols.bin",
        ] {
            assert!(dir.join(f).is_file(), "{f} missing for {kver}");
        }
        // kmf_fw names the firmware it requests (MODULE_FIRMWARE), as `verify` reads it.
        assert_eq!(
            modinfo(&dir.join("kmf_fw.ko"), "firmware"),
            "kmf_fw/hello.bin"
        );
        // kmf_user resolved kmf_export_add through the exporter's Module.symvers.
        assert_eq!(modinfo(&dir.join("kmf_user.ko"), "depends"), "kmf_export");
        // depmod indexed the exported symbol, so modprobe can resolve it by name.
        let symbols = fs::read_to_string(dir.join("modules.symbols")).unwrap();
        assert!(
            symbols
                .lines()
                .any(|l| l == "alias symbol:kmf_export_add kmf_export"),
            "{symbols}"
        );
        let exported = fs::read_to_string(
            p.out()
                .join(".kmodforge/kernels")
                .join(kver)
                .join("modules/kmf_export/artifacts/Module.symvers"),
        )
        .unwrap();
        assert!(exported.contains("kmf_export_add"), "{exported}");
        assert!(
            p.out()
                .join("logs")
                .join(kver)
                .join("kmf_user.log")
                .is_file()
        );
    }
    // Parameters are declared, and the DKMS-style module landed where module.toml said.
    assert!(
        modinfo(&p.moddir(K61).join("kmf_param.ko"), "parm")
            .contains("greeting:What to say on load")
    );
    for kver in [K61, K612] {
        assert!(
            first
                .stdout
                .lines()
                .any(|l| l.starts_with(kver) && l.contains("ok ")),
            "summary row for {kver}:\n{}",
            first.stdout
        );
    }

    // Nothing changed: no job starts and the engine is not even asked. A stand-in engine
    // on PATH records any call.
    let spy = tempfile::tempdir().unwrap();
    let called = spy.path().join("called");
    let fake = spy.path().join("podman");
    fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", called.display()),
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        spy.path().display(),
        std::env::var("PATH").unwrap()
    );
    let before = snapshot(&p.out().join(K61));
    let mut cmd = p.xtask(&["--engine", "podman", "build-all"]);
    cmd.env("PATH", &path);
    let second = run(cmd).ok();
    assert!(second.stdout.contains("nothing to do"), "{}", second.all());
    assert!(second.started().is_empty(), "{}", second.all());
    assert!(
        !called.exists(),
        "the engine was called on a no-op run: {:?}",
        fs::read_to_string(&called)
    );
    assert_eq!(snapshot(&p.out().join(K61)), before);

    // Editing one module rebuilds that module and depmod, for every kernel, nothing else.
    let src = p.path().join("modules/kmf_hello/kmf_hello.c");
    let mut text = fs::read_to_string(&src).unwrap();
    text.push_str("MODULE_VERSION(\"2\");\n");
    fs::write(&src, text).unwrap();
    let third = p.run(&["--engine", "podman", "build-all"]).ok();
    let mut started = third.started();
    started.sort();
    let mut expected: Vec<String> = [K61, K612]
        .iter()
        .flat_map(|k| {
            [
                format!("depmod @ {k}"),
                format!("kmf_hello @ {k}"),
                format!("toolchain @ {k}"),
            ]
        })
        .chain(["base localhost/kmodforge/debian:bookworm".to_string()])
        .collect();
    expected.sort();
    assert_eq!(started, expected, "{}", third.all());
    assert_eq!(
        modinfo(&p.moddir(K612).join("kmf_hello.ko"), "version"),
        "2"
    );

    // A second run on the same output directory waits for the first, or with --no-wait
    // refuses at once.
    let lock = fs::File::options()
        .write(true)
        .open(p.out().join(".kmodforge/lock"))
        .unwrap();
    lock.lock().unwrap();
    let refused = p.run(&["build-all", "--no-wait"]).failed();
    assert!(
        refused.stderr.contains("another kmodforge run") && refused.stderr.contains("is using"),
        "{}",
        refused.all()
    );
    let mut waiting = p
        .xtask(&["build-all"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the second run should wait for the lock"
    );
    lock.unlock().unwrap();
    let out = waiting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("waiting for it to finish"),
        "{stderr}"
    );
}

#[test]
fn one_failing_module_spares_the_others_and_keeps_the_last_good_tree() {
    require("podman", "podman");
    let p = Project::new(&[K61, K612]);
    for m in ["kmf_nested", "kmf_param"] {
        p.remove_module(m);
    }
    let module = |version: &str, body: &str| {
        p.write("modules/kmf_api/Kbuild", "obj-m := kmf_api.o\n");
        p.write(
            "modules/kmf_api/kmf_api.c",
            &format!(
                "#include <linux/module.h>\n#include <linux/version.h>\n{body}\n\
                 static int __init a_init(void) {{ return 0; }}\nstatic void __exit a_exit(void) {{}}\n\
                 module_init(a_init);\nmodule_exit(a_exit);\nMODULE_LICENSE(\"GPL\");\nMODULE_VERSION(\"{version}\");\n"
            ),
        );
    };
    module("1", "");
    p.run(&["--engine", "podman", "build-all"]).ok();

    // Version 2 uses an API that 6.12 no longer has: it breaks there only.
    module(
        "2",
        "#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0)\n#error kmf_api v2 needs the pre-6.12 API\n#endif",
    );
    let r = p.run(&["--engine", "podman", "build-all"]).failed();
    assert_eq!(r.code, Some(1));
    let e = &r.stderr;
    assert!(
        e.contains(&format!("error: kmf_api @ {K612} failed")),
        "{e}"
    );
    assert!(e.contains("exit status: 2"), "{e}");
    assert!(
        e.contains(&format!(
            "log: {}",
            p.out()
                .join("logs")
                .join(K612)
                .join("kmf_api.log")
                .display()
        )),
        "{e}"
    );
    assert!(
        e.contains("| ") && e.contains("kmf_api v2 needs the pre-6.12 API"),
        "the log's tail is shown: {e}"
    );
    assert!(e.contains("1 of") && e.contains("jobs failed"), "{e}");
    // 6.1 got version 2 of the module. 6.12 ships what built, as DKMS installs what
    // built: every other module, and no kmf_api (neither the failed v2 nor the old v1).
    assert_eq!(modinfo(&p.moddir(K61).join("kmf_api.ko"), "version"), "2");
    assert!(!p.moddir(K612).join("kmf_api.ko").exists(), "{}", r.all());
    for m in ["kmf_hello", "kmf_export", "kmf_user"] {
        assert!(
            p.moddir(K612).join(format!("{m}.ko")).is_file(),
            "{m}: {}",
            r.all()
        );
    }
    let dep = fs::read_to_string(p.moddir(K612).join("modules.dep")).unwrap();
    assert!(!dep.contains("kmf_api"), "{dep}");
    assert!(r.stdout.contains("FAILED"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains(&format!("{K612}: staging tree without kmf_api (failed)")),
        "{}",
        r.stdout
    );

    // As a CI gate, --all-or-nothing keeps a kernel's previous tree whole instead.
    module("1", "");
    p.run(&["--engine", "podman", "build-all"]).ok();
    let good_612 = snapshot(&p.out().join(K612));
    module(
        "3",
        "#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0)\n#error kmf_api v3 needs the pre-6.12 API\n#endif",
    );
    let r = p
        .run(&["--engine", "podman", "build-all", "--all-or-nothing"])
        .failed();
    assert_eq!(modinfo(&p.moddir(K61).join("kmf_api.ko"), "version"), "3");
    assert_eq!(
        snapshot(&p.out().join(K612)),
        good_612,
        "with --all-or-nothing, 6.12's staging tree must be left as it was\n{}",
        r.all()
    );
}

#[test]
fn a_module_built_against_the_wrong_kernel_fails_its_vermagic_check() {
    require("podman", "podman");
    // A toolchain holding two kernels' headers (as the DTK holds the regular and the RT
    // kernel), and a module whose build picks the wrong one, as a Makefile that uses
    // `uname -r` or a hard-coded kernel does.
    let p = Project::new(&[]);
    copy_tree(
        &repo_root().join("xtask/tests/fixtures"),
        &p.path().join("fixtures"),
    );
    let other = "6.1.0-56-amd64";
    let mut toml = toolchains_section();
    toml.push_str(&format!(
        "[toolchains.two]\nrecipe = \"fixtures/toolchain-two-kernels.Containerfile\"\n\
         base = \"localhost/kmodforge/debian:bookworm\"\nbuild-args = {{ SECOND_KERNEL = \"{other}\" }}\n\
         [[kernel]]\nversion = \"{K61}\"\ntoolchain = \"two\"\nmodules = [\"kmf_hello\", \"kmf_wrong\"]\n"
    ));
    p.write("kernels.toml", &toml);
    p.write("modules/kmf_wrong/Kbuild", "obj-m := kmf_wrong.o\n");
    p.write(
        "modules/kmf_wrong/kmf_wrong.c",
        "#include <linux/module.h>\nMODULE_LICENSE(\"GPL\");\n",
    );
    p.write(
        "modules/kmf_wrong/module.toml",
        &format!("make = [\"make\", \"-C\", \"/lib/modules/{other}/build\", \"M=${{module_dir}}\", \"modules\"]\n"),
    );
    let r = p.run(&["--engine", "podman", "build-all"]).failed();
    assert!(
        r.stderr
            .contains(&format!("error: kmf_wrong @ {K61} failed")),
        "{}",
        r.all()
    );
    assert!(
        r.stderr.contains(&format!(
            "kmf_wrong.ko was built for kernel {other}, not {K61}"
        )),
        "{}",
        r.all()
    );
    // The right module for the same kernel is fine and ships; the bad one does not.
    assert!(
        p.out()
            .join(".kmodforge/kernels")
            .join(K61)
            .join("modules/kmf_hello/artifacts/kmf_hello.ko")
            .is_file()
    );
    assert!(p.moddir(K61).join("kmf_hello.ko").is_file(), "{}", r.all());
    assert!(!p.moddir(K61).join("kmf_wrong.ko").exists());
}

#[test]
fn a_kernel_without_headers_in_the_archive_is_named_with_its_place() {
    require("podman", "podman");
    let p = Project::new(&[K61, "6.1.0-99-amd64"]);
    let r = p.run(&["--engine", "podman", "build-all"]).failed();
    let e = &r.stderr;
    assert!(
        e.contains("error: toolchain @ 6.1.0-99-amd64 failed"),
        "{e}"
    );
    assert!(e.contains("the archive has no headers package for kernel 6.1.0-99-amd64 (linux-headers-6.1.0-99-amd64)"), "{e}");
    assert!(
        e.contains(&format!(
            "check the version at {}:",
            p.path().join("kernels.toml").display()
        )),
        "{e}"
    );
    // The other kernel is built all the same.
    assert!(p.moddir(K61).join("modules.dep").is_file(), "{}", r.all());
}

/// Sends `signal` to the xtask process alone (not its group, as `timeout` or a CI
/// cancel does) and checks it stops at once and leaves no container behind.
fn interrupted_by(signal: &str) {
    let (_p, mut child) = slow_build(K61);
    let pid = child.id();
    std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    let finished = wait_until(Duration::from_secs(60), || {
        child.try_wait().unwrap().is_some()
    });
    assert!(finished, "xtask did not stop after SIG{signal}");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        containers_of("podman", pid).is_empty(),
        "containers left behind after SIG{signal}"
    );
}

#[test]
fn ctrl_c_stops_the_jobs_and_removes_their_containers() {
    interrupted_by("INT");
}

#[test]
fn sigterm_cleans_up_like_ctrl_c() {
    interrupted_by("TERM");
}

#[test]
fn a_prebuilt_toolchain_is_pulled_from_its_registry_as_a_driver_toolkit_would_be() {
    require("podman", "podman");
    require("skopeo", "skopeo");
    // A toolchain image published to a registry, as OpenShift publishes its Driver Toolkit.
    let made = Project::new(&[K61]);
    made.run(&["--engine", "podman", "build-all"]).ok();
    let toolchain = made.toolchain_image();
    let reg = registry(false);
    let dtk = format!("{}/dtk/driver-toolkit:{K61}", reg.host);
    let pushed = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("containers-storage:{}", toolchain.as_str()))
        .arg(format!("docker://{dtk}"))
        .status()
        .unwrap();
    assert!(pushed.success());
    let forget = || {
        let _ = std::process::Command::new("podman")
            .args(["rmi", "-f", &dtk])
            .output();
    };

    let p = Project::new(&[]);
    let toml = |opt_in: &str| {
        format!(
            "{}[toolchains.dtk]\nimage = \"{}/dtk/driver-toolkit:${{KERNEL_FULL_VERSION}}\"\n{opt_in}\
             [[kernel]]\nversion = \"{K61}\"\ntoolchain = \"dtk\"\nmodules = [\"kmf_hello\"]\n",
            toolchains_section(),
            reg.host
        )
    };
    // Plain HTTP is refused until kernels.toml opts that registry in.
    forget();
    p.write("kernels.toml", &toml(""));
    let r = p.run(&["--engine", "podman", "build-all"]).failed();
    assert!(
        r.stderr
            .contains(&format!("cannot pull toolchain image {dtk}")),
        "{}",
        r.all()
    );
    p.write(
        "kernels.toml",
        &toml(&format!("[registries.\"{}\"]\ninsecure = true\n", reg.host)),
    );
    let r = p.run(&["--engine", "podman", "build-all"]).ok();
    let log = fs::read_to_string(p.out().join("logs").join(K61).join("toolchain.log")).unwrap();
    assert!(
        log.contains(&format!("pull --tls-verify=false {dtk}")),
        "{log}"
    );
    assert!(
        modinfo(&p.moddir(K61).join("kmf_hello.ko"), "vermagic").starts_with(&format!("{K61} ")),
        "{}",
        r.all()
    );
    forget();
}
