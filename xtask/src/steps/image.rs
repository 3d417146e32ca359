//! The image step: a kernel's staging tree as one layer on a small base, written as a
//! reproducible OCI image layout at `<out>/images/<kver>/`.
//!
//! The layer holds `<prefix>/lib/modules/<kver>/` and nothing else (every `.ko` and
//! depmod's files, with their parent directories), every time set to the source date
//! epoch. The base is ubi-minimal (or any image) from local storage or a registry, or
//! kmodforge's own `busybox` base: scratch plus Debian's static busybox providing the
//! `sh`, `mkdir` and `cp` that KMM's worker runs. Labels and annotations name the
//! source, revision, creation time, title and kernel.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use oci_spec::image::{
    Arch, ConfigBuilder, HistoryBuilder, ImageConfiguration, ImageConfigurationBuilder, MediaType,
    Os, RootFsBuilder,
};

use crate::config::diag::display_path;
use crate::config::template::image_reference;
use crate::config::{Config, ImageBase, Kernel};
use crate::formats::oci::{Entry, OciDir, descriptor, layer};
use crate::host::engine::{Engine, require_program};
use crate::host::fs::replace_dir;
use crate::host::process::Cmd;
use crate::run::fingerprint::{Fingerprint, walk_files};
use crate::run::layout::Layout;

/// What the source of an image is: time, revision, and where it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    /// Seconds since 1970: `SOURCE_DATE_EPOCH`, else the last commit's time, else 0.
    pub epoch: u64,
    pub revision: Option<String>,
    pub source: Option<String>,
}

/// Parses `SOURCE_DATE_EPOCH` strictly: decimal digits only, at most year 9999.
pub fn parse_epoch(value: &str) -> Result<u64> {
    const MAX: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let ok = !value.is_empty() && value.len() <= 12 && value.bytes().all(|b| b.is_ascii_digit());
    match value.parse::<u64>() {
        Ok(n) if ok && n <= MAX => Ok(n),
        _ => bail!(
            "SOURCE_DATE_EPOCH={value:?} is not a time: it must be a whole number of seconds since 1970-01-01 \
             (digits only, no sign or spaces), at most {MAX}\n  help: e.g. SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)"
        ),
    }
}

impl Provenance {
    /// Reads the environment and the git repository holding `root` (if any).
    pub fn detect(root: &Path, configured_source: Option<&str>) -> Result<Provenance> {
        let git = |args: &[&str]| -> Option<String> {
            Cmd::new("git")
                .arg("-C")
                .arg(root)
                .args(args)
                .read()
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let in_git = git(&["rev-parse", "--is-inside-work-tree"]).as_deref() == Some("true");
        let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => parse_epoch(&v)?,
            Err(_) => in_git
                .then(|| git(&["log", "-1", "--format=%ct"]))
                .flatten()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        };
        let revision = in_git
            .then(|| git(&["rev-parse", "HEAD"]))
            .flatten()
            .map(|rev| {
                let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some();
                if dirty { format!("{rev}-dirty") } else { rev }
            });
        let source = configured_source.map(str::to_string).or_else(|| {
            in_git
                .then(|| git(&["config", "--get", "remote.origin.url"]))
                .flatten()
        });
        Ok(Provenance {
            epoch,
            revision,
            source,
        })
    }
}

/// RFC 3339 UTC time of an epoch, e.g. `2023-11-14T22:13:20Z`.
pub fn rfc3339(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A kernel's image as written to disk.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub kver: String,
    /// The full reference, tag normalized: `quay.io/x/y:6.12.117_deb12-amd64`.
    pub reference: String,
    pub tag: String,
    /// The OCI layout holding it.
    pub dir: PathBuf,
    /// The manifest's digest.
    pub digest: String,
    /// Every layer's digest, base layers first.
    pub layers: Vec<String>,
}

/// The image reference for a kernel, from the `[image] name` template.
pub fn reference(config: &Config, kver: &str) -> Result<String> {
    let expanded = config
        .kmm
        .vars(kver)
        .expand(&config.image.name)
        .map_err(anyhow::Error::msg)?;
    image_reference(&expanded).map_err(anyhow::Error::msg)
}

/// Builds the image of `kernel` from its staging tree.
pub fn assemble(
    config: &Config,
    kernel: &Kernel,
    engine: &Engine,
    state: &Layout,
    provenance: &Provenance,
    log: &Path,
) -> Result<BuiltImage> {
    let kver = &kernel.version;
    let staging = state.staging_modules(kver);
    if !staging.join("modules.dep").is_file() {
        bail!(
            "kernel {kver} has no build output in {}\n  help: run `cargo xtask build --kernel {kver}`",
            display_path(&staging)
        );
    }
    let reference = reference(config, kver)?;
    let tag = reference
        .rsplit_once(':')
        .map(|(_, t)| t.to_string())
        .expect("references have tags");

    let base = resolve_base(config, engine, state, provenance.epoch, log)?;
    let (base_desc, base_manifest) = base.oci.manifest()?;
    let base_config: ImageConfiguration = base
        .oci
        .read_json(base_manifest.config().digest().as_ref())?;

    let prefix = config.image.prefix.trim_start_matches('/');
    let mut entries = Vec::new();
    let mut dir = String::new();
    for part in Path::new(prefix)
        .join("lib/modules")
        .join(kver)
        .components()
    {
        dir = if dir.is_empty() {
            part.as_os_str().to_string_lossy().into()
        } else {
            format!("{dir}/{}", part.as_os_str().to_string_lossy())
        };
        entries.push(Entry::Dir { path: dir.clone() });
    }
    let mut files = Vec::new();
    for rel in walk_files(&staging)? {
        let data = fs::read(staging.join(&rel))?;
        files.push(rel.to_string_lossy().into_owned());
        entries.push(Entry::File {
            path: format!("{dir}/{}", rel.to_string_lossy()),
            mode: 0o644,
            data,
        });
    }
    let modules_layer = layer(entries, provenance.epoch)?;

    let scratch = state.scratch("image-")?;
    let oci = OciDir::create(scratch.path())?;
    let mut layers = Vec::new();
    for l in base_manifest.layers() {
        oci.import_blob(&base.oci, l.digest().as_ref())?;
        layers.push(l.clone());
    }
    let (layer_digest, layer_size) = oci.write_blob(&modules_layer.gzip)?;
    layers.push(descriptor(
        MediaType::ImageLayerGzip,
        &layer_digest,
        layer_size,
    )?);

    let created = rfc3339(provenance.epoch);
    let title = reference
        .rsplit_once(':')
        .map(|(r, _)| r.rsplit('/').next().unwrap_or(r))
        .unwrap_or(&reference)
        .to_string();
    let mut annotations: HashMap<String, String> = HashMap::new();
    annotations.insert("org.opencontainers.image.created".into(), created.clone());
    annotations.insert("org.opencontainers.image.title".into(), title);
    annotations.insert("org.opencontainers.image.version".into(), kver.clone());
    annotations.insert(
        "org.opencontainers.image.description".into(),
        format!("Kernel modules for Linux {kver}, in the layout KMM loads"),
    );
    annotations.insert("io.kmodforge.kernel".into(), kver.clone());
    annotations.insert("io.kmodforge.modules-dir".into(), format!("/{dir}"));
    if let Some(r) = &provenance.revision {
        annotations.insert("org.opencontainers.image.revision".into(), r.clone());
    }
    if let Some(s) = &provenance.source {
        annotations.insert("org.opencontainers.image.source".into(), s.clone());
    }
    if let Some(name) = &base.name {
        annotations.insert("org.opencontainers.image.base.name".into(), name.clone());
        annotations.insert(
            "org.opencontainers.image.base.digest".into(),
            base_desc.digest().to_string(),
        );
    }

    let mut image_config = base_config.clone();
    image_config.set_created(Some(created.clone()));
    image_config
        .rootfs_mut()
        .diff_ids_mut()
        .push(modules_layer.diff_id.clone());
    let mut history = image_config.history().clone().unwrap_or_default();
    history.push(
        HistoryBuilder::default()
            .created(created.clone())
            .created_by(format!(
                "kmodforge: {} .ko files and depmod output in /{dir}",
                files.iter().filter(|f| f.ends_with(".ko")).count()
            ))
            .build()?,
    );
    image_config.set_history(Some(history));
    let mut runtime = image_config.config().clone().unwrap_or_default();
    let mut labels = runtime.labels().clone().unwrap_or_default();
    labels.extend(annotations.clone());
    runtime.set_labels(Some(labels));
    image_config.set_config(Some(runtime));

    let digest = oci.write_image(&image_config, layers.clone(), Some(annotations), &tag)?;

    let dest = state.out.join("images").join(kver);
    replace_dir(&scratch.keep(), &dest)?;
    Ok(BuiltImage {
        kver: kver.clone(),
        reference,
        tag,
        dir: dest,
        digest,
        layers: layers.iter().map(|l| l.digest().to_string()).collect(),
    })
}

struct ResolvedBase {
    oci: OciDir,
    /// The reference it came from, for the `base.name` annotation.
    name: Option<String>,
}

/// Finds the base image as an OCI layout: from local storage, else from its registry;
/// or makes the busybox base.
fn resolve_base(
    config: &Config,
    engine: &Engine,
    state: &Layout,
    epoch: u64,
    log: &Path,
) -> Result<ResolvedBase> {
    match &config.image.base {
        ImageBase::Busybox => Ok(ResolvedBase {
            oci: busybox_base(config, state, epoch, log)?,
            name: None,
        }),
        ImageBase::Reference(r) => {
            require_program("skopeo", "skopeo", "kmodforge copies images with it")?;
            if let Some(id) = engine.image_id(r)? {
                let cache = state
                    .out
                    .join(".kmodforge/bases")
                    .join(id.trim_start_matches("sha256:"));
                if !cache.join("index.json").is_file() {
                    let tmp = state.scratch("base-")?;
                    engine
                        .skopeo_from_storage(r, &format!("oci:{}:base", tmp.path().display()))
                        .run_logged(log, None)
                        .with_context(|| {
                            format!(
                                "cannot copy the base image {r} out of {}'s storage",
                                engine.kind
                            )
                        })?;
                    replace_dir(&tmp.keep(), &cache)?;
                }
                return Ok(ResolvedBase {
                    oci: OciDir::open(&cache)?,
                    name: Some(r.clone()),
                });
            }
            let tmp = state.scratch("base-")?;
            let tls = crate::steps::publish::tls_flag(config, r, "--src-tls-verify");
            let pulled = Cmd::new("skopeo")
                .args([
                    "copy",
                    "--quiet",
                    &tls,
                    &format!("docker://{r}"),
                    &format!("oci:{}:base", tmp.path().display()),
                ])
                .run_logged(log, None);
            match pulled {
                Ok(()) => Ok(ResolvedBase {
                    oci: OciDir::open(&tmp.keep())?,
                    name: Some(r.clone()),
                }),
                Err(e) => bail!(
                    "cannot find the base image {r}: it is not in {}'s local storage, and pulling it failed: {e:#}\n  \
                     help: where no registry is reachable, load it into local storage (`{} load -i <file>`), \
                     push it to a registry you run and set [image] base to that reference, or set \
                     [image] base = \"busybox\" for kmodforge's minimal base",
                    engine.kind,
                    engine.kind
                ),
            }
        }
    }
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
        crate::host::fs::write_atomic(&binary, &data)?;
    }
    Ok(fs::read(&binary)?)
}

/// `scratch` plus Debian's static busybox, with `sh`, `mkdir` and `cp` linked to it:
/// exactly what KMM's worker runs in the image.
fn busybox_base(config: &Config, state: &Layout, epoch: u64, log: &Path) -> Result<OciDir> {
    let data = busybox_binary(config, state, log)?;
    let digest = crate::formats::oci::sha256(&data);
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

    let dir = state
        .out
        .join(".kmodforge/bases")
        .join(format!("busybox-{}-{epoch}", &key[..16]));
    if dir.join("index.json").is_file() {
        return OciDir::open(&dir);
    }
    let tmp = state.scratch("busybox-oci-")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_date_epoch_is_parsed_strictly() {
        assert_eq!(parse_epoch("0").unwrap(), 0);
        assert_eq!(parse_epoch("1700000000").unwrap(), 1_700_000_000);
        for bad in [
            "",
            " 1",
            "1 ",
            "+1",
            "-1",
            "1.5",
            "1e9",
            "0x10",
            "abc",
            "253402300800",
            "99999999999999999999",
        ] {
            let e = parse_epoch(bad).unwrap_err().to_string();
            assert!(e.contains("is not a time"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
    }
}
