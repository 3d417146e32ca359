//! The load test: boots the exact kernel a kmod image was built for under QEMU and
//! loads the image's modules the way KMM's worker does.
//!
//! The initramfs holds static busybox, the host's real kmod `modprobe` (busybox's has
//! no `-d`) with the libraries it links, and the image's own `<prefix>` tree. Its
//! `/init` replays KMM: `mkdir -p /tmp<prefix>/lib/modules; cp -R
//! <prefix>/lib/modules/<kver> /tmp<prefix>/lib/modules`, then for every module
//! `modprobe -vd /tmp<prefix> <module> <parameters>` and `modprobe -rvd ...`, printing
//! markers, `/proc/modules` and the kernel log after each step. A module folder's
//! firmware (`<prefix>/firmware/<module>`, its KMM `firmwarePath`) is copied as KMM's
//! init container and worker copy it, into the guest's `/lib/firmware` (upstream KMM's
//! `firmwareHostPath`), before any modprobe. The console is parsed into one verdict per
//! module. The kernel boots with the node's own command-line arguments from
//! kernels.toml (`boot-args`: `module.sig_enforce=1`, say), and a module it refuses for
//! its signature is said to be refused for that reason.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::config::diag::display_path;
use crate::formats::initramfs::Initramfs;
use crate::formats::modinfo::ModInfo;
use crate::formats::oci::{self, OciDir};
use crate::formats::oci::{FileSystem, Node};
use crate::host::fs::{read_json, write_atomic, write_json};
use crate::host::process::{Cmd, quote, which};
use crate::run::layout::Layout;
use crate::steps::compile::Records;
use crate::steps::image::LayerRecord;
use crate::steps::kernel_files::KernelFiles;

/// One module the test loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The module name (the `.ko` file name without `.ko`, `-` as `_`).
    pub name: String,
    pub parameters: Vec<String>,
    /// What its `.modinfo` says it depends on: these must be loaded with it.
    pub depends: Vec<String>,
    /// The kernel release its vermagic names.
    pub built_for: Option<String>,
    /// module.toml says its init fails without its device.
    pub needs_hardware: bool,
    /// The module folder it was built from, when known (its firmware is that folder's).
    pub folder: Option<String>,
}

/// How one module fared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub module: String,
    pub loaded: bool,
    pub unloaded: bool,
    /// Why it failed; `None` is a pass.
    pub reason: Option<String>,
    /// It did not load, and module.toml says it needs hardware the guest lacks: shown
    /// as such, not as a failure.
    #[serde(default)]
    pub needs_hardware: bool,
}

impl Verdict {
    pub fn failed(&self) -> bool {
        self.reason.is_some() && !self.needs_hardware
    }

    /// PASS, FAIL or "needs hardware", for tables.
    pub fn result(&self) -> &'static str {
        match (&self.reason, self.needs_hardware) {
            (None, _) => "PASS",
            (Some(_), true) => "needs hardware",
            (Some(_), false) => "FAIL",
        }
    }
}

/// What the load test of one kernel works with.
pub struct Request<'a> {
    pub config: &'a Config,
    pub layout: &'a Layout,
    pub kver: &'a str,
    /// The kernel's image and its own modules (what a node has in /lib/modules).
    pub kernel: &'a KernelFiles,
    /// Test this OCI image layout instead of kmodforge's layer.
    pub image: Option<&'a Path>,
    pub timeout: Duration,
    pub log: &'a Path,
    /// The node's kernel command-line arguments (`[[kernel]] boot-args`).
    pub boot_args: &'a [String],
}

/// How a kernel's load test went: the boot and a verdict per module.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub accel: String,
    pub wall_seconds: f64,
    /// The guest's memory, sized from what it holds.
    #[serde(default)]
    pub memory_mb: u64,
    /// How many of the kernel's own modules the guest got, for the tree's dependencies.
    #[serde(default)]
    pub in_tree_modules: usize,
    /// The kernel command line the guest booted with.
    #[serde(default)]
    pub command_line: String,
    pub console: PathBuf,
    /// The firmware folders (KMM's `firmwarePath`s) the guest copied, as the image has them.
    #[serde(default)]
    pub firmware: Vec<String>,
    pub verdicts: Vec<Verdict>,
}

impl Report {
    pub fn path(layout: &Layout, kver: &str) -> PathBuf {
        layout.kernel_state(kver).join("loadtest.json")
    }

    pub fn load(layout: &Layout, kver: &str) -> Option<Report> {
        read_json(&Self::path(layout, kver))
    }

    pub fn failures(&self) -> usize {
        self.verdicts.iter().filter(|v| v.failed()).count()
    }
}

/// Boots the kernel with the modules of its layer (or of `image`) and judges each one.
pub fn run(r: &Request) -> Result<Report> {
    let prefix = &r.config.image.prefix;
    let tree = prefix.trim_start_matches('/').to_string();
    let under_prefix = |p: &str| p.starts_with(&format!("{tree}/"));
    let image_fs = match r.image {
        Some(dir) => oci::filesystem(&OciDir::open(dir)?, under_prefix)?,
        None => {
            LayerRecord::load(r.layout, r.kver)?;
            let blob = LayerRecord::blob(r.layout, r.kver);
            let gzip =
                fs::read(&blob).with_context(|| format!("cannot read {}", display_path(&blob)))?;
            oci::layer_filesystem(&gzip, under_prefix)?
        }
    };
    let modules_dir = format!("{tree}/lib/modules/{}", r.kver);
    if !image_fs.contains_key(&modules_dir) {
        bail!(
            "the image has no {prefix}/lib/modules/{}/: it was not built for this kernel, or with another prefix",
            r.kver
        );
    }
    let subjects = subjects(&image_fs, &modules_dir, &hints(r.config, r.layout, r.kver))?;
    if subjects.is_empty() {
        bail!(
            "the image holds no .ko file in {prefix}/lib/modules/{}/",
            r.kver
        );
    }
    let busybox = crate::steps::image_base::busybox_binary(r.config, r.layout, r.log)?;
    let in_tree = InTree::for_kernel(r.kernel, &image_fs, &modules_dir);
    let replay = Replay {
        kver: r.kver,
        prefix,
        subjects: &subjects,
        in_tree: &in_tree,
        firmware: crate::steps::image::firmware_paths(&image_fs, prefix),
    };
    let guest_files = Guest::files(busybox, &image_fs, &replay, r.kernel)?;
    let initrd = r.layout.kernel_state(r.kver).join("initrd.gz");
    write_atomic(&initrd, &guest_files.finish()?)?;
    let guest = Guest {
        vmlinuz: r.kernel.vmlinuz(),
        initrd,
        memory_mb: memory_mb(guest_files.bytes()),
        share: matches!(in_tree, InTree::Mounted { .. }).then(|| r.kernel.modules()),
        command_line: command_line(r.boot_args),
    };
    let console_log = r.layout.log(r.kver, "qemu-console");
    let (console, wall, accel) = boot(&guest, &console_log, r.timeout)
        .with_context(|| format!("QEMU did not boot {}", r.kver))?;
    let modules_dep = image_fs.contains_key(&format!("{modules_dir}/modules.dep"));
    let report = Report {
        accel: accel.describe().to_string(),
        wall_seconds: wall.as_secs_f64(),
        memory_mb: guest.memory_mb,
        in_tree_modules: match &in_tree {
            InTree::Mounted { .. } => r.kernel.modules_dep().len(),
            InTree::Copied(files) => files.len(),
        },
        command_line: guest.command_line.clone(),
        console: console_log,
        verdicts: judge(&console, r.kver, &subjects, modules_dep),
        firmware: replay.firmware,
    };
    write_json(&Report::path(r.layout, r.kver), &report)?;
    Ok(report)
}

/// What module.toml says of a `.ko` for the test.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hint {
    pub parameters: Vec<String>,
    pub needs_hardware: bool,
    /// The module folder that builds it.
    pub folder: Option<String>,
}

/// What module.toml says of each `.ko` for the test, by module name: its parameters,
/// whether it needs hardware and its folder. A folder's `[test] parameters` go to the
/// module its KMM Module loads by name, as the manifests deploy them; `needs-hardware`
/// to every `.ko` it covers.
fn hints(config: &Config, layout: &Layout, kver: &str) -> BTreeMap<String, Hint> {
    let mut out = BTreeMap::new();
    let records = Records::load(layout, kver);
    for m in &config.modules {
        let kos = records
            .get(&m.name)
            .map(|r| r.modules.clone())
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| vec![format!("{}.ko", m.name)]);
        for ko in kos {
            let name = ko.trim_end_matches(".ko").replace('-', "_");
            let hint = Hint {
                parameters: Vec::new(),
                needs_hardware: m.test.needs_hardware.covers(&name),
                folder: Some(m.name.clone()),
            };
            out.insert(name, hint);
        }
        if let Some(spec) = crate::handoff::kmm::load_spec(config, layout, kver, m)
            && let Some(entry) = out.get_mut(&spec.module_name)
        {
            entry.parameters = spec.parameters;
        }
    }
    out
}

/// The in-tree modules the tree's own modules need, through the host link: every
/// `host/...` path the tree's lines of modules.dep name (it lists each module's whole
/// closure), relative to the kernel's `lib/modules/<kver>`.
pub fn in_tree_closure(image_fs: &FileSystem, modules_dir: &str) -> Vec<String> {
    let Some(Node::File {
        data: Some(dep), ..
    }) = image_fs.get(&format!("{modules_dir}/modules.dep"))
    else {
        return Vec::new();
    };
    let link = format!("{}/", crate::steps::depmod::HOST_LINK);
    let mut out: Vec<String> = Vec::new();
    for line in String::from_utf8_lossy(dep).lines() {
        let (module, deps) = line.split_once(':').unwrap_or((line, ""));
        if module.starts_with(&link) {
            continue;
        }
        out.extend(
            deps.split_whitespace()
                .filter_map(|d| d.strip_prefix(&link))
                .map(str::to_string),
        );
    }
    out.sort();
    out.dedup();
    out
}

/// Guest memory for an initramfs that unpacks to `bytes`: the kernel's own needs, the
/// unpacked files, and KMM's copy of the tree (an initramfs lives in RAM).
pub fn memory_mb(bytes: u64) -> u64 {
    let mb = bytes.div_ceil(1 << 20);
    (384 + 3 * mb).div_ceil(64) * 64
}

/// The host's kmod binary and the shared libraries it needs, by their paths.
fn host_kmod() -> Result<Vec<(String, Vec<u8>)>> {
    let kmod = which("kmod").or_else(|| which("modprobe")).context(
        "the load test needs kmod's modprobe on the host (busybox's has no -d)\n  help: `cargo xtask deps --install --tests` (Debian package kmod)",
    )?;
    let kmod = fs::canonicalize(&kmod)?;
    let mut files = vec![("bin/kmod".to_string(), fs::read(&kmod)?)];
    let ldd = Cmd::new("ldd")
        .arg(&kmod)
        .read()
        .context("cannot list kmod's libraries with ldd")?;
    for line in ldd.lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push((
                p.trim_start_matches('/').to_string(),
                fs::read(p).with_context(|| format!("cannot read {p}"))?,
            ));
        }
    }
    Ok(files)
}

/// The modules under `<prefix>/lib/modules/<kver>/` of an image file system, with
/// what their `.modinfo` says they depend on.
pub fn subjects(
    image_fs: &FileSystem,
    modules_dir: &str,
    hints: &BTreeMap<String, Hint>,
) -> Result<Vec<Subject>> {
    let mut out = Vec::new();
    for (path, node) in image_fs.range(format!("{modules_dir}/")..) {
        if !path.starts_with(&format!("{modules_dir}/")) {
            break;
        }
        let (
            Some(file),
            Node::File {
                data: Some(data), ..
            },
        ) = (path.strip_suffix(".ko"), node)
        else {
            continue;
        };
        let name = file.rsplit('/').next().unwrap_or(file).replace('-', "_");
        let info = ModInfo::from_elf(data).with_context(|| format!("/{path} in the image"))?;
        let hint = hints.get(&name).cloned().unwrap_or_default();
        out.push(Subject {
            parameters: hint.parameters,
            needs_hardware: hint.needs_hardware,
            folder: hint.folder,
            depends: info
                .depends()
                .into_iter()
                .map(|d| d.replace('-', "_"))
                .collect(),
            built_for: info.vermagic_release().map(str::to_string),
            name,
        });
    }
    Ok(out)
}

const MARK: &str = "@@kmodforge";

/// What the guest's `/init` replays.
pub struct Replay<'a> {
    pub kver: &'a str,
    pub prefix: &'a str,
    pub subjects: &'a [Subject],
    pub in_tree: &'a InTree,
    /// The image's firmware folders (KMM's `firmwarePath`s).
    pub firmware: Vec<String>,
}

/// Where the guest's firmware loader looks, as KMM's worker sets it: upstream KMM's
/// default `worker.firmwareHostPath`.
pub const FIRMWARE_HOST_PATH: &str = "/lib/firmware";

/// The `/init` that replays KMM's worker for every subject: the init container's copy
/// (its error kept), the host link checked, the firmware put where the kernel's loader
/// finds it, then modprobe for each module.
pub fn init_script(r: &Replay) -> String {
    let (kver, prefix) = (r.kver, r.prefix);
    let tmp = format!("/tmp{prefix}");
    let tree = format!("{tmp}/lib/modules/{kver}");
    let link = crate::steps::depmod::HOST_LINK;
    let mut s = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin:/sbin\n\
         mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev 2>/dev/null\n\
         say() {{ echo \"{MARK} $*\"; }}\n\
         state() {{ say modules $(cut -d' ' -f1 /proc/modules | tr '\\n' ' '); say dmesg-begin; dmesg -c; say dmesg-end; }}\n\
         say boot \"$(uname -r)\"\n\
         {mount}\
         dmesg -c >/dev/null\n\
         # KMM's image-loader init container\n\
         mkdir -p {tmp}/lib/modules; cp -R {prefix}/lib/modules/{kver} {tmp}/lib/modules 2>/cp.err\n\
         say copied $?\n\
         [ -s /cp.err ] && say copy-error \"$(head -n1 /cp.err)\"\n\
         if [ -L {tree}/{link} ] && ! [ -d {tree}/{link}/ ]; then say link-broken \"$(readlink {tree}/{link})\"; fi\n\
         {firmware}",
        mount = mount_script(kver, r.in_tree),
        firmware = firmware_script(&r.firmware),
    );
    for m in r.subjects {
        let params: Vec<String> = m.parameters.iter().map(|p| quote(p)).collect();
        s.push_str(&format!(
            "say load {name}\n/sbin/modprobe -vd {tmp} {name} {params} 2>&1; say rc $?\nstate\n\
             say unload {name}\n/sbin/modprobe -rvd {tmp} {name} 2>&1; say rc $?\nstate\n",
            name = m.name,
            params = params.join(" ")
        ));
    }
    s.push_str("say end\nreboot -f\n");
    s
}

/// The node's own /lib/modules/<kver>, as its kernel and KMM's worker see it.
fn mount_script(kver: &str, in_tree: &InTree) -> String {
    let InTree::Mounted { boot } = in_tree else {
        return String::new();
    };
    let mut m = String::new();
    for b in boot {
        m.push_str(&format!("/sbin/insmod /lib/modules/{kver}/{b}\n"));
    }
    m.push_str(&format!(
        "mount -t 9p -o trans=virtio,version=9p2000.L,ro {SHARE_TAG} /lib/modules/{kver} 2>/9p.err\n\
         say kernel-modules $? \"$(head -n1 /9p.err)\"\n"
    ));
    m
}

/// KMM's firmware steps, in KMM's order: the init container's `mkdir -p /tmp<fw>; cp -R
/// <fw>/* /tmp<fw>` for each firmware folder, then the worker's: the loader's path pointed
/// at the host directory (when the kernel has the parameter) and each copy merged into
/// it. Each step's status and first error line are kept for the verdict.
fn firmware_script(firmware: &[String]) -> String {
    if firmware.is_empty() {
        return String::new();
    }
    let host = FIRMWARE_HOST_PATH;
    let param = "/sys/module/firmware_class/parameters/path";
    let mut s = String::from("# KMM's image-loader init container: the firmwarePath copy\n");
    for fw in firmware {
        let (from, tmp) = (quote(fw), quote(&format!("/tmp{fw}")));
        s.push_str(&format!(
            "mkdir -p {tmp}; cp -R {from}/* {tmp} 2>/fw.err\n\
             say firmware-copied {from} $? \"$(head -n1 /fw.err)\"\n"
        ));
    }
    s.push_str(&format!(
        "# KMM's worker: the firmware loader's path, the copy into the host's directory\n\
         if [ -e {param} ]; then printf %s {host} > {param} 2>/fw.err; say firmware-path $? \"$(head -n1 /fw.err)\"; fi\n\
         mkdir -p {host}\n"
    ));
    for fw in firmware {
        let (from, tmp) = (quote(fw), quote(&format!("/tmp{fw}")));
        s.push_str(&format!(
            "cp -R {tmp}/. {host}/ 2>/fw.err\n\
             say firmware-installed {from} $? \"$(head -n1 /fw.err)\"\n"
        ));
    }
    s
}

/// A QEMU guest: a kernel, an initramfs, and memory for what it holds.
pub struct Guest {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub memory_mb: u64,
    /// The kernel's own modules, shared read-only with the guest (9p).
    pub share: Option<PathBuf>,
    /// The kernel command line: the test's serial console, then the node's arguments.
    pub command_line: String,
}

/// The guest's kernel command line: a serial console, a panic that ends QEMU at once,
/// every kernel message, then the node's own arguments (`boot-args`).
pub fn command_line(boot_args: &[String]) -> String {
    let mut words = vec!["console=ttyS0", "panic=-1", "loglevel=7"];
    words.extend(boot_args.iter().map(String::as_str));
    words.join(" ")
}

/// How the guest gets the kernel's own modules at `/lib/modules/<kver>`, where a node has
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InTree {
    /// All of them, shared read-only over 9p, as the node's whole tree (the kernel asks
    /// for modules of its own too, e.g. a crypto algorithm): these modules, loaded from
    /// the initramfs, mount it.
    Mounted { boot: Vec<String> },
    /// Only these, in the initramfs (for a kernel without 9p).
    Copied(Vec<String>),
}

impl InTree {
    fn for_kernel(kernel: &KernelFiles, image_fs: &FileSystem, modules_dir: &str) -> InTree {
        let has_dep = kernel.modules().join("modules.dep").is_file();
        match kernel.load_order(&["virtio_pci", "9pnet_virtio", "9p"]) {
            Some(boot) if has_dep => InTree::Mounted { boot },
            _ => InTree::Copied(in_tree_closure(image_fs, modules_dir)),
        }
    }

    /// What of the kernel's modules the initramfs itself holds.
    fn files(&self) -> &[String] {
        match self {
            InTree::Mounted { boot } => boot,
            InTree::Copied(files) => files,
        }
    }
}

/// The 9p share's tag.
const SHARE_TAG: &str = "kmfmodules";

impl Guest {
    /// The initramfs: busybox, kmod, the image's `<prefix>` tree, the kernel's own
    /// modules the tree needs through the host link (at `/lib/modules/<kver>`, where a
    /// node has them), and `/init`.
    pub fn files(
        busybox: Vec<u8>,
        image_fs: &FileSystem,
        replay: &Replay,
        kernel: &KernelFiles,
    ) -> Result<Initramfs> {
        let (prefix, kver, in_tree) = (replay.prefix, replay.kver, replay.in_tree);
        let mut i = Initramfs::default();
        i.file("bin/busybox", 0o755, busybox);
        for (path, data) in host_kmod()? {
            i.file(&path, 0o755, data);
        }
        i.symlink("sbin/modprobe", "/bin/kmod");
        i.symlink("sbin/insmod", "/bin/kmod");
        for d in ["proc", "sys", "dev", "tmp"] {
            i.add(crate::formats::oci::Entry::Dir { path: d.into() });
        }
        let tree = prefix.trim_start_matches('/');
        for (path, node) in image_fs.range(format!("{tree}/")..) {
            if !path.starts_with(&format!("{tree}/")) {
                break;
            }
            match node {
                Node::Dir => i.add(crate::formats::oci::Entry::Dir { path: path.clone() }),
                Node::File {
                    mode,
                    data: Some(data),
                } => i.file(path, *mode & 0o777, data.clone()),
                Node::File { data: None, .. } => bail!("/{path} of the image was not read"),
                Node::Symlink(t) => i.symlink(path, t),
            }
        }
        // Every node has its kernel's /lib/modules/<kver>; the guest gets the part of it
        // the tree needs.
        i.add(crate::formats::oci::Entry::Dir {
            path: format!("lib/modules/{kver}"),
        });
        for rel in in_tree.files() {
            let from = kernel.modules().join(rel);
            let data = fs::read(&from).with_context(|| {
                format!(
                    "the tree's modules.dep names {rel} of the kernel's own modules, which {} lacks",
                    display_path(&kernel.modules())
                )
            })?;
            i.file(&format!("lib/modules/{kver}/{rel}"), 0o644, data);
        }
        i.file("init", 0o755, init_script(replay).into_bytes());
        Ok(i)
    }
}

/// How QEMU runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn describe(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "emulation (TCG)",
        }
    }
}

/// Where the verdict "KVM does not work on this host" is remembered: nested or
/// restricted virtualization can offer a /dev/kvm that QEMU cannot run guests on.
fn kvm_verdict_file() -> PathBuf {
    crate::run::layout::cache_dir().join("kvm-unusable")
}

fn host_identity() -> String {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let qemu = Cmd::new("qemu-system-x86_64")
        .arg("--version")
        .read()
        .unwrap_or_default();
    format!(
        "{} / {}",
        release.trim(),
        qemu.lines().next().unwrap_or_default()
    )
}

/// KVM first when /dev/kvm opens and it has not failed on this host before
/// (`KMODFORGE_ACCEL=kvm|tcg` decides instead).
fn accelerators() -> Vec<Accel> {
    match std::env::var("KMODFORGE_ACCEL").as_deref() {
        Ok("tcg") => return vec![Accel::Tcg],
        Ok("kvm") => return vec![Accel::Kvm],
        _ => {}
    }
    let opens = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let failed_before = fs::read_to_string(kvm_verdict_file()).is_ok_and(|s| s == host_identity());
    if opens && !failed_before {
        vec![Accel::Kvm, Accel::Tcg]
    } else {
        vec![Accel::Tcg]
    }
}

/// How long a KVM guest may take to reach /init before KVM counts as unusable.
const KVM_GRACE: Duration = Duration::from_secs(30);

/// Boots `vmlinuz` with `initrd` under QEMU, with a hard timeout; the console goes to
/// `console_log`. KVM is tried first where it may work; a guest that does not reach
/// /init under KVM within a grace period is booted again under emulation, and the
/// host remembered. Returns the console, the wall time and the accelerator used. The
/// QEMU process is always reaped (killed on timeout).
pub fn boot(
    guest: &Guest,
    console_log: &Path,
    timeout: Duration,
) -> Result<(String, Duration, Accel)> {
    crate::host::engine::require_program(
        "qemu-system-x86_64",
        "qemu-system-x86",
        "the load test boots kernels with it",
    )?;
    let candidates = accelerators();
    let mut last_error = None;
    for (i, accel) in candidates.iter().enumerate() {
        let fallback_left = i + 1 < candidates.len();
        let limit = if fallback_left {
            timeout.min(KVM_GRACE)
        } else {
            timeout
        };
        let flags: &[&str] = match accel {
            Accel::Kvm => &["-accel", "kvm"],
            Accel::Tcg => &["-accel", "tcg"],
        };
        let _ = fs::remove_file(console_log);
        let started = Instant::now();
        let result = Cmd::new("qemu-system-x86_64")
            .args([
                "-m",
                &guest.memory_mb.to_string(),
                "-smp",
                "1",
                "-nodefaults",
                "-nographic",
                "-serial",
                "stdio",
                "-monitor",
                "none",
                "-no-reboot",
            ])
            .args(flags)
            .arg("-kernel")
            .arg(&guest.vmlinuz)
            .arg("-initrd")
            .arg(&guest.initrd)
            .args(guest.share.iter().flat_map(|dir| {
                [
                    "-virtfs".to_string(),
                    format!(
                        "local,path={},mount_tag={SHARE_TAG},security_model=none,readonly=on",
                        dir.display()
                    ),
                ]
            }))
            .arg("-append")
            .arg(&guest.command_line)
            .run_logged(console_log, Some(limit));
        let wall = started.elapsed();
        let console =
            String::from_utf8_lossy(&fs::read(console_log).unwrap_or_default()).into_owned();
        let reached_init = console.contains(&format!("{MARK} boot"));
        match result {
            Ok(()) => return Ok((console, wall, *accel)),
            // A timeout or a crash after /init started is the modules' doing: judge it.
            Err(_) if reached_init => return Ok((console, wall, *accel)),
            Err(e) => {
                if *accel == Accel::Kvm && fallback_left {
                    let _ = crate::host::fs::write_atomic(
                        &kvm_verdict_file(),
                        host_identity().as_bytes(),
                    );
                }
                last_error = Some(e);
            }
        }
    }
    Err(last_error.expect("at least one accelerator was tried"))
}

/// What in a kernel log means trouble: the kernel's own Oops, BUG, WARN and panic
/// markers (as it prints them; a driver's "Warning:" is its own business), and refusals.
static PROBLEM: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\bOops\b|\bBUG: |WARNING: CPU: |Unknown symbol|Call Trace:|general protection fault|Kernel panic|version magic .* should be|disagrees about version of symbol").unwrap()
});

/// One step's output from the console: modprobe's lines, its exit status, the modules
/// loaded afterwards, and the kernel log of that step.
#[derive(Default, Debug)]
struct Step {
    output: Vec<String>,
    rc: Option<i32>,
    modules: Vec<String>,
    dmesg: Vec<String>,
}

/// The console's steps by (module, "load" | "unload"), whether `/init` ended, and what
/// KMM's own steps said before any module (the copy, the host link).
struct Console {
    steps: BTreeMap<(String, &'static str), Step>,
    ended: bool,
    /// The copy's exit status and first error line, when it failed.
    copy_failed: Option<String>,
    /// Where the host link points, when it resolves to nothing.
    link_broken: Option<String>,
    /// Why the guest could not mount the kernel's own modules (a fault of the test).
    no_kernel_modules: Option<String>,
    /// Each firmware folder's module folder, with why KMM's copies of it failed, if they
    /// did.
    firmware: BTreeMap<String, Option<String>>,
    /// Why the firmware loader's path could not be set, if it could not.
    firmware_path_failed: Option<String>,
}

fn parse_console(console: &str) -> Console {
    let mut steps: BTreeMap<(String, &'static str), Step> = BTreeMap::new();
    let mut current: Option<(String, &'static str)> = None;
    let (mut in_dmesg, mut ended) = (false, false);
    let (mut copy_failed, mut link_broken): (Option<String>, Option<String>) = (None, None);
    let mut no_kernel_modules: Option<String> = None;
    let mut firmware: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut firmware_path_failed = None;
    for raw in console.lines() {
        let line = raw.trim_end_matches('\r');
        let Some(rest) = line.split_once(MARK).map(|(_, r)| r.trim()) else {
            if let Some(key) = &current {
                let step = steps.entry(key.clone()).or_default();
                if in_dmesg {
                    step.dmesg.push(line.to_string())
                } else if !line.trim().is_empty() {
                    step.output.push(line.to_string())
                }
            }
            continue;
        };
        let (word, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        match (word, &current) {
            ("load", _) => current = Some((arg.to_string(), "load")),
            ("unload", _) => current = Some((arg.to_string(), "unload")),
            ("rc", Some(key)) => steps.entry(key.clone()).or_default().rc = arg.trim().parse().ok(),
            ("modules", Some(key)) => {
                steps.entry(key.clone()).or_default().modules =
                    arg.split_whitespace().map(str::to_string).collect()
            }
            ("dmesg-begin", _) => in_dmesg = true,
            ("dmesg-end", _) => in_dmesg = false,
            ("end", _) => ended = true,
            ("copied", _) if arg.trim() != "0" => {
                copy_failed.get_or_insert(format!("cp exited with status {}", arg.trim()));
            }
            ("copy-error", _) => {
                copy_failed = Some(match copy_failed {
                    Some(c) => format!("{c}: {}", arg.trim()),
                    None => arg.trim().to_string(),
                })
            }
            ("link-broken", _) => link_broken = Some(arg.trim().to_string()),
            ("firmware-copied" | "firmware-installed", _) => {
                let (folder, failed) = firmware_step(word, arg);
                let entry = firmware.entry(folder).or_default();
                if entry.is_none() {
                    *entry = failed;
                }
            }
            ("firmware-path", _) if !succeeded(arg) => {
                firmware_path_failed = Some(status_and_error(arg.trim()));
            }
            ("kernel-modules", _) if !arg.trim().starts_with('0') => {
                let why = arg
                    .trim()
                    .split_once(' ')
                    .map_or("", |(_, w)| w)
                    .to_string();
                no_kernel_modules = Some(why);
            }
            _ => {}
        }
    }
    Console {
        steps,
        ended,
        copy_failed,
        link_broken,
        no_kernel_modules,
        firmware,
        firmware_path_failed,
    }
}

/// A firmware step's marker (`<firmwarePath> <status> <first error line>`): the module
/// folder it belongs to and, when it failed, what failed.
fn firmware_step(word: &str, arg: &str) -> (String, Option<String>) {
    let (path, rest) = arg.trim().split_once(' ').unwrap_or((arg.trim(), "0"));
    let path = path.trim_matches('\'');
    let folder = path.rsplit('/').next().unwrap_or(path).to_string();
    if succeeded(rest) {
        return (folder, None);
    }
    let step = match word {
        "firmware-copied" => {
            format!("KMM's copy of the image's firmware {path} (cp -R {path}/* /tmp{path})")
        }
        _ => format!("the copy of /tmp{path} into the host's {FIRMWARE_HOST_PATH}"),
    };
    (
        folder,
        Some(format!("{step} failed: {}", status_and_error(rest.trim()))),
    )
}

/// Whether a marker's `<status> [<error line>]` is a zero status.
fn succeeded(arg: &str) -> bool {
    arg.split_whitespace().next() == Some("0")
}

/// `<status> <error line>` as "cp exited with status N: <error line>".
fn status_and_error(arg: &str) -> String {
    let (rc, err) = arg.split_once(' ').unwrap_or((arg, ""));
    match err.trim() {
        "" => format!("exit status {rc}"),
        e => format!("exit status {rc}: {e}"),
    }
}

/// Reads the console into a verdict per subject. A failed step of KMM's replay (the
/// copy, a broken link) is the reason, never a later symptom.
pub fn judge(
    console: &str,
    kver: &str,
    subjects: &[Subject],
    modules_dep_present: bool,
) -> Vec<Verdict> {
    let console = parse_console(console);
    subjects
        .iter()
        .map(|s| {
            let load = console.steps.get(&(s.name.clone(), "load"));
            let unload = console.steps.get(&(s.name.clone(), "unload"));
            let mut reasons = Vec::new();
            if let Some(copy) = &console.copy_failed {
                reasons.push(format!("KMM's copy of the image's tree failed: {copy}"));
            }
            reasons.extend(firmware_reason(s, &console, subjects));
            let loaded = judge_load(
                s,
                load,
                console.ended,
                kver,
                modules_dep_present,
                &mut reasons,
            );
            if let (false, Some(why)) = (loaded, &console.no_kernel_modules) {
                reasons.insert(0, format!(
                    "the load test could not give the guest the kernel's own modules (9p mount: {why})"
                ));
            }
            if let (false, Some(target)) = (loaded, &console.link_broken) {
                reasons.insert(
                    0,
                    format!(
                        "the image's host link points at {target}, which the node does not have"
                    ),
                );
            }
            if let Some(p) = problems(load).into_iter().next() {
                reasons.push(format!("kernel log while loading: {p}"));
            }
            let unloaded = judge_unload(s, unload, loaded, &mut reasons);
            if let Some(p) = problems(unload).into_iter().next() {
                reasons.push(format!("kernel log while unloading: {p}"));
            }
            Verdict {
                module: s.name.clone(),
                loaded,
                unloaded,
                needs_hardware: !loaded && s.needs_hardware,
                reason: reasons.into_iter().next(),
            }
        })
        .collect()
}

/// Why KMM's firmware steps failed for subject `s`: its folder's copies, or setting
/// the loader's path when its folder has firmware. A failed copy of a folder no subject
/// comes from (an image built elsewhere) is everyone's: it is never dropped.
fn firmware_reason(s: &Subject, console: &Console, subjects: &[Subject]) -> Option<String> {
    let folder_of = |s: &Subject| s.folder.clone().unwrap_or_else(|| s.name.clone());
    let mine = folder_of(s);
    if let (Some(why), true) = (
        &console.firmware_path_failed,
        console.firmware.contains_key(&mine),
    ) {
        return Some(format!(
            "KMM's worker could not point the firmware loader at {FIRMWARE_HOST_PATH}: {why}"
        ));
    }
    console
        .firmware
        .iter()
        .filter_map(|(folder, failed)| failed.as_ref().map(|f| (folder, f)))
        .find(|(folder, _)| **folder == mine || !subjects.iter().any(|o| folder_of(o) == **folder))
        .map(|(_, f)| f.clone())
}

/// The kernel log lines of a step that show a problem, without time stamps.
fn problems(step: Option<&Step>) -> Vec<String> {
    step.map(|st| {
        st.dmesg
            .iter()
            .filter(|l| PROBLEM.is_match(l))
            .map(|l| strip_time(l))
            .collect()
    })
    .unwrap_or_default()
}

fn judge_load(
    s: &Subject,
    load: Option<&Step>,
    ended: bool,
    kver: &str,
    modules_dep_present: bool,
    reasons: &mut Vec<String>,
) -> bool {
    let Some(st) = load else {
        reasons.push(if ended {
            "never loaded".into()
        } else {
            "the kernel crashed or hung before this module was loaded; see the console log".into()
        });
        return false;
    };
    if st.rc.is_none() {
        let seen = st
            .output
            .iter()
            .chain(&st.dmesg)
            .find(|l| PROBLEM.is_match(l))
            .map(|l| strip_time(l));
        reasons.push(format!(
            "the kernel crashed or hung while loading it{}; see the console log",
            seen.map(|p| format!(" ({p})")).unwrap_or_default()
        ));
        return false;
    }
    if st.rc != Some(0) {
        reasons.push(refusal(s, st, kver, modules_dep_present));
        return false;
    }
    if !st.modules.contains(&s.name) {
        reasons.push("modprobe succeeded but the module is not in /proc/modules".into());
        return false;
    }
    if let Some(d) = s.depends.iter().find(|d| !st.modules.contains(d)) {
        reasons.push(format!("its dependency {d} was not loaded with it"));
    }
    true
}

/// Why modprobe refused a module: its words, the kernel's, and what they mean.
fn refusal(s: &Subject, st: &Step, kver: &str, modules_dep_present: bool) -> String {
    let said = st
        .output
        .iter()
        .rev()
        .find(|l| l.contains("modprobe:"))
        .cloned()
        .unwrap_or_else(|| "modprobe failed".into());
    let firmware_line = st
        .dmesg
        .iter()
        .find(|l| l.contains("Direct firmware load for"))
        .map(|l| strip_time(l));
    let kernel = problems(Some(st)).into_iter().next();
    let kernel = kernel
        .or_else(|| signature_refusal(st, &said))
        .or(firmware_line)
        .or_else(|| {
            st.dmesg
                .iter()
                .find(|l| l.contains(&s.name) && !l.contains("taints kernel"))
                .map(|l| strip_time(l))
        });
    let mut r = match kernel {
        Some(k) => format!("{said}; kernel: {k}"),
        None => said,
    };
    if !modules_dep_present {
        r.push_str(" (the image has no modules.dep: depmod was not run when it was built)");
    }
    if let Some(name) = missing_firmware(st) {
        r.push_str(&format!(
            " (firmware {name} is not in {FIRMWARE_HOST_PATH}, where KMM's worker copies the image's firmwarePath: \
             is it in the module's [firmware] dir, as {name}?)"
        ));
    }
    if let Some(other) = s.built_for.as_deref().filter(|b| *b != kver) {
        r.push_str(&format!(
            " (vermagic: the module was built for kernel {other}, not {kver})"
        ));
    }
    r
}

/// The kernel's words when it refused a module for its signature, and what they mean:
/// it enforces signatures (`module.sig_enforce=1`, Secure Boot's lockdown, or
/// `CONFIG_MODULE_SIG_FORCE`) and the module is unsigned, or signed by a key it does
/// not trust, or its signature does not hold.
fn signature_refusal(st: &Step, said: &str) -> Option<String> {
    let line = st.dmesg.iter().find(|l| SIGNATURE_REFUSAL.is_match(l));
    let why = match line.and_then(|l| SIGNATURE_REFUSAL.captures(l)) {
        Some(c) => match &c[1] {
            "unsigned module" => {
                "the kernel enforces module signatures and the module is not signed: set [signing] in kernels.toml"
            }
            "module with unavailable key" => {
                "the kernel enforces module signatures and the module is signed by a key it does not trust: sign with a key whose certificate the kernel (or the node's MOK list) holds"
            }
            _ => {
                "the kernel enforces module signatures and cannot check this signature's algorithm"
            }
        },
        None if said.contains("Key was rejected by service") => {
            return Some("the kernel rejected the module's signature: it does not hold (the module changed after signing) or the kernel does not trust its key".into());
        }
        None => return None,
    };
    Some(format!("{} ({why})", strip_time(line?)))
}

/// The kernel's notice when it refuses a module for its signature
/// (`kernel/module/signing.c`).
static SIGNATURE_REFUSAL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"Loading of (.+) is rejected").unwrap());

/// The firmware file a step's kernel log says the loader did not find
/// ("Direct firmware load for <name> failed with error -2").
fn missing_firmware(st: &Step) -> Option<String> {
    st.dmesg.iter().find_map(|l| {
        let rest = l.split_once("Direct firmware load for ")?.1;
        let (name, err) = rest.split_once(" failed with error ")?;
        (err.trim() == "-2").then(|| name.to_string())
    })
}

fn judge_unload(
    s: &Subject,
    unload: Option<&Step>,
    loaded: bool,
    reasons: &mut Vec<String>,
) -> bool {
    match unload {
        Some(st) if st.rc == Some(0) && !st.modules.contains(&s.name) => true,
        Some(st) if loaded => {
            let said = st
                .output
                .iter()
                .rev()
                .find(|l| l.contains("modprobe:"))
                .cloned()
                .unwrap_or_default();
            reasons.push(format!("did not unload cleanly {said}").trim().to_string());
            false
        }
        None if loaded => {
            reasons.push("the kernel crashed or hung while unloading; see the console log".into());
            false
        }
        _ => false,
    }
}

/// A kernel log line without its `[    1.234567] ` time stamp.
fn strip_time(line: &str) -> String {
    let l = line.trim();
    match l.strip_prefix('[').and_then(|r| r.split_once(']')) {
        Some((_, rest)) => rest.trim().to_string(),
        None => l.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(name: &str, depends: &[&str]) -> Subject {
        Subject {
            name: name.into(),
            parameters: vec![],
            depends: depends.iter().map(|d| d.to_string()).collect(),
            built_for: Some("6.1.0-47-amd64".into()),
            needs_hardware: false,
            folder: Some(name.into()),
        }
    }

    #[test]
    fn the_init_script_replays_kmm() {
        let s = init_script(&Replay {
            kver: "6.1.0-47-amd64",
            prefix: "/opt",
            subjects: &[Subject {
                parameters: vec!["greeting=hi there".into()],
                ..subject("kmf_param", &[])
            }],
            in_tree: &InTree::Mounted {
                boot: vec!["kernel/fs/9p/9p.ko".into()],
            },
            firmware: vec![],
        });
        // The node's own modules, mounted where a node has them, before KMM's replay.
        let mount = s.find("mount -t 9p -o trans=virtio,version=9p2000.L,ro kmfmodules /lib/modules/6.1.0-47-amd64").unwrap();
        assert!(
            s.find("/sbin/insmod /lib/modules/6.1.0-47-amd64/kernel/fs/9p/9p.ko")
                .unwrap()
                < mount
        );
        assert!(mount < s.find("cp -R").unwrap());
        // KMM's exact command, its error kept for the verdict.
        assert!(s.contains("mkdir -p /tmp/opt/lib/modules; cp -R /opt/lib/modules/6.1.0-47-amd64 /tmp/opt/lib/modules 2>/cp.err\n"), "{s}");
        assert!(
            s.contains("/sbin/modprobe -vd /tmp/opt kmf_param 'greeting=hi there' 2>&1"),
            "{s}"
        );
        assert!(
            s.contains("/sbin/modprobe -rvd /tmp/opt kmf_param 2>&1"),
            "{s}"
        );
        assert!(s.trim_end().ends_with("reboot -f"));
        assert!(
            !s.contains("firmware"),
            "no firmware, no firmware steps:\n{s}"
        );
    }

    #[test]
    fn the_init_script_copies_firmware_as_kmm_does_before_any_modprobe() {
        let s = init_script(&Replay {
            kver: "6.1.0-47-amd64",
            prefix: "/opt",
            subjects: &[subject("kmf_fw", &[])],
            in_tree: &InTree::Copied(vec![]),
            firmware: vec!["/opt/firmware/kmf_fw".into()],
        });
        let at = |needle: &str| {
            s.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} in:\n{s}"))
        };
        // KMM's order: the init container's copies (the modules', then the firmware's,
        // exactly as KMM writes them), then the worker's: the loader's path set (where the
        // kernel has it) and the copy to the host's firmware directory; then modprobe.
        let modules = at("cp -R /opt/lib/modules/6.1.0-47-amd64 /tmp/opt/lib/modules");
        let copy = at(
            "mkdir -p /tmp/opt/firmware/kmf_fw; cp -R /opt/firmware/kmf_fw/* /tmp/opt/firmware/kmf_fw 2>/fw.err\n",
        );
        let path = at(
            "if [ -e /sys/module/firmware_class/parameters/path ]; then printf %s /lib/firmware > /sys/module/firmware_class/parameters/path",
        );
        let install = at("cp -R /tmp/opt/firmware/kmf_fw/. /lib/firmware/ 2>/fw.err\n");
        let modprobe = at("/sbin/modprobe -vd /tmp/opt kmf_fw");
        assert!(
            modules < copy && copy < path && path < install && install < modprobe,
            "{s}"
        );
        assert!(
            s.contains("say firmware-copied /opt/firmware/kmf_fw $?"),
            "{s}"
        );
    }

    #[test]
    fn a_failed_firmware_copy_is_the_reason_of_its_modules_only() {
        let console = "@@kmodforge copied 0\n@@kmodforge firmware-path 0 \n\
                       @@kmodforge firmware-copied /opt/firmware/kmf_fw 1 cp: can't stat '/opt/firmware/kmf_fw/*': No such file or directory\n\
                       @@kmodforge firmware-installed /opt/firmware/kmf_fw 0 \n\
                       @@kmodforge load kmf_fw\n@@kmodforge rc 0\n@@kmodforge modules kmf_fw\n\
                       @@kmodforge unload kmf_fw\n@@kmodforge rc 0\n@@kmodforge modules\n\
                       @@kmodforge load kmf_hello\n@@kmodforge rc 0\n@@kmodforge modules kmf_hello\n\
                       @@kmodforge unload kmf_hello\n@@kmodforge rc 0\n@@kmodforge modules\n@@kmodforge end\n";
        let subjects = [subject("kmf_fw", &[]), subject("kmf_hello", &[])];
        let v = judge(console, "6.1.0-47-amd64", &subjects, true);
        assert_eq!(
            v[0].reason.as_deref(),
            Some(
                "KMM's copy of the image's firmware /opt/firmware/kmf_fw (cp -R /opt/firmware/kmf_fw/* /tmp/opt/firmware/kmf_fw) failed: \
                 exit status 1: cp: can't stat '/opt/firmware/kmf_fw/*': No such file or directory"
            ),
            "{v:?}"
        );
        assert!(v[0].failed() && v[1].reason.is_none(), "{v:?}");
        // A folder no subject comes from fails everyone rather than no one.
        let other = console.replace("/opt/firmware/kmf_fw", "/opt/firmware/vendor");
        let v = judge(&other, "6.1.0-47-amd64", &subjects, true);
        assert!(v.iter().all(|v| v.failed()), "{v:?}");
        // The loader's path, for the modules with firmware.
        let path = "@@kmodforge firmware-path 1 sh: can't create /sys/module/firmware_class/parameters/path: Permission denied\n\
                    @@kmodforge firmware-copied /opt/firmware/kmf_fw 0 \n@@kmodforge end\n";
        let v = judge(path, "6.1.0-47-amd64", &subjects, true);
        assert!(
            v[0].reason.as_deref().unwrap().starts_with(
                "KMM's worker could not point the firmware loader at /lib/firmware: exit status 1: sh: can't create"
            ),
            "{v:?}"
        );
        assert_eq!(v[1].reason.as_deref(), Some("never loaded"));
    }

    #[test]
    fn missing_firmware_is_named_with_where_it_should_come_from() {
        let console = "@@kmodforge firmware-copied /opt/firmware/kmf_fw 0 \n@@kmodforge load kmf_fw\n\
                       modprobe: ERROR: could not insert 'kmf_fw': No such file or directory\n@@kmodforge rc 1\n\
                       @@kmodforge modules\n@@kmodforge dmesg-begin\n\
                       [ 1.0] kmf_fw: module verification failed: signature and/or required key missing - tainting kernel\n\
                       [ 1.1] platform kmf_fw: Direct firmware load for kmf_fw/hello.bin failed with error -2\n\
                       [ 1.1] kmf_fw: cannot load firmware kmf_fw/hello.bin (error -2)\n\
                       @@kmodforge dmesg-end\n@@kmodforge end\n";
        let v = judge(console, "6.1.0-47-amd64", &[subject("kmf_fw", &[])], true);
        let r = v[0].reason.as_deref().unwrap();
        assert!(
            r.starts_with("modprobe: ERROR: could not insert 'kmf_fw': No such file or directory; \
                           kernel: platform kmf_fw: Direct firmware load for kmf_fw/hello.bin failed with error -2")
                && r.contains("(firmware kmf_fw/hello.bin is not in /lib/firmware, where KMM's worker copies the image's firmwarePath"),
            "{r}"
        );
    }

    const GOOD: &str = "\
@@kmodforge boot 6.1.0-47-amd64
@@kmodforge load kmf_user
insmod /tmp/opt/lib/modules/6.1.0-47-amd64/kmf_export.ko
insmod /tmp/opt/lib/modules/6.1.0-47-amd64/kmf_user.ko
@@kmodforge rc 0
@@kmodforge modules kmf_user kmf_export
@@kmodforge dmesg-begin
[    1.20] kmf_user: kmf_export_add(40, 2) = 42
@@kmodforge dmesg-end
@@kmodforge unload kmf_user
rmmod kmf_user
@@kmodforge rc 0
@@kmodforge modules
@@kmodforge dmesg-begin
@@kmodforge dmesg-end
";

    #[test]
    fn a_clean_load_and_unload_passes() {
        let v = judge(
            &format!("{GOOD}@@kmodforge end\n"),
            "6.1.0-47-amd64",
            &[subject("kmf_user", &["kmf_export"])],
            true,
        );
        assert_eq!(
            v,
            [Verdict {
                module: "kmf_user".into(),
                loaded: true,
                unloaded: true,
                reason: None,
                needs_hardware: false,
            }]
        );
    }

    #[test]
    fn a_failed_copy_or_link_is_the_reason_not_a_later_symptom() {
        let full = "@@kmodforge boot k\n@@kmodforge copied 1\n\
                    @@kmodforge copy-error cp: write error: No space left on device\n\
                    @@kmodforge load kmf_hello\nmodprobe: ERROR: could not insert 'kmf_hello': Invalid argument\n@@kmodforge rc 1\n@@kmodforge end\n";
        let v = judge(full, "6.1.0-47-amd64", &[subject("kmf_hello", &[])], true);
        assert_eq!(
            v[0].reason.as_deref(),
            Some(
                "KMM's copy of the image's tree failed: cp exited with status 1: cp: write error: No space left on device"
            )
        );
        let broken = "@@kmodforge copied 0\n@@kmodforge link-broken /lib/modules/k\n\
                      @@kmodforge load x\nmodprobe: FATAL: Module x_tables not found\n@@kmodforge rc 1\n@@kmodforge end\n";
        let v = judge(broken, "6.1.0-47-amd64", &[subject("x", &[])], true);
        assert!(
            v[0].reason
                .as_deref()
                .unwrap()
                .starts_with("the image's host link points at /lib/modules/k"),
            "{v:?}"
        );
    }

    #[test]
    fn only_the_kernels_own_markers_are_problems() {
        for bad in [
            "[ 1.0] WARNING: CPU: 0 PID: 1 at kmf.c:10 init+0x1/0x2",
            "[ 1.0] BUG: kernel NULL pointer dereference, address: 0",
            "[ 1.0] Oops: 0002 [#1] PREEMPT SMP",
            "[ 1.0] kmf: Unknown symbol crc7_be (err -2)",
        ] {
            assert!(PROBLEM.is_match(bad), "{bad}");
        }
        let fine = "[ 1.0] dahdi: Warning: Span DAHDI_DUMMY/1 didn't specify a spantype.";
        assert!(!PROBLEM.is_match(fine));
    }

    #[test]
    fn a_module_that_needs_hardware_is_said_so_never_silently() {
        let console = "@@kmodforge copied 0\n@@kmodforge load wcfxo\nmodprobe: ERROR: could not insert 'wcfxo': No such device\n@@kmodforge rc 1\n@@kmodforge end\n";
        let hw = Subject {
            needs_hardware: true,
            ..subject("wcfxo", &[])
        };
        let v = judge(console, "6.1.0-47-amd64", &[hw], true);
        assert!(v[0].needs_hardware && !v[0].failed());
        assert_eq!(v[0].result(), "needs hardware");
        assert!(v[0].reason.as_deref().unwrap().contains("No such device"));
        let v = judge(console, "6.1.0-47-amd64", &[subject("wcfxo", &[])], true);
        assert!(v[0].failed() && v[0].result() == "FAIL");
    }

    #[test]
    fn the_guest_gets_the_in_tree_closure_and_memory_for_what_it_holds() {
        let mut fs = FileSystem::new();
        fs.insert(
            "opt/lib/modules/k/modules.dep".into(),
            Node::File {
                mode: 0o644,
                data: Some(
                    b"updates/dkms/xt_RTPENGINE.ko: host/kernel/net/netfilter/x_tables.ko\n\
                      kmf_hello.ko:\nhost/kernel/net/netfilter/x_tables.ko:\nhost/kernel/lib/crc7.ko:\n"
                        .to_vec(),
                ),
            },
        );
        assert_eq!(
            in_tree_closure(&fs, "opt/lib/modules/k"),
            ["kernel/net/netfilter/x_tables.ko"]
        );
        assert_eq!(memory_mb(0), 384);
        // A 119 MB tree, as the one that made a 512 MiB guest's copy fail.
        assert!(memory_mb(119 << 20) >= 384 + 2 * 119);
    }

    #[test]
    fn the_node_arguments_follow_the_tests_own() {
        assert_eq!(command_line(&[]), "console=ttyS0 panic=-1 loglevel=7");
        assert_eq!(
            command_line(&["module.sig_enforce=1".into()]),
            "console=ttyS0 panic=-1 loglevel=7 module.sig_enforce=1"
        );
    }

    #[test]
    fn a_signature_refusal_says_why() {
        let refused = |kernel_says: &str| {
            let console = format!(
                "@@kmodforge load kmf_hello\nmodprobe: ERROR: could not insert 'kmf_hello': Key was rejected by service\n\
                 @@kmodforge rc 1\n@@kmodforge modules\n@@kmodforge dmesg-begin\n{kernel_says}@@kmodforge dmesg-end\n@@kmodforge end\n"
            );
            judge(
                &console,
                "6.1.0-47-amd64",
                &[subject("kmf_hello", &[])],
                true,
            )[0]
            .reason
            .clone()
            .unwrap()
        };
        let r = refused("[    2.5] Loading of unsigned module is rejected\n");
        assert!(
            r.contains(
                "Key was rejected by service; kernel: Loading of unsigned module is rejected"
            ) && r.contains("the module is not signed"),
            "{r}"
        );
        let r = refused("[    2.5] Loading of module with unavailable key is rejected\n");
        assert!(
            r.contains("Loading of module with unavailable key is rejected")
                && r.contains("signed by a key it does not trust"),
            "{r}"
        );
        let r = refused("");
        assert!(
            r.contains("the kernel rejected the module's signature"),
            "{r}"
        );
    }

    /// The first module's reason for failing.
    fn first_reason(console: &str, kver: &str, subjects: &[Subject], dep: bool) -> String {
        judge(console, kver, subjects, dep)[0]
            .reason
            .clone()
            .unwrap()
    }

    #[test]
    fn failures_say_why() {
        let refused = "@@kmodforge load kmf_hello\nmodprobe: ERROR: could not insert 'kmf_hello': Exec format error\n@@kmodforge rc 1\n\
                       @@kmodforge modules\n@@kmodforge dmesg-begin\n[ 2.0] kmf_hello: version magic '6.1.0-47-amd64 SMP' should be '6.12.117+deb12-amd64 SMP'\n\
                       @@kmodforge dmesg-end\n@@kmodforge unload kmf_hello\n@@kmodforge rc 1\n@@kmodforge modules\n@@kmodforge end\n";
        let v = judge(
            refused,
            "6.12.117+deb12-amd64",
            &[subject("kmf_hello", &[])],
            true,
        );
        let r = v[0].reason.as_deref().unwrap();
        assert!(
            r.contains("Exec format error")
                && r.contains("version magic '6.1.0-47-amd64 SMP' should be")
                && r.contains(
                    "the module was built for kernel 6.1.0-47-amd64, not 6.12.117+deb12-amd64"
                ),
            "{r}"
        );

        let missing = "@@kmodforge load kmf_hello\nmodprobe: FATAL: Module kmf_hello not found in directory /tmp/opt/lib/modules/k\n@@kmodforge rc 1\n@@kmodforge end\n";
        let r = first_reason(
            missing,
            "6.1.0-47-amd64",
            &[subject("kmf_hello", &[])],
            false,
        );
        assert!(
            r.contains("not found in directory") && r.contains("no modules.dep"),
            "{r}"
        );

        let oops = GOOD.replace(
            "kmf_export_add(40, 2) = 42",
            "WARNING: CPU: 0 PID: 1 at kmf_user.c:10",
        );
        let r = first_reason(
            &format!("{oops}@@kmodforge end\n"),
            "6.1.0-47-amd64",
            &[subject("kmf_user", &[])],
            true,
        );
        assert!(
            r.contains("kernel log while loading: kmf_user: WARNING: CPU: 0"),
            "{r}"
        );

        let nodep = GOOD.replace("modules kmf_user kmf_export", "modules kmf_user");
        let r = first_reason(
            &format!("{nodep}@@kmodforge end\n"),
            "6.1.0-47-amd64",
            &[subject("kmf_user", &["kmf_export"])],
            true,
        );
        assert!(r.contains("dependency kmf_export was not loaded"), "{r}");

        let crash = "@@kmodforge load kmf_user\n[ 3.0] BUG: kernel NULL pointer dereference\n";
        let v = judge(
            crash,
            "6.1.0-47-amd64",
            &[subject("kmf_user", &[]), subject("kmf_hello", &[])],
            true,
        );
        assert!(
            v[0].reason
                .as_deref()
                .unwrap()
                .contains("crashed or hung while loading it (BUG: kernel NULL pointer"),
            "{v:?}"
        );
        assert!(
            v[1].reason
                .as_deref()
                .unwrap()
                .contains("crashed or hung before"),
            "{v:?}"
        );
    }
}
