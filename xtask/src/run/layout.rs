//! The output directory: where each kernel's staging tree, the per-job logs and the
//! bookkeeping that makes builds incremental live, and the lock that keeps two runs
//! from writing it at once.
//!
//! ```text
//! <out>/<kver>/lib/modules/<kver>/*.ko, modules.dep, ...   what the kmod image holds
//! <out>/logs/<kver>/{toolchain,<module>,depmod}.log        one log per job
//! <out>/.kmodforge/lock
//! <out>/.kmodforge/kernels/<kver>/compiles.json          every module's compile record
//! <out>/.kmodforge/kernels/<kver>/modules/<module>/{artifacts/,phases.json}
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
use serde::{Deserialize, Serialize};

use crate::config::diag::display_path;
use crate::run::fingerprint::Fingerprint;

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
        let cannot = || {
            format!(
                "cannot create a scratch directory in {}",
                display_path(&dir)
            )
        };
        fs::create_dir_all(&dir).with_context(cannot)?;
        tempfile::Builder::new()
            .prefix(name)
            .tempdir_in(&dir)
            .with_context(cannot)
    }

    /// Takes the output directory's lock for this process's lifetime. When another run
    /// holds it, waits (saying so through `waiting`) or, with `wait == false`, fails.
    /// Then clears what a killed run left in the scratch folder.
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
            .open(&path)
            .with_context(|| format!("cannot open {}", display_path(&path)))?;
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
        // The pid only tells a waiting run who holds the lock: a full disk must not stop
        // this run over it.
        let _ = file
            .set_len(0)
            .and_then(|()| (&file).write_all(std::process::id().to_string().as_bytes()));
        // Whatever is in the scratch folder was left by a run that was killed: this run
        // alone holds the directory now.
        let tmp = self.internal().join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot clear {}", display_path(&tmp)))?;
        }
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

/// How long jobs took last time, so the longest can start first.
#[derive(Default, Serialize, Deserialize)]
pub struct Timings(pub BTreeMap<String, f64>);

#[cfg(test)]
mod tests {
    use super::*;

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
