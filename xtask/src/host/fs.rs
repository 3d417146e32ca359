//! File-system helpers every step uses: whole-tree replacement, atomic writes, JSON
//! records. A reader never sees half of a file or a mix of two trees.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Serialize, de::DeserializeOwned};

use crate::config::diag::display_path;

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
    let cannot = || format!("cannot write {}", display_path(path));
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", display_path(dir)))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(cannot)?;
    tmp.write_all(bytes).with_context(cannot)?;
    tmp.persist(path).with_context(cannot)?;
    Ok(())
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(value)?)
}

/// Replaces the directory `dest` with `new` so that `dest` is always either the old
/// complete tree or the new complete tree (or, for a moment, absent): never a mix.
pub fn replace_dir(new: &Path, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", display_path(parent)))?;
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

/// Copies a file and gives it mode 0644, whoever built it.
pub fn copy_file(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", display_path(from), display_path(to)))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("cannot set the mode of {}", display_path(to)))?;
    Ok(())
}

/// `std::fs::write`, with the path in its error (a full disk, a read-only `--out`).
pub fn write(path: &Path, data: impl AsRef<[u8]>) -> Result<()> {
    fs::write(path, data).with_context(|| format!("cannot write {}", display_path(path)))
}

/// `std::fs::create_dir_all`, with the path in its error.
pub fn create_dir_all(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("cannot create {}", display_path(path)))
}

/// `std::fs::read`, with the path in its error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", display_path(path)))
}

/// `std::fs::read_to_string`, with the path in its error.
pub fn read_to_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", display_path(path)))
}

/// Copies `from` to `to` as `cp -a` does (modes, links and times kept), making `to`'s
/// folder first.
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        create_dir_all(parent)?;
    }
    let ok = crate::host::process::Cmd::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .succeeds()?;
    anyhow::ensure!(
        ok,
        "cannot copy {} to {}",
        display_path(from),
        display_path(to)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
