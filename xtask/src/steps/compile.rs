//! The compile step: one module built for one kernel inside that kernel's toolchain.
//!
//! The container has no network; the module's folder is mounted read-only and copied
//! into a writable build directory, so a build never writes into the sources. Modules
//! this one depends on are mounted read-only too, and their `Module.symvers` passed as
//! `KBUILD_EXTRA_SYMBOLS` so modpost resolves the symbols they export. Every `.ko` that
//! comes out is checked against the kernel version (vermagic) before it is kept.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::diag::display_path;
use crate::config::modules::{Language, Module, make_vars};
use crate::formats::modinfo::check_vermagic;
use crate::host::engine::{Engine, Mount, Run};
use crate::host::fs::{copy_file, read_json, replace_dir, write_json};
use crate::run::fingerprint::{Fingerprint, walk_files};
use crate::run::layout::Layout;

const SRC: &str = "/kmodforge/src";
const BUILD: &str = "/kmodforge/build";
const DEPS: &str = "/kmodforge/deps";

/// What the last successful run of a (kernel, module) job produced.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub fingerprint: String,
    /// The `.ko` file names kept in the artifacts directory.
    pub modules: Vec<String>,
    /// Why the module was skipped for this kernel, if it was.
    pub skipped: Option<String>,
}

impl Record {
    pub fn path(layout: &Layout, kver: &str, module: &str) -> PathBuf {
        layout.module_state(kver, module).join("record.json")
    }

    /// The last successful run's record, whatever its inputs.
    pub fn load(layout: &Layout, kver: &str, module: &str) -> Option<Record> {
        read_json(&Record::path(layout, kver, module))
    }

    /// The last record when it matches `fingerprint` and its files are still there.
    pub fn fresh(layout: &Layout, kver: &str, module: &str, fingerprint: &str) -> Option<Record> {
        let rec: Record = read_json(&Record::path(layout, kver, module))?;
        let artifacts = layout.artifacts(kver, module);
        let complete =
            rec.skipped.is_some() || rec.modules.iter().all(|m| artifacts.join(m).is_file());
        (rec.fingerprint == fingerprint && complete).then_some(rec)
    }

    fn save(&self, layout: &Layout, kver: &str, module: &str) -> Result<()> {
        write_json(&Record::path(layout, kver, module), self)
    }
}

/// The identity of a compile job's inputs: the toolchain, the module's files and
/// metadata, and the fingerprints of the modules it depends on.
pub fn fingerprint(
    module: &Module,
    kver: &str,
    toolchain: &str,
    deps: &[(&str, &str)],
) -> Result<String> {
    let mut f = Fingerprint::new("compile-v1");
    f.field("kernel", kver)
        .field("toolchain", toolchain)
        .field("module", &module.name);
    f.tree(&module.dir)?;
    for (name, fp) in deps {
        f.field(name, fp);
    }
    Ok(f.finish())
}

/// The command that builds the module, with its variables expanded.
pub fn make_command(module: &Module, kver: &str, kdir: &str) -> Vec<String> {
    let vars = make_vars(kver, kdir, BUILD);
    match &module.make {
        Some(argv) => argv
            .iter()
            .map(|a| {
                vars.expand(a)
                    .expect("validated when the module was loaded")
            })
            .collect(),
        None => vec![
            "make".into(),
            "-C".into(),
            kdir.into(),
            format!("M={BUILD}"),
            "modules".into(),
        ],
    }
}

pub struct Compile<'a> {
    pub engine: &'a Engine,
    pub layout: &'a Layout,
    pub module: &'a Module,
    pub kver: &'a str,
    pub image: &'a str,
    pub kdir: &'a str,
    /// Whether the kernel was built with CONFIG_RUST.
    pub kernel_has_rust: bool,
    /// Modules this one depends on, by name.
    pub deps: Vec<&'a str>,
    pub fingerprint: &'a str,
    pub log: &'a Path,
}

impl Compile<'_> {
    /// Builds the module, or records why it is skipped. `Ok(Some(reason))` is a skip.
    pub fn run(&self) -> Result<Option<String>> {
        if self.module.language == Language::Rust && !self.kernel_has_rust {
            let reason = format!("kernel {} was built without CONFIG_RUST", self.kver);
            Record {
                fingerprint: self.fingerprint.into(),
                modules: vec![],
                skipped: Some(reason.clone()),
            }
            .save(self.layout, self.kver, &self.module.name)?;
            return Ok(Some(reason));
        }
        let work = self.layout.work(self.kver, &self.module.name);
        crate::host::fs::fresh_dir(&work)?;

        let dep_dirs: Vec<(String, PathBuf)> = self
            .deps
            .iter()
            .map(|d| (format!("{DEPS}/{d}"), self.layout.artifacts(self.kver, d)))
            .collect();
        let mut mounts = vec![
            Mount {
                host: &self.module.dir,
                container: SRC,
                read_only: true,
            },
            Mount {
                host: &work,
                container: BUILD,
                read_only: false,
            },
        ];
        mounts.extend(dep_dirs.iter().map(|(c, h)| Mount {
            host: h,
            container: c,
            read_only: true,
        }));
        let mut env = Vec::new();
        if !dep_dirs.is_empty() {
            let symvers: Vec<String> = dep_dirs
                .iter()
                .map(|(c, _)| format!("{c}/Module.symvers"))
                .collect();
            env.push(("KBUILD_EXTRA_SYMBOLS".to_string(), symvers.join(" ")));
        }
        let mut command = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            format!("cp -R {SRC}/. {BUILD}/ && exec \"$@\""),
            "kmodforge-build".into(),
        ];
        command.extend(make_command(self.module, self.kver, self.kdir));
        let run = Run {
            image: self.image,
            mounts,
            env,
            workdir: Some(BUILD),
            network: false,
            command,
        };
        self.engine.run(&run).run_logged(self.log, None)?;

        let built = self.collect(&work)?;
        for ko in &built {
            check_vermagic(&work.join(ko), self.kver)?;
        }
        self.keep(&work, &built)?;
        Ok(None)
    }

    /// The `.ko` files the build produced, relative to the build directory.
    fn collect(&self, work: &Path) -> Result<Vec<PathBuf>> {
        match &self.module.built_modules {
            Some(list) => {
                let mut out = Vec::new();
                for rel in list {
                    if !work.join(rel).is_file() {
                        bail!(
                            "the build did not produce {rel}, which built-modules in {} names",
                            display_path(&self.module.dir.join("module.toml"))
                        );
                    }
                    out.push(PathBuf::from(rel));
                }
                Ok(out)
            }
            None => {
                let kos: Vec<PathBuf> = walk_files(work)?
                    .into_iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "ko"))
                    .collect();
                if kos.is_empty() {
                    bail!(
                        "the build of {} produced no .ko file\n  help: check the Kbuild's obj-m line, or set built-modules in module.toml",
                        self.module.name
                    );
                }
                Ok(kos)
            }
        }
    }

    /// Replaces the module's artifacts with the new `.ko` files and Module.symvers.
    fn keep(&self, work: &Path, built: &[PathBuf]) -> Result<()> {
        let scratch = self.layout.scratch("artifacts-")?;
        let mut names = Vec::new();
        for rel in built {
            let name = rel
                .file_name()
                .context("a .ko path has a file name")?
                .to_string_lossy()
                .into_owned();
            if names.contains(&name) {
                bail!("the build produced two modules named {name}");
            }
            copy_file(&work.join(rel), &scratch.path().join(&name))?;
            names.push(name);
        }
        let symvers = work.join("Module.symvers");
        if symvers.is_file() {
            copy_file(&symvers, &scratch.path().join("Module.symvers"))?;
        }
        let artifacts = self.layout.artifacts(self.kver, &self.module.name);
        replace_dir(&scratch.keep(), &artifacts)?;
        names.sort();
        Record {
            fingerprint: self.fingerprint.into(),
            modules: names,
            skipped: None,
        }
        .save(self.layout, self.kver, &self.module.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(make: Option<Vec<&str>>) -> Module {
        Module {
            name: "m".into(),
            dir: "/nowhere".into(),
            language: Language::C,
            kernels: None,
            depends: vec![],
            make: make.map(|v| v.into_iter().map(String::from).collect()),
            built_modules: None,
            test: Default::default(),
        }
    }

    #[test]
    fn default_and_custom_make_commands() {
        assert_eq!(
            make_command(
                &module(None),
                "6.1.0-47-amd64",
                "/lib/modules/6.1.0-47-amd64/build"
            ),
            [
                "make",
                "-C",
                "/lib/modules/6.1.0-47-amd64/build",
                "M=/kmodforge/build",
                "modules"
            ]
        );
        let custom = module(Some(vec![
            "make",
            "-C",
            "${module_dir}/src",
            "KVER=${kernelver}",
            "KDIR=${kernel_source_dir}",
        ]));
        assert_eq!(
            make_command(&custom, "6.12.117+deb12-amd64", "/k"),
            [
                "make",
                "-C",
                "/kmodforge/build/src",
                "KVER=6.12.117+deb12-amd64",
                "KDIR=/k"
            ]
        );
    }
}
