//! What the compiles of one kernel produced: a record per module folder, all of a
//! kernel's in one file (`kernels/<kver>/compiles.json`). A no-op check reads that file
//! once per kernel and then only looks at the files the records name, so that a
//! no-op run of 200 kernels x 20 modules reads 200 files, not 4,000 (on a virtual
//! machine each system call costs microseconds, and they were most of that run).
//!
//! Only one process writes an output directory (its lock); within it, compiles finish
//! on many threads, so saving a record (read the file, change one entry, replace the
//! file) is done one at a time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::host::fs::{read_json, write_json};
use crate::run::layout::Layout;

/// What the last successful run of a (kernel, module) job produced.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub fingerprint: String,
    /// The `.ko` file names kept in the artifacts directory.
    pub modules: Vec<String>,
    /// Where they go under `lib/modules/<kver>/` ("" for the top; `updates/dkms` for a
    /// DKMS package, as Debian's DKMS installs them).
    #[serde(default)]
    pub location: String,
    /// Why the module was skipped for this kernel, if it was.
    pub skipped: Option<String>,
    /// A DKMS package's PACKAGE_NAME and PACKAGE_VERSION.
    #[serde(default)]
    pub package: Option<(String, String)>,
    /// Bytes of the kept (stripped) files and of the unstripped ones.
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub unstripped_bytes: u64,
}

/// The records of one kernel's compiles, by module folder name.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Records(pub BTreeMap<String, Record>);

/// Saving a record rewrites its kernel's file: one save at a time.
static SAVING: Mutex<()> = Mutex::new(());

impl Records {
    pub fn path(layout: &Layout, kver: &str) -> PathBuf {
        layout.kernel_state(kver).join("compiles.json")
    }

    /// The kernel's records (none when there is no file or it cannot be read: then
    /// every module is built again).
    pub fn load(layout: &Layout, kver: &str) -> Records {
        read_json(&Records::path(layout, kver)).unwrap_or_default()
    }

    /// `module`'s record, whatever its inputs.
    pub fn get(&self, module: &str) -> Option<&Record> {
        self.0.get(module)
    }

    /// Replaces the kernel's file with these records.
    pub fn save(&self, layout: &Layout, kver: &str) -> Result<()> {
        write_json(&Records::path(layout, kver), self)
    }

    /// `module`'s record when it matches `fingerprint` and its files are still there.
    pub fn fresh(
        &self,
        layout: &Layout,
        kver: &str,
        module: &str,
        fingerprint: &str,
    ) -> Option<&Record> {
        let rec = self.get(module)?;
        if rec.fingerprint != fingerprint {
            return None;
        }
        if rec.skipped.is_some() {
            return Some(rec);
        }
        let artifacts = layout.artifacts(kver, module);
        // Sizes are cheap to check and catch a truncated or replaced file; depmod needs
        // the unstripped twins too.
        let mut total = 0;
        for m in &rec.modules {
            total += std::fs::metadata(artifacts.join(m)).ok()?.len();
            if !artifacts.join("unstripped").join(m).is_file() {
                return None;
            }
        }
        (rec.bytes == 0 || total == rec.bytes).then_some(rec)
    }
}

impl Record {
    /// Keeps this as `module`'s record, the kernel's other records as they are.
    pub fn save(&self, layout: &Layout, kver: &str, module: &str) -> Result<()> {
        let _one = SAVING.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = Records::load(layout, kver);
        all.0.insert(module.to_string(), self.clone());
        all.save(layout, kver)
    }

    pub(super) fn skipped(fingerprint: &str, reason: String) -> Record {
        Record {
            fingerprint: fingerprint.into(),
            modules: vec![],
            location: String::new(),
            skipped: Some(reason),
            package: None,
            bytes: 0,
            unstripped_bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(fingerprint: &str, file: &str, bytes: u64) -> Record {
        Record {
            fingerprint: fingerprint.into(),
            modules: vec![file.into()],
            location: String::new(),
            skipped: None,
            package: None,
            bytes,
            unstripped_bytes: bytes,
        }
    }

    /// Records saved from many threads all stay: a save changes its own entry only.
    #[test]
    fn saves_from_many_threads_keep_every_record() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path()).unwrap();
        std::thread::scope(|s| {
            for i in 0..16 {
                let layout = &layout;
                s.spawn(move || {
                    built(&format!("fp{i}"), "m.ko", 1)
                        .save(layout, "6.1.0-1-amd64", &format!("m{i}"))
                        .unwrap()
                });
            }
        });
        let all = Records::load(&layout, "6.1.0-1-amd64");
        assert_eq!(all.0.len(), 16);
        assert_eq!(all.0["m7"].fingerprint, "fp7");
        // Another kernel's file is another file.
        assert!(Records::load(&layout, "6.1.0-2-amd64").0.is_empty());
    }

    /// A record is fresh with its fingerprint and its files, each of the recorded size.
    #[test]
    fn a_record_is_fresh_only_with_its_fingerprint_and_files() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path()).unwrap();
        let (kver, art) = ("6.1.0-1-amd64", layout.artifacts("6.1.0-1-amd64", "m"));
        built("fp", "m.ko", 3).save(&layout, kver, "m").unwrap();
        let fresh = || {
            Records::load(&layout, kver)
                .fresh(&layout, kver, "m", "fp")
                .is_some()
        };
        assert!(!fresh(), "no files yet");
        std::fs::create_dir_all(art.join("unstripped")).unwrap();
        std::fs::write(art.join("m.ko"), "abc").unwrap();
        assert!(!fresh(), "no unstripped twin");
        std::fs::write(art.join("unstripped/m.ko"), "abcdef").unwrap();
        assert!(fresh());
        let other = Records::load(&layout, kver);
        assert!(other.fresh(&layout, kver, "m", "other").is_none());
        std::fs::write(art.join("m.ko"), "ab").unwrap();
        assert!(!fresh(), "a truncated module");
        Record::skipped("fp", "no rust".into())
            .save(&layout, kver, "m")
            .unwrap();
        assert!(fresh(), "a skip has no files");
    }
}
