//! What kmodforge reads of a DKMS package's `dkms.conf` on the host, without running it.
//!
//! A dkms.conf is a bash script: it is read for real (two passes of bash, as DKMS does)
//! only inside the compile container, where the kernel's config and headers are. The
//! plan needs a little before that: the package's name, to find the folders its
//! `BUILD_DEPENDS` names, and those names. Both are literal assignments in every
//! package seen; a computed one is simply not known here (the build still reads it).

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;

/// The file that makes a module folder a DKMS package.
pub const DKMS_CONF: &str = "dkms.conf";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkmsConf {
    pub path: PathBuf,
    /// PACKAGE_NAME, when dkms.conf assigns it a literal value.
    pub package_name: Option<String>,
    pub package_version: Option<String>,
    /// BUILD_DEPENDS[i], when literal: other DKMS packages to build first.
    pub build_depends: Vec<String>,
    /// Whether it sets BUILD_EXCLUSIVE_KERNEL (the build decides per kernel).
    pub exclusive_kernel: bool,
}

static ASSIGNMENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"^\s*(?:export\s+)?([A-Z_]+)(?:\[\s*[0-9]+\s*\])?=(?:"([^"$`\\]*)"|'([^']*)'|([^\s"'$`;&|()<>\\]*))\s*(?:#.*)?$"#)
        .unwrap()
});

/// The literal directives of the dkms.conf at `path` (none when it cannot be read).
pub fn read_static(path: &Path) -> DkmsConf {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut conf = DkmsConf {
        path: path.to_path_buf(),
        package_name: None,
        package_version: None,
        build_depends: Vec::new(),
        exclusive_kernel: false,
    };
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim_start().starts_with("BUILD_EXCLUSIVE_KERNEL=") {
            conf.exclusive_kernel = true;
        }
        let Some(c) = ASSIGNMENT.captures(line) else {
            continue;
        };
        let value = c
            .get(2)
            .or(c.get(3))
            .or(c.get(4))
            .map_or("", |m| m.as_str())
            .to_string();
        match &c[1] {
            "PACKAGE_NAME" => conf.package_name = Some(value),
            "PACKAGE_VERSION" => conf.package_version = Some(value),
            "BUILD_DEPENDS" => conf
                .build_depends
                .extend(value.split_whitespace().map(str::to_string)),
            _ => {}
        }
    }
    conf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_assignments_are_read_and_computed_ones_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(DKMS_CONF);
        std::fs::write(
            &p,
            "PACKAGE_NAME=\"evdi\"\r\nPACKAGE_VERSION=1.14.1 # comment\nBUILD_DEPENDS[0]='exp'\n\
             BUILD_DEPENDS[1]=\"other\"\nMAKE[0]=\"make -C $kernel_source_dir\"\n\
             BUILD_EXCLUSIVE_KERNEL=\"^6\"\n",
        )
        .unwrap();
        let c = read_static(&p);
        assert_eq!(c.package_name.as_deref(), Some("evdi"));
        assert_eq!(c.package_version.as_deref(), Some("1.14.1"));
        assert_eq!(c.build_depends, ["exp", "other"]);
        assert!(c.exclusive_kernel);
        std::fs::write(&p, "PACKAGE_NAME=\"x-$(uname -r)\"\n").unwrap();
        assert_eq!(read_static(&p).package_name, None);
    }
}
