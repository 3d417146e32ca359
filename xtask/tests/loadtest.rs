//! The QEMU load test on real Debian kernels, its failures, and `verify`.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

const RUN_FLAGS: &[&str] = &[
    "--runtime=runc",
    "--ulimit=nofile=1024:1024",
    "--ulimit=nproc=4096:4096",
];

fn project(kernels: &[&str], image_name: &str) -> Project {
    let p = Project::new(&[]);
    let mut text = toolchains_section();
    for k in kernels {
        text.push_str(&format!("[[kernel]]\nversion = \"{k}\"\n"));
    }
    text.push_str(&format!(
        "[image]\nbase = \"busybox\"\nname = \"{image_name}:${{KERNEL_FULL_VERSION}}\"\n"
    ));
    p.write("kernels.toml", &text);
    p
}

/// The table rows `cargo xtask test` printed: (kernel, module, result, reason).
fn table_rows(r: &Run) -> Vec<(String, String, String, String)> {
    r.stdout
        .lines()
        .filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 5 && ["PASS", "FAIL"].contains(&w[4])
        })
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (
                w[0].to_string(),
                w[1].to_string(),
                w[4].to_string(),
                w[5..].join(" "),
            )
        })
        .collect()
}

/// An image made from `base` by a Containerfile's extra lines, as a third party might
/// build one, exported as an OCI layout.
fn derived_image(base: &str, lines: &str, files: &[(&str, &Path)], tag: &str) -> tempfile::TempDir {
    require("skopeo", "skopeo");
    let ctx = tempfile::tempdir().unwrap();
    for (name, path) in files {
        fs::copy(path, ctx.path().join(name)).unwrap();
    }
    fs::write(
        ctx.path().join("Containerfile"),
        format!("FROM {base}\n{lines}\n"),
    )
    .unwrap();
    let name = format!("localhost/kmodforge-test/derived:{tag}");
    let ok = Command::new("podman")
        .arg("build")
        .args(RUN_FLAGS)
        .args(["-q", "-t", &name])
        .arg(ctx.path())
        .status()
        .unwrap()
        .success();
    assert!(ok, "podman build of the derived image");
    let out = tempfile::tempdir().unwrap();
    let ok = Command::new("skopeo")
        .args(["copy", "--quiet", &format!("containers-storage:{name}")])
        .arg(format!("oci:{}:{tag}", out.path().display()))
        .status()
        .unwrap()
        .success();
    assert!(ok, "skopeo copy of the derived image");
    out
}

#[test]
fn every_example_module_loads_in_its_debian_kernel_as_kmm_loads_it() {
    require("podman", "podman");
    require("qemu-system-x86_64", "qemu-system-x86");
    let p = project(&[K61, K612], "localhost/kmodforge-test/load");
    let r = p.run(&["--engine", "podman", "test", "--all"]).ok();
    let rows = table_rows(&r);
    let modules = [
        "kmf_crc",
        "kmf_export",
        "kmf_fw",
        "kmf_hello",
        "kmf_nested",
        "kmf_param",
        "kmf_user",
    ];
    for k in [K61, K612] {
        for m in modules {
            assert!(
                rows.iter()
                    .any(|row| row.0 == k && row.1 == m && row.2 == "PASS"),
                "{m} on {k} did not pass:\n{}",
                r.all()
            );
        }
        // Each boot's wall time is printed, and its whole console kept.
        assert!(r.stdout.lines().any(|l| l.starts_with(&format!("{k}: booted under QEMU")) && l.contains(" s wall")), "{}", r.all());
        let console =
            fs::read_to_string(p.out().join("logs").join(k).join("qemu-console.log")).unwrap();
        // KMM's worker: the tree copied out of the image, modprobe -d on the copy.
        assert!(console.contains("@@kmodforge copied 0"), "{console}");
        // Loading the user pulled in the exporter first, through modules.dep.
        let user = console.find("@@kmodforge load kmf_user").unwrap();
        let exporter = console[user..]
            .find(&format!("insmod /tmp/opt/lib/modules/{k}/kmf_export.ko"))
            .unwrap();
        let itself = console[user..]
            .find(&format!("insmod /tmp/opt/lib/modules/{k}/kmf_user.ko"))
            .unwrap();
        assert!(
            exporter < itself,
            "kmf_export must load before kmf_user:\n{console}"
        );
        assert!(
            console.contains("kmf_user: kmf_export_add(40, 2) = 42"),
            "{console}"
        );
        // Test parameters from module.toml reached the module.
        assert!(console.contains("kmf_param: kmodforge (3/3)"), "{console}");
        // kmf_crc needs the kernel's own crc7: modprobe found it through the image's
        // host link, in the guest's /lib/modules (where a node has it), and loaded it
        // first.
        let crc = console.find("@@kmodforge load kmf_crc").unwrap();
        let ext = if k == K612 { ".ko.xz" } else { ".ko" };
        let dep = console[crc..]
            .find(&format!(
                "insmod /tmp/opt/lib/modules/{k}/host/kernel/lib/crc7{ext}"
            ))
            .unwrap_or_else(|| panic!("crc7 loaded through the host link:\n{console}"));
        let own = console[crc..].find("kmf_crc.ko").unwrap();
        assert!(dep < own, "{console}");
        assert!(
            console.contains("kmf_crc: crc7_be(\"kmodforge\") = 0x"),
            "{console}"
        );
        // kmf_fw found its firmware where KMM's worker put it.
        assert!(
            console.contains(
                "kmf_fw: firmware kmf_fw/hello.bin (38 bytes) says \"hello from kmf_fw\""
            ),
            "{console}"
        );
    }
    assert_eq!(rows.len(), 14);

    // verify agrees, statically, on the same outputs: every import resolved, kmf_crc's
    // through the host link.
    let v = p.run(&["verify", "--all"]).ok();
    assert!(
        !v.stdout.contains("FAIL")
            && v.stdout.contains("ok    symbols")
            && v.stdout
                .contains("1 on the kernel's own modules, through the host link"),
        "{}",
        v.all()
    );
}

#[test]
fn the_load_test_says_why_a_module_fails() {
    require("podman", "podman");
    require("qemu-system-x86_64", "qemu-system-x86");
    // A module whose init returns an error: kmf_param refuses repeat=0.
    let p = project(&[K612], "localhost/kmodforge-test/fail");
    p.write(
        "modules/kmf_param/module.toml",
        "[test]\nparameters = [\"repeat=0\"]\n",
    );
    let r = p
        .run(&["--engine", "podman", "test", "--kernel", K612])
        .failed();
    let rows = table_rows(&r);
    let param = rows
        .iter()
        .find(|row| row.1 == "kmf_param")
        .unwrap_or_else(|| panic!("{}", r.all()));
    assert_eq!(param.2, "FAIL");
    assert!(
        param.3.contains("Invalid argument") && param.3.contains("repeat=0 is out of range"),
        "{param:?}"
    );
    assert!(
        rows.iter()
            .filter(|row| row.1 != "kmf_param")
            .all(|row| row.2 == "PASS"),
        "{}",
        r.all()
    );
    assert!(r.stderr.contains("1 load test failure"), "{}", r.all());

    // An image someone built without running depmod, from ours (loaded into podman).
    p.run(&["--engine", "podman", "image", "--kernel", K612])
        .ok();
    let image = format!("localhost/kmodforge-test/fail:{}", K612.replace('+', "_"));
    let dir = format!("/opt/lib/modules/{K612}");
    let no_dep = derived_image(
        &image,
        &format!(
            "RUN [\"/bin/busybox\", \"rm\", \"{dir}/modules.dep\", \"{dir}/modules.dep.bin\", \"{dir}/modules.alias.bin\", \"{dir}/modules.symbols.bin\"]"
        ),
        &[],
        "nodep",
    );
    let r = p
        .run(&[
            "--engine",
            "podman",
            "test",
            "--kernel",
            K612,
            "--image",
            no_dep.path().to_str().unwrap(),
        ])
        .failed();
    let hello = table_rows(&r)
        .into_iter()
        .find(|row| row.1 == "kmf_hello")
        .unwrap_or_else(|| panic!("{}", r.all()));
    assert_eq!(hello.2, "FAIL");
    assert!(
        hello.3.contains("not found") && hello.3.contains("the image has no modules.dep"),
        "{hello:?}"
    );
    let v = p
        .run(&[
            "verify",
            "--kernel",
            K612,
            "--image",
            no_dep.path().to_str().unwrap(),
        ])
        .failed();
    assert!(
        v.stdout.contains("FAIL  depmod files")
            && v.stdout
                .contains("modules.dep is missing (was depmod run?)"),
        "{}",
        v.all()
    );

    // An image holding a module built for another kernel: that kernel refuses it.
    let other = project(&[K61], "localhost/kmodforge-test/other");
    other.run(&["--engine", "podman", "build-all"]).ok();
    let foreign = other.moddir(K61).join("kmf_hello.ko");
    let wrong = derived_image(
        &image,
        &format!("COPY kmf_hello.ko {dir}/kmf_hello.ko"),
        &[("kmf_hello.ko", &foreign)],
        "wrong",
    );
    let r = p
        .run(&[
            "--engine",
            "podman",
            "test",
            "--kernel",
            K612,
            "--image",
            wrong.path().to_str().unwrap(),
        ])
        .failed();
    let hello = table_rows(&r)
        .into_iter()
        .find(|row| row.1 == "kmf_hello")
        .unwrap_or_else(|| panic!("{}", r.all()));
    assert_eq!(hello.2, "FAIL");
    assert!(
        hello.3.contains("could not insert 'kmf_hello'"),
        "{hello:?}"
    );
    assert!(
        hello.3.contains(&format!(
            "the module was built for kernel {K61}, not {K612}"
        )),
        "{hello:?}"
    );
    let v = p
        .run(&[
            "verify",
            "--kernel",
            K612,
            "--image",
            wrong.path().to_str().unwrap(),
        ])
        .failed();
    assert!(
        v.stdout
            .contains(&format!("kmf_hello.ko was built for {K61}")),
        "{}",
        v.all()
    );
}

#[test]
fn verify_finds_tampered_trees_and_images_without_tools() {
    require("podman", "podman");
    let p = project(&[K61], "localhost/kmodforge-test/verify");
    p.run(&["--engine", "podman", "image", "--kernel", K61])
        .ok();
    p.run(&["verify", "--kernel", K61]).ok();

    // A module added after depmod ran: modules.dep is stale.
    fs::copy(
        p.moddir(K61).join("kmf_hello.ko"),
        p.moddir(K61).join("kmf_late.ko"),
    )
    .unwrap();
    let v = p.run(&["verify", "--kernel", K61]).failed();
    assert!(
        v.stdout
            .contains("kmf_late.ko is not in modules.dep (stale: run depmod)"),
        "{}",
        v.all()
    );

    // An image without the tools KMM's worker runs (scratch plus the tree).
    let image = format!("localhost/kmodforge-test/verify:{K61}");
    let bare = derived_image(&image, "FROM scratch\nCOPY --from=0 /opt /opt", &[], "bare");
    let v = p
        .run(&[
            "verify",
            "--kernel",
            K61,
            "--image",
            bare.path().to_str().unwrap(),
        ])
        .failed();
    assert!(
        v.stdout.contains("no sh in /bin or /usr/bin")
            && v.stdout.contains("no cp in /bin or /usr/bin"),
        "{}",
        v.all()
    );
    assert!(v.stdout.contains("ok    vermagic"), "{}", v.all());
}

#[test]
fn without_the_host_link_verify_names_what_a_node_would_not_find() {
    require("podman", "podman");
    let p = project(&[K61], "localhost/kmodforge-test/nolink");
    let toml = fs::read_to_string(p.path().join("kernels.toml")).unwrap();
    p.write(
        "kernels.toml",
        &toml.replace("[image]\n", "[image]\nhost-link = \"never\"\n"),
    );
    p.run(&["--engine", "podman", "build-all"]).ok();
    assert!(!p.moddir(K61).join("host").exists());
    let v = p.run(&["verify", "--kernel", K61]).failed();
    assert!(
        v.stdout.contains("kmf_crc.ko depends on crc7, one of the kernel's own modules, which `modprobe -d` cannot reach: the image has no host link"),
        "{}",
        v.all()
    );
    assert!(
        v.stdout.contains("kmf_crc.ko uses crc7_be of the kernel's own module crc7 (lib/crc7), which the image cannot reach: it has no host link"),
        "{}",
        v.all()
    );
    // With the link (the default), the same tree checks out.
    p.write("kernels.toml", &toml);
    p.run(&["--engine", "podman", "build-all"]).ok();
    let v = p.run(&["verify", "--kernel", K61]).ok();
    assert!(v.stdout.contains("ok    symbols"), "{}", v.all());
}

#[test]
fn a_tree_larger_than_the_old_guest_memory_loads() {
    require("podman", "podman");
    require("qemu-system-x86_64", "qemu-system-x86");
    // A 200 MB module: a 512 MiB guest (what the load test used to boot) cannot hold
    // the initramfs and KMM's copy of it.
    let p = project(&[K61], "localhost/kmodforge-test/big");
    p.keep_modules(&["kmf_hello"]);
    p.write("modules/kmf_big/Kbuild", "obj-m := kmf_big.o\n");
    p.write(
        "modules/kmf_big/kmf_big.c",
        "#include <linux/module.h>\nchar kmf_big_data[200 << 20] = { 1 };\nEXPORT_SYMBOL(kmf_big_data);\n\
         static int __init b_init(void) { pr_info(\"kmf_big: %d\\n\", kmf_big_data[0]); return 0; }\n\
         static void __exit b_exit(void) {}\nmodule_init(b_init);\nmodule_exit(b_exit);\nMODULE_LICENSE(\"GPL\");\n",
    );
    let r = p.run(&["--engine", "podman", "test", "--kernel", K61]).ok();
    let rows = table_rows(&r);
    assert!(
        rows.iter().any(|row| row.1 == "kmf_big" && row.2 == "PASS"),
        "{}",
        r.all()
    );
    let booted = r
        .stdout
        .lines()
        .find(|l| l.contains("booted under QEMU"))
        .unwrap();
    let mib: u64 = booted
        .split(" MiB")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(mib > 512 + 400, "{booted}");
}

#[test]
fn a_module_loads_with_its_firmware_and_fails_without_it() {
    require("podman", "podman");
    require("qemu-system-x86_64", "qemu-system-x86");
    // kmf_fw requests kmf_fw/hello.bin in its init; kmf_hello has no firmware.
    let p = project(&[K61], "localhost/kmodforge-test/firmware");
    p.keep_modules(&["kmf_fw", "kmf_hello"]);
    let r = p.run(&["--engine", "podman", "test", "--kernel", K61]).ok();
    let rows = table_rows(&r);
    for m in ["kmf_fw", "kmf_hello"] {
        assert!(
            rows.iter().any(|row| row.1 == m && row.2 == "PASS"),
            "{m}:\n{}",
            r.all()
        );
    }
    assert!(
        r.stdout.contains("firmware from /opt/firmware/kmf_fw"),
        "{}",
        r.all()
    );
    let console =
        || fs::read_to_string(p.out().join("logs").join(K61).join("qemu-console.log")).unwrap();
    let c = console();
    // KMM's steps, each with status 0, before the module asked for its file.
    for step in [
        "@@kmodforge firmware-path 0",
        "@@kmodforge firmware-copied /opt/firmware/kmf_fw 0",
        "@@kmodforge firmware-installed /opt/firmware/kmf_fw 0",
    ] {
        assert!(c.contains(step), "{step} in:\n{c}");
    }
    assert!(
        c.contains("kmf_fw: firmware kmf_fw/hello.bin (38 bytes) says \"hello from kmf_fw\""),
        "{c}"
    );

    // The image and verify: the firmware folder and the file the module names in it.
    p.run(&["--engine", "podman", "image", "--kernel", K61])
        .ok();
    let v = p.run(&["verify", "--kernel", K61]).ok();
    assert!(
        v.stdout
            .contains("ok    firmware      /opt/firmware/kmf_fw: kmf_fw/hello.bin"),
        "{}",
        v.all()
    );

    // An image whose firmware folder someone emptied: KMM's init container fails on
    // `cp -R <firmwarePath>/*`, and that is kmf_fw's reason, not kmf_hello's.
    let image = format!("localhost/kmodforge-test/firmware:{K61}");
    let emptied = derived_image(
        &image,
        "RUN [\"/bin/busybox\", \"rm\", \"-r\", \"/opt/firmware/kmf_fw/kmf_fw\"]",
        &[],
        "nofw",
    );
    let emptied = emptied.path().to_str().unwrap();
    let args = [
        "--engine", "podman", "test", "--kernel", K61, "--image", emptied,
    ];
    let r = p.run(&args).failed();
    let rows = table_rows(&r);
    let fw = rows.iter().find(|row| row.1 == "kmf_fw").unwrap();
    assert_eq!(fw.2, "FAIL", "{}", r.all());
    assert!(
        fw.3.starts_with("KMM's copy of the image's firmware /opt/firmware/kmf_fw (cp -R /opt/firmware/kmf_fw/* /tmp/opt/firmware/kmf_fw) failed: exit status 1: cp: can't stat '/opt/firmware/kmf_fw/*'"),
        "{fw:?}"
    );
    assert!(
        rows.iter()
            .any(|row| row.1 == "kmf_hello" && row.2 == "PASS"),
        "{}",
        r.all()
    );
    let v = p
        .run(&["verify", "--kernel", K61, "--image", emptied])
        .failed();
    assert!(
        v.stdout.contains("FAIL  firmware      /opt/firmware/kmf_fw holds no file: KMM's init container (cp -R /opt/firmware/kmf_fw/*) fails on it"),
        "{}",
        v.all()
    );

    // The module folder without the file the module asks for: the layer is made again
    // (its firmware is an input), and the module fails to load, saying which file.
    let dir = p.path().join("modules/kmf_fw/firmware/kmf_fw");
    fs::rename(dir.join("hello.bin"), dir.join("other.bin")).unwrap();
    let r = p
        .run(&["--engine", "podman", "test", "--kernel", K61])
        .failed();
    assert!(
        r.started().contains(&format!("layer @ {K61}")),
        "{}",
        r.all()
    );
    let rows = table_rows(&r);
    let fw = rows.iter().find(|row| row.1 == "kmf_fw").unwrap();
    assert_eq!(fw.2, "FAIL", "{}", r.all());
    assert!(
        fw.3.contains("could not insert 'kmf_fw'")
            && fw
                .3
                .contains("Direct firmware load for kmf_fw/hello.bin failed with error -2")
            && fw
                .3
                .contains("is it in the module's [firmware] dir, as kmf_fw/hello.bin?"),
        "{fw:?}"
    );
    assert!(
        console().contains("@@kmodforge firmware-copied /opt/firmware/kmf_fw 0"),
        "the copy itself worked: only the file is missing"
    );
}
