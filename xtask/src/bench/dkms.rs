//! The baseline: Debian's own `dkms` building the same packages with the host's kernel
//! headers, one build at a time, as DKMS runs them (its own `make -j`, signing and all).
//!
//! Every round gets a DKMS tree and a source tree of its own (`--dkmstree`,
//! `--sourcetree` in the bench's scratch folder), so the host's `/var/lib/dkms` and
//! `/usr/src` stay as they are and no round finds another's builds. The example modules,
//! which are not DKMS packages, become the smallest faithful ones: a dkms.conf per
//! folder with the same make command and module list; a module that uses another's
//! symbols carries that module's sources and builds them first, since DKMS passes no
//! symbols between packages.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::bench::cpu::{self, Measured};
use crate::config::Config;
use crate::config::modules::{Build, Language, Module};
use crate::host::fs::copy_tree;
use crate::host::process::{Cmd, process_error};

/// A package DKMS builds, named as kmodforge names the module folder.
#[derive(Clone, Debug)]
pub struct DkmsPackage {
    /// The module folder's name: how both sides' outcomes are paired.
    pub label: String,
    pub name: String,
    pub version: String,
    /// The folder holding dkms.conf.
    pub source: PathBuf,
}

/// One `dkms build`.
#[derive(Clone, Debug, Serialize)]
pub struct DkmsBuild {
    pub package: String,
    pub kernel: String,
    /// DKMS's exit status: 0 built, 77 skipped (BUILD_EXCLUSIVE_*), others failed.
    pub exit: i32,
    pub wall_s: f64,
    /// CPU seconds of dkms and everything it ran (make, the compilers, sign-file).
    pub cpu_s: f64,
}

impl DkmsBuild {
    pub fn built(&self) -> bool {
        self.exit == 0
    }
}

/// A DKMS tree and source tree of the bench's own, with every package added.
pub struct Tree {
    dkms: PathBuf,
    src: PathBuf,
    log: PathBuf,
}

impl Tree {
    /// Clears `dir` and runs `dkms add` for every package into it (not timed: the
    /// packages are installed before DKMS builds them, as kmodforge's are in modules/).
    pub fn fresh(dir: &Path, packages: &[DkmsPackage], log: &Path) -> Result<Tree> {
        crate::host::fs::fresh_dir(dir)?;
        let tree = Tree {
            dkms: dir.join("dkms"),
            src: dir.join("src"),
            log: log.to_path_buf(),
        };
        crate::host::fs::create_dir_all(&tree.dkms)?;
        for p in packages {
            copy_tree(
                &p.source,
                &tree.src.join(format!("{}-{}", p.name, p.version)),
            )?;
            tree.dkms(&["add", "-m", &p.name, "-v", &p.version])
                .run_logged(log, None)
                .with_context(|| format!("dkms add of {} {} failed", p.name, p.version))?;
        }
        Ok(tree)
    }

    fn dkms(&self, args: &[&str]) -> Cmd {
        Cmd::new("dkms")
            .args(args)
            .arg("--dkmstree")
            .arg(&self.dkms)
            .arg("--sourcetree")
            .arg(&self.src)
    }

    /// `dkms build` of one package for one kernel; a failed build is an outcome.
    pub fn build(&self, p: &DkmsPackage, kver: &str) -> Result<DkmsBuild> {
        let (cpu, started) = (cpu::children_cpu_s(), Instant::now());
        let result = self
            .dkms(&["build", "-m", &p.name, "-v", &p.version, "-k", kver])
            .run_logged(&self.log, None);
        let exit = match &result {
            Ok(()) => 0,
            Err(e) => process_error(e).and_then(|pe| pe.code()).ok_or_else(|| {
                anyhow::anyhow!("dkms build of {} for {kver} did not run: {e:#}", p.name)
            })?,
        };
        Ok(DkmsBuild {
            package: p.label.clone(),
            kernel: kver.to_string(),
            exit,
            wall_s: started.elapsed().as_secs_f64(),
            cpu_s: cpu::children_cpu_s() - cpu,
        })
    }
}

/// One timed DKMS round: a fresh tree, then every package for every kernel, a kernel at
/// a time (as DKMS's autoinstall does when a kernel arrives).
pub fn round(
    dir: &Path,
    packages: &[DkmsPackage],
    kernels: &[String],
    log: &Path,
) -> Result<(Vec<DkmsBuild>, Measured)> {
    let tree = Tree::fresh(dir, packages, log)?;
    cpu::measure(|| {
        let mut builds = Vec::new();
        for k in kernels {
            for p in packages {
                builds.push(tree.build(p, k)?);
            }
        }
        Ok(builds)
    })
}

/// The project's example modules as DKMS packages, written under `dir`, with notes on
/// any left out (a Rust module: Debian's kernels have no CONFIG_RUST, and kmodforge
/// skips it there too).
pub fn examples(config: &Config, dir: &Path) -> Result<(Vec<DkmsPackage>, Vec<String>)> {
    let (mut out, mut notes) = (Vec::new(), Vec::new());
    for m in &config.modules {
        let deps: Vec<&Module> = m.depends.iter().filter_map(|d| config.module(d)).collect();
        if let Build::Dkms(conf) = &m.build {
            if let (Some(name), Some(version)) = (&conf.package_name, &conf.package_version) {
                out.push(DkmsPackage {
                    label: m.name.clone(),
                    name: name.clone(),
                    version: version.clone(),
                    source: m.dir.clone(),
                });
            }
            continue;
        }
        let Some(conf) = conf_for(m, &deps) else {
            notes.push(format!(
                "{}: not built by DKMS ({})",
                m.name,
                if m.language == Language::Rust {
                    "a Rust module; Debian's kernels have no CONFIG_RUST"
                } else {
                    "its make command uses variables DKMS has no equivalent for"
                }
            ));
            continue;
        };
        let pkg = dir.join(format!("{}-bench", m.name));
        copy_tree(&m.dir, &pkg)?;
        for d in &deps {
            copy_tree(&d.dir, &pkg.join("deps").join(&d.name))?;
        }
        crate::host::fs::write(&pkg.join("dkms.conf"), conf)?;
        out.push(DkmsPackage {
            label: m.name.clone(),
            name: m.name.clone(),
            version: "bench".into(),
            source: pkg,
        });
    }
    Ok((out, notes))
}

/// The dkms.conf that builds a module of kmodforge's own as module.toml says: same
/// make command, same modules; `None` when DKMS cannot say it.
pub fn conf_for(m: &Module, deps: &[&Module]) -> Option<String> {
    let Build::Kbuild {
        make,
        built_modules,
        strip,
    } = &m.build
    else {
        return None;
    };
    if m.language == Language::Rust {
        return None;
    }
    let build = format!("$dkms_tree/{}/bench/build", m.name);
    let modules: Vec<(String, String)> = match built_modules {
        Some(list) => list
            .iter()
            .map(|p| {
                let (dir, file) = p.rsplit_once('/').unwrap_or(("", p));
                (file.trim_end_matches(".ko").to_string(), dir.to_string())
            })
            .collect(),
        None => kbuild_objects(&m.dir)
            .into_iter()
            .map(|n| (n, String::new()))
            .collect(),
    };
    if modules.is_empty() {
        return None;
    }
    let mut lines = vec![
        format!("PACKAGE_NAME=\"{}\"", m.name),
        "PACKAGE_VERSION=\"bench\"".to_string(),
    ];
    for (i, (name, dir)) in modules.iter().enumerate() {
        lines.push(format!("BUILT_MODULE_NAME[{i}]=\"{name}\""));
        if !dir.is_empty() {
            lines.push(format!("BUILT_MODULE_LOCATION[{i}]=\"{dir}/\""));
        }
        lines.push(format!("DEST_MODULE_LOCATION[{i}]=\"/updates/dkms\""));
    }
    if !strip {
        lines.push("STRIP[0]=\"no\"".into());
    }
    if let Some(re) = &m.kernels {
        lines.push(format!("BUILD_EXCLUSIVE_KERNEL=\"{}\"", re.as_str()));
    }
    match (make, deps.is_empty()) {
        (None, true) => {}
        (Some(argv), true) => lines.push(format!("MAKE[0]=\"{}\"", dkms_make(argv, &build)?)),
        (None, false) => {
            let mut steps: Vec<String> = deps
                .iter()
                .map(|d| {
                    format!(
                        "make -C $kernel_source_dir M={build}/deps/{} modules",
                        d.name
                    )
                })
                .collect();
            let symvers: Vec<String> = deps
                .iter()
                .map(|d| format!("{build}/deps/{}/Module.symvers", d.name))
                .collect();
            steps.push(format!(
                "make -C $kernel_source_dir M={build} KBUILD_EXTRA_SYMBOLS='{}' modules",
                symvers.join(" ")
            ));
            lines.push(format!("MAKE[0]=\"{}\"", steps.join(" && ")));
        }
        (Some(_), false) => return None,
    }
    Some(lines.join("\n") + "\n")
}

/// A module.toml make argv as a DKMS MAKE line: kmodforge's variables become DKMS's.
fn dkms_make(argv: &[String], build: &str) -> Option<String> {
    let words: Vec<String> = argv
        .iter()
        .map(|a| {
            let w = a
                .replace("${kernelver}", "$kernelver")
                .replace("${KERNEL_FULL_VERSION}", "$kernelver")
                .replace("${kernel_source_dir}", "$kernel_source_dir")
                .replace("${module_dir}", build);
            if w.contains(char::is_whitespace) {
                format!("'{w}'")
            } else {
                w
            }
        })
        .collect();
    (!words.iter().any(|w| w.contains("${"))).then(|| words.join(" "))
}

/// The `name.o` files of a Kbuild's (or Makefile's) `obj-m` lines, as module names.
fn kbuild_objects(dir: &Path) -> Vec<String> {
    let text = ["Kbuild", "Makefile"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix("obj-m")?.trim_start();
            let rest = rest.trim_start_matches([':', '+']).strip_prefix('=')?;
            Some(rest.split_whitespace().filter_map(|w| w.strip_suffix(".o")))
        })
        .flatten()
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(dir: &Path, name: &str, toml: Option<&str>) -> Module {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("Kbuild"), format!("obj-m := {name}.o\n")).unwrap();
        std::fs::write(d.join(format!("{name}.c")), "").unwrap();
        if let Some(t) = toml {
            std::fs::write(d.join("module.toml"), t).unwrap();
        }
        crate::config::modules::discover(dir)
            .unwrap()
            .into_iter()
            .find(|m| m.name == name)
            .unwrap()
    }

    #[test]
    fn examples_become_dkms_packages() {
        let d = tempfile::tempdir().unwrap();
        let hello = module(d.path(), "hello", Some("kernels = '-amd64$'\n"));
        assert_eq!(
            conf_for(&hello, &[]).unwrap(),
            "PACKAGE_NAME=\"hello\"\nPACKAGE_VERSION=\"bench\"\nBUILT_MODULE_NAME[0]=\"hello\"\n\
             DEST_MODULE_LOCATION[0]=\"/updates/dkms\"\nBUILD_EXCLUSIVE_KERNEL=\"-amd64$\"\n"
        );
        let nested = module(
            d.path(),
            "nested",
            Some(
                "make = [\"make\", \"KVER=${kernelver}\", \"KDIR=${kernel_source_dir}\"]\nbuilt-modules = [\"src/nested.ko\"]\n",
            ),
        );
        let conf = conf_for(&nested, &[]).unwrap();
        assert!(conf.contains("BUILT_MODULE_LOCATION[0]=\"src/\""), "{conf}");
        assert!(
            conf.contains("MAKE[0]=\"make KVER=$kernelver KDIR=$kernel_source_dir\""),
            "{conf}"
        );
        let user = module(d.path(), "user", Some("depends = [\"hello\"]\n"));
        let conf = conf_for(&user, &[&hello]).unwrap();
        assert!(
            conf.contains(
                "MAKE[0]=\"make -C $kernel_source_dir M=$dkms_tree/user/bench/build/deps/hello modules && \
                 make -C $kernel_source_dir M=$dkms_tree/user/bench/build \
                 KBUILD_EXTRA_SYMBOLS='$dkms_tree/user/bench/build/deps/hello/Module.symvers' modules\""
            ),
            "{conf}"
        );
        let rust = module(d.path(), "rusty", Some("language = \"rust\"\n"));
        assert!(conf_for(&rust, &[]).is_none());
    }

    #[test]
    fn obj_m_lines_name_the_modules() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("Kbuild"),
            "obj-m := a.o\nobj-m += b.o c.o\nobj-y := d.o\nccflags-y := -O2\n",
        )
        .unwrap();
        assert_eq!(kbuild_objects(d.path()), ["a", "b", "c"]);
    }
}
