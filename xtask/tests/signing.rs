//! Secure Boot signing: modules signed with the kernel's own sign-file in their
//! toolchain, checked by `verify` against the certificate, the key found nowhere it must
//! not be, and a kernel that enforces signatures loading what kmodforge signed and
//! refusing the rest, saying why.
//!
//! The key pairs are the TEST-ONLY fixtures in tests/fixtures/signing/ (their private
//! keys are public); the Rust kernel's toolchain trusts `test.crt`.

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const KRUST: &str = "6.12.117-kmodforge-rust";
const TEST_SIGNER: &str = "kmodforge test signing key (TEST ONLY, private key is public)";
const MARKER: &[u8] = b"~Module signature appended~\n";

fn fixture(name: &str) -> PathBuf {
    repo_root().join("xtask/tests/fixtures/signing").join(name)
}

/// The key pairs, copied outside the project (a key need not live in the repository).
fn keys() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("kmodforge-keys-")
        .tempdir()
        .unwrap();
    for f in ["test.key", "test.crt", "other.key", "other.crt"] {
        fs::copy(fixture(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// A `[signing]` table naming `keys/<pair>.key` and `<pair>.crt` by absolute path.
fn signing(keys: &Path, key: &str, cert: &str) -> String {
    format!(
        "[signing]\nkey = \"{}\"\ncert = \"{}\"\n",
        keys.join(format!("{key}.key")).display(),
        keys.join(format!("{cert}.crt")).display()
    )
}

/// A project for one kernel with `modules`, a busybox image base, and `extra` (the
/// [signing] table, say) appended to kernels.toml.
fn write_config(p: &Project, kernel: &str, modules: &str, extra: &str) {
    let toolchain = if kernel == KRUST {
        "toolchain = \"rust\"\nboot-args = [\"module.sig_enforce=1\"]\n"
    } else {
        ""
    };
    p.write(
        "kernels.toml",
        &format!(
            "{}[[kernel]]\nversion = \"{kernel}\"\n{toolchain}modules = [{modules}]\n\
             [image]\nbase = \"busybox\"\nname = \"localhost/kmodforge-test/signed:${{KERNEL_FULL_VERSION}}\"\n{extra}",
            toolchains_section()
        ),
    );
}

/// `openssl x509 -serial` as modinfo prints a signature's key: `11:69:B7:...`.
fn serial(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    let hex = String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_string();
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

fn kos(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ko"))
        .collect();
    out.sort();
    out
}

fn signed(ko: &Path) -> bool {
    fs::read(ko).unwrap().ends_with(MARKER)
}

#[test]
fn modules_are_signed_in_their_toolchain_and_verify_checks_them_against_the_certificate() {
    require("podman", "podman");
    require("openssl", "openssl");
    let keys = keys();
    let p = Project::new(&[]);
    let modules = "\"kmf_hello\", \"kmf_export\", \"kmf_user\"";
    write_config(&p, K61, modules, &signing(keys.path(), "test", "test"));
    let r = p.run(&["--engine", "podman", "build-all"]).ok();

    // Every module carries the test key's signature, as the host's modinfo reads it.
    let built = kos(&p.moddir(K61));
    assert_eq!(built.len(), 3, "{}", r.all());
    for ko in &built {
        assert_eq!(modinfo(ko, "signer"), TEST_SIGNER, "{}", ko.display());
        assert_eq!(modinfo(ko, "sig_key"), serial(&fixture("test.crt")));
        assert_eq!(modinfo(ko, "sig_hashalgo"), "sha256");
        assert!(modinfo(ko, "vermagic").starts_with(K61));
    }
    // depmod ran on the signed files: modules.dep as before.
    let dep = fs::read_to_string(p.moddir(K61).join("modules.dep")).unwrap();
    assert!(dep.contains("kmf_user.ko: kmf_export.ko"), "{dep}");
    // The unstripped copies kept for crash analysis are not signed (and never shipped).
    let state = p.out().join(".kmodforge/kernels").join(K61).join("modules");
    let unstripped = state.join("kmf_hello/artifacts/unstripped/kmf_hello.ko");
    assert!(!signed(&unstripped), "{}", unstripped.display());
    // The key is mounted read-only into the signing container only, never into the
    // container that runs the module's build.
    let log = fs::read_to_string(p.out().join("logs").join(K61).join("kmf_hello.log")).unwrap();
    let key = keys.path().join("test.key").display().to_string();
    let runs: Vec<&str> = log.lines().filter(|l| l.starts_with("$ ")).collect();
    assert_eq!(runs.len(), 2, "{log}");
    assert!(
        runs[0].contains("driver.sh") && !runs[0].contains(&key),
        "{log}"
    );
    assert!(
        runs[1].contains(&format!("{key}:/run/kmodforge/signing/key.pem:ro"))
            && runs[1].contains("--network=none"),
        "{log}"
    );
    assert!(log.contains("kmodforge: signed kmf_hello.ko"), "{log}");

    // verify checks the staging tree and the image against the certificate.
    p.run(&["--engine", "podman", "image", "--kernel", K61, "--no-load"])
        .ok();
    let v = p.run(&["verify", "--kernel", K61]).ok();
    let ok_lines = v
        .stdout
        .lines()
        .filter(|l| {
            l.trim_start()
                .starts_with("ok    signature     3 modules signed")
        })
        .count();
    assert_eq!(ok_lines, 2, "the tree and the image:\n{}", v.all());

    // Against the other certificate: each module is signed by another key, named.
    write_config(&p, K61, modules, &signing(keys.path(), "test", "other"));
    let v = p.run(&["verify", "--kernel", K61]).failed();
    assert!(
        v.stdout.contains("FAIL  signature")
            && v.stdout.contains(&format!(
                "kmf_hello.ko is signed by another key (O=kmodforge TEST ONLY, CN={TEST_SIGNER}, serial 0x"
            ))
            && v.stdout.contains("not by the key of"),
        "{}",
        v.all()
    );

    // Built without [signing], the modules are unsigned, and verify says so.
    write_config(&p, K61, modules, "");
    let r = p.run(&["--engine", "podman", "build-all"]).ok();
    assert!(
        r.started().iter().any(|j| j.contains("kmf_hello")),
        "{}",
        r.all()
    );
    assert!(built.iter().all(|ko| !signed(ko)));
    write_config(&p, K61, modules, &signing(keys.path(), "test", "test"));
    let v = p.run(&["verify", "--kernel", K61]).failed();
    assert!(
        v.stdout.contains(
            "kmf_hello.ko is not signed: a node that enforces signatures (Secure Boot) refuses it"
        ),
        "{}",
        v.all()
    );
    // The certificate is an input: signing again rebuilds, and verify passes.
    let r = p.run(&["--engine", "podman", "build-all"]).ok();
    assert!(
        r.started().iter().any(|j| j.contains("kmf_user")),
        "{}",
        r.all()
    );
    assert!(built.iter().all(|ko| signed(ko)));
}

#[test]
fn a_debian_612_module_signed_through_the_environment_and_the_key_is_nowhere_else() {
    require("podman", "podman");
    require("openssl", "openssl");
    require("grep", "grep");
    let keys = keys();
    let p = Project::new(&[]);
    // The certificate in the project, the key outside it, named by the environment.
    fs::create_dir_all(p.path().join("certs")).unwrap();
    fs::copy(fixture("test.crt"), p.path().join("certs/test.crt")).unwrap();
    write_config(
        &p,
        K612,
        "\"kmf_hello\"",
        "[signing]\ncert = \"certs/test.crt\"\n",
    );
    let key = keys.path().join("test.key");
    let with_key = |args: &[&str], key: &Path| {
        let mut cmd = p.xtask(args);
        cmd.env("KMODFORGE_SIGNING_KEY", key);
        run(cmd)
    };

    // Without the key, the commands that only read the plan work; a build says why not.
    p.run(&["plan"]).ok();
    let r = p.run(&["--engine", "podman", "build-all"]).failed();
    assert!(
        r.stderr.contains("kernels.toml:") && r.stderr.contains("[signing] has no `key`"),
        "{}",
        r.all()
    );
    // A key that is not the certificate's: sign-file refuses it, the error says what to
    // check, and quotes no key.
    let other = keys.path().join("other.key");
    let r = with_key(&["--engine", "podman", "build-all"], &other).failed();
    assert!(
        r.stderr.contains("signing the modules for kernel") && r.stderr.contains("are a pair"),
        "{}",
        r.all()
    );
    assert_no_key_in(&r.all(), &other);

    let r = with_key(&["--engine", "podman", "build-all"], &key).ok();
    let ko = p.moddir(K612).join("kmf_hello.ko");
    assert_eq!(modinfo(&ko, "signer"), TEST_SIGNER, "{}", r.all());
    assert!(modinfo(&ko, "vermagic").starts_with(K612));
    let i = with_key(&["--engine", "podman", "image", "--kernel", K612], &key).ok();
    assert_no_key_in(&i.all(), &key);
    p.run(&["verify", "--kernel", K612]).ok();

    // The key's PEM body and its DER bytes are nowhere: not in the project and its out/
    // (staging trees, logs, fingerprints and records, OCI layout), not in the image's
    // layers unpacked, not in kmodforge's machine-wide cache.
    let layers = tempfile::tempdir().unwrap();
    unpack_layers(&p.out().join("images").join(K612), layers.path());
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
        .join("kmodforge");
    assert!(cache.is_dir(), "{}", cache.display());
    for (name, dir) in [
        ("the project", p.path()),
        ("the image's layers", layers.path()),
        ("the cache", cache.as_path()),
    ] {
        let found = files_holding_key(&key, dir);
        assert!(found.is_empty(), "the key is in {name}: {found:?}");
    }
    // The search finds what it looks for, as PEM and as DER.
    assert!(!files_holding_key(&key, keys.path()).is_empty());
    let der = tempfile::tempdir().unwrap();
    let ok = Command::new("openssl")
        .args(["pkey", "-outform", "DER", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(der.path().join("key.der"))
        .status()
        .unwrap()
        .success();
    assert!(ok && !files_holding_key(&key, der.path()).is_empty());
}

/// The key's body: its base64 lines, and windows of its DER bytes.
fn key_patterns(key: &Path) -> (Vec<String>, Vec<Vec<u8>>) {
    let pem = fs::read_to_string(key).unwrap();
    let lines: Vec<String> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 32)
        .map(str::to_string)
        .collect();
    assert!(lines.len() > 10, "{}", key.display());
    let der = Command::new("openssl")
        .args(["pkey", "-outform", "DER", "-in"])
        .arg(key)
        .output()
        .unwrap()
        .stdout;
    assert!(der.len() > 1000);
    let windows = [200, 600, 1000]
        .iter()
        .map(|at| der[*at..at + 48].to_vec())
        .collect();
    (lines, windows)
}

/// The files under `dir` holding any part of the key's body (grep, which reads
/// gigabytes in seconds).
fn files_holding_key(key: &Path, dir: &Path) -> Vec<String> {
    let (lines, windows) = key_patterns(key);
    let patterns = tempfile::NamedTempFile::new().unwrap();
    fs::write(patterns.path(), lines.join("\n") + "\n").unwrap();
    let grep = |args: Vec<String>| {
        let out = Command::new("grep")
            .env("LC_ALL", "C")
            .args(["-r", "-a", "-l"])
            .args(args)
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.code().is_some_and(|c| c < 2), "grep: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let mut found = grep(vec![
        "-F".into(),
        "-f".into(),
        patterns.path().display().to_string(),
    ]);
    for w in windows {
        let escaped: String = w.iter().map(|b| format!("\\x{b:02x}")).collect();
        found.extend(grep(vec!["-P".into(), escaped]));
    }
    found
}

fn assert_no_key_in(text: &str, key: &Path) {
    for line in key_patterns(key).0 {
        assert!(!text.contains(&line), "a line of the key is in:\n{text}");
    }
}

/// Every gzip blob of an OCI layout, decompressed into `to`.
fn unpack_layers(layout: &Path, to: &Path) {
    let mut n = 0;
    for e in fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let data = fs::read(e.unwrap().path()).unwrap();
        if data.starts_with(&[0x1f, 0x8b]) {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(data.as_slice())
                .read_to_end(&mut plain)
                .unwrap();
            fs::write(to.join(format!("layer-{n}.tar")), plain).unwrap();
            n += 1;
        }
    }
    assert!(n >= 2, "the base's layer and kmodforge's");
}

/// The load test's rows: (module, result, reason).
fn rows(r: &Run) -> Vec<(String, String, String)> {
    r.stdout
        .lines()
        .filter(|l| l.starts_with(KRUST))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 5 && ["PASS", "FAIL"].contains(&w[4]))
                .then(|| (w[1].to_string(), w[4].to_string(), w[5..].join(" ")))
        })
        .collect()
}

/// The load test on the Rust kernel fails both modules, each for the kernel's `why` (its
/// log line) and kmodforge's `reason`.
fn all_refused(p: &Project, why: &str, reason_says: &str) {
    let t = p
        .run(&["--engine", "podman", "test", "--kernel", KRUST])
        .failed();
    let got = rows(&t);
    assert_eq!(got.len(), 2, "{}", t.all());
    for (m, result, reason) in &got {
        assert_eq!(result, "FAIL", "{m}: {}", t.all());
        assert!(
            reason.contains("Key was rejected by service")
                && reason.contains(why)
                && reason.contains(reason_says),
            "{m}: {reason}"
        );
    }
}

#[test]
fn a_kernel_that_enforces_signatures_loads_what_kmodforge_signed_and_refuses_the_rest() {
    require("podman", "podman");
    require("qemu-system-x86_64", "qemu-system-x86");
    let keys = keys();
    let p = Project::new(&[]);
    let modules = "\"kmf_hello\", \"kmf_rust\"";
    write_config(&p, KRUST, modules, &signing(keys.path(), "test", "test"));

    // Signed with the key whose certificate the kernel trusts: both load, C and Rust.
    let t = p
        .run(&["--engine", "podman", "test", "--kernel", KRUST])
        .ok();
    let got = rows(&t);
    assert_eq!(got.len(), 2, "{}", t.all());
    assert!(got.iter().all(|r| r.1 == "PASS"), "{}", t.all());
    assert!(
        t.stdout.contains(
            "kernel command line: console=ttyS0 panic=-1 loglevel=7 module.sig_enforce=1"
        ),
        "{}",
        t.all()
    );
    let console_log = p.out().join("logs").join(KRUST).join("qemu-console.log");
    let console = fs::read_to_string(&console_log).unwrap();
    assert!(console.contains("module.sig_enforce=1"), "{console}");
    assert!(console.contains("kmf_rust: hello from Rust"), "{console}");
    assert_eq!(
        modinfo(&p.moddir(KRUST).join("kmf_rust.ko"), "signer"),
        TEST_SIGNER
    );
    p.run(&["verify", "--kernel", KRUST]).ok();

    // Signed with a key the kernel does not trust: refused, and the table says why.
    write_config(&p, KRUST, modules, &signing(keys.path(), "other", "other"));
    all_refused(
        &p,
        "Loading of module with unavailable key is rejected",
        "signed by a key it does not trust",
    );

    // Unsigned: refused, and the table says why.
    write_config(&p, KRUST, modules, "");
    all_refused(
        &p,
        "Loading of unsigned module is rejected",
        "the module is not signed",
    );

    // The same unsigned modules load when the kernel does not enforce signatures: the
    // refusals above are the enforcement's.
    p.write(
        "kernels.toml",
        &fs::read_to_string(p.path().join("kernels.toml"))
            .unwrap()
            .replace("boot-args = [\"module.sig_enforce=1\"]\n", ""),
    );
    let t = p
        .run(&["--engine", "podman", "test", "--kernel", KRUST])
        .ok();
    assert!(rows(&t).iter().all(|r| r.1 == "PASS"), "{}", t.all());
    let console = fs::read_to_string(&console_log).unwrap();
    assert!(
        console.contains("module verification failed: signature and/or required key missing"),
        "{console}"
    );
}
