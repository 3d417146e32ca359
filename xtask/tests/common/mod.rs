//! Helpers for the integration tests: scratch projects made from the repository's own
//! kernels.toml, images/ and modules/, and the real `xtask` binary run against them.
#![allow(dead_code)] // each test binary uses its own subset

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const K61: &str = "6.1.0-47-amd64";
pub const K612: &str = "6.12.117+deb12-amd64";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Fails the test, with the way to fix it, when a host program the test needs is
/// missing: a test never passes by skipping what it was meant to check.
pub fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{program}`: run `cargo xtask deps --install --tests` (Debian package {package})"
    );
}

/// A scratch project: the repository's toolchains and images, chosen kernels, and the
/// repository's modules plus any the test adds.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new(kernels: &[&str]) -> Project {
        let dir = tempfile::Builder::new()
            .prefix("kmodforge-test-")
            .tempdir()
            .unwrap();
        copy_tree(&repo_root().join("images"), &dir.path().join("images"));
        copy_tree(&repo_root().join("modules"), &dir.path().join("modules"));
        let p = Project { dir };
        p.set_kernels(kernels);
        p
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// kernels.toml: the repository's settings and toolchains, with `kernels` listed.
    pub fn set_kernels(&self, kernels: &[&str]) {
        let mut text = toolchains_section();
        for k in kernels {
            text.push_str(&format!("\n[[kernel]]\nversion = \"{k}\"\n"));
        }
        self.write("kernels.toml", &text);
    }

    pub fn write(&self, rel: &str, contents: &str) {
        let path = self.path().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    pub fn remove_module(&self, name: &str) {
        fs::remove_dir_all(self.path().join("modules").join(name)).unwrap();
    }

    /// Removes every module folder but `keep` (files such as modules/.gitignore stay).
    pub fn keep_modules(&self, keep: &[&str]) {
        for entry in fs::read_dir(self.path().join("modules")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap();
            if path.is_dir() && !keep.contains(&name) {
                fs::remove_dir_all(&path).unwrap();
            }
        }
    }

    pub fn out(&self) -> PathBuf {
        self.path().join("out")
    }

    pub fn moddir(&self, kver: &str) -> PathBuf {
        self.out().join(kver).join("lib/modules").join(kver)
    }

    /// The real xtask binary, pointed at this project, with plain progress lines.
    pub fn xtask(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
        cmd.arg("--config")
            .arg(self.path().join("kernels.toml"))
            .args(["--progress", "plain"])
            .args(args);
        cmd.env_remove("KMODFORGE_ENGINE")
            .env_remove("KMODFORGE_OUT")
            .env_remove("KMODFORGE_CONFIG")
            .env_remove("KMODFORGE_SIGNING_KEY");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        run(self.xtask(args))
    }

    /// The toolchain image a build of this project used (from its probe record).
    pub fn toolchain_image(&self) -> String {
        let dir = self.out().join(".kmodforge/toolchains");
        let facts = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .next()
            .expect("a probed toolchain")
            .unwrap()
            .path();
        let facts: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(facts).unwrap()).unwrap();
        facts["image"].as_str().unwrap().to_string()
    }
}

/// The part of the repository's kernels.toml before its first kernel.
pub fn toolchains_section() -> String {
    let text = fs::read_to_string(repo_root().join("kernels.toml")).unwrap();
    let end = text.find("[[kernel]]").expect("kernels.toml lists kernels");
    text[..end].to_string()
}

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn all(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr)
    }

    pub fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "xtask failed:\n{}", self.all());
        self
    }

    pub fn failed(self) -> Run {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "xtask should have failed:\n{}",
            self.all()
        );
        self
    }

    /// The jobs a run started ("start     <job>" progress lines).
    pub fn started(&self) -> Vec<String> {
        self.stderr
            .lines()
            .filter_map(|l| {
                l.split_once("] start     ")
                    .map(|(_, j)| j.trim().to_string())
            })
            .collect()
    }
}

pub fn run(mut cmd: Command) -> Run {
    let out: Output = cmd.stdin(Stdio::null()).output().expect("run xtask");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// A field of a .ko's .modinfo as the host's own modinfo reads it (independent of
/// kmodforge's reader).
pub fn modinfo(ko: &Path, field: &str) -> String {
    require("modinfo", "kmod");
    let out = Command::new("modinfo")
        .args(["-F", field])
        .arg(ko)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "modinfo {}: {}",
        ko.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every file under `dir` with its contents, for before/after comparisons.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    if !dir.exists() {
        return out;
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), fs::read(e.path()).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

/// Polls `cond` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    cond()
}

/// A project whose one module builds for five minutes, and a running `build-all` of it
/// that has started the build's container.
pub fn slow_build(kver: &str) -> (Project, std::process::Child) {
    require("podman", "podman");
    let p = Project::new(&[kver]);
    p.write(
        "kernels.toml",
        &format!(
            "{}[[kernel]]\nversion = \"{kver}\"\nmodules = [\"kmf_slow\"]\n",
            toolchains_section()
        ),
    );
    p.write("modules/kmf_slow/Kbuild", "obj-m := kmf_slow.o\n");
    p.write(
        "modules/kmf_slow/module.toml",
        "make = [\"sleep\", \"300\"]\n",
    );
    let child = p
        .xtask(&["--engine", "podman", "build-all"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The build's own container (not the toolchain's probe, which ends on its own).
    let appeared = wait_until(std::time::Duration::from_secs(300), || {
        let out = Command::new("podman")
            .args([
                "ps",
                "--no-trunc",
                "--filter",
                &format!("label=kmodforge.pid={pid}"),
                "--format",
                "{{.Command}}",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("sleep 300")
    });
    assert!(appeared, "the slow build's container never started");
    (p, child)
}

/// Containers that the kmodforge process `pid` started, as the engine lists them.
pub fn containers_of(engine: &str, pid: u32) -> Vec<String> {
    let filter = format!("label=kmodforge.pid={pid}");
    let out = Command::new(engine)
        .args(["ps", "-aq", "--filter", &filter])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// A Docker daemon for the tests: the one already running, or one started here (as
/// root) with its storage under target/, stopped when the guard is dropped.
pub struct Dockerd {
    child: Option<std::process::Child>,
    pub host: Option<String>,
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

pub fn dockerd() -> Dockerd {
    require("docker", "docker.io");
    require("dockerd", "docker.io");
    if Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        return Dockerd {
            child: None,
            host: None,
        };
    }
    let root = repo_root().join("target/test-dockerd");
    fs::create_dir_all(&root).unwrap();
    let sock = format!("unix://{}/docker.sock", root.display());
    let log = fs::File::create(root.join("dockerd.log")).unwrap();
    let child = Command::new("dockerd")
        .arg("--data-root")
        .arg(root.join("data"))
        .arg("--exec-root")
        .arg("/tmp/kmodforge-test-dockerd")
        .arg("--pidfile")
        .arg(root.join("dockerd.pid"))
        .arg("-H")
        .arg(&sock)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start dockerd");
    let ready = wait_until(Duration::from_secs(60), || {
        Command::new("docker")
            .args(["-H", &sock, "info"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    });
    assert!(
        ready,
        "dockerd did not start; see {}",
        root.join("dockerd.log").display()
    );
    Dockerd {
        child: Some(child),
        host: Some(sock),
    }
}

/// A real registry (Debian's docker-registry) on a free loopback port, over plain HTTP
/// or over HTTPS with a fresh self-signed certificate; stopped when dropped.
pub struct Registry {
    child: std::process::Child,
    pub host: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn registry(tls: bool) -> Registry {
    require("docker-registry", "docker-registry");
    let dir = tempfile::Builder::new()
        .prefix("kmodforge-registry-")
        .tempdir()
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = format!("127.0.0.1:{port}");
    let mut yaml = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n",
        dir.path().join("data").display()
    );
    if tls {
        require("openssl", "openssl");
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .arg("-keyout")
            .arg(dir.path().join("key.pem"))
            .arg("-out")
            .arg(dir.path().join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl could not make a certificate");
        yaml.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            dir.path().join("cert.pem").display(),
            dir.path().join("key.pem").display()
        ));
    }
    fs::write(dir.path().join("config.yml"), yaml).unwrap();
    let log = fs::File::create(dir.path().join("registry.log")).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.path().join("config.yml"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(&host).is_ok()
    });
    assert!(
        up,
        "docker-registry did not start; see {}",
        dir.path().join("registry.log").display()
    );
    Registry {
        child,
        host,
        _dir: dir,
    }
}

/// `skopeo inspect` of an image in a registry, TLS verification off (the tests' own
/// registries), as JSON.
pub fn skopeo_inspect(reference: &str, raw: bool) -> Option<serde_json::Value> {
    let mut cmd = Command::new("skopeo");
    cmd.arg("inspect").arg("--tls-verify=false");
    if raw {
        cmd.arg("--raw");
    }
    let out = cmd.arg(format!("docker://{reference}")).output().unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// Makes the project a git repository with one commit (for the revision label).
pub fn git_commit(p: &Project) {
    require("git", "git");
    for args in [
        vec!["init", "-q"],
        vec!["add", "-A"],
        vec![
            "-c",
            "user.name=kmodforge",
            "-c",
            "user.email=test@kmodforge.invalid",
            "commit",
            "-q",
            "-m",
            "test",
        ],
    ] {
        let ok = Command::new("git")
            .arg("-C")
            .arg(p.path())
            .args(&args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }
}

/// The image's manifest, config and the entries of each layer, read from the OCI
/// layout with plain tar and JSON (not kmodforge's own reader).
pub struct LayoutImage {
    pub manifest: serde_json::Value,
    pub config: serde_json::Value,
    pub layers: Vec<Vec<LayerEntry>>,
    pub blobs: Vec<Vec<u8>>,
}

/// One entry of a layer as plain tar reads it.
pub struct LayerEntry {
    pub path: String,
    pub mode: u32,
    pub uid: u64,
    pub mtime: u64,
    pub data: Vec<u8>,
}

pub fn read_layout(dir: &Path) -> LayoutImage {
    let blob =
        |digest: &str| fs::read(dir.join("blobs").join(digest.replacen(':', "/", 1))).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let mut layers = Vec::new();
    for l in manifest["layers"].as_array().unwrap() {
        let mut entries = Vec::new();
        let gz = blob(l["digest"].as_str().unwrap());
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz.as_slice()));
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            entries.push(LayerEntry {
                path: e.path().unwrap().to_string_lossy().into_owned(),
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                mtime: h.mtime().unwrap(),
                data,
            });
        }
        layers.push(entries);
    }
    let blobs = fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| fs::read(e.unwrap().path()).unwrap())
        .collect();
    LayoutImage {
        manifest,
        config,
        layers,
        blobs,
    }
}

/// The source folder of a real Debian `*-dkms` package, as it would sit in
/// `/usr/src/<source_dir>`: fetched with `apt-get download` (once per machine, kept
/// under target/) and unpacked with `dpkg-deb -x`, never committed.
pub fn debian_dkms_source(deb: &str, source_dir: &str) -> PathBuf {
    require("apt-get", "apt");
    require("dpkg-deb", "dpkg");
    let cache = repo_root().join("target/dkms-packages").join(deb);
    let src = cache.join("x/usr/src").join(source_dir);
    if src.join("dkms.conf").is_file() {
        return src;
    }
    fs::create_dir_all(&cache).unwrap();
    let got = Command::new("apt-get")
        .args(["download", "-q", deb])
        .current_dir(&cache)
        .output()
        .unwrap();
    assert!(
        got.status.success(),
        "apt-get download {deb}: {}",
        String::from_utf8_lossy(&got.stderr)
    );
    let file = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("the downloaded .deb");
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&file)
        .arg(cache.join("x"))
        .status()
        .unwrap()
        .success();
    assert!(
        ok && src.join("dkms.conf").is_file(),
        "{deb} has no {source_dir}/dkms.conf"
    );
    src
}
