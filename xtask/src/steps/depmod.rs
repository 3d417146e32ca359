//! The depmod step: a kernel's staging tree, laid out as the kmod image holds it.
//!
//! All modules built for the kernel are gathered into a fresh
//! `lib/modules/<kver>/`, `depmod -b` runs on it inside the kernel's toolchain (which
//! holds kmod), and only then does the new tree replace `<out>/<kver>`. A kernel whose
//! modules did not all build keeps its previous tree.

use std::fs;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::host::engine::{Engine, Mount, Run};
use crate::host::fs::copy_file;
use crate::host::fs::{read_json, replace_dir, write_json};
use crate::run::fingerprint::Fingerprint;
use crate::run::layout::Layout;

/// The files depmod writes that kmodforge relies on (modprobe reads the `.bin`s).
pub const DEPMOD_FILES: &[&str] = &[
    "modules.dep",
    "modules.dep.bin",
    "modules.alias",
    "modules.alias.bin",
    "modules.symbols",
    "modules.symbols.bin",
];

#[derive(Serialize, Deserialize)]
struct DepmodRecord {
    fingerprint: String,
}

/// The identity of a kernel's staging tree: its toolchain and each module's build.
pub fn fingerprint(kver: &str, toolchain: &str, modules: &[(&str, &str)]) -> String {
    let mut f = Fingerprint::new("depmod-v1");
    f.field("kernel", kver).field("toolchain", toolchain);
    for (name, fp) in modules {
        f.field(name, fp);
    }
    f.finish()
}

fn record_path(layout: &Layout, kver: &str) -> std::path::PathBuf {
    layout.kernel_state(kver).join("depmod.json")
}

pub fn is_fresh(layout: &Layout, kver: &str, fingerprint: &str) -> bool {
    let rec: Option<DepmodRecord> = read_json(&record_path(layout, kver));
    rec.is_some_and(|r| r.fingerprint == fingerprint)
        && layout.staging_modules(kver).join("modules.dep").is_file()
}

/// Builds the kernel's staging tree from the artifacts of `modules` (name and `.ko`
/// file names) and swaps it into place.
pub fn run(
    engine: &Engine,
    layout: &Layout,
    kver: &str,
    image: &str,
    modules: &[(String, Vec<String>)],
    fingerprint: &str,
    log: &std::path::Path,
) -> Result<()> {
    let scratch = layout.scratch("staging-")?;
    let moddir = scratch.path().join("lib/modules").join(kver);
    fs::create_dir_all(&moddir)?;
    let mut owner: std::collections::BTreeMap<&str, &str> = Default::default();
    for (module, kos) in modules {
        for ko in kos {
            if let Some(other) = owner.insert(ko, module) {
                bail!(
                    "modules {other} and {module} both build {ko}: a kernel's modules need distinct names"
                );
            }
            copy_file(&layout.artifacts(kver, module).join(ko), &moddir.join(ko))?;
        }
    }
    let run = Run {
        image,
        mounts: vec![Mount {
            host: scratch.path(),
            container: "/kmodforge/staging",
            read_only: false,
        }],
        env: vec![],
        workdir: None,
        network: false,
        command: vec![
            "depmod".into(),
            "-b".into(),
            "/kmodforge/staging".into(),
            kver.into(),
        ],
    };
    engine.run(&run).run_logged(log, None)?;
    for f in DEPMOD_FILES {
        if !moddir.join(f).is_file() {
            bail!("depmod did not write {f} in the staging tree of {kver}");
        }
    }
    let dest = layout.staging(kver);
    replace_dir(&scratch.keep(), &dest).context("cannot put the new staging tree in place")?;
    write_json(
        &record_path(layout, kver),
        &DepmodRecord {
            fingerprint: fingerprint.into(),
        },
    )
}
