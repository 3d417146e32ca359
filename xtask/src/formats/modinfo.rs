//! Reads a `.ko` file's `.modinfo` section: `vermagic`, `depends`, `name`, ...
//!
//! The section is a run of NUL-terminated `key=value` strings. kmodforge checks
//! `vermagic` after every build: a module whose Makefile used `uname -r`, or a toolchain
//! that holds the wrong kernel's headers, gives a `.ko` the target kernel will refuse.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection, ObjectSymbol};

use crate::config::diag::display_path;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModInfo {
    pub fields: Vec<(String, String)>,
}

impl ModInfo {
    pub fn read(path: &Path) -> Result<ModInfo> {
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", display_path(path)))?;
        ModInfo::from_elf(&data)
            .with_context(|| format!("{} is not a kernel module", display_path(path)))
    }

    /// The `.modinfo` of a module's bytes.
    pub fn from_elf(data: &[u8]) -> Result<ModInfo> {
        let file = object::File::parse(data).context("not an ELF object")?;
        let section = file
            .section_by_name(".modinfo")
            .context("no .modinfo section")?;
        Ok(ModInfo::parse(section.data()?))
    }

    pub fn parse(section: &[u8]) -> ModInfo {
        let fields = section
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                let s = String::from_utf8_lossy(s);
                let (k, v) = s.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect();
        ModInfo { fields }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The modules named in `depends=` (empty when there are none).
    pub fn depends(&self) -> Vec<String> {
        self.get("depends")
            .map(|d| {
                d.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The kernel release in `vermagic` (its first word).
    pub fn vermagic_release(&self) -> Option<&str> {
        self.get("vermagic")
            .and_then(|v| v.split_whitespace().next())
    }
}

/// The symbols a module links against the kernel with.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Symbols {
    /// Undefined symbols: what the module needs from the kernel or other modules.
    pub imports: Vec<String>,
    /// The CRC each import was built against (`__versions`, with CONFIG_MODVERSIONS).
    pub crcs: BTreeMap<String, u32>,
    /// The symbols it exports (`EXPORT_SYMBOL*`, seen as `__ksymtab_<name>`).
    pub exports: Vec<String>,
}

impl Symbols {
    pub fn from_elf(data: &[u8]) -> Result<Symbols> {
        let file = object::File::parse(data).context("not an ELF object")?;
        let mut out = Symbols::default();
        for sym in file.symbols() {
            let Ok(name) = sym.name() else { continue };
            if sym.is_undefined() && sym.is_global() && !name.is_empty() {
                out.imports.push(name.to_string());
            } else if let Some(export) = name.strip_prefix("__ksymtab_") {
                out.exports.push(export.to_string());
            }
        }
        if let Some(versions) = file.section_by_name("__versions") {
            // struct modversion_info { unsigned long crc; char name[64 - sizeof(long)]; }
            for entry in versions.data()?.chunks_exact(64) {
                let crc = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
                let name = &entry[8..];
                let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
                out.crcs.insert(
                    String::from_utf8_lossy(&name[..end]).into_owned(),
                    crc as u32,
                );
            }
        }
        out.imports.sort();
        out.exports.sort();
        Ok(out)
    }
}

/// A kernel's `Module.symvers`: every exported symbol, its CRC, and who exports it
/// (`vmlinux`, or an in-tree module's path such as `lib/crc7`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Symvers(pub BTreeMap<String, (u32, String)>);

impl Symvers {
    pub fn parse(text: &str) -> Symvers {
        let mut map = BTreeMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() >= 3 {
                let crc = u32::from_str_radix(f[0].trim_start_matches("0x"), 16).unwrap_or(0);
                map.insert(f[1].to_string(), (crc, f[2].to_string()));
            }
        }
        Symvers(map)
    }

    pub fn get(&self, symbol: &str) -> Option<&(u32, String)> {
        self.0.get(symbol)
    }
}

/// Fails unless the module at `path` was built for kernel `kver`.
pub fn check_vermagic(path: &Path, kver: &str) -> Result<()> {
    let info = ModInfo::read(path)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    match info.vermagic_release() {
        Some(release) if release == kver => Ok(()),
        Some(release) => bail!(
            "{name} was built for kernel {release}, not {kver} (vermagic {:?}); the kernel would refuse it\n  \
             help: build against ${{kernel_source_dir}} / ${{kernelver}}, never `uname -r` or a hard-coded \
             kernel, and check that the toolchain holds {kver}'s headers",
            info.get("vermagic").unwrap_or_default()
        ),
        None => bail!("{name} has no vermagic in its .modinfo section"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_modinfo_section() {
        let raw = b"license=GPL\0depends=kmf_export,other\0\0vermagic=6.1.0-47-amd64 SMP preempt mod_unload modversions \0name=kmf_user\0";
        let info = ModInfo::parse(raw);
        assert_eq!(info.get("license"), Some("GPL"));
        assert_eq!(info.depends(), ["kmf_export", "other"]);
        assert_eq!(info.vermagic_release(), Some("6.1.0-47-amd64"));
        assert_eq!(info.get("name"), Some("kmf_user"));
        assert!(ModInfo::parse(b"depends=\0").depends().is_empty());
    }

    #[test]
    fn symvers_name_who_exports_what() {
        let s = Symvers::parse(
            "0xba55d23e\tcrc7_be\tlib/crc7\tEXPORT_SYMBOL\t\n0x12345678\t_printk\tvmlinux\tEXPORT_SYMBOL\t\n",
        );
        assert_eq!(
            s.get("crc7_be"),
            Some(&(0xba55d23e, "lib/crc7".to_string()))
        );
        assert_eq!(s.get("_printk").unwrap().1, "vmlinux");
        assert!(s.get("nope").is_none());
    }

    #[test]
    fn non_modules_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.ko");
        std::fs::write(&p, b"not elf").unwrap();
        assert!(
            format!("{:#}", check_vermagic(&p, "1").unwrap_err()).contains("not an ELF object")
        );
        // The test binary itself is ELF but no module.
        let exe = std::env::current_exe().unwrap();
        assert!(
            format!("{:#}", check_vermagic(&exe, "1").unwrap_err()).contains("no .modinfo section")
        );
    }
}
