//! What the bench builds, and where: real Debian `*-dkms` packages fetched at run time,
//! the project's example modules, the project's Debian kernels, in scratch projects of
//! the bench's own (a kernels.toml, `modules/`, `out/`), so a user's `out/` is never
//! touched.
//!
//! The packages come from the DKMS oracle (`xtask/tests/dkms/oracle.toml`, measured
//! with Debian's own DKMS): its seconds say which package is the large one. They are
//! fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a cache
//! (`~/.cache/kmodforge/bench/<deb>/`), never committed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::config::Config;
use crate::config::diag::display_path;
use crate::config::dkms;
use crate::host::fs::copy_tree;
use crate::host::process::Cmd;

const ORACLE: &str = include_str!("../../tests/dkms/oracle.toml");

/// The packages the bench uses by default, the large one first: dahdi (32 modules, a
/// minute of compile per kernel), then packages that build on every kernel, then ones
/// that fail on 6.12 (failures cost time on both sides too). openafs (four minutes of
/// mostly serial `./configure`) and west-chamber (it builds against another package's
/// sources) are left out; `--package` picks any package of the oracle.
pub const DEFAULT_PACKAGES: &[&str] = &[
    "dahdi-dkms",
    "bbswitch-dkms",
    "lime-forensics-dkms",
    "rtpengine-kernel-dkms",
    "dpdk-kmods-dkms",
    "evdi-dkms",
    "tp-smapi-dkms",
];

#[derive(Debug, Deserialize)]
struct Oracle {
    package: Vec<OraclePackage>,
}

/// One package of the oracle: what Debian's DKMS did with it per kernel.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OraclePackage {
    pub deb: String,
    pub source_dir: String,
    pub result: Vec<OracleResult>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OracleResult {
    pub kernel: String,
    pub outcome: String,
    pub seconds: f64,
}

impl OraclePackage {
    /// DKMS's seconds for the kernels it built on: how long a compile it is.
    pub fn build_seconds(&self) -> f64 {
        let built: Vec<f64> = self
            .result
            .iter()
            .filter(|r| r.outcome == "built")
            .map(|r| r.seconds)
            .collect();
        crate::bench::cpu::median(&built)
    }
}

pub fn oracle() -> Result<Vec<OraclePackage>> {
    let o: Oracle = toml::from_str(ORACLE).context("xtask/tests/dkms/oracle.toml is malformed")?;
    Ok(o.package)
}

/// The oracle's packages to use: `asked` (Debian package names) or the defaults, the
/// first `count` of them.
pub fn choose_packages(
    oracle: &[OraclePackage],
    asked: &[String],
    count: Option<usize>,
) -> Result<Vec<OraclePackage>> {
    let names: Vec<&str> = if asked.is_empty() {
        DEFAULT_PACKAGES.to_vec()
    } else {
        asked.iter().map(String::as_str).collect()
    };
    let mut out = Vec::new();
    for name in names.iter().take(count.unwrap_or(usize::MAX)) {
        let p = oracle.iter().find(|p| p.deb == *name).with_context(|| {
            let known: Vec<&str> = oracle.iter().map(|p| p.deb.as_str()).collect();
            format!(
                "{name} is not a package of the DKMS oracle\n  help: pick from {}",
                known.join(", ")
            )
        })?;
        out.push(p.clone());
    }
    if out.is_empty() {
        bail!("the bench needs at least one package (--packages 0 leaves none)");
    }
    Ok(out)
}

/// The package of `chosen` for the single-large comparison: `asked`, else the one with
/// the longest DKMS build.
pub fn large<'p>(chosen: &'p [Package], asked: Option<&str>) -> Result<&'p Package> {
    match asked {
        Some(deb) => chosen.iter().find(|p| p.deb == deb).with_context(|| {
            format!("--large {deb}: not one of the bench's packages (add it with --package)")
        }),
        None => chosen
            .iter()
            .max_by(|a, b| a.build_seconds.total_cmp(&b.build_seconds))
            .context("no package to compare"),
    }
}

/// The kernels to bench on: the project's Debian kernels (a Debian flavour such as
/// `-amd64` at the end of the version), series taking turns so the first two are one
/// 6.1 and one 6.12, then the first `count`.
pub fn choose_kernels(versions: &[String], count: usize) -> Vec<String> {
    let debian: Vec<&String> = versions
        .iter()
        .filter(|v| v.ends_with("-amd64") || v.ends_with("-arm64"))
        .collect();
    let series = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    let mut groups: Vec<(String, Vec<&String>)> = Vec::new();
    for v in debian {
        match groups.iter_mut().find(|(s, _)| *s == series(v)) {
            Some((_, g)) => g.push(v),
            None => groups.push((series(v), vec![v])),
        }
    }
    let mut out = Vec::new();
    for i in 0.. {
        let round: Vec<String> = groups
            .iter()
            .filter_map(|(_, g)| g.get(i).map(|v| v.to_string()))
            .collect();
        if round.is_empty() {
            break;
        }
        out.extend(round);
    }
    out.truncate(count);
    out
}

/// A package fetched and unpacked.
#[derive(Clone, Debug)]
pub struct Package {
    pub deb: String,
    /// PACKAGE_NAME and PACKAGE_VERSION from its dkms.conf.
    pub name: String,
    pub version: String,
    /// The folder holding dkms.conf (what DKMS has in `/usr/src/<name>-<version>`).
    pub source: PathBuf,
    /// That folder's name: the module folder kmodforge builds it as.
    pub folder: String,
    /// DKMS's median seconds per built kernel in the oracle.
    pub build_seconds: f64,
    /// The kernels DKMS built it for in the oracle.
    pub built_on: Vec<String>,
}

/// Fetches `p` into `cache` (once per machine) and reads its name and version.
pub fn fetch(p: &OraclePackage, cache: &Path) -> Result<Package> {
    let dir = cache.join(&p.deb);
    let unpacked = dir.join("x/usr/src");
    if !unpacked.is_dir() {
        download(&p.deb, &dir)?;
    }
    let folder = std::fs::read_dir(&unpacked)
        .with_context(|| format!("cannot read {}", display_path(&unpacked)))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| unpacked.join(n).join(dkms::DKMS_CONF).is_file())
        .with_context(|| {
            format!(
                "{} holds no package with a dkms.conf\n  help: remove {} and run the bench again",
                p.deb,
                display_path(&dir)
            )
        })?;
    let source = unpacked.join(&folder);
    let conf = dkms::read_static(&source.join(dkms::DKMS_CONF));
    let (Some(name), Some(version)) = (conf.package_name, conf.package_version) else {
        bail!(
            "{}: PACKAGE_NAME or PACKAGE_VERSION is not a literal, which the bench needs to run `dkms add`",
            display_path(&source.join(dkms::DKMS_CONF))
        );
    };
    Ok(Package {
        deb: p.deb.clone(),
        name,
        version,
        source,
        folder,
        build_seconds: p.build_seconds(),
        built_on: p
            .result
            .iter()
            .filter(|r| r.outcome == "built")
            .map(|r| r.kernel.clone())
            .collect(),
    })
}

fn download(deb: &str, dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    crate::host::fs::create_dir_all(dir)?;
    let log = dir.join("fetch.log");
    Cmd::new("apt-get")
        .args(["download", "-q", deb])
        .dir(dir)
        .run_logged(&log, None)
        .with_context(|| {
            format!("cannot download {deb}\n  help: `apt-get update` first (the host's package lists may be stale)")
        })?;
    let file = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| {
            format!(
                "apt-get download {deb} left no .deb in {}",
                display_path(dir)
            )
        })?;
    Cmd::new("dpkg-deb")
        .arg("-x")
        .arg(&file)
        .arg(dir.join("x"))
        .run_logged(&log, None)
        .with_context(|| format!("cannot unpack {}", display_path(&file)))
}

/// A scratch project of the bench's own.
pub struct Project {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub out: PathBuf,
}

/// One kernel of a scratch project, and the module folders built for it (all if `None`).
pub struct KernelEntry {
    pub version: String,
    pub modules: Option<Vec<String>>,
}

impl Project {
    /// Makes `dir` a project with `config`'s toolchains (their recipe folders copied),
    /// `kernels`, and `modules` (folder name, source) copied into `modules/`. Images use
    /// the busybox base, made from the Debian archive, so no registry is needed.
    pub fn create(
        dir: &Path,
        config: &Config,
        kernels: &[KernelEntry],
        modules: &[(String, PathBuf)],
    ) -> Result<Project> {
        crate::host::fs::fresh_dir(dir)?;
        for tc in config.toolchains.values() {
            if let crate::config::ToolchainSource::Recipe(r) = &tc.source {
                let rel = r.context.strip_prefix(&config.root).with_context(|| {
                    format!(
                        "recipe folder {} is outside the project",
                        display_path(&r.context)
                    )
                })?;
                if !dir.join(rel).exists() {
                    copy_tree(&r.context, &dir.join(rel))?;
                }
            }
        }
        crate::host::fs::create_dir_all(&dir.join("modules"))?;
        for (name, src) in modules {
            copy_tree(src, &dir.join("modules").join(name))?;
        }
        let project = Project {
            dir: dir.to_path_buf(),
            config: dir.join("kernels.toml"),
            out: dir.join("out"),
        };
        project.set_kernels(config, kernels)?;
        Ok(project)
    }

    /// Rewrites kernels.toml: `config`'s file with `kernels` and the busybox image base.
    pub fn set_kernels(&self, config: &Config, kernels: &[KernelEntry]) -> Result<()> {
        let text = crate::host::fs::read_to_string(&config.path)?;
        let rewritten = scratch_config(&text, kernels).with_context(|| {
            format!(
                "cannot rewrite {} for the bench",
                display_path(&config.path)
            )
        })?;
        crate::host::fs::write(&self.config, rewritten)
    }

    pub fn module_dir(&self, name: &str) -> PathBuf {
        self.dir.join("modules").join(name)
    }
}

/// A project's kernels.toml with its kernels replaced by `kernels` and `[image] base =
/// "busybox"`.
pub fn scratch_config(text: &str, kernels: &[KernelEntry]) -> Result<String> {
    let mut table: toml::Table = text.parse()?;
    let list: Vec<toml::Value> = kernels
        .iter()
        .map(|k| {
            let mut t = toml::Table::new();
            t.insert("version".into(), k.version.clone().into());
            if let Some(m) = &k.modules {
                t.insert("modules".into(), m.clone().into());
            }
            toml::Value::Table(t)
        })
        .collect();
    table.insert("kernel".into(), list.into());
    let image = table
        .entry("image")
        .or_insert_with(|| toml::Table::new().into());
    if let toml::Value::Table(image) = image {
        image.insert("base".into(), "busybox".into());
    }
    Ok(toml::to_string(&table)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oracle_reads_and_the_large_package_is_dahdi() {
        let o = oracle().unwrap();
        let chosen = choose_packages(&o, &[], None).unwrap();
        assert_eq!(chosen.len(), DEFAULT_PACKAGES.len());
        let largest = chosen
            .iter()
            .max_by(|a, b| a.build_seconds().total_cmp(&b.build_seconds()))
            .unwrap();
        assert_eq!(largest.deb, "dahdi-dkms");
        assert_eq!(choose_packages(&o, &[], Some(2)).unwrap().len(), 2);
        let e = choose_packages(&o, &["nope-dkms".into()], None).unwrap_err();
        assert!(format!("{e}").contains("pick from adv-17v35x-dkms"), "{e}");
    }

    #[test]
    fn kernels_take_turns_by_series() {
        let v: Vec<String> = [
            "6.1.0-47-amd64",
            "6.1.0-56-amd64",
            "6.12.113+deb12-amd64",
            "6.12.117+deb12-amd64",
            "6.12.117-kmodforge-rust",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            choose_kernels(&v, 2),
            ["6.1.0-47-amd64", "6.12.113+deb12-amd64"]
        );
        assert_eq!(choose_kernels(&v, 10).len(), 4, "not the Rust kernel");
    }

    #[test]
    fn the_scratch_config_keeps_toolchains_and_replaces_kernels() {
        let text = "[defaults]\ntoolchain = \"deb\"\n[toolchains.deb]\nrecipe = \"images/r\"\n\
                    [[kernel]]\nversion = \"1\"\n[image]\nprefix = \"/opt\"\n";
        let out = scratch_config(
            text,
            &[KernelEntry {
                version: "6.1.0-47-amd64".into(),
                modules: Some(vec!["a".into()]),
            }],
        )
        .unwrap();
        let t: toml::Table = out.parse().unwrap();
        assert_eq!(t["toolchains"]["deb"]["recipe"].as_str(), Some("images/r"));
        assert_eq!(t["kernel"].as_array().unwrap().len(), 1);
        assert_eq!(t["kernel"][0]["modules"][0].as_str(), Some("a"));
        assert_eq!(t["image"]["base"].as_str(), Some("busybox"));
        assert_eq!(t["image"]["prefix"].as_str(), Some("/opt"));
    }
}
