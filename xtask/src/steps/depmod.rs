//! The depmod step: a kernel's staging tree, laid out as the kmod image holds it.
//!
//! Every module that built for the kernel is gathered into a fresh `lib/modules/<kver>/`
//! (a DKMS package's under `updates/dkms/`, where Debian's DKMS installs them),
//! `depmod -b` runs on it inside the kernel's toolchain (which holds kmod), and only then
//! does the new tree replace `<out>/<kver>`. The unstripped modules go to
//! `<out>/unstripped/<kver>/`, for crash analysis, never into an image. The record keeps
//! a stamp of the tree (each file's name, size and modification time) and, apart, each
//! file's hash, so a run that finds nothing to rebuild still notices a tree that was
//! changed or damaged since: a tree whose stamp matches is taken as it was (as make and
//! git do); otherwise its files are hashed again and compared.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::diag::display_path;
use crate::formats::modinfo::ModInfo;
use crate::formats::oci::sha256;
use crate::host::engine::{Engine, Mount, Run};
use crate::host::fs::{copy_file, read_json, replace_dir, write_json};
use crate::run::layout::Layout;
use crate::steps::compile::Record;

/// The files depmod writes that kmodforge relies on (modprobe reads the `.bin`s).
pub const DEPMOD_FILES: &[&str] = &[
    "modules.dep",
    "modules.dep.bin",
    "modules.alias",
    "modules.alias.bin",
    "modules.symbols",
    "modules.symbols.bin",
];

/// What the last depmod run made: its inputs' fingerprint and a stamp of the tree
/// (every file's name, size and modification time), enough for the no-op check; the
/// files' hashes are kept apart, read only when the stamp differs.
#[derive(Serialize, Deserialize)]
struct DepmodRecord {
    fingerprint: String,
    #[serde(default)]
    stamp: String,
}

/// Every file of `lib/modules/<kver>/`: size and SHA-256.
#[derive(Serialize, Deserialize)]
struct TreeFiles {
    files: BTreeMap<String, (u64, String)>,
}

/// The kernel's Module.symvers, as the last depmod found it in the toolchain.
pub fn kernel_symvers(layout: &Layout, kver: &str) -> PathBuf {
    layout.kernel_state(kver).join("Module.symvers")
}

fn record_path(layout: &Layout, kver: &str) -> PathBuf {
    layout.kernel_state(kver).join("depmod.json")
}

fn files_path(layout: &Layout, kver: &str) -> PathBuf {
    layout.kernel_state(kver).join("depmod-files.json")
}

/// The regular files of a tree (symbolic links, such as the host link, left out), sorted
/// by path. Each is looked at relative to its open folder (a no-op run does this for
/// every file of every kernel's tree).
fn regular_files(dir: &Path) -> Result<Vec<(String, std::fs::Metadata)>> {
    let mut out = Vec::new();
    let mut folders = vec![PathBuf::new()];
    while let Some(rel) = folders.pop() {
        let abs = dir.join(&rel);
        let list = std::fs::read_dir(&abs)
            .with_context(|| format!("cannot list {}", display_path(&abs)))?;
        for entry in list {
            let entry = entry?;
            let kind = entry.file_type()?;
            let child = rel.join(entry.file_name());
            if kind.is_dir() {
                folders.push(child);
            } else if !kind.is_symlink() {
                out.push((child, entry.metadata()?));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out
        .into_iter()
        .map(|(rel, meta)| (rel.to_string_lossy().into_owned(), meta))
        .collect())
}

/// A digest of every file's name, size and modification time: what a tree left alone
/// keeps, and a write, a truncation or a new file changes.
fn stamp(dir: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut f = crate::run::fingerprint::Fingerprint::new("tree-stamp");
    for (rel, meta) in regular_files(dir)? {
        let time = format!("{} {}.{}", meta.len(), meta.mtime(), meta.mtime_nsec());
        f.field(&rel, &time);
    }
    Ok(f.finish())
}

/// Sizes and hashes of a tree's files.
fn inventory(dir: &Path) -> Result<BTreeMap<String, (u64, String)>> {
    let mut files = BTreeMap::new();
    for (rel, _) in regular_files(dir)? {
        let data = crate::host::fs::read(&dir.join(&rel))?;
        files.insert(rel, (data.len() as u64, sha256(&data)));
    }
    Ok(files)
}

/// The staging tree is the one the last run made from these inputs, file for file: its
/// stamp is the recorded one, or (a file rewritten with the same bytes) its contents.
pub fn is_fresh(layout: &Layout, kver: &str, fingerprint: &str) -> bool {
    let Some(rec) = read_json::<DepmodRecord>(&record_path(layout, kver)) else {
        return false;
    };
    let dir = layout.staging_modules(kver);
    if rec.fingerprint != fingerprint || !dir.join("modules.dep").is_file() {
        return false;
    }
    if stamp(&dir).is_ok_and(|s| s == rec.stamp) {
        return true;
    }
    read_json::<TreeFiles>(&files_path(layout, kver))
        .is_some_and(|rec| inventory(&dir).is_ok_and(|files| files == rec.files))
}

/// What the staging tree was made from (a partial tree says which modules it lacks): a
/// layer written from another tree is stale even when its inputs are the same.
pub fn tree_fingerprint(layout: &Layout, kver: &str) -> Option<String> {
    read_json::<DepmodRecord>(&record_path(layout, kver)).map(|r| r.fingerprint)
}

/// The name of KMM's link to the node's in-tree modules, in the image's tree.
pub const HOST_LINK: &str = "host";

/// What depmod runs with besides the tree.
pub struct Kernel<'a> {
    pub kver: &'a str,
    /// The toolchain image (it holds kmod) and the kernel's build tree in it.
    pub image: &'a str,
    pub kdir: &'a str,
    /// The kernel's own `lib/modules/<kver>`, when the tree gets the host link.
    pub host_modules: Option<&'a Path>,
}

/// Whether a module of `built` depends on a module none of them is: then it needs the
/// kernel's own modules, which KMM gives through the host link.
pub fn needs_in_tree(layout: &Layout, kver: &str, built: &[(String, Record)]) -> Result<bool> {
    let name = |file: &str| file.trim_end_matches(".ko").replace('-', "_");
    let ours: std::collections::BTreeSet<String> = built
        .iter()
        .flat_map(|(_, r)| r.modules.iter().map(|m| name(m)))
        .collect();
    for (module, rec) in built {
        for ko in &rec.modules {
            let info = ModInfo::read(&layout.artifacts(kver, module).join(ko))?;
            if info
                .depends()
                .iter()
                .any(|d| !ours.contains(&d.replace('-', "_")))
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Builds the kernel's staging tree from the artifacts of `built` (each module's name
/// and its compile record) and swaps it into place. With the kernel's own modules, the
/// tree gets the host link and depmod resolves in-tree dependencies through it. The
/// kernel's Module.symvers is kept beside the tree, for `verify`.
pub fn run(
    engine: &Engine,
    layout: &Layout,
    kernel: &Kernel,
    built: &[(String, Record)],
    fingerprint: &str,
    log: &Path,
) -> Result<()> {
    let kver = kernel.kver;
    let scratch = layout.scratch("staging-")?;
    let moddir = scratch.path().join("lib/modules").join(kver);
    let debug = layout.scratch("unstripped-")?;
    let info = layout.scratch("kernel-info-")?;
    gather(layout, kver, built, &moddir, debug.path())?;
    let mut mounts = vec![
        Mount {
            host: scratch.path(),
            container: "/kmodforge/staging",
            read_only: false,
        },
        Mount {
            host: info.path(),
            container: "/kmodforge/info",
            read_only: false,
        },
    ];
    if let Some(host) = kernel.host_modules {
        std::os::unix::fs::symlink(format!("/lib/modules/{kver}"), moddir.join(HOST_LINK))?;
        mounts.push(Mount {
            host,
            container: "/kmodforge/kernel-modules",
            read_only: true,
        });
    }
    // The kernel's Module.symvers first (its build tree is under /lib/modules/<kver>),
    // then /lib/modules/<kver> becomes the kernel's own modules, where the host link
    // points, as on a node.
    let script = "{ cp \"$2/Module.symvers\" /kmodforge/info/ 2>/dev/null || true; } && \
                  if [ -d /kmodforge/kernel-modules ]; then \
                  rm -rf \"/lib/modules/$1\" && ln -s /kmodforge/kernel-modules \"/lib/modules/$1\"; fi && \
                  depmod -b /kmodforge/staging \"$1\"";
    let run = Run {
        image: kernel.image,
        mounts,
        env: vec![],
        workdir: None,
        network: false,
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            script.into(),
            "depmod".into(),
            kver.into(),
            kernel.kdir.into(),
        ],
        pass_fds: vec![],
    };
    engine.run(&run).run_logged(log, None)?;
    for f in DEPMOD_FILES {
        if !moddir.join(f).is_file() {
            bail!("depmod did not write {f} in the staging tree of {kver}");
        }
    }
    let symvers = info.path().join("Module.symvers");
    if symvers.is_file() {
        copy_file(&symvers, &kernel_symvers(layout, kver))?;
    }
    replace_dir(&scratch.keep(), &layout.staging(kver))
        .context("cannot put the new staging tree in place")?;
    replace_dir(&debug.keep(), &layout.out.join("unstripped").join(kver))?;
    record(layout, kver, fingerprint)
}

/// Records the staging tree in place as the one made from `fingerprint`, file for file
/// (after depmod; the bench's synthetic inventory makes its trees fresh this way too).
pub fn record(layout: &Layout, kver: &str, fingerprint: &str) -> Result<()> {
    let dir = layout.staging_modules(kver);
    write_json(
        &files_path(layout, kver),
        &TreeFiles {
            files: inventory(&dir)?,
        },
    )?;
    write_json(
        &record_path(layout, kver),
        &DepmodRecord {
            fingerprint: fingerprint.into(),
            stamp: stamp(&dir)?,
        },
    )
}

/// Copies every module that built to its place in `moddir`, and its unstripped twin to
/// the same place under `debug`.
fn gather(
    layout: &Layout,
    kver: &str,
    built: &[(String, Record)],
    moddir: &Path,
    debug: &Path,
) -> Result<()> {
    let mut owner: BTreeMap<PathBuf, &str> = BTreeMap::new();
    for (module, rec) in built {
        let artifacts = layout.artifacts(kver, module);
        for ko in &rec.modules {
            let rel = Path::new(&rec.location).join(ko);
            if let Some(other) = owner.insert(rel.clone(), module) {
                bail!(
                    "modules {other} and {module} both build {}: a kernel's modules need distinct names",
                    rel.display()
                );
            }
            for (from, to) in [
                (artifacts.join(ko), moddir),
                (artifacts.join("unstripped").join(ko), debug),
            ] {
                crate::host::fs::create_dir_all(&to.join(&rec.location))?;
                copy_file(&from, &to.join(&rel))?;
            }
        }
    }
    Ok(())
}
