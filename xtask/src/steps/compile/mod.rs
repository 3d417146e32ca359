//! The compile step: one module folder built for one kernel inside that kernel's
//! toolchain.
//!
//! The container has no network; the folder is mounted read-only and copied into a
//! build directory inside the container, so a build never writes into the sources.
//! [`driver.sh`](driver.sh) does the building: a module of kmodforge's own runs its make
//! command; a DKMS package is built as DKMS builds it (dkms.conf read with bash, in the
//! layout DKMS promises). Either way the `.ko` files are stripped of debug info unless
//! told not to (the unstripped ones are kept for crash analysis) and reported in a
//! manifest. Modules this one depends on are mounted read-only, their `Module.symvers`
//! passed as `KBUILD_EXTRA_SYMBOLS`. Every `.ko` is checked against the kernel version
//! (vermagic) before it is kept, and with `[signing]` then signed, in a container of
//! its own that alone sees the key ([`crate::steps::sign`]). `make` shares the run's
//! jobserver (or a share of `-j`). Where the time went is kept beside the record
//! ([`Phases`]).

mod phases;
mod record;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

use crate::config::diag::display_path;
use crate::config::modules::{Build, Language, Module, make_vars};
use crate::config::signing::Signing;
use crate::formats::modinfo::check_vermagic;
use crate::host::engine::{Engine, Mount, Run};
use crate::host::fs::{copy_file, replace_dir};
use crate::run::jobserver::Jobserver;
use crate::run::layout::Layout;
pub use phases::Phases;
pub use record::{Record, Records};

const SRC: &str = "/kmodforge/src";
const BUILD: &str = "/kmodforge/build";
const OUT: &str = "/kmodforge/out";
const DEPS: &str = "/kmodforge/deps";
const DRIVER: &str = include_str!("driver.sh");

/// The command that builds a module of kmodforge's own, with its variables expanded.
pub fn make_command(make: Option<&[String]>, kver: &str, kdir: &str) -> Vec<String> {
    let vars = make_vars(kver, kdir, BUILD);
    match make {
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

/// The driver's environment and arguments for building `module` for `kver` against the
/// kernel build tree `kdir`, with `deps` (folder names) mounted under `/kmodforge/deps`:
/// the same for the local build and the in-cluster one, which must run the same argv.
pub fn invocation(
    module: &Module,
    kver: &str,
    kdir: &str,
    deps: &[&str],
) -> (Vec<(String, String)>, Vec<String>) {
    let mut env = vec![
        ("kernelver".to_string(), kver.to_string()),
        ("kernel_source_dir".to_string(), kdir.to_string()),
    ];
    if !deps.is_empty() {
        let symvers: Vec<String> = deps
            .iter()
            .map(|d| format!("{DEPS}/{d}/Module.symvers"))
            .collect();
        env.push(("KBUILD_EXTRA_SYMBOLS".into(), symvers.join(" ")));
    }
    let mut argv = Vec::new();
    match &module.build {
        Build::Kbuild {
            make,
            built_modules,
            strip,
        } => {
            env.push(("KMF_MODE".into(), "kbuild".into()));
            env.push(("KMF_STRIP".into(), if *strip { "yes" } else { "no" }.into()));
            if let Some(list) = built_modules {
                env.push(("KMF_BUILT".into(), list.join("\n")));
            }
            argv = make_command(make.as_deref(), kver, kdir);
        }
        Build::Dkms(_) => env.push(("KMF_MODE".into(), "dkms".into())),
    }
    (env, argv)
}

/// kmodforge's build driver (bash), as the compile container and the in-cluster build
/// run it.
pub const DRIVER_SCRIPT: &str = DRIVER;

/// How a compile's `make` gets its parallelism.
pub enum MakeJobs<'a> {
    /// The run's jobserver (podman passes its pipe into the container).
    Server(&'a Jobserver),
    /// `-jN`: the share of the run's budget no other job used when it started.
    Share(usize),
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
    pub jobs: MakeJobs<'a>,
    pub log: &'a Path,
    /// Sign the stripped modules with this key and certificate.
    pub signing: Option<&'a Signing>,
}

/// What the driver reported.
struct Manifest {
    package: Option<(String, String)>,
    /// (file name, built path, location)
    modules: Vec<(String, String, String)>,
    missing: Vec<String>,
}

impl Compile<'_> {
    /// Builds the module, or records why it is skipped. `Ok(Some(reason))` is a skip.
    pub fn run(&self) -> Result<Option<String>> {
        if self.module.language == Language::Rust && !self.kernel_has_rust {
            let reason = format!("kernel {} was built without CONFIG_RUST", self.kver);
            Record::skipped(self.fingerprint, reason.clone()).save(
                self.layout,
                self.kver,
                &self.module.name,
            )?;
            return Ok(Some(reason));
        }
        let out = self.layout.scratch("compile-")?;
        let invoked = SystemTime::now();
        let result = self
            .container(out.path(), &self.driver()?)
            .run_logged(self.log, None);
        let mut phases =
            Phases::from_driver(&phases::read_driver(out.path()), invoked, SystemTime::now());
        let outcome = self.finish(out.path(), result);
        phases.wall_s = invoked.elapsed().map_or(0.0, |d| d.as_secs_f64());
        phases.ok = outcome.is_ok();
        phases.save(self.layout, self.kver, &self.module.name);
        outcome
    }

    /// What the container's run and its output directory `out` amount to: a skip, a
    /// failure with the driver's reason, or the checked modules kept.
    fn finish(&self, out: &Path, result: Result<()>) -> Result<Option<String>> {
        let said = |file: &str| {
            std::fs::read_to_string(out.join(file))
                .ok()
                .map(|s| s.trim().to_string())
        };
        if let Some(reason) = said("skip") {
            Record::skipped(self.fingerprint, reason.clone()).save(
                self.layout,
                self.kver,
                &self.module.name,
            )?;
            return Ok(Some(reason));
        }
        if let Err(e) = result {
            return Err(match said("error") {
                Some(why) => e.context(format!(
                    "{}: {why}",
                    display_path(&self.module.metadata_file())
                )),
                None => e,
            });
        }
        let manifest = read_manifest(&out.join("manifest"))?;
        self.check(&manifest)?;
        for (name, _, _) in &manifest.modules {
            check_vermagic(&out.join("modules").join(name), self.kver)?;
        }
        if let Some(signing) = self.signing {
            let names: Vec<String> = manifest.modules.iter().map(|m| m.0.clone()).collect();
            let signer = crate::steps::sign::Signer {
                engine: self.engine,
                signing,
                image: self.image,
                kdir: self.kdir,
                kver: self.kver,
            };
            signer.sign(&out.join("modules"), &names, self.log)?;
        }
        self.keep(out, &manifest)?;
        Ok(None)
    }

    /// The driver as a file, mounted into the container (shown in logs by its path, not
    /// its text); written once per output directory and version of the driver.
    fn driver(&self) -> Result<PathBuf> {
        let hash = crate::formats::oci::sha256(DRIVER.as_bytes());
        let path = self
            .layout
            .out
            .join(".kmodforge")
            .join(format!("driver-{}.sh", &hash[7..19]));
        if !path.is_file() {
            crate::host::fs::write_atomic(&path, DRIVER.as_bytes())?;
        }
        Ok(path)
    }

    fn container(&self, out: &Path, driver: &Path) -> crate::host::process::Cmd {
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
                host: out,
                container: OUT,
                read_only: false,
            },
            Mount {
                host: driver,
                container: "/kmodforge/driver.sh",
                read_only: true,
            },
        ];
        mounts.extend(dep_dirs.iter().map(|(c, h)| Mount {
            host: h,
            container: c,
            read_only: true,
        }));
        let (mut env, argv) = invocation(self.module, self.kver, self.kdir, &self.deps);
        let mut command = vec!["bash".to_string(), "/kmodforge/driver.sh".into()];
        command.extend(argv);
        let mut fds = Vec::new();
        match &self.jobs {
            MakeJobs::Server(js) => {
                env.push(("MAKEFLAGS".into(), js.makeflags()));
                fds = js.fds().to_vec();
            }
            MakeJobs::Share(n) => {
                env.push(("MAKEFLAGS".into(), format!("-j{n}")));
                env.push(("KMF_MAKE_JOBS".into(), format!("-j{n}")));
            }
        }
        let run = Run {
            image: self.image,
            mounts,
            env,
            workdir: None,
            network: false,
            command,
            pass_fds: fds,
        };
        self.engine.run(&run)
    }

    /// The modules the build must have made are there.
    fn check(&self, manifest: &Manifest) -> Result<()> {
        if let Some(rel) = manifest.missing.first() {
            bail!(
                "the build did not produce {rel}, which built-modules in {} names",
                display_path(&self.module.dir.join("module.toml"))
            );
        }
        if manifest.modules.is_empty() {
            bail!(
                "the build of {} produced no .ko file\n  help: check the Kbuild's obj-m line, or set built-modules in module.toml",
                self.module.name
            );
        }
        Ok(())
    }

    /// Replaces the module's artifacts with the new `.ko` files and Module.symvers, and
    /// keeps the unstripped ones beside them.
    fn keep(&self, out: &Path, manifest: &Manifest) -> Result<()> {
        let scratch = self.layout.scratch("artifacts-")?;
        let unstripped = scratch.path().join("unstripped");
        crate::host::fs::create_dir_all(&unstripped)?;
        let mut names: Vec<String> = Vec::new();
        let (mut bytes, mut unstripped_bytes) = (0, 0);
        for (name, _, _) in &manifest.modules {
            if names.contains(name) {
                bail!("the build produced two modules named {name}");
            }
            copy_file(&out.join("modules").join(name), &scratch.path().join(name))?;
            copy_file(&out.join("unstripped").join(name), &unstripped.join(name))?;
            bytes += std::fs::metadata(scratch.path().join(name))?.len();
            unstripped_bytes += std::fs::metadata(unstripped.join(name))?.len();
            names.push(name.clone());
        }
        if out.join("Module.symvers").is_file() {
            copy_file(
                &out.join("Module.symvers"),
                &scratch.path().join("Module.symvers"),
            )?;
        }
        let artifacts = self.layout.artifacts(self.kver, &self.module.name);
        replace_dir(&scratch.keep(), &artifacts)?;
        names.sort();
        Record {
            fingerprint: self.fingerprint.into(),
            modules: names,
            location: manifest
                .modules
                .first()
                .map(|m| m.2.clone())
                .unwrap_or_default(),
            skipped: None,
            package: manifest.package.clone(),
            bytes,
            unstripped_bytes,
        }
        .save(self.layout, self.kver, &self.module.name)
    }
}

fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("the build left no manifest at {}", display_path(path)))?;
    let mut m = Manifest {
        package: None,
        modules: Vec::new(),
        missing: Vec::new(),
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["package", name, version] => m.package = Some((name.to_string(), version.to_string())),
            ["module", file, built, _strip, location] => {
                m.modules
                    .push((file.to_string(), built.to_string(), location.to_string()))
            }
            ["missing", rel] => m.missing.push(rel.to_string()),
            _ => bail!("the build's manifest has a line kmodforge does not know: {line:?}"),
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(argv: Option<Vec<&str>>) -> Option<Vec<String>> {
        argv.map(|v| v.into_iter().map(String::from).collect())
    }

    #[test]
    fn default_and_custom_make_commands() {
        assert_eq!(
            make_command(
                make(None).as_deref(),
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
        let custom = make(Some(vec![
            "make",
            "-C",
            "${module_dir}/src",
            "KVER=${kernelver}",
            "KDIR=${kernel_source_dir}",
        ]));
        assert_eq!(
            make_command(custom.as_deref(), "6.12.117+deb12-amd64", "/k"),
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
