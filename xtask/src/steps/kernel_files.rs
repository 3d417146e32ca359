//! A kernel's own files, as a node running it has them: the kernel image (to boot it
//! in the load test), its in-tree modules under `lib/modules/<kver>/` (what KMM's
//! worker sees of the node's `/lib/modules`, and what depmod resolves an image's
//! in-tree dependencies against), and the `Module.symvers` of its build (every
//! exported symbol and its CRC, for `verify`).
//!
//! They come from the kernel's toolchain: from `/boot` and `/lib/modules` when it holds
//! the kernel (a kernel it built, the Driver Toolkit's kernel-modules), else from the
//! distribution's kernel package, fetched from its archive and unpacked, not installed
//! (`linux-image-<kver>` on Debian, whose toolchains hold headers only, even for 6.12
//! where the headers depend on the image package; `kernel-core`, `kernel-modules` on
//! RHEL). Kept once per machine.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::diag::display_path;
use crate::host::engine::{Engine, Mount, Run};
use crate::run::layout::{Layout, cache_dir, machine_lock};

/// Where one kernel's files are kept.
#[derive(Clone, Debug)]
pub struct KernelFiles {
    pub dir: PathBuf,
    pub kver: String,
}

impl KernelFiles {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The kernel's own `lib/modules/<kver>/` (in-tree modules, modules.order, ...).
    pub fn modules(&self) -> PathBuf {
        self.dir.join("lib/modules").join(&self.kver)
    }

    /// The build's `Module.symvers` (may be missing for a prebuilt toolchain).
    pub fn symvers(&self) -> PathBuf {
        self.dir.join("Module.symvers")
    }

    /// The kernel's own modules.dep: each module and what it needs, in load order.
    pub fn modules_dep(&self) -> BTreeMap<String, Vec<String>> {
        let text = fs::read_to_string(self.modules().join("modules.dep")).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(m, d)| {
                (
                    m.to_string(),
                    d.split_whitespace().map(str::to_string).collect(),
                )
            })
            .collect()
    }

    /// The module files (paths in `modules()`) to load, in order, so that `wanted` (module
    /// names) and all they need are loaded (built-in ones need nothing); `None` when one
    /// is neither a module of the kernel nor built in.
    pub fn load_order(&self, wanted: &[&str]) -> Option<Vec<String>> {
        let dep = self.modules_dep();
        let name = |p: &str| {
            let file = p.rsplit('/').next().unwrap_or(p);
            file.split(".ko").next().unwrap_or(file).replace('-', "_")
        };
        let builtin =
            fs::read_to_string(self.modules().join("modules.builtin")).unwrap_or_default();
        let mut order: Vec<String> = Vec::new();
        for w in wanted {
            if builtin.lines().any(|p| name(p) == w.replace('-', "_")) {
                continue;
            }
            let (path, needs) = dep.iter().find(|(p, _)| name(p) == w.replace('-', "_"))?;
            // modprobe loads a module's dependencies last to first, then the module.
            for p in needs.iter().rev().chain(std::iter::once(path)) {
                if !order.contains(p) {
                    order.push(p.clone());
                }
            }
        }
        Some(order)
    }
}

const FETCH: &str = r#"set -eu
k="$1"; kdir="$2"; out=/kmodforge/out
mkdir -p "$out/lib/modules/$k"
if [ -f "$kdir/Module.symvers" ]; then cp "$kdir/Module.symvers" "$out/Module.symvers"; fi
tree() { # ROOT: the kernel's modules under ROOT/lib/modules/$k, without build and source,
  # with the modules.dep a node's depmod made for them
  [ -d "$1/lib/modules/$k" ] || return 0
  tar -C "$1/lib/modules/$k" --exclude=./build --exclude=./source -cf - . | tar -C "$out/lib/modules/$k" -xf -
  if [ -d "$out/lib/modules/$k/kernel" ]; then depmod -b "$out" "$k"; fi
}
if [ -f "/boot/vmlinuz-$k" ]; then
  cp "/boot/vmlinuz-$k" "$out/vmlinuz"; tree ""; exit 0
fi
mkdir -p /tmp/kmodforge-kernel && cd /tmp/kmodforge-kernel
if command -v apt-get >/dev/null; then
  apt-get -o APT::Sandbox::User=root update -qq
  apt-get -o APT::Sandbox::User=root download -qq "linux-image-$k" || apt-get -o APT::Sandbox::User=root download -qq "linux-image-$k-unsigned"
  dpkg-deb -x linux-image-*.deb x
  cp "x/boot/vmlinuz-$k" "$out/vmlinuz"; tree x; exit 0
fi
if command -v dnf >/dev/null; then
  dnf download -q "kernel-core-$k" "kernel-modules-core-$k" "kernel-modules-$k" || dnf download -q "kernel-core-$k" "kernel-modules-$k"
  for r in kernel-*.rpm; do rpm2cpio "$r" | cpio -idm --quiet; done
  cp "lib/modules/$k/vmlinuz" "$out/vmlinuz"; tree .; exit 0
fi
echo "the toolchain has neither /boot/vmlinuz-$k nor apt-get or dnf to fetch the kernel" >&2; exit 1
"#;

/// The kernel's files, fetched through its toolchain once per machine (per toolchain
/// fingerprint).
pub fn ensure(
    engine: &Engine,
    layout: &Layout,
    toolchain_image: &str,
    fingerprint: &str,
    kver: &str,
    kdir: &str,
    log: &Path,
) -> Result<KernelFiles> {
    let files = KernelFiles {
        dir: cache_dir()
            .join("kernels-v2")
            .join(format!("{kver}-{}", &fingerprint[..12])),
        kver: kver.to_string(),
    };
    let complete = |f: &KernelFiles| f.dir.join(".complete").is_file();
    if complete(&files) {
        return Ok(files);
    }
    let _lock = machine_lock(&format!("kernel files {}", files.dir.display()))?;
    if complete(&files) {
        return Ok(files);
    }
    let tmp = layout.scratch("kernel-files-")?;
    let run = Run {
        image: toolchain_image,
        mounts: vec![Mount {
            host: tmp.path(),
            container: "/kmodforge/out",
            read_only: false,
        }],
        env: vec![],
        workdir: None,
        network: true,
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            FETCH.into(),
            "kernel-files".into(),
            kver.into(),
            kdir.into(),
        ],
        pass_fds: vec![],
    };
    engine
        .run(&run)
        .run_logged(log, None)
        .with_context(|| format!("cannot get the kernel image and modules of {kver}"))?;
    crate::host::fs::write(&tmp.path().join(".complete"), "")?;
    if let Some(parent) = files.dir.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", display_path(parent)))?;
    }
    let _ = fs::remove_dir_all(&files.dir);
    // The cache may be on another file system than the output directory.
    if fs::rename(tmp.path(), &files.dir).is_err() {
        crate::host::fs::copy_tree(tmp.path(), &files.dir)?;
    }
    Ok(files)
}
