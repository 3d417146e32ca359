//! Bad input: each case exits non-zero, says what and where, and leaves the outputs
//! that were already there untouched.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::*;

/// A project with a previous kernel output in place, which no failed run may touch.
fn project_with_output() -> Project {
    let p = Project::new(&[K61]);
    p.write(
        &format!("out/{K61}/lib/modules/{K61}/kmf_hello.ko"),
        "previous good build",
    );
    p.write(
        &format!("out/{K61}/lib/modules/{K61}/modules.dep"),
        "kmf_hello.ko:\n",
    );
    p
}

/// Runs build-all on `p` and checks that it fails with every `expected` fragment in its
/// error and without touching the outputs.
fn fails_cleanly(p: &Project, expected: &[&str]) {
    let before = snapshot(&p.out());
    let r = p.run(&["build-all"]).failed();
    for e in expected {
        assert!(r.stderr.contains(e), "expected {e:?} in:\n{}", r.all());
    }
    let after: Vec<_> = snapshot(&p.out())
        .into_iter()
        .filter(|(path, _)| !path.starts_with(p.out().join(".kmodforge")))
        .collect();
    assert_eq!(after, before, "outputs changed");
}

fn kernels_toml(p: &Project, kernels: &str) -> String {
    let text = format!("{}{kernels}", toolchains_section());
    p.write("kernels.toml", &text);
    p.path().join("kernels.toml").display().to_string()
}

/// `needle`'s 1-based line and column in the project's kernels.toml.
fn at(p: &Project, needle: &str) -> String {
    at_offset(p, needle, 0)
}

/// The line and column `delta` bytes after the start of `needle`.
fn at_offset(p: &Project, needle: &str, delta: usize) -> String {
    let text = fs::read_to_string(p.path().join("kernels.toml")).unwrap();
    let offset = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in kernels.toml"))
        + delta;
    let line = text[..offset].matches('\n').count() + 1;
    let col = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("{}:{line}:{col}", p.path().join("kernels.toml").display())
}

#[test]
fn toml_syntax_error() {
    let p = project_with_output();
    kernels_toml(&p, "[[kernel]]\nversion = \"6.1.0-47-amd64\n");
    // The string runs to the end of its line, where the closing quote is missing.
    let end = "\"6.1.0-47-amd64".len();
    fails_cleanly(
        &p,
        &[
            &at_offset(&p, "\"6.1.0-47-amd64\n", end),
            "invalid basic string, expected `\"`",
        ],
    );
}

#[test]
fn unknown_key() {
    let p = project_with_output();
    kernels_toml(&p, "[[kernel]]\nverison = \"6.1.0-47-amd64\"\n");
    fails_cleanly(
        &p,
        &[
            &at(&p, "verison"),
            "unknown field `verison`",
            "help: check the spelling",
        ],
    );
}

#[test]
fn wrong_type() {
    let p = project_with_output();
    kernels_toml(
        &p,
        "[[kernel]]\nversion = \"6.1.0-47-amd64\"\nmodules = \"kmf_hello\"\n",
    );
    fails_cleanly(
        &p,
        &[
            &at(&p, "\"kmf_hello\""),
            "invalid type: string \"kmf_hello\", expected a sequence",
        ],
    );
}

#[test]
fn empty_kernel_version() {
    let p = project_with_output();
    kernels_toml(&p, "[[kernel]]\nversion = \"\"\n");
    fails_cleanly(
        &p,
        &[&at(&p, "\"\"\n"), "kernel version is empty", "uname -r"],
    );
}

#[test]
fn duplicate_kernel_version() {
    let p = project_with_output();
    kernels_toml(
        &p,
        "[[kernel]]\nversion = \"6.1.0-47-amd64\"\n[[kernel]]\nversion = \"6.1.0-47-amd64\" # again\n",
    );
    fails_cleanly(
        &p,
        &[
            &at(&p, "\"6.1.0-47-amd64\" # again"),
            "kernel 6.1.0-47-amd64 is listed twice",
            "first listed at",
        ],
    );
}

#[test]
fn module_folder_without_kbuild_or_makefile() {
    let p = project_with_output();
    p.write("modules/kmf_empty/README", "sources to come\n");
    fails_cleanly(
        &p,
        &[
            "modules/kmf_empty has no Kbuild or Makefile",
            "obj-m := kmf_empty.o",
        ],
    );
}

#[test]
fn module_names_with_slash_or_dotdot() {
    for bad in ["../kmf_hello", "kmf/hello"] {
        let p = project_with_output();
        kernels_toml(
            &p,
            &format!("[[kernel]]\nversion = \"6.1.0-47-amd64\"\nmodules = [\"{bad}\"]\n"),
        );
        fails_cleanly(
            &p,
            &[
                &at(&p, &format!("\"{bad}\"")),
                "is not a valid module name",
                "no '/', no '..'",
            ],
        );
    }
    let p = project_with_output();
    p.write(
        "modules/kmf_user/module.toml",
        "depends = [\"../kmf_export\"]\n",
    );
    fails_cleanly(
        &p,
        &[
            "modules/kmf_user/module.toml:1:12",
            "is not a valid module name",
        ],
    );
}

#[test]
fn invalid_regular_expression() {
    let p = project_with_output();
    p.write(
        "modules/kmf_hello/module.toml",
        "kernels = '^6\\.(1|12\\.'\n",
    );
    fails_cleanly(
        &p,
        &[
            "modules/kmf_hello/module.toml:1:11",
            "`kernels` is not a valid regular expression",
            "unclosed group",
        ],
    );
}

#[test]
fn bad_firmware_dirs() {
    let toml = "modules/kmf_fw/module.toml";
    let fw = |dir: &str| format!("kernels = '-amd64$'\n\n[firmware]\ndir = \"{dir}\"\n");
    let help = "help: `dir` is a folder of the module folder";
    // Outside the module folder.
    for dir in ["../kmf_hello", "/lib/firmware"] {
        let p = project_with_output();
        p.write(toml, &fw(dir));
        fails_cleanly(
            &p,
            &[
                &format!("{toml}:4:7"),
                &format!("firmware dir {dir:?} is not a folder inside the module folder"),
                help,
            ],
        );
    }
    // Missing.
    let p = project_with_output();
    p.write(toml, &fw("blobs"));
    fails_cleanly(
        &p,
        &[
            &format!("{toml}:4:7"),
            "firmware dir \"blobs\" does not exist in",
            help,
        ],
    );
    // The repository's own module.toml, where `dir`'s value is.
    let text = fs::read_to_string(repo_root().join(toml)).unwrap();
    let offset = text.find("dir = ").unwrap() + "dir = ".len();
    let line = text[..offset].matches('\n').count() + 1;
    let col = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
    let at_dir = format!("{toml}:{line}:{col}");
    // Empty: KMM's copy would fail on it.
    let p = project_with_output();
    fs::remove_file(p.path().join("modules/kmf_fw/firmware/kmf_fw/hello.bin")).unwrap();
    fails_cleanly(
        &p,
        &[
            &at_dir,
            "firmware dir \"firmware\" holds no file: KMM's `cp -R <firmwarePath>/*` fails on an empty folder",
        ],
    );
    // A link out of the module folder, named (as every such link in a module folder is),
    // whether absolute or climbing out.
    for target in ["/etc/hostname", "../../../kmf_hello/kmf_hello.c"] {
        let p = project_with_output();
        std::os::unix::fs::symlink(
            target,
            p.path().join("modules/kmf_fw/firmware/kmf_fw/host.bin"),
        )
        .unwrap();
        fails_cleanly(
            &p,
            &[&format!(
                "modules/kmf_fw/firmware/kmf_fw/host.bin is a symbolic link to {target}, outside its module folder"
            )],
        );
    }
    // A hidden file is not firmware: a folder holding only one is empty.
    let p = project_with_output();
    fs::rename(
        p.path().join("modules/kmf_fw/firmware/kmf_fw/hello.bin"),
        p.path()
            .join("modules/kmf_fw/firmware/kmf_fw/.hello.bin.swp"),
    )
    .unwrap();
    fails_cleanly(&p, &[&at_dir, "firmware dir \"firmware\" holds no file"]);
    // A misspelt key.
    let p = project_with_output();
    p.write(toml, "[firmware]\ndirectory = \"firmware\"\n");
    fails_cleanly(
        &p,
        &[
            &format!("{toml}:2:1"),
            "unknown field `directory`, expected `dir`",
        ],
    );
}

#[test]
fn no_engine_installed() {
    let p = project_with_output();
    let empty = tempfile::tempdir().unwrap();
    let before = snapshot(&p.out());
    let mut cmd = p.xtask(&["build-all"]);
    cmd.env("PATH", empty.path());
    let r = run(cmd).failed();
    assert!(
        r.stderr
            .contains("no container engine found: kmodforge needs podman or docker"),
        "{}",
        r.all()
    );
    assert!(
        r.stderr.contains("cargo xtask deps --install"),
        "{}",
        r.all()
    );
    assert_eq!(snapshot(&p.out()), before);
    for engine in ["podman", "docker"] {
        let mut cmd = p.xtask(&["--engine", engine, "build-all"]);
        cmd.env("PATH", empty.path());
        let r = run(cmd).failed();
        assert!(
            r.stderr
                .contains(&format!("{engine} is not installed (not found on PATH)")),
            "{}",
            r.all()
        );
    }
}

#[test]
fn an_engine_that_cannot_run_containers() {
    // The real docker CLI with no daemon behind it.
    require("docker", "docker.io");
    let p = project_with_output();
    let before: Vec<_> = snapshot(&p.out());
    let mut cmd = p.xtask(&["--engine", "docker", "build-all"]);
    cmd.env("DOCKER_HOST", "unix:///nonexistent/kmodforge-test.sock");
    let r = run(cmd).failed();
    assert!(
        r.stderr
            .contains("docker cannot run containers on this machine"),
        "{}",
        r.all()
    );
    assert!(r.stderr.contains("start the Docker daemon"), "{}", r.all());
    let after: Vec<_> = snapshot(&p.out())
        .into_iter()
        .filter(|(path, _)| !path.starts_with(p.out().join(".kmodforge")))
        .collect();
    assert_eq!(after, before);
}

#[test]
fn unknown_kernel_on_the_command_line() {
    let p = project_with_output();
    let r = p.run(&["build", "--kernel", "6.1.0-47"]).failed();
    assert!(
        r.stderr.contains("kernel \"6.1.0-47\" is not listed in")
            && r.stderr.contains("listed kernels: 6.1.0-47-amd64"),
        "{}",
        r.all()
    );
}

#[test]
fn help_explains_the_commands() {
    let p = project_with_output();
    let r = p.run(&["--help"]).ok();
    for words in [
        "build-all",
        "Build every module for every kernel",
        "--engine",
        "KMODFORGE_ENGINE",
        "kernels.toml",
    ] {
        assert!(
            r.stdout.contains(words),
            "{words:?} missing from --help:\n{}",
            r.stdout
        );
    }
    let r = p.run(&["build-all", "--help"]).ok();
    assert!(
        r.stdout.contains("--jobs") && r.stdout.contains("--no-wait") && r.stdout.contains("logs"),
        "{}",
        r.stdout
    );
    // The stand-in engine below would make any build fail: --help must not touch it.
    let fake = tempfile::tempdir().unwrap();
    fs::write(fake.path().join("podman"), "#!/bin/sh\nexit 1\n").unwrap();
    fs::set_permissions(
        fake.path().join("podman"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let mut cmd = p.xtask(&["plan"]);
    cmd.env("PATH", fake.path());
    let r = run(cmd).ok();
    assert!(
        r.stdout.contains("6.1.0-47-amd64")
            && r.stdout.contains("build kmf_user (needs kmf_export)"),
        "{}",
        r.stdout
    );
}
