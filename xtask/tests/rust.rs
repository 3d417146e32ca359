//! Rust-for-Linux: the Rust-enabled kernel's toolchain (built from Debian's kernel
//! source), the Rust module built for it and skipped elsewhere, loaded in that kernel
//! under QEMU, and rust-project.json for editors.

mod common;

use std::fs;
use std::path::Path;

use common::*;

const KRUST: &str = "6.12.117-kmodforge-rust";

fn project() -> Project {
    let p = Project::new(&[]);
    p.write(
        "kernels.toml",
        &format!(
            "{}[[kernel]]\nversion = \"{K61}\"\n[[kernel]]\nversion = \"{KRUST}\"\ntoolchain = \"rust\"\n\
             [image]\nbase = \"busybox\"\nname = \"localhost/kmodforge-test/rust:${{KERNEL_FULL_VERSION}}\"\n",
            toolchains_section()
        ),
    );
    p
}

#[test]
fn the_rust_module_builds_for_the_rust_kernel_loads_there_and_is_skipped_elsewhere() {
    require("podman", "podman");
    require("qemu-system-x86_64", "qemu-system-x86");
    let p = project();
    let r = p.run(&["--engine", "podman", "build-all"]).ok();

    let ko = p.moddir(KRUST).join("kmf_rust.ko");
    assert!(
        modinfo(&ko, "vermagic").starts_with(&format!("{KRUST} ")),
        "{}",
        r.all()
    );
    assert_eq!(
        modinfo(&ko, "parm"),
        "repeat:How many greetings to log (1-10) (int)"
    );
    // The C modules build for the Rust kernel too.
    for m in ["kmf_hello", "kmf_user", "kmf_nested"] {
        assert!(modinfo(&p.moddir(KRUST).join(format!("{m}.ko")), "vermagic").starts_with(KRUST));
    }
    // Skipped, clearly, where the kernel has no CONFIG_RUST; not a failure.
    assert!(!p.moddir(K61).join("kmf_rust.ko").exists());
    assert!(
        r.stderr.contains(&format!(
            "note: kmf_rust @ {K61} skipped: kernel {K61} was built without CONFIG_RUST"
        )),
        "{}",
        r.all()
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with(K61) && l.contains("skipped")),
        "{}",
        r.stdout
    );
    let dep = fs::read_to_string(p.moddir(KRUST).join("modules.dep")).unwrap();
    assert!(dep.lines().any(|l| l == "kmf_rust.ko:"), "{dep}");

    // KMM manifests map the Rust module to the kernel it was built for, no other.
    let yaml = p.run(&["kmm"]).ok().stdout;
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let rust = docs
        .iter()
        .find(|d| d["spec"]["moduleLoader"]["container"]["modprobe"]["moduleName"] == "kmf_rust")
        .unwrap();
    let mappings = rust["spec"]["moduleLoader"]["container"]["kernelMappings"]
        .as_array()
        .unwrap();
    assert_eq!(mappings.len(), 1, "{rust:#}");
    assert_eq!(mappings[0]["literal"], KRUST);

    // The skip is remembered like a build: a second run does nothing.
    let again = p.run(&["--engine", "podman", "build-all"]).ok();
    assert!(again.stdout.contains("nothing to do"), "{}", again.all());

    // Its image comes out like any other, and loads in its kernel under QEMU.
    let t = p
        .run(&["--engine", "podman", "test", "--kernel", KRUST])
        .ok();
    for m in ["kmf_rust", "kmf_user", "kmf_param"] {
        assert!(
            t.stdout.lines().any(|l| l.starts_with(KRUST)
                && l.contains(&format!(" {m} "))
                && l.contains("PASS")),
            "{}",
            t.all()
        );
    }
    let console =
        fs::read_to_string(p.out().join("logs").join(KRUST).join("qemu-console.log")).unwrap();
    assert!(
        console.contains(&format!(
            "insmod /tmp/opt/lib/modules/{KRUST}/kmf_rust.ko repeat=2"
        )),
        "{console}"
    );
    assert!(
        console.contains("kmf_rust: hello from Rust (2/2)")
            && console.contains("kmf_rust: goodbye after 2 greetings"),
        "{console}"
    );
    // The load test needs only kmodforge's layer; the image comes out like any other.
    assert!(!p.out().join("images").join(KRUST).exists());
    p.run(&[
        "--engine",
        "podman",
        "image",
        "--kernel",
        KRUST,
        "--no-load",
    ])
    .ok();
    assert!(
        p.out()
            .join("images")
            .join(KRUST)
            .join("index.json")
            .is_file()
    );
}

#[test]
fn rust_analyzer_writes_a_project_file_that_points_at_real_sources() {
    require("podman", "podman");
    let p = project();
    p.run(&["--engine", "podman", "build-all"]).ok();
    let r = p
        .run(&[
            "--engine",
            "podman",
            "rust-analyzer",
            "--module",
            "kmf_rust",
        ])
        .ok();
    let path = p.path().join("modules/kmf_rust/rust-project.json");
    assert!(
        r.stdout.contains(&format!("(kernel {KRUST})")),
        "{}",
        r.all()
    );
    let project: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let crates = project["crates"].as_array().unwrap();
    let module_root = p.path().join("modules/kmf_rust/kmf_rust.rs");
    assert!(
        crates
            .iter()
            .any(|c| c["root_module"] == module_root.to_str().unwrap()),
        "the module's own crate points at its folder: {project:#}"
    );
    let kernel = crates
        .iter()
        .find(|c| c["display_name"] == "kernel")
        .expect("the kernel crate");
    let kernel_root = kernel["root_module"].as_str().unwrap();
    assert!(
        Path::new(kernel_root).is_file(),
        "{kernel_root} must exist on the host"
    );
    let core = crates
        .iter()
        .find(|c| c["display_name"] == "core")
        .expect("the core crate");
    assert!(
        Path::new(core["root_module"].as_str().unwrap()).is_file(),
        "{core}"
    );
    let sysroot = project["sysroot"].as_str().unwrap();
    assert!(
        Path::new(sysroot)
            .join("lib/rustlib/src/rust/library/core/src/lib.rs")
            .is_file(),
        "{sysroot} must hold the Rust library"
    );
    assert!(
        !fs::read_to_string(&path).unwrap().contains("/kmodforge/"),
        "no container path is left"
    );
    // What rust-analyzer writes is not an input of the build (git ignores it): the next
    // build-all has nothing to do and starts no container.
    let again = p.run(&["--engine", "podman", "build-all"]).ok();
    assert!(
        again.stdout.contains("nothing to do") && again.started().is_empty(),
        "{}",
        again.all()
    );

    let c = p
        .run(&[
            "--engine",
            "podman",
            "rust-analyzer",
            "--module",
            "kmf_hello",
        ])
        .failed();
    assert!(c.stderr.contains("kmf_hello is a C module"), "{}", c.all());
    let k = p
        .run(&[
            "--engine",
            "podman",
            "rust-analyzer",
            "--module",
            "kmf_rust",
            "--kernel",
            K61,
        ])
        .failed();
    assert!(
        k.stderr
            .contains(&format!("kernel {K61} was built without CONFIG_RUST")),
        "{}",
        k.all()
    );
}
