//! kmod images: layout, reproducibility, KMM's init command, and real registries on
//! loopback over plain HTTP and HTTPS.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

/// Flags any container engine needs on this kind of host (see machine notes): rlimits
/// within root's and runc on cgroup v1.
const RUN_FLAGS: &[&str] = &[
    "--runtime=runc",
    "--ulimit=nofile=1024:1024",
    "--ulimit=nproc=4096:4096",
];

fn image_project(kernel: &str, image_toml: &str) -> Project {
    let p = Project::new(&[]);
    p.write(
        "kernels.toml",
        &format!(
            "{}[[kernel]]\nversion = \"{kernel}\"\n\n{image_toml}",
            toolchains_section()
        ),
    );
    p
}

/// The reference and digest a successful `image` run printed for `kver`.
fn printed(r: &Run, kver: &str) -> (String, String) {
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("{kver}: ")) && l.contains(" sha256:"))
        .unwrap_or_else(|| panic!("{}", r.all()));
    let mut words = line.split_whitespace().skip(1);
    (
        words.next().unwrap().to_string(),
        words.next().unwrap().to_string(),
    )
}

fn image(p: &Project, args: &[&str], epoch: Option<&str>) -> Run {
    let mut cmd = p.xtask(&[&["--engine", "podman", "image"], args].concat());
    match epoch {
        Some(e) => cmd.env("SOURCE_DATE_EPOCH", e),
        None => cmd.env_remove("SOURCE_DATE_EPOCH"),
    };
    run(cmd)
}

fn relative_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    snapshot(dir)
        .into_iter()
        .map(|(p, d)| {
            (
                p.strip_prefix(dir).unwrap().to_string_lossy().into_owned(),
                d,
            )
        })
        .collect()
}

#[test]
fn a_busybox_image_is_minimal_reproducible_and_loads_the_way_kmm_copies_it() {
    require("podman", "podman");
    let p = image_project(
        K612,
        "[image]\nbase = \"busybox\"\nname = \"localhost/kmodforge-test/kmods:${KERNEL_FULL_VERSION}\"\n\
         source = \"https://example.com/kmodforge.git\"\n",
    );
    // A secret in a module's folder (a signing key, say) must never reach an image.
    p.write(
        "modules/kmf_hello/signing-key.pem",
        "-----BEGIN PRIVATE KEY----- hunter2-do-not-ship\n",
    );
    git_commit(&p);

    let first = image(&p, &["--kernel", K612], Some("1700000000")).ok();
    let second = image(&p, &["--kernel", K612], Some("1700000000")).ok();
    let (reference, digest) = printed(&first, K612);
    assert_eq!(
        printed(&second, K612).1,
        digest,
        "two builds of the same inputs must have one digest"
    );
    // The tag is normalized as KMM does it ('+' becomes '_'); paths keep the raw version.
    assert_eq!(
        reference,
        "localhost/kmodforge-test/kmods:6.12.117_deb12-amd64"
    );
    assert!(
        Command::new("podman")
            .args(["image", "exists", &reference])
            .status()
            .unwrap()
            .success()
    );

    let img = read_layout(&p.out().join("images").join(K612));
    assert_eq!(img.layers.len(), 2);
    let base: Vec<&str> = img.layers[0].iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        base,
        ["bin/", "bin/busybox", "bin/cp", "bin/mkdir", "bin/sh"],
        "the base is busybox and nothing else"
    );

    // The added layer holds exactly the staging tree under /opt/lib/modules/<kver>/ and
    // kmf_fw's firmware under /opt/firmware/kmf_fw/ (its KMM firmwarePath).
    let staging = p.moddir(K612);
    let firmware = "opt/firmware/kmf_fw/kmf_fw/hello.bin";
    let mut expected: Vec<String> = [
        "opt/",
        "opt/firmware/",
        "opt/firmware/kmf_fw/",
        "opt/firmware/kmf_fw/kmf_fw/",
        firmware,
        "opt/lib/",
        "opt/lib/modules/",
        &format!("opt/lib/modules/{K612}/"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let files = relative_files(&staging);
    expected.extend(
        files
            .iter()
            .map(|(rel, _)| format!("opt/lib/modules/{K612}/{rel}")),
    );
    let layer = &img.layers[1];
    assert_eq!(
        layer.iter().map(|e| e.path.clone()).collect::<Vec<_>>(),
        expected
    );
    let hello = fs::read(p.path().join("modules/kmf_fw/firmware/kmf_fw/hello.bin")).unwrap();
    let fw = layer.iter().find(|e| e.path == firmware).unwrap();
    assert_eq!((fw.mode, &fw.data), (0o644, &hello));
    for e in layer {
        assert_eq!((e.uid, e.mtime), (0, 1_700_000_000), "{}", e.path);
        if let Some((_, want)) = files
            .iter()
            .find(|(rel, _)| e.path.ends_with(&format!("/{rel}")))
        {
            assert_eq!(&e.data, want, "{} differs from the build output", e.path);
        }
    }
    assert!(
        files.iter().any(|(f, _)| f == "kmf_user.ko")
            && files.iter().any(|(f, _)| f == "modules.dep.bin")
    );
    for blob in &img.blobs {
        assert!(
            !blob.windows(12).any(|w| w == b"hunter2-do-n"),
            "a secret reached the image"
        );
    }

    // Labels and annotations.
    let revision = String::from_utf8(
        Command::new("git")
            .arg("-C")
            .arg(p.path())
            .args(["rev-parse", "HEAD"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for a in [
        &img.manifest["annotations"],
        &img.config["config"]["Labels"],
    ] {
        assert_eq!(
            a["org.opencontainers.image.created"],
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            a["org.opencontainers.image.source"],
            "https://example.com/kmodforge.git"
        );
        assert_eq!(a["org.opencontainers.image.revision"], revision.trim());
        assert_eq!(a["org.opencontainers.image.title"], "kmods");
        assert_eq!(a["io.kmodforge.kernel"], K612);
    }

    // KMM's image-loader init container, exactly (a Module with firmwarePath adds its
    // copy): the copy equals the build output and the module's firmware.
    let copy = tempfile::tempdir().unwrap();
    let init = format!(
        "\nmkdir -p /tmp/opt/lib/modules;\ncp -R /opt/lib/modules/{K612} /tmp/opt/lib/modules;\n\
         \nmkdir -p /tmp/opt/firmware/kmf_fw;\ncp -R /opt/firmware/kmf_fw/* /tmp/opt/firmware/kmf_fw;\n"
    );
    let status = Command::new("podman")
        .args(["run", "--rm"])
        .args(RUN_FLAGS)
        .arg("-v")
        .arg(format!("{}:/tmp/opt", copy.path().display()))
        .args([&reference, "/bin/sh", "-c", &init])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        relative_files(&copy.path().join("lib/modules").join(K612)),
        files
    );
    assert_eq!(
        relative_files(&copy.path().join("firmware/kmf_fw")),
        [("kmf_fw/hello.bin".to_string(), hello)]
    );

    // The time is an input; a malformed one is refused.
    let later = image(&p, &["--kernel", K612], Some("1700000001")).ok();
    assert_ne!(printed(&later, K612).1, digest);
    let bad = image(&p, &["--kernel", K612], Some("17e8")).failed();
    assert!(
        bad.stderr
            .contains("SOURCE_DATE_EPOCH=\"17e8\" is not a time"),
        "{}",
        bad.all()
    );

    // Without SOURCE_DATE_EPOCH the last commit's time is used: still reproducible.
    let a = image(&p, &["--kernel", K612, "--no-load"], None).ok();
    let b = image(&p, &["--kernel", K612, "--no-load"], None).ok();
    assert_eq!(printed(&a, K612).1, printed(&b, K612).1);

    // An OCI archive is the same bytes every time.
    let archives = tempfile::tempdir().unwrap();
    let x = archives.path().join("x");
    let y = archives.path().join("y");
    let tar = "6.12.117_deb12-amd64.tar";
    image(
        &p,
        &["--kernel", K612, "--oci-archive", x.to_str().unwrap()],
        Some("1700000000"),
    )
    .ok();
    image(
        &p,
        &["--kernel", K612, "--oci-archive", y.to_str().unwrap()],
        Some("1700000000"),
    )
    .ok();
    assert_eq!(
        fs::read(x.join(tar)).unwrap(),
        fs::read(y.join(tar)).unwrap()
    );
}

/// The paths of the kmodforge layer (the last) of the image of `kver`.
fn layer_paths(p: &Project, kver: &str) -> Vec<String> {
    let img = read_layout(&p.out().join("images").join(kver));
    let layer = img.layers.last().unwrap();
    layer.iter().map(|e| e.path.clone()).collect()
}

#[test]
fn firmware_ships_with_its_module_only() {
    require("podman", "podman");
    let busybox = "[image]\nbase = \"busybox\"\nname = \"localhost/kmodforge-test/fw:${KERNEL_FULL_VERSION}\"\n";
    let p = image_project(K61, busybox);
    p.keep_modules(&["kmf_fw", "kmf_hello"]);
    let fw = "opt/firmware/kmf_fw/kmf_fw/hello.bin".to_string();
    image(&p, &["--kernel", K61, "--no-load"], Some("1700000000")).ok();
    assert!(layer_paths(&p, K61).contains(&fw));

    // A kernel that does not build kmf_fw gets neither the module nor its firmware.
    p.write(
        "kernels.toml",
        &format!(
            "{}[[kernel]]\nversion = \"{K61}\"\nmodules = [\"kmf_hello\"]\n\n{busybox}",
            toolchains_section()
        ),
    );
    image(&p, &["--kernel", K61, "--no-load"], Some("1700000000")).ok();
    let paths = layer_paths(&p, K61);
    assert!(
        paths
            .iter()
            .all(|p| !p.contains("firmware") && !p.contains("kmf_fw")),
        "{paths:?}"
    );

    // Nor does one where kmf_fw failed to build: the tree ships what built, and only
    // their firmware.
    p.write(
        "kernels.toml",
        &format!(
            "{}[[kernel]]\nversion = \"{K61}\"\n\n{busybox}",
            toolchains_section()
        ),
    );
    p.write(
        "modules/kmf_fw/kmf_fw.c",
        "#error kmf_fw does not build today\n",
    );
    let r = image(&p, &["--kernel", K61, "--no-load"], Some("1700000000")).failed();
    assert!(
        r.stderr.contains("kmf_fw does not build today"),
        "{}",
        r.all()
    );
    let paths = layer_paths(&p, K61);
    assert!(
        paths
            .iter()
            .all(|p| !p.contains("firmware") && !p.contains("kmf_fw"))
            && paths.iter().any(|p| p.ends_with("kmf_hello.ko")),
        "{paths:?}\n{}",
        r.all()
    );
}

#[test]
fn push_follows_kmm_registry_tls_and_skips_identical_content() {
    require("podman", "podman");
    require("skopeo", "skopeo");
    let http = registry(false);
    let https = registry(true);
    let auth = tempfile::tempdir().unwrap();
    let authfile = auth.path().join("auth.json");
    // base64("kmf:s3cr3t-pw")
    let secret_b64 = "a21mOnMzY3IzdC1wdw==";
    fs::write(
        &authfile,
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{secret_b64}\"}}}}}}",
            https.host
        ),
    )
    .unwrap();

    let toml = |host: &str, registries: &str, base: &str| {
        format!(
            "[kmm]\nname = \"kmf-test\"\n[image]\nbase = \"{base}\"\nname = \"{host}/drivers/${{MOD_NAME}}:${{KERNEL_FULL_VERSION}}\"\n{registries}"
        )
    };
    let p = image_project(K61, &toml(&http.host, "", "busybox"));
    let push = |p: &Project, extra: &[&str]| {
        let mut cmd = p.xtask(
            &[
                &[
                    "--engine",
                    "podman",
                    "image",
                    "--kernel",
                    K61,
                    "--push",
                    "--no-load",
                ],
                extra,
            ]
            .concat(),
        );
        cmd.env("SOURCE_DATE_EPOCH", "1700000000")
            .env("REGISTRY_AUTH_FILE", &authfile);
        run(cmd)
    };

    // Plain HTTP needs the opt-in.
    let refused = push(&p, &[]).failed();
    assert!(
        refused
            .stderr
            .contains(&format!("{} speaks plain HTTP", http.host)),
        "{}",
        refused.all()
    );
    assert!(
        refused
            .stderr
            .contains(&format!("[registries.\"{}\"] insecure = true", http.host)),
        "{}",
        refused.all()
    );
    let opt_in = format!("[registries.\"{}\"]\ninsecure = true\n", http.host);
    p.write(
        "kernels.toml",
        &format!(
            "{}[[kernel]]\nversion = \"{K61}\"\n\n{}",
            toolchains_section(),
            toml(&http.host, &opt_in, "busybox")
        ),
    );
    let pushed = push(&p, &[]).ok();
    let reference = format!("{}/drivers/kmf-test:{K61}", http.host);
    assert!(
        pushed.stdout.contains(&format!("pushed {reference}")),
        "{}",
        pushed.all()
    );
    let remote = skopeo_inspect(&reference, true).expect("the image is in the registry");
    let local = read_layout(&p.out().join("images").join(K61));
    assert_eq!(remote["layers"], local.manifest["layers"]);

    // KMM's mapping pins the digest the registry holds, so a new image reaches the nodes.
    let digest = skopeo_inspect(&reference, false).unwrap()["Digest"]
        .as_str()
        .unwrap()
        .to_string();
    let yaml = p.run(&["kmm", "--require-digests"]).ok().stdout;
    assert!(
        yaml.contains(&format!("containerImage: {reference}@{digest}")),
        "{yaml}"
    );

    // The same content again: skipped, and said so; --force pushes anyway.
    let again = push(&p, &[]).ok();
    assert!(
        again.stdout.contains("skipped push") && again.stdout.contains("same content"),
        "{}",
        again.all()
    );
    let forced = push(&p, &["--force"]).ok();
    assert!(
        forced.stdout.contains(&format!("pushed {reference}")),
        "{}",
        forced.all()
    );

    // HTTPS with a self-signed certificate: verification is on, so it is refused with
    // what to do; the skip-verify opt-in lets it through.
    let ps = image_project(K61, &toml(&https.host, "", "busybox"));
    let refused = push(&ps, &[]).failed();
    assert!(
        refused
            .stderr
            .contains(&format!("the certificate of {} is not trusted", https.host)),
        "{}",
        refused.all()
    );
    assert!(
        refused.stderr.contains("insecure-skip-tls-verify = true"),
        "{}",
        refused.all()
    );
    let skip = format!(
        "[registries.\"{}\"]\ninsecure-skip-tls-verify = true\n",
        https.host
    );
    ps.write(
        "kernels.toml",
        &format!(
            "{}[[kernel]]\nversion = \"{K61}\"\n\n{}",
            toolchains_section(),
            toml(&https.host, &skip, "busybox")
        ),
    );
    let pushed = push(&ps, &[]).ok();
    assert!(
        pushed
            .stdout
            .contains(&format!("pushed {}/drivers/kmf-test:{K61}", https.host)),
        "{}",
        pushed.all()
    );
    // The credentials in the auth file are used by skopeo and never shown.
    for text in [pushed.all(), refused.all()].into_iter().chain(
        snapshot(&ps.out().join("logs"))
            .into_iter()
            .map(|(_, d)| String::from_utf8_lossy(&d).into_owned()),
    ) {
        assert!(
            !text.contains("s3cr3t-pw") && !text.contains(secret_b64),
            "credentials were printed"
        );
    }

    // A base image from a registry we run: copy the busybox image there, then build on it.
    let base_ref = format!("{}/bases/minimal:1", http.host);
    let copied = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!(
            "oci:{}:{}",
            p.out().join("images").join(K61).display(),
            K61
        ))
        .arg(format!("docker://{base_ref}"))
        .status()
        .unwrap();
    assert!(copied.success());
    let pb = image_project(K61, &toml(&http.host, &opt_in, &base_ref));
    let built = image(&pb, &["--kernel", K61, "--no-load"], Some("1700000000")).ok();
    let img = read_layout(&pb.out().join("images").join(K61));
    assert_eq!(
        img.manifest["annotations"]["org.opencontainers.image.base.name"],
        base_ref.as_str(),
        "{}",
        built.all()
    );
    assert_eq!(
        img.layers.len(),
        3,
        "the base's two layers and the modules layer"
    );

    // A base from local storage: the Debian image kmodforge bootstrapped for toolchains.
    let pl = image_project(
        K61,
        &toml(&http.host, &opt_in, "localhost/kmodforge/debian:bookworm"),
    );
    image(&pl, &["--kernel", K61, "--no-load"], Some("1700000000")).ok();
    let img = read_layout(&pl.out().join("images").join(K61));
    assert_eq!(
        img.manifest["annotations"]["org.opencontainers.image.base.name"],
        "localhost/kmodforge/debian:bookworm"
    );

    // A base that is nowhere: what was tried and what to do.
    let missing = format!("{}/nothing/here:1", http.host);
    let pm = image_project(K61, &toml(&http.host, &opt_in, &missing));
    let r = image(&pm, &["--kernel", K61], Some("1700000000")).failed();
    assert!(r.stderr.contains(&format!("cannot find the base image {missing}: it is not in podman's local storage, and pulling it failed")), "{}", r.all());
    assert!(
        r.stderr.contains("help:") && r.stderr.contains("base = \"busybox\""),
        "{}",
        r.all()
    );
    assert!(
        !pm.out().join("images").join(K61).exists(),
        "nothing half-written"
    );
}
