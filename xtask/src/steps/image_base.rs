//! The image base: what kmodforge's layer goes on. An image from the engine's local
//! storage or from its registry (ubi-minimal by default), found once per run and kept
//! by digest, or kmodforge's own `busybox` base: scratch plus Debian's static busybox
//! providing the `sh`, `mkdir` and `cp` that KMM's worker runs, made from the Debian
//! archive.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use oci_spec::image::{
    Arch, ConfigBuilder, HistoryBuilder, ImageConfigurationBuilder, MediaType, Os, RootFsBuilder,
};

use crate::config::{Config, ImageBase};
use crate::formats::oci::{Entry, OciDir, descriptor, layer, sha256};
use crate::host::engine::{Engine, require_program};
use crate::host::fs::{replace_dir, write_atomic};
use crate::host::process::Cmd;
use crate::host::skopeo::{self, Location};
use crate::run::fingerprint::Fingerprint;
use crate::run::layout::Layout;
use crate::steps::image::rfc3339;

pub struct BaseImage {
    pub oci: OciDir,
    /// The reference it came from, for the `base.name` annotation.
    pub name: Option<String>,
}

/// Finds the base image as an OCI layout: from local storage, else from its registry;
/// or makes the busybox base. One job per run does this for every kernel's image, and
/// what it finds is kept under `<out>/.kmodforge/bases/` by digest (or image ID), so a
/// base is copied once, not once per kernel or per run.
pub fn resolve(
    config: &Config,
    engine: &Engine,
    layout: &Layout,
    epoch: u64,
    log: &Path,
) -> Result<BaseImage> {
    let reference = match &config.image.base {
        ImageBase::Busybox => {
            return Ok(BaseImage {
                oci: busybox_base(config, layout, epoch, log)?,
                name: None,
            });
        }
        ImageBase::Reference(r) => r,
    };
    require_program("skopeo", "skopeo", "kmodforge copies images with it")?;
    let oci = match engine.image_id(reference)? {
        Some(id) => from_storage(engine, layout, reference, &id, log)?,
        None => from_registry(config, engine, layout, reference, log)?,
    };
    Ok(BaseImage {
        oci,
        name: Some(reference.clone()),
    })
}

fn cached(layout: &Layout, key: &str) -> std::path::PathBuf {
    layout
        .out
        .join(".kmodforge/bases")
        .join(key.trim_start_matches("sha256:"))
}

/// Copies `from` into the bases cache under `key` unless it is there already.
fn keep(layout: &Layout, key: &str, copy: impl FnOnce(&Path) -> Result<()>) -> Result<OciDir> {
    let dir = cached(layout, key);
    if !dir.join("index.json").is_file() {
        let tmp = layout.scratch("base-")?;
        copy(tmp.path())?;
        replace_dir(&tmp.keep(), &dir)?;
    }
    OciDir::open(&dir)
}

fn from_storage(
    engine: &Engine,
    layout: &Layout,
    reference: &str,
    id: &str,
    log: &Path,
) -> Result<OciDir> {
    keep(layout, id, |tmp| {
        let from = Location::Storage { engine, reference };
        let to = Location::Oci {
            dir: tmp,
            tag: "base",
        };
        skopeo::copy(&from, &to)
            .run_logged(log, None)
            .with_context(|| {
                format!(
                    "cannot copy the base image {reference} out of {}'s storage",
                    engine.kind
                )
            })
    })
}

fn from_registry(
    config: &Config,
    engine: &Engine,
    layout: &Layout,
    reference: &str,
    log: &Path,
) -> Result<OciDir> {
    let verify_tls = config.tls_verify(reference);
    let not_found = |e: anyhow::Error| {
        anyhow::anyhow!(
            "cannot find the base image {reference}: it is not in {kind}'s local storage, and pulling it failed: {e:#}\n  \
             help: where no registry is reachable, load it into local storage (`{kind} load -i <file>`), \
             push it to a registry you run and set [image] base to that reference, or set \
             [image] base = \"busybox\" for kmodforge's minimal base",
            kind = engine.kind
        )
    };
    let manifest = skopeo::inspect_raw(reference, verify_tls)
        .read()
        .map_err(not_found)?;
    keep(layout, &sha256(manifest.as_bytes()), |tmp| {
        let from = Location::Registry {
            reference,
            verify_tls,
        };
        let to = Location::Oci {
            dir: tmp,
            tag: "base",
        };
        skopeo::copy(&from, &to)
            .run_logged(log, None)
            .map_err(not_found)
    })
}

/// Debian's static busybox (busybox-static), fetched once from the archive with
/// mmdebstrap's extract variant (no registry, no container) and cached.
pub fn busybox_binary(config: &Config, state: &Layout, log: &Path) -> Result<Vec<u8>> {
    let (suite, sources) = (&config.image.busybox_suite, &config.image.busybox_sources);
    let mut fp = Fingerprint::new("busybox-v1");
    fp.field("suite", suite);
    for s in sources {
        fp.field("source", s);
    }
    let key = fp.finish();
    let binary = state
        .out
        .join(".kmodforge/busybox")
        .join(&key[..16])
        .join("busybox");
    if !binary.is_file() {
        require_program(
            "mmdebstrap",
            "mmdebstrap",
            "busybox-static is fetched from the Debian archive with it",
        )?;
        let tmp = state.scratch("busybox-")?;
        let tarball = tmp.path().join("rootfs.tar");
        Cmd::new("mmdebstrap")
            .args([
                "--variant=extract",
                "--include=busybox-static",
                "--quiet",
                suite,
            ])
            .arg(&tarball)
            .args(sources)
            .run_logged(log, None)
            .context("cannot fetch busybox-static from the Debian archive")?;
        let mut archive = tar::Archive::new(fs::File::open(&tarball)?);
        let mut found = None;
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.to_string_lossy().into_owned();
            if matches!(
                path.trim_start_matches("./"),
                "bin/busybox" | "usr/bin/busybox"
            ) {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut data)?;
                found = Some(data);
                break;
            }
        }
        let data = found.context("busybox-static did not contain bin/busybox")?;
        write_atomic(&binary, &data)?;
    }
    Ok(fs::read(&binary)?)
}

/// `scratch` plus Debian's static busybox, with `sh`, `mkdir` and `cp` linked to it:
/// exactly what KMM's worker runs in the image.
fn busybox_base(config: &Config, layout: &Layout, epoch: u64, log: &Path) -> Result<OciDir> {
    let data = busybox_binary(config, layout, log)?;
    let digest = sha256(&data);
    let key = digest.trim_start_matches("sha256:");
    let mut entries = vec![
        Entry::Dir { path: "bin".into() },
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data,
        },
    ];
    for tool in ["cp", "mkdir", "sh"] {
        entries.push(Entry::Symlink {
            path: format!("bin/{tool}"),
            target: "busybox".into(),
        });
    }
    let base_layer = layer(entries, epoch)?;

    let dir = layout
        .out
        .join(".kmodforge/bases")
        .join(format!("busybox-{}-{epoch}", &key[..16]));
    if dir.join("index.json").is_file() {
        return OciDir::open(&dir);
    }
    let tmp = layout.scratch("busybox-oci-")?;
    let oci = OciDir::create(tmp.path())?;
    let (digest, size) = oci.write_blob(&base_layer.gzip)?;
    let created = rfc3339(epoch);
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .created(created.clone())
        .config(
            ConfigBuilder::default()
                .env(vec!["PATH=/bin".to_string()])
                .cmd(vec!["/bin/sh".to_string()])
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![base_layer.diff_id.clone()])
                .build()?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created(created)
                .created_by("kmodforge: static busybox (sh, mkdir, cp)")
                .build()?,
        ])
        .build()?;
    oci.write_image(
        &config,
        vec![descriptor(MediaType::ImageLayerGzip, &digest, size)?],
        None,
        "busybox",
    )?;
    replace_dir(&tmp.keep(), &dir)?;
    OciDir::open(&dir)
}
