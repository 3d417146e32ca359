//! Fingerprints: the identity of a job's inputs, a SHA-256 over labelled fields and
//! file trees. A job whose fingerprint matches its last successful run does not run.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::config::diag::display_path;

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
            self.entry(dir, &rel)?;
        }
        Ok(self)
    }

    fn entry(&mut self, dir: &Path, rel: &Path) -> Result<()> {
        let path = dir.join(rel);
        let meta = fs::symlink_metadata(&path)?;
        let rel = rel.to_string_lossy();
        if meta.file_type().is_symlink() {
            self.field("link", &rel);
            self.field("target", &fs::read_link(&path)?.to_string_lossy());
            return Ok(());
        }
        use std::os::unix::fs::PermissionsExt;
        let exec = meta.permissions().mode() & 0o111 != 0;
        self.field("file", &rel);
        self.field("exec", if exec { "1" } else { "0" });
        self.contents(&path)?;
        Ok(())
    }

    /// Adds a module folder's files as [`Fingerprint::tree`] does, leaving out what git
    /// ignores there (editor swap files, the rust-project.json rust-analyzer writes).
    pub fn module_tree(&mut self, dir: &Path) -> Result<&mut Self> {
        for rel in walk_module_files(dir)? {
            self.entry(dir, &rel)?;
        }
        Ok(self)
    }

    /// Adds a file's bytes, exactly (binary files: firmware).
    pub fn contents(&mut self, path: &Path) -> Result<&mut Self> {
        let bytes =
            fs::read(path).with_context(|| format!("cannot read {}", display_path(path)))?;
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(&bytes);
        Ok(self)
    }

    pub fn finish(&self) -> String {
        hex(&self.0.clone().finalize())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// The files of a module folder, as [`walk_files`] lists them, less what git ignores
/// there: `.gitignore` files in the folder and above it, `.git/info/exclude` and the
/// user's global excludes, whether or not the folder is in a git repository.
pub fn walk_module_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let walk = ignore::WalkBuilder::new(dir)
        .standard_filters(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(true)
        .parents(true)
        .require_git(false)
        .filter_entry(|e| e.file_name() != ".git")
        .build();
    for entry in walk {
        let entry = entry.with_context(|| format!("cannot list {}", display_path(dir)))?;
        if entry.file_type().is_some_and(|t| !t.is_dir()) {
            let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
            out.push(rel.to_path_buf());
        }
    }
    out.sort();
    Ok(out)
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
}
