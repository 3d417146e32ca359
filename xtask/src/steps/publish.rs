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

use std::path::Path;

use anyhow::{Result, anyhow};

use crate::config::Config;
use crate::config::template::registry_host;
use crate::host::engine::Engine;
use crate::host::process::Cmd;
use crate::steps::image::BuiltImage;

/// skopeo's TLS flag (`--tls-verify`, `--dest-tls-verify`, ...) for `reference`: off only
/// when kernels.toml opts that registry into plain HTTP or into skipping verification.
pub fn tls_flag(config: &Config, reference: &str, flag: &str) -> String {
    format!("{flag}={}", config.tls_verify(reference))
}

/// Copies the image into the engine's local storage under its reference.
pub fn load(engine: &Engine, image: &BuiltImage, log: &Path) -> Result<()> {
    engine
        .skopeo_into_storage(&source(image), &image.reference)
        .run_logged(log, None)
        .map_err(|e| {
            anyhow!(
                "cannot load {} into {}'s storage: {e:#}",
                image.reference,
                engine.kind
            )
        })
}

fn source(image: &BuiltImage) -> String {
    format!("oci:{}:{}", image.dir.display(), image.tag)
}

pub enum Pushed {
    Pushed,
    /// The registry already had an image with these layers, under this digest.
    Identical(String),
}

/// Pushes the image to its registry unless an identical one is there (or `force`).
pub fn push(config: &Config, image: &BuiltImage, force: bool, log: &Path) -> Result<Pushed> {
    let remote = format!("docker://{}", image.reference);
    if !force
        && let Some((digest, layers)) = remote_layers(config, image, log)?
        && layers == image.layers
    {
        return Ok(Pushed::Identical(digest));
    }
    Cmd::new("skopeo")
        .args([
            "copy",
            "--quiet",
            &tls_flag(config, &image.reference, "--dest-tls-verify"),
            &source(image),
            &remote,
        ])
        .run_logged(log, None)
        .map_err(|e| explain(config, &image.reference, "push", e))?;
    Ok(Pushed::Pushed)
}

/// The digest and layer digests of the image the registry holds under the reference,
/// or `None` when it holds none.
fn remote_layers(
    config: &Config,
    image: &BuiltImage,
    log: &Path,
) -> Result<Option<(String, Vec<String>)>> {
    let raw = Cmd::new("skopeo")
        .args([
            "inspect",
            "--raw",
            &tls_flag(config, &image.reference, "--tls-verify"),
        ])
        .arg(format!("docker://{}", image.reference))
        .read();
    let raw = match raw {
        Ok(raw) => raw,
        Err(e) => {
            let msg = format!("{e:#}");
            if msg.contains("manifest unknown")
                || msg.contains("not found")
                || msg.contains("name unknown")
            {
                crate::host::process::append_log(
                    log,
                    &format!("{} is not in the registry yet", image.reference),
                )?;
                return Ok(None);
            }
            return Err(explain(config, &image.reference, "inspect", e));
        }
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
    let help = if msg.contains("x509") || msg.contains("certificate") {
        format!(
            "\n  help: the certificate of {host} is not trusted. Install its CA on this host, or (not recommended) set \
             [registries.\"{host}\"] insecure-skip-tls-verify = true in {}",
            crate::config::diag::display_path(&config.path)
        )
    } else if msg.contains("HTTP response to HTTPS client") {
        format!(
            "\n  help: {host} speaks plain HTTP. If that is intended (not recommended), set [registries.\"{host}\"] insecure = true in {}",
            crate::config::diag::display_path(&config.path)
        )
    } else if msg.contains("unauthorized") || msg.contains("authentication required") {
        format!(
            "\n  help: log in first (`podman login {host}` or `docker login {host}`); kmodforge uses the engine's auth file"
        )
    } else {
        String::new()
    };
    anyhow!("cannot {what} {reference}: {msg}{help}")
}
