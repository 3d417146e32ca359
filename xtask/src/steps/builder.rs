//! The builder image of a kernel, for `kmm --in-cluster-build builder`: what the
//! in-cluster build starts from on a cluster without OpenShift's Driver Toolkit.
//!
//! It is the kernel's toolchain (headers, compiler, kmod; rustc for a Rust kernel) with
//! every extra package the kernel's modules ask for, plus the kernel's own modules at
//! `/lib/modules/<kver>`, where the Driver Toolkit has them too: the in-cluster depmod
//! resolves in-tree dependencies through the host link against them, as the local
//! depmod step does. Named by `[kmm] builder` (KMM's variables; default: the image
//! name's repository with `-builder`), it is pushed for the cluster to pull.

use std::path::Path;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::host::engine::Engine;
use crate::host::process::Cmd;
use crate::host::skopeo::{self, Location};
use crate::run::layout::Layout;
use crate::steps::kernel_files::KernelFiles;

/// The builder image's reference for `kver`, as KMM receives it in the build argument.
pub fn reference(config: &Config, kver: &str) -> Result<String> {
    let kmm = &config.kmm;
    let resolved =
        crate::config::envsubst::kmm_resolve(&kmm.builder, kver, Some((&kmm.name, &kmm.namespace)))
            .map_err(anyhow::Error::msg)?;
    crate::config::template::image_reference(&resolved).map_err(anyhow::Error::msg)
}

/// Builds the builder image of `kernel` from `toolchain` into the engine's storage.
pub fn build(
    engine: &Engine,
    layout: &Layout,
    toolchain: &str,
    packages: &[String],
    kernel: &KernelFiles,
    reference: &str,
    log: &Path,
) -> Result<()> {
    let context = layout.scratch("builder-")?;
    let modules = context.path().join("modules");
    // Hard links where the cache and the scratch share a file system, else a copy.
    Cmd::new("sh")
        .args([
            "-c",
            "cp -al \"$1\" \"$2\" 2>/dev/null || { rm -rf \"$2\"; cp -a \"$1\" \"$2\"; }",
            "cp",
        ])
        .arg(kernel.modules())
        .arg(&modules)
        .run_logged(log, None)
        .context("cannot copy the kernel's modules into the builder's build context")?;
    for link in ["build", "source"] {
        let _ = std::fs::remove_file(modules.join(link));
    }
    let containerfile = context.path().join("Containerfile");
    crate::host::fs::write(&containerfile, recipe(&kernel.kver, packages))?;
    let args = [("TOOLCHAIN".to_string(), toolchain.to_string())];
    let labels = [("io.kmodforge.builder".to_string(), kernel.kver.clone())];
    engine
        .build(&containerfile, context.path(), reference, &args, &labels)
        .run_logged(log, None)
        .with_context(|| format!("cannot build the builder image {reference}"))
}

fn recipe(kver: &str, packages: &[String]) -> String {
    let mut s = String::from("ARG TOOLCHAIN\nFROM ${TOOLCHAIN}\n");
    if !packages.is_empty() {
        let list = packages.join(" ");
        s.push_str(&format!(
            "RUN set -eu; if command -v apt-get >/dev/null; then apt-get update; \\\n\
             DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {list}; rm -rf /var/lib/apt/lists/*; \\\n\
             else dnf install -y {list}; dnf clean all; fi\n"
        ));
    }
    s.push_str(&format!("COPY modules/ /lib/modules/{kver}/\n"));
    s
}

/// Pushes the builder image from the engine's storage to its registry.
pub fn push(config: &Config, engine: &Engine, reference: &str, log: &Path) -> Result<()> {
    let from = Location::Storage { engine, reference };
    let to = Location::Registry {
        reference,
        verify_tls: config.tls_verify(reference),
    };
    skopeo::copy(&from, &to)
        .run_logged(log, None)
        .with_context(|| format!("cannot push the builder image {reference}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_recipe_adds_packages_and_the_kernels_modules() {
        let r = super::recipe("6.1.0-47-amd64", &["perl".into()]);
        assert!(r.starts_with("ARG TOOLCHAIN\nFROM ${TOOLCHAIN}\n"));
        assert!(r.contains("apt-get install -y --no-install-recommends perl"));
        assert!(r.ends_with("COPY modules/ /lib/modules/6.1.0-47-amd64/\n"));
        assert!(!super::recipe("k", &[]).contains("RUN"));
    }
}
