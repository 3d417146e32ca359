//! A module's firmware: module.toml's `[firmware] dir` names a folder inside the module
//! folder whose tree is relative to the firmware root (`firmware/kmf_fw/hello.bin` is
//! what the module asks `request_firmware()` for as `kmf_fw/hello.bin`). The image holds
//! it at `<prefix>/firmware/<module>/` (KMM's `modprobe.firmwarePath`), and KMM's worker
//! copies it into the node's firmware directory before modprobe.
//!
//! The folder is listed here, once, for everyone who reads it (the check of module.toml,
//! the layer's fingerprint, the layer itself), so that they agree on what ships. Symbolic
//! links are followed (linux-firmware aliases files that way) but must stay inside the
//! module folder: a link out of it would ship a file of the build host nobody reviewed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::config::diag::display_path;

/// One firmware file: its name as the module requests it and the file that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirmwareFile {
    /// Relative to the firmware root, `/`-separated: `kmf_fw/hello.bin`.
    pub name: String,
    /// Where its bytes are (a link already followed).
    pub source: PathBuf,
}

/// The files of the firmware folder `dir` of the module folder `module_dir`, sorted by
/// name, links followed; hidden ones (`.gitkeep`, an editor's swap file) are not
/// firmware. An error (a message for people) names the first link that
/// leaves the module folder, points at nothing or loops, and any entry that is neither
/// a file nor a folder.
pub fn files(module_dir: &Path, dir: &Path) -> Result<Vec<FirmwareFile>, String> {
    let root = canonical(module_dir, module_dir)?;
    let mut walk = Walk {
        module_dir,
        root,
        ancestors: BTreeSet::new(),
    };
    let mut out = Vec::new();
    walk.folder(dir, "", &mut out)?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

struct Walk<'a> {
    module_dir: &'a Path,
    /// The module folder, canonical: every file and folder must resolve inside it.
    root: PathBuf,
    /// The folders being listed (canonical), so that a link to one of them is a loop,
    /// not a hang. Two links to one folder elsewhere are two names, as on disk.
    ancestors: BTreeSet<PathBuf>,
}

impl Walk<'_> {
    fn folder(
        &mut self,
        dir: &Path,
        prefix: &str,
        out: &mut Vec<FirmwareFile>,
    ) -> Result<(), String> {
        let real = self.inside(dir)?;
        if !self.ancestors.insert(real.clone()) {
            return Err(format!(
                "{} leads back into a folder that holds it (a link loop)",
                self.shown(dir)
            ));
        }
        let entries =
            fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", self.shown(dir)))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", self.shown(dir)))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                return Err(format!(
                    "{} is not a UTF-8 name: firmware names are strings",
                    self.shown(&path)
                ));
            };
            if name.starts_with('.') {
                continue;
            }
            let name = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            self.inside(&path)?;
            let meta = fs::metadata(&path).map_err(|e| format!("{}: {e}", self.shown(&path)))?;
            if meta.is_dir() {
                self.folder(&path, &name, out)?;
            } else if meta.is_file() {
                out.push(FirmwareFile { name, source: path });
            } else {
                return Err(format!(
                    "{} is neither a file nor a folder",
                    self.shown(&path)
                ));
            }
        }
        self.ancestors.remove(&real);
        Ok(())
    }

    /// `path` with its links followed, when that stays inside the module folder.
    fn inside(&self, path: &Path) -> Result<PathBuf, String> {
        let real = canonical(self.module_dir, path)?;
        if real.starts_with(&self.root) {
            return Ok(real);
        }
        Err(format!(
            "{} leads outside the module folder (to {}): the image would ship a file of the build host",
            self.shown(path),
            real.display()
        ))
    }

    /// `path` as the user wrote it: relative to the module folder.
    fn shown(&self, path: &Path) -> String {
        match path.strip_prefix(self.module_dir) {
            Ok(rel) => rel.display().to_string(),
            Err(_) => display_path(path),
        }
    }
}

/// `path` with every link followed; a link to nothing is named.
fn canonical(module_dir: &Path, path: &Path) -> Result<PathBuf, String> {
    fs::canonicalize(path).map_err(|e| {
        let shown = path
            .strip_prefix(module_dir)
            .map_or_else(|_| display_path(path), |r| r.display().to_string());
        match fs::read_link(path) {
            Ok(target) => format!(
                "{shown} is a link to {}, which does not exist",
                target.display()
            ),
            Err(_) => format!("{shown}: {e}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn module() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("fw/kmf/sub")).unwrap();
        fs::write(d.path().join("fw/kmf/b.bin"), "b").unwrap();
        fs::write(d.path().join("fw/kmf/sub/a.bin"), "a").unwrap();
        fs::write(d.path().join("blob.bin"), "blob").unwrap();
        d
    }

    fn names(d: &Path) -> Result<Vec<String>, String> {
        files(d, &d.join("fw")).map(|f| f.into_iter().map(|f| f.name).collect())
    }

    #[test]
    fn files_are_listed_relative_to_the_firmware_root_and_sorted() {
        let d = module();
        fs::write(d.path().join("fw/kmf/.b.bin.swp"), "editor").unwrap();
        assert_eq!(names(d.path()).unwrap(), ["kmf/b.bin", "kmf/sub/a.bin"]);
    }

    #[test]
    fn links_inside_the_module_folder_are_followed() {
        let d = module();
        symlink("../../blob.bin", d.path().join("fw/kmf/alias.bin")).unwrap();
        symlink("sub", d.path().join("fw/kmf/linked")).unwrap();
        assert_eq!(
            names(d.path()).unwrap(),
            [
                "kmf/alias.bin",
                "kmf/b.bin",
                "kmf/linked/a.bin",
                "kmf/sub/a.bin"
            ]
        );
        let alias = files(d.path(), &d.path().join("fw")).unwrap();
        assert_eq!(fs::read(&alias[0].source).unwrap(), b"blob");
    }

    #[test]
    fn links_out_of_the_module_folder_to_nothing_or_in_a_loop_are_named() {
        let d = module();
        symlink("/etc/hostname", d.path().join("fw/kmf/evil.bin")).unwrap();
        let e = names(d.path()).unwrap_err();
        assert!(
            e.contains("fw/kmf/evil.bin leads outside the module folder (to /etc/hostname)"),
            "{e}"
        );

        let d = module();
        symlink("gone.bin", d.path().join("fw/kmf/dangling.bin")).unwrap();
        let e = names(d.path()).unwrap_err();
        assert!(
            e.contains("fw/kmf/dangling.bin is a link to gone.bin, which does not exist"),
            "{e}"
        );

        let d = module();
        symlink("..", d.path().join("fw/kmf/sub/up")).unwrap();
        let e = names(d.path()).unwrap_err();
        assert!(
            e.contains("fw/kmf/sub/up leads back into a folder that holds it"),
            "{e}"
        );

        // The folder itself may not be a link out of the module folder either.
        let d = module();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("x.bin"), "x").unwrap();
        symlink(outside.path(), d.path().join("fw2")).unwrap();
        let e = files(d.path(), &d.path().join("fw2")).unwrap_err();
        assert!(e.contains("fw2 leads outside the module folder"), "{e}");
    }
}
