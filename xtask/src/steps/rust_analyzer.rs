//! `rust-analyzer`: the `rust-project.json` an editor needs for a Rust module.
//!
//! The kernel's own `make -C <kdir> M=<module> rust-analyzer` writes it, inside the
//! module's toolchain (which holds the kernel's Rust sources, the Rust library sources
//! and the very rustc). Its paths point into the container, so the sources it names
//! are copied out once per kernel and every path is rewritten to the host: the module's
//! own files to its folder in `modules/`, the rest to the copies.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::config::modules::Module;
use crate::host::engine::{Engine, Mount, Run};
use crate::run::layout::Layout;

const SRC: &str = "/kmodforge/src";
const BUILD: &str = "/kmodforge/build";
const EXPORT: &str = "/kmodforge/export";

/// The rust-project.json the kernel wrote, with every container path made a host path:
/// the module's own to its folder, the kernel's and the Rust library's to the copies.
fn host_paths(module: &Module, work: &Path, export: &Path) -> Result<serde_json::Value> {
    let listed = fs::read_to_string(work.join(".roots"))?;
    let roots: Vec<String> = listed
        .lines()
        .filter_map(|l| l.strip_prefix("root=").map(str::to_string))
        .collect();
    let sysroot = listed
        .lines()
        .find_map(|l| l.strip_prefix("sysroot="))
        .unwrap_or("/usr");
    let json = fs::read_to_string(work.join("rust-project.json"))
        .context("make rust-analyzer wrote no rust-project.json")?;
    let mut value: serde_json::Value = serde_json::from_str(&json)?;
    let mut map: Vec<(String, PathBuf)> = vec![(BUILD.to_string(), module.dir.clone())];
    map.extend(
        roots
            .iter()
            .map(|r| (r.clone(), export.join(r.trim_start_matches('/')))),
    );
    rewrite(&mut value, &map);
    // rustc's sysroot (where rust-analyzer looks for lib/rustlib/src): the copy too.
    if value.get("sysroot").and_then(|s| s.as_str()) == Some(sysroot) {
        value["sysroot"] = export
            .join(sysroot.trim_start_matches('/'))
            .display()
            .to_string()
            .into();
    }
    if value["crates"].as_array().is_none_or(|c| c.is_empty()) {
        bail!("rust-project.json lists no crates");
    }
    Ok(value)
}

/// Writes `<module>/rust-project.json` for kernel `kver`; returns its path.
pub fn generate(
    engine: &Engine,
    layout: &Layout,
    module: &Module,
    kver: &str,
    image: &str,
    kdir: &str,
    log: &Path,
) -> Result<PathBuf> {
    let work = layout.work(kver, &format!("{}.rust-analyzer", module.name));
    crate::host::fs::fresh_dir(&work)?;
    let export = layout.kernel_state(kver).join("rust-analyzer");
    let exported = export.join(".complete").is_file();
    if !exported {
        let _ = fs::remove_dir_all(&export);
        crate::host::fs::create_dir_all(&export)?;
    }
    // The roots rust-project.json points at, printed for the rewrite below.
    let script = format!(
        r#"set -eu
cp -R {SRC}/. {BUILD}/
make -C "$1" M={BUILD} rust-analyzer
srctree=$(realpath "$1")
sysroot=$(rustc --print sysroot)
sysroot_src="${{RUST_LIB_SRC:-$sysroot/lib/rustlib/src/rust/library}}"
echo "root=$srctree" > {BUILD}/.roots
echo "root=$sysroot_src" >> {BUILD}/.roots
echo "sysroot=$sysroot" >> {BUILD}/.roots
if [ "$2" = copy ]; then
  tar -C / -chf - "${{srctree#/}}/rust" "${{srctree#/}}/include/generated" "${{sysroot_src#/}}" | tar -C {EXPORT} -xf -
fi
"#
    );
    let run = Run {
        image,
        mounts: vec![
            Mount {
                host: &module.dir,
                container: SRC,
                read_only: true,
            },
            Mount {
                host: &work,
                container: BUILD,
                read_only: false,
            },
            Mount {
                host: &export,
                container: EXPORT,
                read_only: false,
            },
        ],
        env: vec![],
        workdir: None,
        network: false,
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            script,
            "rust-analyzer".into(),
            kdir.into(),
            if exported { "keep" } else { "copy" }.into(),
        ],
        pass_fds: vec![],
    };
    engine.run(&run).run_logged(log, None).with_context(|| {
        format!(
            "`make rust-analyzer` for {} failed in the toolchain of {kver}",
            module.name
        )
    })?;
    if !exported {
        crate::host::fs::write(&export.join(".complete"), "")?;
    }

    let value = host_paths(module, &work, &export)?;
    let dest = module.dir.join("rust-project.json");
    crate::host::fs::write_atomic(&dest, serde_json::to_string_pretty(&value)?.as_bytes())?;
    Ok(dest)
}

/// Rewrites every string that is a path under one of the container prefixes.
fn rewrite(value: &mut serde_json::Value, map: &[(String, PathBuf)]) {
    match value {
        serde_json::Value::String(s) => {
            for (from, to) in map {
                if let Some(rest) = s.strip_prefix(from.as_str())
                    && (rest.is_empty() || rest.starts_with('/'))
                {
                    *s = format!("{}{rest}", to.display());
                    return;
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| rewrite(v, map)),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(|v| rewrite(v, map)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_paths_become_host_paths() {
        let mut v = serde_json::json!({
            "sysroot_src": "/usr/lib/rustlib/src/rust/library",
            "crates": [
                {"root_module": "/kmodforge/build/kmf_rust.rs", "env": {"OBJTREE": "/usr/src/linux-headers-k"}},
                {"root_module": "/usr/src/linux-headers-k/rust/kernel/lib.rs", "cfg": ["CONFIG_RUST"]},
                {"root_module": "/usr/src/linux-headers-kx/other.rs"}
            ]
        });
        let map = vec![
            (BUILD.to_string(), PathBuf::from("/repo/modules/kmf_rust")),
            (
                "/usr/src/linux-headers-k".to_string(),
                PathBuf::from("/cache/usr/src/linux-headers-k"),
            ),
            (
                "/usr/lib/rustlib/src/rust/library".to_string(),
                PathBuf::from("/cache/lib"),
            ),
        ];
        rewrite(&mut v, &map);
        assert_eq!(v["sysroot_src"], "/cache/lib");
        assert_eq!(
            v["crates"][0]["root_module"],
            "/repo/modules/kmf_rust/kmf_rust.rs"
        );
        assert_eq!(
            v["crates"][0]["env"]["OBJTREE"],
            "/cache/usr/src/linux-headers-k"
        );
        assert_eq!(
            v["crates"][1]["root_module"],
            "/cache/usr/src/linux-headers-k/rust/kernel/lib.rs"
        );
        assert_eq!(v["crates"][1]["cfg"][0], "CONFIG_RUST");
        assert_eq!(
            v["crates"][2]["root_module"], "/usr/src/linux-headers-kx/other.rs",
            "a longer name is another path"
        );
    }
}
