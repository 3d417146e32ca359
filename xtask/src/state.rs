//! The output directory: where each kernel's staging tree, the per-job logs and the
//! bookkeeping that makes builds incremental live, and the lock that keeps two runs
//! from writing it at once.
//!
//! ```text
//! <out>/<kver>/lib/modules/<kver>/*.ko, modules.dep, ...   what the kmod image holds
//! <out>/logs/<kver>/{toolchain,<module>,depmod}.log        one log per job
//! <out>/.kmodforge/lock
//! <out>/.kmodforge/kernels/<kver>/modules/<module>/{record.json,artifacts/}
//! <out>/.kmodforge/kernels/<kver>/work/<module>/           the last build tree
//! <out>/.kmodforge/kernels/<kver>/depmod.json
//! <out>/.kmodforge/toolchains/<fingerprint>.json           what the toolchain probe found
//! <out>/.kmodforge/timings.json                            durations, for scheduling
//! ```

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

use crate::diag::display_path;

#[derive(Clone, Debug)]
pub struct Layout {
    pub out: PathBuf,
}

impl Layout {
    pub fn new(out: &Path) -> Result<Layout> {
        Ok(Layout {
            out: std::path::absolute(out)?,
        })
    }

    fn internal(&self) -> PathBuf {
        self.out.join(".kmodforge")
    }

    /// `<out>/<kver>`: the prefix tree, as `<prefix>` is in the image.
    pub fn staging(&self, kver: &str) -> PathBuf {
        self.out.join(kver)
    }

    /// `<out>/<kver>/lib/modules/<kver>`.
    pub fn staging_modules(&self, kver: &str) -> PathBuf {
        self.staging(kver).join("lib/modules").join(kver)
    }

    pub fn log(&self, kver: &str, job: &str) -> PathBuf {
        self.out.join("logs").join(kver).join(format!("{job}.log"))
    }

    pub fn kernel_state(&self, kver: &str) -> PathBuf {
        self.internal().join("kernels").join(kver)
    }

    pub fn module_state(&self, kver: &str, module: &str) -> PathBuf {
        self.kernel_state(kver).join("modules").join(module)
    }

    pub fn artifacts(&self, kver: &str, module: &str) -> PathBuf {
        self.module_state(kver, module).join("artifacts")
    }

    pub fn work(&self, kver: &str, module: &str) -> PathBuf {
        self.kernel_state(kver).join("work").join(module)
    }

    pub fn toolchain_facts(&self, fingerprint: &str) -> PathBuf {
        self.internal()
            .join("toolchains")
            .join(format!("{fingerprint}.json"))
    }

    pub fn timings(&self) -> PathBuf {
        self.internal().join("timings.json")
    }

    /// A fresh scratch directory on the same file system as the outputs, so that a
    /// finished result can be renamed into place.
    pub fn scratch(&self, name: &str) -> Result<tempfile::TempDir> {
        let dir = self.internal().join("tmp");
        fs::create_dir_all(&dir)?;
        tempfile::Builder::new()
            .prefix(name)
            .tempdir_in(&dir)
            .context("cannot create a scratch directory")
    }

    /// Takes the output directory's lock for this process's lifetime. When another run
    /// holds it, waits (saying so through `waiting`) or, with `wait == false`, fails.
    pub fn lock(&self, wait: bool, waiting: impl FnOnce(&str)) -> Result<OutputLock> {
        fs::create_dir_all(self.internal()).with_context(|| {
            format!(
                "cannot create the output directory {}",
                display_path(&self.out)
            )
        })?;
        let path = self.internal().join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                };
                if !wait {
                    anyhow::bail!(
                        "another kmodforge run{who} is using {}\n  help: wait for it to finish, or run without --no-wait to wait for it",
                        display_path(&self.out)
                    );
                }
                waiting(&format!(
                    "another kmodforge run{who} is using {}; waiting for it to finish",
                    display_path(&self.out)
                ));
                file.lock()?;
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).context("cannot lock the output directory");
            }
        }
        file.set_len(0)?;
        (&file).write_all(std::process::id().to_string().as_bytes())?;
        Ok(OutputLock { _file: file })
    }
}

/// Held while a run writes the output directory; released when dropped or at exit.
pub struct OutputLock {
    _file: File,
}

/// kmodforge's per-user cache: `$XDG_CACHE_HOME/kmodforge` (or `~/.cache/kmodforge`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("kmodforge")
}

/// Serializes work on one machine-wide resource (an image in the engine's storage)
/// between kmodforge processes, whatever their output directories: the second to
/// come waits, then finds the first one's result.
pub fn machine_lock(what: &str) -> Result<File> {
    let dir = cache_dir().join("locks");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", display_path(&dir)))?;
    let name = &Fingerprint::new("lock").field("what", what).finish()[..16];
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(name))?;
    file.lock()
        .with_context(|| format!("cannot lock {}", display_path(&dir.join(name))))?;
    Ok(file)
}

/// A SHA-256 over labelled fields and file trees: the identity of a job's inputs.
pub struct Fingerprint(Sha256);

impl Fingerprint {
    pub fn new(kind: &str) -> Fingerprint {
        let mut f = Fingerprint(Sha256::new());
        f.field("kind", kind);
        f
    }

    /// Adds a named value; names and lengths keep `("ab","c")` apart from `("a","bc")`.
    pub fn field(&mut self, name: &str, value: &str) -> &mut Self {
        for part in [name, value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part.as_bytes());
        }
        self
    }

    /// Adds every file under `dir` (sorted relative paths, the executable bit and the
    /// contents); symbolic links by their target.
    pub fn tree(&mut self, dir: &Path) -> Result<&mut Self> {
        for rel in walk_files(dir)? {
            let path = dir.join(&rel);
            let meta = fs::symlink_metadata(&path)?;
            let rel = rel.to_string_lossy();
            if meta.file_type().is_symlink() {
                self.field("link", &rel);
                self.field("target", &fs::read_link(&path)?.to_string_lossy());
                continue;
            }
            use std::os::unix::fs::PermissionsExt;
            let exec = meta.permissions().mode() & 0o111 != 0;
            self.field("file", &rel);
            self.field("exec", if exec { "1" } else { "0" });
            let bytes =
                fs::read(&path).with_context(|| format!("cannot read {}", display_path(&path)))?;
            self.0.update((bytes.len() as u64).to_le_bytes());
            self.0.update(&bytes);
        }
        Ok(self)
    }

    pub fn file(&mut self, name: &str, path: &Path) -> Result<&mut Self> {
        let bytes =
            fs::read(path).with_context(|| format!("cannot read {}", display_path(path)))?;
        self.field(name, &String::from_utf8_lossy(&bytes));
        Ok(self)
    }

    pub fn finish(&self) -> String {
        hex(&self.0.clone().finalize())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Relative paths of all files and symlinks under `dir`, sorted; `.git` is passed over.
pub fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        for entry in
            fs::read_dir(&abs).with_context(|| format!("cannot list {}", display_path(&abs)))?
        {
            let entry = entry?;
            let name = entry.file_name();
            if name == ".git" {
                continue;
            }
            let child = rel.join(&name);
            if entry.file_type()?.is_dir() {
                stack.push(child);
            } else {
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Makes `dir` an empty directory, removing whatever a previous run left there.
pub fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", display_path(dir)))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", display_path(dir)))
}

/// Reads a JSON file; `None` when it is missing or unreadable (a stale or foreign file
/// only means the work is redone).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes a file so that a reader sees either the old or the new contents, never half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("path has no parent")?;
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", display_path(path)))?;
    Ok(())
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(value)?)
}

/// Replaces the directory `dest` with `new` so that `dest` is always either the old
/// complete tree or the new complete tree (or, for a moment, absent): never a mix.
pub fn replace_dir(new: &Path, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    if dest.exists() {
        let old = dest.with_file_name(format!(
            ".{}.old-{}",
            dest.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&old);
        fs::rename(dest, &old)
            .with_context(|| format!("cannot move {} aside", display_path(dest)))?;
        fs::rename(new, dest)
            .with_context(|| format!("cannot move a new tree to {}", display_path(dest)))?;
        fs::remove_dir_all(&old).ok();
    } else {
        fs::rename(new, dest)
            .with_context(|| format!("cannot move a new tree to {}", display_path(dest)))?;
    }
    Ok(())
}

/// How long jobs took last time, so the longest can start first.
#[derive(Default, Serialize, Deserialize)]
pub struct Timings(pub BTreeMap<String, f64>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_changes_with_content_not_with_touch() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a.c"), "int x;\n").unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("sub/b.h"), "#define B\n").unwrap();
        let fp = || Fingerprint::new("t").tree(d.path()).unwrap().finish();
        let first = fp();
        // Rewriting the same bytes (a touch) changes nothing.
        fs::write(d.path().join("a.c"), "int x;\n").unwrap();
        assert_eq!(fp(), first);
        fs::write(d.path().join("sub/b.h"), "#define B 1\n").unwrap();
        assert_ne!(fp(), first);
    }

    #[test]
    fn fields_are_length_delimited() {
        let a = Fingerprint::new("t").field("ab", "c").finish();
        let b = Fingerprint::new("t").field("a", "bc").finish();
        assert_ne!(a, b);
    }

    #[test]
    fn replace_dir_swaps_whole_trees() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("k");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("old"), "").unwrap();
        let new = d.path().join("new");
        fs::create_dir(&new).unwrap();
        fs::write(new.join("fresh"), "").unwrap();
        replace_dir(&new, &dest).unwrap();
        assert!(dest.join("fresh").exists() && !dest.join("old").exists() && !new.exists());
        let leftovers: Vec<_> = fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn a_second_lock_fails_fast_without_wait() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path()).unwrap();
        let _held = layout.lock(false, |_| {}).unwrap();
        // std's file locks are per open file description, so a second open conflicts
        // within one process too.
        let err = layout
            .lock(false, |_| {})
            .err()
            .expect("second lock must fail");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("another kmodforge run") && msg.contains(&std::process::id().to_string()),
            "{msg}"
        );
    }
}
