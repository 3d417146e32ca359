//! The KMM hand-off against KMM itself: its CRD schema (made strict), the rules of its
//! admission webhook (xtask/tests/kmm/webhook-rules.md), the `.ko` files a real build
//! made, and the in-cluster Dockerfile built with podman from a kmodforge builder image
//! (no Driver Toolkit), compared file for file with the local build.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

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

/// The rules of KMM's admission webhook that kmodforge's output touches (rule numbers
/// of webhook-rules.md; 40, not 41, for rule 1: every released 2.x).
fn webhook_errors(m: &serde_json::Value) -> Vec<String> {
    let mut errors = Vec::new();
    let name = m["metadata"]["name"].as_str().unwrap_or("");
    let ns = m["metadata"]["namespace"].as_str().unwrap_or("");
    if name.len() + ns.len() > 40 {
        errors.push(format!("1: {name}+{ns} longer than 40"));
    }
    for t in m["spec"]["tolerations"].as_array().into_iter().flatten() {
        if t.get("key").is_none() && t["operator"] != "Exists" {
            errors.push("3: empty key needs Exists".into());
        }
    }
    let c = &m["spec"]["moduleLoader"]["container"];
    let dir = c["modprobe"]["dirName"].as_str().unwrap_or("/opt");
    for (i, k) in c["kernelMappings"].as_array().unwrap().iter().enumerate() {
        if k.get("literal").is_some() == k.get("regexp").is_some() {
            errors.push(format!(
                "15/16: mapping {i} needs exactly one of literal, regexp"
            ));
        }
        let image = k["containerImage"].as_str().unwrap_or("");
        if !image.contains([':', '@']) {
            errors.push(format!("19: {image} has no tag or digest"));
        }
        for f in k["sign"]["filesToSign"].as_array().into_iter().flatten() {
            if !f.as_str().unwrap().starts_with(&format!("{dir}/")) {
                errors.push(format!("30: {f} not under {dir}/"));
            }
        }
    }
    let p = &c["modprobe"];
    if let Some(order) = p["modulesLoadingOrder"].as_array() {
        if order.len() < 2 {
            errors.push("24: loading order shorter than 2".into());
        }
        if order.first() != Some(&p["moduleName"]) {
            errors.push("26: first of the loading order is not moduleName".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        if !order.iter().all(|o| seen.insert(o.as_str().unwrap())) {
            errors.push("27: duplicate in the loading order".into());
        }
    }
    errors
}

/// Every `.ko` of a tree, by module name (`-` as `_`).
fn ko_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walkdir(dir) {
        if let Some(name) = e
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            out.push(name.replace('-', "_"));
        }
    }
    out.sort();
    out
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_symlink() {
            continue;
        }
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

const KMM_SETTINGS: &str = "[kmm]\nname = \"kmf-demo\"\nnamespace = \"drivers\"\nimage-repo-secret = \"pull-secret\"\n\
     selector = { \"feature.node.kubernetes.io/kmf\" = \"true\" }\n\
     tolerations = [{ key = \"nvidia.com/gpu\", operator = \"Exists\", effect = \"NoSchedule\" }]\n\
     [image]\nname = \"registry.example.com:5000/drivers/$MOD_NAME:${KERNEL_FULL_VERSION}\"\nprefix = \"/opt\"\n\
     base = \"localhost/kmodforge/debian:bookworm\"\n\
     [registries.\"registry.example.com:5000\"]\ninsecure-skip-tls-verify = true\n";

fn project_with(settings: &str) -> Project {
    let p = Project::new(&[K61, K612]);
    let toml = fs::read_to_string(p.path().join("kernels.toml")).unwrap();
    p.write("kernels.toml", &format!("{toml}{settings}"));
    p
}

/// One built project shared by the tests below (a build is the slow part).
fn built() -> &'static Project {
    static P: std::sync::OnceLock<Project> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        require("podman", "podman");
        let p = project_with(KMM_SETTINGS);
        let before = p.run(&["kmm"]).failed();
        assert!(
            before.stderr.contains("no current build")
                && before.stderr.contains("cargo xtask build-all"),
            "without build results kmm must say what is missing: {}",
            before.all()
        );
        p.run(&["--engine", "podman", "build-all"]).ok();
        p
    })
}

#[test]
fn kmm_manifests_pass_the_crd_and_the_webhook_and_load_real_modules() {
    let p = built();
    let validator = jsonschema::validator_for(&module_schema()).unwrap();
    let yaml = p.run(&["kmm"]).ok().stdout;
    assert!(yaml.starts_with("# KMM manifests"), "{yaml}");
    assert!(
        yaml.contains("# images not pinned by digest"),
        "nothing was pushed: {yaml}"
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
            "kmf-demo-kmf-fw",
            "kmf-demo-kmf-hello",
            "kmf-demo-kmf-nested",
            "kmf-demo-kmf-param",
            "kmf-demo-kmf-user"
        ],
        "the Rust module has no kernel here; kmf_export loads with kmf_user"
    );
    for m in &modules {
        // KMM copies a Module's firmwarePath to the node before modprobe: kmf_fw's only.
        let firmware = &m["spec"]["moduleLoader"]["container"]["modprobe"]["firmwarePath"];
        if m["metadata"]["name"] == "kmf-demo-kmf-fw" {
            assert_eq!(firmware, "/opt/firmware/kmf_fw");
        } else {
            assert!(firmware.is_null(), "{m:#}");
        }
        let crd: Vec<String> = validator
            .iter_errors(m)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            crd.is_empty(),
            "{} breaks KMM's CRD: {crd:#?}",
            m["metadata"]["name"]
        );
        assert_eq!(webhook_errors(m), Vec::<String>::new(), "{m:#}");
        let c = &m["spec"]["moduleLoader"]["container"];
        assert_eq!(m["spec"]["tolerations"][0]["key"], "nvidia.com/gpu");
        assert_eq!(
            m["spec"]["selector"]["feature.node.kubernetes.io/kmf"],
            "true"
        );
        assert_eq!(c["registryTLS"]["insecureSkipTLSVerify"], true);
        for k in c["kernelMappings"].as_array().unwrap() {
            let kver = k["literal"].as_str().unwrap();
            // moduleName and every loading-order entry are .ko files of the kernel's tree.
            let kos = ko_names(&p.moddir(kver));
            let p_ = &c["modprobe"];
            assert!(
                kos.contains(&p_["moduleName"].as_str().unwrap().to_string()),
                "{kos:?} {p_}"
            );
            for o in p_["modulesLoadingOrder"].as_array().into_iter().flatten() {
                assert!(
                    kos.contains(&o.as_str().unwrap().to_string()),
                    "{o} not in {kos:?}"
                );
            }
            // The image KMM resolves (unbraced $MOD_NAME, '+' normalized) is kmodforge's.
            let tag = kver.replace('+', "_");
            assert_eq!(
                k["containerImage"],
                format!("registry.example.com:5000/drivers/kmf-demo:{tag}")
            );
        }
    }
    let user = &modules[5]["spec"]["moduleLoader"]["container"]["modprobe"];
    assert_eq!(
        user["modulesLoadingOrder"],
        serde_json::json!(["kmf_user", "kmf_export"])
    );
    let param = &modules[4]["spec"]["moduleLoader"]["container"]["modprobe"];
    assert_eq!(
        param["parameters"],
        serde_json::json!(["greeting=kmodforge", "repeat=3"])
    );
}

#[test]
fn kmm_refuses_names_the_webhook_refuses_and_offers_versions_and_regexps() {
    let p = built();
    let regexp = docs(
        &p.run(&["kmm", "--regexp", "--version", "2026.11.27"])
            .ok()
            .stdout,
    );
    let c = &regexp[0]["spec"]["moduleLoader"]["container"];
    assert_eq!(c["version"], "2026.11.27");
    let mappings = c["kernelMappings"].as_array().unwrap();
    assert_eq!(mappings.len(), 1);
    let re = regex::Regex::new(mappings[0]["regexp"].as_str().unwrap()).unwrap();
    assert!(re.is_match(K61) && re.is_match(K612) && !re.is_match("6.1.0-47-amd64x"));
    assert_eq!(
        mappings[0]["containerImage"],
        "registry.example.com:5000/drivers/kmf-demo:${KERNEL_FULL_VERSION}"
    );

    let long = project_with(&KMM_SETTINGS.replace("kmf-demo", "kmf-a-rather-long-module-prefix"));
    let out = p.out();
    let r = long.run(&["--out", out.to_str().unwrap(), "kmm"]).failed();
    assert!(
        r.stderr.contains("KMM's webhook allows 40") && r.stderr.contains("shorten [kmm] name"),
        "{}",
        r.all()
    );
}

#[test]
fn kmm_signing_and_in_cluster_builds_are_one_per_kernel() {
    let p = built();
    let signed = project_with(&format!(
        "{KMM_SETTINGS}[kmm.sign]\nkey-secret = \"signing-key\"\ncert-secret = \"signing-cert\"\n"
    ));
    let out = p.out();
    let all = docs(
        &signed
            .run(&[
                "--out",
                out.to_str().unwrap(),
                "kmm",
                "--in-cluster-build",
                "builder",
            ])
            .ok()
            .stdout,
    );
    assert_eq!(all[0]["kind"], "ConfigMap");
    assert_eq!(all[0]["metadata"]["namespace"], "drivers");
    let validator = jsonschema::validator_for(&module_schema()).unwrap();
    let mut builds = Vec::new();
    for m in &all[1..] {
        assert!(validator.iter_errors(m).next().is_none(), "{m:#}");
        assert_eq!(webhook_errors(m), Vec::<String>::new(), "{m:#}");
        for k in m["spec"]["moduleLoader"]["container"]["kernelMappings"]
            .as_array()
            .unwrap()
        {
            let kver = k["literal"].as_str().unwrap().to_string();
            assert!(
                k["containerImage"]
                    .as_str()
                    .unwrap()
                    .contains("/drivers/kmf-demo-signed:")
            );
            if k.get("build").is_some() {
                assert_eq!(k["build"]["buildArgs"][0]["name"], "KMODFORGE_BUILDER");
                assert_eq!(
                    k["build"]["buildArgs"][0]["value"],
                    format!(
                        "registry.example.com:5000/drivers/kmf-demo-builder:{}",
                        kver.replace('+', "_")
                    )
                );
                let files: Vec<&str> = k["sign"]["filesToSign"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap())
                    .collect();
                assert_eq!(files.len(), ko_names(&p.moddir(&kver)).len(), "{files:?}");
                assert!(
                    files.iter().all(|f| f.starts_with("/opt/lib/modules/*/")),
                    "{files:?}"
                );
                builds.push(kver);
            } else {
                assert!(k.get("sign").is_none(), "only the kernel's builder signs");
            }
        }
    }
    builds.sort();
    assert_eq!(builds, [K61, K612], "exactly one build per kernel");

    let dtk = docs(&p.run(&["kmm", "--in-cluster-build", "dtk"]).ok().stdout);
    let dockerfile = dtk[0]["data"]["dockerfile"].as_str().unwrap();
    assert!(
        dockerfile.contains("FROM ${DTK_AUTO} AS build"),
        "{dockerfile}"
    );
    assert!(
        dockerfile.contains("kernel $kver is not in kernels.toml"),
        "{dockerfile}"
    );
}

#[test]
fn preflight_checks_mappings_and_images_first() {
    let p = built();
    let r = p.run(&["kmm", "--preflight", K61]).failed();
    assert!(
        r.stderr.contains("is not pushed") && r.stderr.contains("image --push --kernel"),
        "{}",
        r.all()
    );
    let r = p.run(&["kmm", "--preflight", "6.1.0-99-amd64"]).failed();
    assert!(r.stderr.contains("is not in"), "{}", r.all());
    let ok = docs(
        &p.run(&["kmm", "--preflight", K612, "--in-cluster-build", "builder"])
            .ok()
            .stdout,
    );
    assert_eq!(ok[0]["apiVersion"], "kmm.sigs.x-k8s.io/v1beta2");
    assert_eq!(ok[0]["kind"], "PreflightValidation");
    assert_eq!(ok[0]["spec"]["kernelVersion"], K612);
    assert_eq!(ok[0]["spec"]["pushBuiltImage"], true);
    let ocp = docs(
        &p.run(&[
            "kmm",
            "--preflight",
            K612,
            "--in-cluster-build",
            "dtk",
            "--ocp",
            "--dtk-image",
            "quay.io/x/dtk@sha256:00",
        ])
        .ok()
        .stdout,
    );
    assert_eq!(ocp[0]["kind"], "PreflightValidationOCP");
    assert_eq!(ocp[0]["spec"]["dtkImage"], "quay.io/x/dtk@sha256:00");
}

/// `podman build` of the in-cluster Dockerfile in `ctx` for `kver`, from `builder`.
fn podman_build(builder: &str, kver: &str, tag: &str, ctx: &Path) -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["build", "--runtime=runc", "--ulimit=nofile=1024:1024"])
        .arg("--ulimit=nproc=4096:4096")
        .args(["--build-arg", &format!("KMODFORGE_BUILDER={builder}")])
        .args(["--build-arg", &format!("KERNEL_FULL_VERSION={kver}")])
        .args(["-t", tag])
        .arg(ctx);
    cmd
}

/// The in-cluster build on a cluster without the Driver Toolkit: kmodforge's builder
/// image as KMODFORGE_BUILDER, the Dockerfile from the ConfigMap built by podman (as
/// kaniko builds it: the Dockerfile is the whole context), and the tree KMM's worker
/// copies out holds the very files the local build made.
#[test]
fn the_in_cluster_dockerfile_builds_from_a_builder_image_what_build_all_builds() {
    let p = built();
    p.run(&["--engine", "podman", "builders", "--kernel", K61])
        .ok();
    let builder = format!("registry.example.com:5000/drivers/kmf-demo-builder:{K61}");
    let manifests = docs(&p.run(&["kmm", "--in-cluster-build", "builder"]).ok().stdout);
    let ctx = tempfile::tempdir().unwrap();
    fs::write(
        ctx.path().join("Dockerfile"),
        manifests[0]["data"]["dockerfile"].as_str().unwrap(),
    )
    .unwrap();
    let tag = "localhost/kmodforge-test/in-cluster:1";
    let built = podman_build(&builder, K61, tag, ctx.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        built.success(),
        "the in-cluster Dockerfile must build FROM kmodforge's builder"
    );

    // KMM's init container; kmf_fw's Module adds the copy of its firmwarePath.
    let copy = tempfile::tempdir().unwrap();
    let init = format!(
        "mkdir -p /tmp/opt/lib/modules; cp -R /opt/lib/modules/{K61} /tmp/opt/lib/modules; \
         mkdir -p /tmp/opt/firmware/kmf_fw; cp -R /opt/firmware/kmf_fw/* /tmp/opt/firmware/kmf_fw"
    );
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
    let copied = copy.path().join("lib/modules").join(K61);
    let relative = |dir: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        snapshot(dir)
            .into_iter()
            .map(|(path, data)| (path.strip_prefix(dir).unwrap().to_path_buf(), data))
            .collect()
    };
    assert_eq!(
        relative(&copied),
        relative(&p.moddir(K61)),
        "same .ko bytes, same depmod files"
    );
    assert_eq!(
        fs::read_link(copied.join("host")).unwrap(),
        fs::read_link(p.moddir(K61).join("host")).unwrap()
    );
    // The firmware where kmodforge's own image holds it.
    assert_eq!(
        relative(&copy.path().join("firmware/kmf_fw")),
        relative(&p.path().join("modules/kmf_fw/firmware")),
        "kmf_fw's firmware, as in kmodforge's layer"
    );

    // A kernel kernels.toml does not list fails the build, loudly.
    let unknown = podman_build(
        &builder,
        "6.1.0-99-amd64",
        "localhost/kmodforge-test/in-cluster:2",
        ctx.path(),
    )
    .output()
    .unwrap();
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr)
            .contains("kernel 6.1.0-99-amd64 is not in kernels.toml")
    );
}
