//! The publish step: where a built image goes. Into the engine's local storage, into an
//! `oci-archive` file, or to a registry.
//!
//! Registries are spoken to with skopeo, which reads the engine's usual auth file
//! (`$REGISTRY_AUTH_FILE`, `${XDG_RUNTIME_DIR}/containers/auth.json`, then
//! `~/.docker/config.json`): credentials never pass through kmodforge. TLS follows
//! KMM's `registryTLS`: certificates are verified unless the registry's entry in
//! kernels.toml opts into plain HTTP (`insecure`) or into skipping verification
//! (`insecure-skip-tls-verify`). Like KMM, a push is skipped when the registry already
//! holds an image with the same content (the same layers); `--force` pushes anyway.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use anyhow::{Result, anyhow};

use crate::config::Config;
use crate::config::template::registry_host;
use crate::host::engine::Engine;
use crate::host::fs::{read_json, write_json};
use crate::host::process::{append_log, process_error};
use crate::host::skopeo::{self, Location};
use crate::run::layout::Layout;
use crate::steps::image::BuiltImage;

/// Copies the image into the engine's local storage under its reference.
pub fn load(engine: &Engine, image: &BuiltImage, log: &Path) -> Result<()> {
    let to = Location::Storage {
        engine,
        reference: &image.reference,
    };
    skopeo::copy(&source(image), &to)
        .run_logged(log, None)
        .map_err(|e| {
            anyhow!(
                "cannot load {} into {}'s storage: {e:#}",
                image.reference,
                engine.kind
            )
        })
}

fn source(image: &BuiltImage) -> Location<'_> {
    Location::Oci {
        dir: &image.dir,
        tag: &image.tag,
    }
}

pub enum Pushed {
    /// Pushed; the registry holds it under this digest.
    Pushed(String),
    /// The registry already had an image with these layers, under this digest.
    Identical(String),
}

/// Pushes the image to its registry unless an identical one is there (or `force`).
pub fn push(config: &Config, image: &BuiltImage, force: bool, log: &Path) -> Result<Pushed> {
    if !force
        && let Some((digest, layers)) = remote_layers(config, image, log)?
        && layers == image.layers
    {
        return Ok(Pushed::Identical(digest));
    }
    let to = Location::Registry {
        reference: &image.reference,
        verify_tls: config.tls_verify(&image.reference),
    };
    let digest_file = tempfile::NamedTempFile::new()?;
    skopeo::copy(&source(image), &to)
        .arg("--digestfile")
        .arg(digest_file.path())
        .run_logged(log, None)
        .map_err(|e| explain(config, &image.reference, "push", e))?;
    let digest = std::fs::read_to_string(digest_file.path())?;
    Ok(Pushed::Pushed(digest.trim().to_string()))
}

/// The digest and layer digests of the image the registry holds under the reference,
/// or `None` when it holds none.
fn remote_layers(
    config: &Config,
    image: &BuiltImage,
    log: &Path,
) -> Result<Option<(String, Vec<String>)>> {
    let raw =
        match skopeo::inspect_raw(&image.reference, config.tls_verify(&image.reference)).read() {
            Ok(raw) => raw,
            Err(e) if skopeo::says_absent(&e) => {
                append_log(
                    log,
                    &format!("{} is not in the registry yet", image.reference),
                )?;
                return Ok(None);
            }
            Err(e) => return Err(explain(config, &image.reference, "inspect", e)),
        };
    let manifest: serde_json::Value = serde_json::from_str(&raw)?;
    let layers = manifest["layers"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .filter_map(|l| l["digest"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(Some((crate::formats::oci::sha256(raw.as_bytes()), layers)))
}

/// Adds what to do to a registry error: TLS opt-ins by name, never by guessing.
fn explain(config: &Config, reference: &str, what: &str, e: anyhow::Error) -> anyhow::Error {
    let host = registry_host(reference);
    let msg = format!("{e:#}");
    // What skopeo said (its stderr, or the log's tail), not kmodforge's own words.
    let said = process_error(&e)
        .map(|p| format!("{}\n{}", p.stderr, p.tail.join("\n")))
        .unwrap_or_default();
    let help = if said.contains("x509") || said.contains("certificate") {
        format!(
            "\n  help: the certificate of {host} is not trusted. Install its CA on this host, or (not recommended) set \
             [registries.\"{host}\"] insecure-skip-tls-verify = true in {}",
            crate::config::diag::display_path(&config.path)
        )
    } else if said.contains("HTTP response to HTTPS client") {
        format!(
            "\n  help: {host} speaks plain HTTP. If that is intended (not recommended), set [registries.\"{host}\"] insecure = true in {}",
            crate::config::diag::display_path(&config.path)
        )
    } else if said.contains("unauthorized") || said.contains("authentication required") {
        format!(
            "\n  help: log in first (`podman login {host}` or `docker login {host}`); kmodforge uses the engine's auth file"
        )
    } else {
        String::new()
    };
    anyhow!("cannot {what} {reference}: {msg}{help}")
}

/// What the last push of a kernel's image sent where: `kmm` pins the digest in the
/// kernel's mapping when the record's inputs are the current ones.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PushRecord {
    /// The push job's fingerprint (its image's inputs).
    pub fingerprint: String,
    pub reference: String,
    pub digest: String,
}

impl PushRecord {
    fn path(layout: &Layout, kver: &str) -> PathBuf {
        layout.kernel_state(kver).join("push.json")
    }

    pub fn save(&self, layout: &Layout, kver: &str) -> Result<()> {
        write_json(&Self::path(layout, kver), self)
    }

    /// The record of `kver`'s push when it was made from these inputs to this reference.
    pub fn fresh(
        layout: &Layout,
        kver: &str,
        fingerprint: &str,
        reference: &str,
    ) -> Option<PushRecord> {
        read_json::<PushRecord>(&Self::path(layout, kver))
            .filter(|r| r.fingerprint == fingerprint && r.reference == reference)
    }
}
