//! Hostile and unlucky inputs (issue 13): each case checks the exit status, the message
//! (what, where, what to do), that the outputs already there are intact, and that the
//! run left no container behind. Ctrl-C and SIGTERM are in tests/build.rs, a cancel
//! racing a start in tests/cancel.rs, `kill -9` and the next run's reaping in
//! tests/reap.rs; the exact argv of the in-cluster build in a unit test of
//! handoff/kmm/dockerfile.rs.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

/// A project for `K61` with a previous output in place that no failed run may touch.
fn project() -> Project {
    let p = Project::new(&[K61]);
    p.write(
        &format!("out/{K61}/lib/modules/{K61}/kmf_hello.ko"),
        "previous good build",
    );
    p
}

/// Runs xtask; returns the run and checks no container of it is left.
fn run_checked(p: &Project, args: &[&str]) -> Run {
    let child = p
        .xtask(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    if which("podman") {
        assert_eq!(
            containers_of("podman", pid),
            Vec::<String>::new(),
            "containers left behind"
        );
    }
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `args` fails with every fragment of `expected` in its error, the outputs untouched.
fn refused(p: &Project, args: &[&str], expected: &[&str]) -> Run {
    let before = outputs(&p.out());
    let r = run_checked(p, args).failed();
    for e in expected {
        assert!(r.stderr.contains(e), "expected {e:?} in:\n{}", r.all());
    }
    assert_eq!(outputs(&p.out()), before, "outputs changed");
    r
}

/// The outputs a run must not damage (its own bookkeeping aside).
fn outputs(out: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    snapshot(out)
        .into_iter()
        .filter(|(path, _)| {
            !path.starts_with(out.join(".kmodforge")) && !path.starts_with(out.join("logs"))
        })
        .collect()
}

fn set_kernels_toml(p: &Project, rest: &str) {
    p.write("kernels.toml", &format!("{}{rest}", toolchains_section()));
}

/// `needle`'s `file:line:col` in the project's kernels.toml.
fn at(p: &Project, needle: &str) -> String {
    let path = p.path().join("kernels.toml");
    let text = fs::read_to_string(&path).unwrap();
    let offset = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in kernels.toml"));
    let line = text[..offset].matches('\n').count() + 1;
    let col = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("{}:{line}:{col}", path.display())
}

/// A project for `K61` with `kmf_hello` alone (one quick compile).
fn hello_only() -> Project {
    let p = Project::new(&[K61]);
    p.keep_modules(&["kmf_hello"]);
    p
}

#[test]
fn links_leaving_a_module_folder_are_refused_by_name() {
    let p = project();
    symlink("/etc/shadow", p.path().join("modules/kmf_hello/secret")).unwrap();
    symlink("/etc", p.path().join("modules/kmf_param/etc")).unwrap();
    for args in [
        &["build-all"][..],
        &["kmm", "--in-cluster-build", "builder"],
        &["plan"],
    ] {
        let r = refused(
            &p,
            args,
            &[
                "modules/kmf_hello/secret is a symbolic link to /etc/shadow, outside its module folder",
                "modules/kmf_param/etc is a symbolic link to /etc, outside its module folder",
                "help: copy the file into the folder",
            ],
        );
        assert!(
            !r.stdout.contains("root:"),
            "a host file leaked: {}",
            r.all()
        );
    }
    // A link that stays inside the folder is fine.
    fs::remove_file(p.path().join("modules/kmf_hello/secret")).unwrap();
    fs::remove_file(p.path().join("modules/kmf_param/etc")).unwrap();
    symlink("kmf_hello.c", p.path().join("modules/kmf_hello/alias.c")).unwrap();
    run_checked(&p, &["plan"]).ok();
}

#[test]
fn a_module_folder_that_is_a_link_is_named_not_skipped() {
    let p = project();
    symlink("/", p.path().join("modules/rootfs")).unwrap();
    refused(
        &p,
        &["plan"],
        &[
            "modules/rootfs is a symbolic link to /",
            "move or copy the folder into modules/",
        ],
    );
}

#[test]
fn recipes_outside_the_project_or_not_files_are_refused_at_their_line() {
    let p = project();
    for (recipe, what) in [
        ("../../etc/passwd", "is outside the project folder"),
        ("/etc/passwd", "is outside the project folder"),
        ("images", "is a directory, not a Containerfile"),
    ] {
        let text = toolchains_section().replace(
            "recipe = \"images/toolchain-debian.Containerfile\"",
            &format!("recipe = \"{recipe}\""),
        );
        p.write(
            "kernels.toml",
            &format!("{text}[[kernel]]\nversion = \"{K61}\"\n"),
        );
        refused(
            &p,
            &["build-all"],
            &[&at(&p, &format!("\"{recipe}\"")), what, "help:"],
        );
    }
    // A recipe that COPYs a file from outside its folder.
    p.write(
        "images/evil.Containerfile",
        "FROM scratch\nCOPY ../../../etc/passwd /x\n",
    );
    let text = toolchains_section().replace(
        "images/toolchain-debian.Containerfile",
        "images/evil.Containerfile",
    );
    p.write(
        "kernels.toml",
        &format!("{text}[[kernel]]\nversion = \"{K61}\"\n"),
    );
    refused(
        &p,
        &["build-all"],
        &["copies ../../../etc/passwd, which is outside its folder"],
    );
}

#[test]
fn registries_with_a_path_a_scheme_or_a_bad_port_are_refused() {
    let p = project();
    for key in [
        "registry.example.com/path",
        "https://registry.example.com",
        "registry.example.com:99999",
    ] {
        set_kernels_toml(
            &p,
            &format!("[[kernel]]\nversion = \"{K61}\"\n[registries.\"{key}\"]\ninsecure = true\n"),
        );
        refused(&p, &["plan"], &[&at(&p, &format!("\"{key}\""))]);
    }
}

#[test]
fn kernel_versions_the_engine_or_kmm_cannot_use_are_refused() {
    let p = project();
    let long = format!("6.1.0-{}", "a".repeat(300));
    set_kernels_toml(&p, &format!("[[kernel]]\nversion = \"{long}\"\n"));
    let r = refused(
        &p,
        &["build-all"],
        &[
            &at(&p, &format!("\"{}", &long[..10])),
            "306 characters long",
            "`uname -r` prints at most 64",
        ],
    );
    assert!(
        r.stderr.len() < 2000,
        "the long value is cut: {}",
        r.stderr.len()
    );
    // KMM needs major.minor.patch to map a kernel at all.
    set_kernels_toml(&p, "[[kernel]]\nversion = \"6.1+foo\"\n");
    refused(
        &p,
        &["plan"],
        &[&at(&p, "\"6.1+foo\""), "expected at least three components"],
    );
    // Two kernels differing only in case.
    set_kernels_toml(
        &p,
        &format!(
            "[[kernel]]\nversion = \"{K61}\"\n[[kernel]]\nversion = \"{}\"\n",
            K61.to_uppercase()
        ),
    );
    refused(
        &p,
        &["plan"],
        &["differs from kernel 6.1.0-47-amd64 only in case"],
    );
}

#[test]
fn a_huge_config_value_is_cut_in_the_message() {
    let p = project();
    let huge = "x".repeat(10 << 20);
    set_kernels_toml(
        &p,
        &format!("[[kernel]]\nversion = \"{K61}\"\ntoolchain = \"{huge}\"\n"),
    );
    let r = refused(&p, &["plan"], &["no toolchain named", "characters)"]);
    assert!(r.stderr.len() < 1000, "{} bytes of error", r.stderr.len());
}

#[test]
fn an_unbraced_kernel_variable_gives_each_kernel_its_own_tag() {
    let p = project();
    set_kernels_toml(
        &p,
        &format!(
            "[[kernel]]\nversion = \"{K61}\"\n[[kernel]]\nversion = \"{K612}\"\n[image]\nname = \"quay.io/x/kmods:$KERNEL_FULL_VERSION\"\n"
        ),
    );
    let m: serde_json::Value =
        serde_json::from_str(&run_checked(&p, &["matrix"]).ok().stdout).unwrap();
    let tags: Vec<&str> = m["include"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["tags"].as_str().unwrap())
        .collect();
    assert_eq!(tags, [K61, "6.12.117_deb12-amd64"]);
    // A variable KMM does not define would be empty there: refused at its line.
    set_kernels_toml(
        &p,
        &format!("[[kernel]]\nversion = \"{K61}\"\n[image]\nname = \"quay.io/x/kmods:$KVER\"\n"),
    );
    refused(
        &p,
        &["plan"],
        &[
            &at(&p, "\"quay.io/x/kmods:$KVER\""),
            "$KVER is not one of KMM's variables",
        ],
    );
}

#[test]
fn module_toml_reports_every_problem_at_once() {
    let p = project();
    p.write(
        "modules/kmf_hello/module.toml",
        "kernels = \"(\"\nmake = []\nbuilt-modules = [\"../x.ko\"]\n",
    );
    let r = refused(
        &p,
        &["plan"],
        &["module.toml:1:11", "module.toml:2:8", "module.toml:3:18"],
    );
    assert!(r.stderr.contains("(3 problems)"), "{}", r.all());
}

#[test]
fn verify_of_a_missing_image_path_says_it_is_missing() {
    let p = project();
    let r = refused(
        &p,
        &["verify", "--kernel", K61, "--image", "/nonexistent/layout"],
        &[],
    );
    assert!(
        r.stdout
            .contains("/nonexistent/layout is not an OCI image layout"),
        "{}",
        r.all()
    );
    assert!(!r.all().contains("run `cargo xtask image`"), "{}", r.all());
}

#[test]
fn a_read_only_or_full_output_directory_is_named_and_the_summary_kept() {
    require("podman", "podman");
    let p = project();
    let mnt = tempfile::tempdir().unwrap();
    let mount = |opts: &str| {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(mnt.path())
            .status()
            .unwrap();
        assert!(
            ok.success(),
            "this test mounts a tmpfs (it runs as root, as CI does)"
        );
    };
    let umount = || {
        Command::new("umount").arg(mnt.path()).status().unwrap();
    };
    mount("size=1M,ro");
    let out = mnt.path().to_str().unwrap().to_string();
    let r = run_checked(&p, &["--out", &out, "build", "--kernel", K61]).failed();
    umount();
    assert!(
        r.stderr.contains(&out) && r.stderr.contains("Read-only file system"),
        "{}",
        r.all()
    );

    mount("size=1M");
    let fill = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "count=100"])
        .arg(format!("of={out}/fill"))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!fill.success(), "the file system is full");
    let r = run_checked(&p, &["--out", &out, "build", "--kernel", K61]);
    umount();
    let r = r.failed();
    assert!(
        r.stdout.contains("kernel ") && r.stdout.contains("FAILED"),
        "the summary table: {}",
        r.all()
    );
    assert!(r.stderr.contains("No space left on device"), "{}", r.all());
    assert!(
        r.stderr.contains(&out),
        "the error names the path: {}",
        r.all()
    );
}

#[test]
fn a_failed_recipe_shows_the_engines_error_line() {
    require("podman", "podman");
    let p = project();
    p.write(
        "images/fails.Containerfile",
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN for i in $(seq 1 40); do echo line $i; done; false\n",
    );
    let text = toolchains_section().replace(
        "images/toolchain-debian.Containerfile",
        "images/fails.Containerfile",
    );
    p.write(
        "kernels.toml",
        &format!("{text}[[kernel]]\nversion = \"{K61}\"\n"),
    );
    refused(
        &p,
        &["--engine", "podman", "build-all"],
        &["| Error: building at STEP", "toolchain.log"],
    );
}

/// A build that writes megabytes of output keeps a capped log (its head, a marker, its
/// tail), and leaves no work folder behind.
#[test]
fn logs_are_capped_and_work_folders_removed() {
    require("podman", "podman");
    let p = hello_only();
    p.write(
        "modules/kmf_hello/module.toml",
        "make = [\"sh\", \"-c\", \"yes kmodforge-noise | head -c 3000000; make -C \\\"$1\\\" M=\\\"$2\\\" modules\", \"sh\", \"${kernel_source_dir}\", \"${module_dir}\"]\n",
    );
    let mut cmd = p.xtask(&["--engine", "podman", "build-all"]);
    cmd.env("KMODFORGE_LOG_CAP", "200000");
    run(cmd).ok();
    let log = p.out().join("logs").join(K61).join("kmf_hello.log");
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.len() < 200_000 + 4096, "{} bytes kept", text.len());
    assert!(
        text.contains("bytes of output cut here"),
        "the cut is marked"
    );
    assert!(
        text.contains("kmf_hello.ko"),
        "the tail, with the build's last lines, is kept"
    );
    let tmp = p.out().join(".kmodforge/tmp");
    let left: Vec<_> = fs::read_dir(&tmp).map(|d| d.collect()).unwrap_or_default();
    assert!(
        left.is_empty(),
        "work folders left in {}: {left:?}",
        tmp.display()
    );
}

/// A C module that needs a Rust module, on a kernel without Rust: both are skipped, and
/// the run succeeds with what built.
#[test]
fn a_skip_propagates_as_a_skip() {
    require("podman", "podman");
    let p = Project::new(&[K61]);
    copy_tree(
        &p.path().join("modules/kmf_hello"),
        &p.path().join("modules/kmf_needs_rust"),
    );
    fs::rename(
        p.path().join("modules/kmf_needs_rust/kmf_hello.c"),
        p.path().join("modules/kmf_needs_rust/kmf_needs_rust.c"),
    )
    .unwrap();
    p.write(
        "modules/kmf_needs_rust/Kbuild",
        "obj-m := kmf_needs_rust.o\n",
    );
    p.write(
        "modules/kmf_needs_rust/module.toml",
        "depends = [\"kmf_rust\"]\n",
    );
    let r = run_checked(&p, &["--engine", "podman", "build-all"]).ok();
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with(K61) && l.contains("skipped")),
        "{}",
        r.all()
    );
    assert!(
        p.moddir(K61).join("modules.dep").is_file(),
        "the kernel ships what built"
    );
}

/// A damaged `.ko` never reaches an image: a no-op run notices a staging tree or a
/// build result that no longer matches its record and remakes it, so the image keeps
/// the good content.
#[test]
fn a_damaged_module_never_reaches_an_image() {
    require("podman", "podman");
    let p = Project::new(&[K61]);
    let toml = fs::read_to_string(p.path().join("kernels.toml")).unwrap();
    p.write(
        "kernels.toml",
        &format!("{toml}[image]\nbase = \"busybox\"\n"),
    );
    let image = |p: &Project| {
        let mut cmd = p.xtask(&["--engine", "podman", "image", "--kernel", K61, "--no-load"]);
        cmd.env("SOURCE_DATE_EPOCH", "1700000000");
        run(cmd).ok()
    };
    image(&p);
    let good = snapshot(&p.out().join("images").join(K61));
    let staged = p.moddir(K61).join("kmf_hello.ko");
    let good_ko = fs::read(&staged).unwrap();
    let truncate = |path: &Path| {
        let len = fs::metadata(path).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    };
    truncate(&staged);
    let again = image(&p);
    assert!(
        again.started().iter().any(|j| j.starts_with("depmod")),
        "the damaged tree is remade: {}",
        again.all()
    );
    assert_eq!(fs::read(&staged).unwrap(), good_ko);

    let artifact = p.out().join(format!(
        ".kmodforge/kernels/{K61}/modules/kmf_hello/artifacts/kmf_hello.ko"
    ));
    truncate(&artifact);
    truncate(&staged);
    let again = image(&p);
    assert!(
        again.started().iter().any(|j| j.starts_with("kmf_hello")),
        "the damaged build result is rebuilt: {}",
        again.all()
    );
    assert_eq!(fs::read(&staged).unwrap(), good_ko);
    assert_eq!(
        snapshot(&p.out().join("images").join(K61)),
        good,
        "the image is the good one"
    );
}

/// `kmm --in-cluster-build` refuses a Dockerfile past a ConfigMap's 1 MiB.
#[test]
fn an_in_cluster_build_past_a_config_map_is_refused_with_its_size() {
    require("podman", "podman");
    let p = hello_only();
    // xorshift noise: gzip cannot shrink it.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let noise: Vec<u8> = (0..2_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(p.path().join("modules/kmf_hello/firmware.bin"), noise).unwrap();
    run_checked(&p, &["--engine", "podman", "build-all"]).ok();
    let r = refused(
        &p,
        &["kmm", "--in-cluster-build", "builder"],
        &["a ConfigMap holds at most 1048576", "help:"],
    );
    assert!(r.stdout.is_empty(), "no manifest is written: {}", r.stdout);
}

/// One binary, two checkouts (a target directory shared by both, as with a global
/// CARGO_TARGET_DIR): the binary built here, run in checkout B, reads checkout B, both
/// as `cargo run` starts it (CARGO_MANIFEST_DIR=B/xtask) and run directly from B.
#[test]
fn a_binary_shared_by_two_checkouts_reads_the_one_it_runs_in() {
    let b = project();
    p_rename_module(&b, "kmf_hello", "kmf_only_in_b");
    fs::create_dir_all(b.path().join("xtask")).unwrap();
    let plan = |cmd: &mut Command| {
        let out = cmd
            .arg("plan")
            .env_remove("KMODFORGE_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bin = env!("CARGO_BIN_EXE_xtask");
    let as_cargo_runs_it = plan(
        Command::new(bin)
            .current_dir(b.path().join("modules"))
            .env("CARGO_MANIFEST_DIR", b.path().join("xtask")),
    );
    let run_directly = plan(
        Command::new(bin)
            .current_dir(b.path().join("modules"))
            .env_remove("CARGO_MANIFEST_DIR"),
    );
    for listed in [as_cargo_runs_it, run_directly] {
        assert!(listed.contains("kmf_only_in_b"), "{listed}");
        assert!(
            !listed.contains("kmf_hello"),
            "read the checkout it was built in: {listed}"
        );
    }
}

fn p_rename_module(p: &Project, from: &str, to: &str) {
    let dir = p.path().join("modules");
    fs::rename(dir.join(from), dir.join(to)).unwrap();
    fs::rename(
        dir.join(to).join(format!("{from}.c")),
        dir.join(to).join(format!("{to}.c")),
    )
    .unwrap();
    p.write(
        &format!("modules/{to}/Kbuild"),
        &format!("obj-m := {to}.o\n"),
    );
}
