//! DKMS packages built unchanged: the 47 test packages of tests/fixtures/dkms (each
//! validated against Debian's own dkms 3.0.10, see its README.md) built by kmodforge for
//! a 6.1 and a 6.12 Debian kernel, outcome for outcome, module for module.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn fixtures() -> PathBuf {
    repo_root().join("xtask/tests/fixtures/dkms")
}

/// Where kmodforge deliberately does what DKMS 3.1+ does, not bookworm's 3.0.10: the
/// case, the kernel outcome and exit status kmodforge gives, and why.
const NEWER_DKMS: &[(&str, &str, i32, &str)] = &[
    (
        "bash-syntax-error",
        "failed",
        8,
        "a dkms.conf that is not valid bash is an error, not a half-read file",
    ),
    (
        "crlf",
        "built",
        0,
        "a trailing \\r is dropped, as DKMS 3.1.5+ does: CRLF files work (module kmftest_crlf, stripped)",
    ),
    (
        "patch-dotdot",
        "failed",
        5,
        "a PATCH that leaves patches/ is refused, as DKMS 3.1.2+ does",
    ),
    (
        "pre-build-fails",
        "failed",
        10,
        "a failing PRE_BUILD fails the build, as DKMS 3.1.5+ does",
    ),
    (
        "pre-build-not-executable",
        "failed",
        10,
        "PRE_BUILD runs as DKMS 3.1.5+ runs it; a script that cannot run fails",
    ),
    (
        "pre-build-sh-prefix",
        "failed",
        10,
        "PRE_BUILD is a path in the build dir (3.1.5+): `sh gen.sh` names no script",
    ),
    (
        "post-build",
        "failed",
        10,
        "a failing POST_BUILD fails the build, as DKMS 3.1.7+ does",
    ),
];

#[derive(Debug, serde::Deserialize)]
struct Expect {
    case: String,
    kernel: Vec<KernelExpect>,
}

#[derive(Debug, serde::Deserialize)]
struct KernelExpect {
    version: String,
    outcome: String,
    exit: i32,
    #[serde(default)]
    modules: Vec<String>,
    #[serde(default)]
    stripped: Vec<String>,
    #[serde(default)]
    modinfo: BTreeMap<String, BTreeMap<String, String>>,
}

/// What kmodforge did with a (case, kernel): its outcome, the failure's exit status,
/// and the installed module files (name -> path).
fn outcome(
    p: &Project,
    r: &Run,
    case: &str,
    kver: &str,
) -> (String, i32, BTreeMap<String, PathBuf>) {
    let failed = format!("error: {case} @ {kver} failed:");
    if let Some(at) = r.stderr.find(&failed) {
        let block = &r.stderr[at..];
        let block = &block[..block[1..].find("\nerror: ").map_or(block.len(), |e| e + 1)];
        // The container's status, not an exit status the message quotes.
        let exit = block
            .split("` failed with exit status: ")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1);
        return ("failed".into(), exit, BTreeMap::new());
    }
    if r.stderr
        .contains(&format!("note: {case} @ {kver} skipped:"))
    {
        return ("skipped".into(), 77, BTreeMap::new());
    }
    let dir = p
        .out()
        .join(".kmodforge/kernels")
        .join(kver)
        .join("modules")
        .join(case)
        .join("artifacts");
    let records: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(
            p.out()
                .join(".kmodforge/kernels")
                .join(kver)
                .join("compiles.json"),
        )
        .unwrap_or_else(|e| panic!("{case} @ {kver}: no records ({e})\n{}", r.all())),
    )
    .unwrap();
    let rec = &records[case];
    assert!(rec.is_object(), "{case} @ {kver}: no record\n{}", r.all());
    let files = rec["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let file = m.as_str().unwrap();
            (file.trim_end_matches(".ko").to_string(), dir.join(file))
        })
        .collect();
    ("built".into(), 0, files)
}

fn has_debug_info(ko: &Path) -> bool {
    require("readelf", "binutils");
    let out = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(ko)
        .output()
        .unwrap();
    assert!(out.status.success(), "readelf {}", ko.display());
    String::from_utf8_lossy(&out.stdout).contains(".debug_info")
}

#[test]
fn the_dkms_test_packages_build_as_dkms_builds_them() {
    require("podman", "podman");
    let p = Project::new(&[K61, K612]);
    fs::remove_dir_all(p.path().join("modules")).unwrap();
    let mut cases = Vec::new();
    for entry in fs::read_dir(fixtures()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("expect.toml").is_file() {
            continue;
        }
        let expect: Expect =
            toml::from_str(&fs::read_to_string(dir.join("expect.toml")).unwrap()).unwrap();
        copy_tree(&dir, &p.path().join("modules").join(&expect.case));
        fs::remove_file(
            p.path()
                .join("modules")
                .join(&expect.case)
                .join("expect.toml"),
        )
        .unwrap();
        cases.push(expect);
    }
    assert!(cases.len() >= 45, "{} cases", cases.len());
    let r = p.run(&["--engine", "podman", "build-all"]);

    let mut compared = 0;
    for case in &cases {
        for k in &case.kernel {
            let (got, exit, files) = outcome(&p, &r, &case.case, &k.version);
            let (want, want_exit) = match NEWER_DKMS.iter().find(|d| d.0 == case.case) {
                Some((_, outcome, exit, _)) => (outcome.to_string(), *exit),
                None => (k.outcome.clone(), k.exit),
            };
            let at = format!("{} @ {}", case.case, k.version);
            assert_eq!(
                (got.as_str(), exit),
                (want.as_str(), want_exit),
                "{at}\n{}",
                r.all()
            );
            compared += 1;
            if got != "built" {
                continue;
            }
            let names: Vec<&String> = files.keys().collect();
            // The one built case 3.0.10 fails (crlf): what 3.1.5+ builds from it.
            let (modules, stripped) = if k.outcome == "built" {
                (k.modules.clone(), k.stripped.clone())
            } else {
                (
                    vec![format!("kmftest_{}", case.case)],
                    vec![format!("kmftest_{}", case.case)],
                )
            };
            let mut expected: Vec<&String> = modules.iter().collect();
            expected.sort();
            assert_eq!(names, expected, "{at}: modules");
            for (name, ko) in &files {
                assert_eq!(
                    !has_debug_info(ko),
                    stripped.contains(name),
                    "{at}: {name} stripped?"
                );
                // The unstripped module is kept, outside the tree an image is made from.
                let debug = ko
                    .parent()
                    .unwrap()
                    .join("unstripped")
                    .join(ko.file_name().unwrap());
                assert!(
                    has_debug_info(&debug),
                    "{at}: {} keeps its debug info",
                    debug.display()
                );
                for (field, value) in k.modinfo.get(name).into_iter().flatten() {
                    assert_eq!(
                        &modinfo(ko, field),
                        value,
                        "{at}: modinfo {field} of {name}"
                    );
                }
            }
        }
    }
    assert_eq!(compared, cases.len() * 2, "every case on both kernels");
    // 6.1 ships what built. On 6.12, two of the test packages both build kmftest_exclusive
    // (one is excluded on 6.1), as two real packages may build a module of the same name:
    // one kernel tree cannot hold both, and kmodforge says which.
    assert!(p.moddir(K61).join("modules.dep").is_file(), "{}", r.all());
    assert!(
        r.stderr.contains(&format!(
            "error: depmod @ {K612} failed: modules build-exclusive-config and build-exclusive-config-per-kernel \
             both build updates/dkms/kmftest_exclusive.ko: a kernel's modules need distinct names"
        )),
        "{}",
        r.all()
    );
}

#[derive(Debug, serde::Deserialize)]
struct Oracle {
    package: Vec<OraclePackage>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct OraclePackage {
    deb: String,
    source_dir: String,
    result: Vec<OracleResult>,
}

#[derive(Debug, serde::Deserialize)]
struct OracleResult {
    kernel: String,
    outcome: String,
    modules: Vec<String>,
}

/// module.toml beside dkms.conf, for the load test.
const TEST_HINTS: &[(&str, &str)] = &[
    (
        "bbswitch-0.8",
        "[test]\nneeds-hardware = true # an NVIDIA Optimus GPU switch\n",
    ),
    (
        "tp_smapi-0.43",
        "[test]\nneeds-hardware = true # a ThinkPad embedded controller\n",
    ),
    (
        "lime-forensics-1.9.1-5",
        "[test]\nparameters = [\"path=/dev/null\", \"format=raw\"]\n",
    ),
];

/// The real packages this test builds: every package of the oracle but openafs (a
/// 5-minute build, left to the benchmark) and west-chamber (it builds against another
/// package's sources, xtables-addons-dkms, installed on the host).
const LEFT_OUT: &[&str] = &["openafs-modules-dkms", "west-chamber-dkms"];

#[test]
fn real_debian_dkms_packages_build_where_dkms_builds_them() {
    require("podman", "podman");
    let oracle: Oracle = toml::from_str(
        &fs::read_to_string(repo_root().join("xtask/tests/dkms/oracle.toml")).unwrap(),
    )
    .unwrap();
    let p = Project::new(&[K61, K612]);
    fs::remove_dir_all(p.path().join("modules")).unwrap();
    let packages: Vec<&OraclePackage> = oracle
        .package
        .iter()
        .filter(|pkg| !LEFT_OUT.contains(&pkg.deb.as_str()))
        .collect();
    assert!(packages.len() >= 5);
    for pkg in &packages {
        // Copied unchanged, folder name and all, as from /usr/src.
        let src = debian_dkms_source(&pkg.deb, &pkg.source_dir);
        copy_tree(&src, &p.path().join("modules").join(&pkg.source_dir));
    }
    // What dkms.conf cannot say, for the load test: modules whose init needs their
    // device, and the parameter LiME needs to load at all.
    for (dir, hints) in TEST_HINTS {
        p.write(&format!("modules/{dir}/module.toml"), hints);
    }
    let r = p.run(&["--engine", "podman", "build-all"]);
    let mut table = Vec::new();
    for pkg in &packages {
        for kver in [K61, K612] {
            let want = pkg.result.iter().find(|x| x.kernel == kver).unwrap();
            let (got, _, files) = outcome(&p, &r, &pkg.source_dir, kver);
            table.push(format!(
                "{} @ {kver}: dkms {}, kmodforge {got}",
                pkg.deb, want.outcome
            ));
            assert_eq!(got, want.outcome, "{} @ {kver}\n{}", pkg.deb, r.all());
            let mut built: Vec<&String> = files.keys().collect();
            let mut expected: Vec<&String> = want.modules.iter().collect();
            built.sort();
            expected.sort();
            assert_eq!(built, expected, "{} @ {kver}: modules", pkg.deb);
        }
    }
    eprintln!("{}", table.join("\n"));
    load_them(&p);
    // Every kernel ships what built: the 6.12 tree holds the packages that built there
    // and none of the failed ones, and depmod ran on it.
    let dep = fs::read_to_string(p.moddir(K612).join("modules.dep")).unwrap();
    assert!(dep.contains("updates/dkms/bbswitch.ko:"), "{dep}");
    assert!(!dep.contains("ddcci"), "{dep}");
    assert_eq!(
        r.code,
        Some(1),
        "failures are still a failed run:\n{}",
        r.all()
    );
}

/// The built packages under QEMU, as KMM loads them: every module loads and unloads, is
/// marked as needing hardware, or fails with what a node would say; verify foresees the
/// failure; packages that need the kernel's own modules reach them through the host link.
fn load_them(p: &Project) {
    require("qemu-system-x86_64", "qemu-system-x86");
    let r = p.run(&["--engine", "podman", "test", "--all"]).failed();
    let rows: Vec<(String, String, String, String)> = r
        .stdout
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let result = match (w.get(4), w.get(5)) {
                (Some(&"needs"), Some(&"hardware")) => "needs hardware",
                (Some(r), _) if ["PASS", "FAIL"].contains(r) => r,
                _ => return None,
            };
            let skip = if result == "needs hardware" { 6 } else { 5 };
            Some((w[0].into(), w[1].into(), result.into(), w[skip..].join(" ")))
        })
        .collect();
    let result = |k: &str, m: &str| {
        rows.iter()
            .find(|r| r.0 == k && r.1 == m)
            .unwrap_or_else(|| panic!("{m} @ {k} was not tested\n{}", r.all()))
    };
    let hardware = ["bbswitch", "thinkpad_ec", "tp_smapi", "hdaps"];
    for (k, m, res, why) in &rows {
        if hardware.contains(&m.as_str()) {
            assert_eq!(res, "needs hardware", "{m} @ {k}: {why}");
            assert!(why.contains("No such device"), "{m} @ {k}: {why}");
        } else if m == "dahdi_echocan_oslec" {
            // dahdi's package does not ship the echo module this one needs.
            assert!(
                res == "FAIL" && why.contains("Unknown symbol oslec_create"),
                "{why}"
            );
        } else {
            assert_eq!(res, "PASS", "{m} @ {k}: {why}\n{}", r.all());
        }
    }
    // Packages that need the kernel's own modules: x_tables, uio, nf_conntrack, hid, drm.
    for (k, m) in [
        (K61, "xt_RTPENGINE"),
        (K612, "xt_RTPENGINE"),
        (K61, "igb_uio"),
        (K612, "igb_uio"),
        (K61, "nf_conntrack_rtsp"),
        (K61, "hid_uclogic"),
        (K61, "evdi"),
    ] {
        assert_eq!(result(k, m).2, "PASS", "{m} @ {k}");
    }
    let console =
        fs::read_to_string(p.out().join("logs").join(K61).join("qemu-console.log")).unwrap();
    assert!(
        console.contains(&format!(
            "insmod /tmp/opt/lib/modules/{K61}/host/kernel/net/netfilter/x_tables.ko"
        )),
        "x_tables comes from the kernel's own modules, through the host link"
    );
    assert_eq!(
        r.stderr.matches("load test failure").count(),
        1,
        "{}",
        r.all()
    );
    assert!(r.stderr.contains("\n1 load test failure(s)"), "{}", r.all());
    // verify saw it coming, statically: the symbol, the module, where it looked.
    let v = p.run(&["verify", "--kernel", K61]).failed();
    assert!(
        v.stdout.contains("FAIL  symbols       updates/dkms/dahdi_echocan_oslec.ko uses oslec_create, which no module of the tree, none of the kernel's own modules and not the kernel itself exports"),
        "{}",
        v.all()
    );
}
