//! The image step: a kernel's staging tree as one layer on a small base, written as a
//! reproducible OCI image layout at `<out>/images/<kver>/`.
//!
//! Two jobs: the layer ([`write_layer`]) holds `<prefix>/lib/modules/<kver>/` (every
//! `.ko` and depmod's files, with their parent directories) and the firmware of the
//! modules it holds at [`firmware_dir`], and nothing else, every time set to the source
//! date epoch; the image ([`assemble`]) puts it on the base
//! ([`crate::steps::image_base`]). Labels and annotations name the source, revision,
//! creation time, title and kernel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use oci_spec::image::{HistoryBuilder, ImageConfiguration, MediaType};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::config::diag::display_path;
use crate::config::firmware;
use crate::config::modules::Module;
use crate::config::template::image_reference;
use crate::formats::oci::{Entry, FileSystem, Node, OciDir, descriptor, layer};
use crate::host::fs::{read_json, replace_dir, write_atomic, write_json};
use crate::host::process::Cmd;
use crate::run::layout::Layout;
use crate::steps::image_base::BaseImage;
use crate::steps::verify;

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

/// The image reference for a kernel: the `[image] name` template resolved exactly as KMM
/// resolves `containerImage` for `[kmm] name` (envsubst, the kernel version normalized),
/// and checked.
pub fn reference(config: &Config, kver: &str) -> Result<String> {
    let module = (config.kmm.name.as_str(), config.kmm.namespace.as_str());
    let resolved = crate::config::envsubst::kmm_resolve(&config.image.name, kver, Some(module))
        .map_err(anyhow::Error::msg)?;
    image_reference(&resolved).map_err(anyhow::Error::msg)
}

/// Where module folder `module`'s firmware is in the image: KMM's
/// `modprobe.firmwarePath` for it, e.g. `/opt/firmware/kmf_fw`. One folder per module,
/// so that each Module's init container copies its own firmware, and KMM's unload (which
/// deletes from the node every file the image's folder holds) removes only its own.
pub fn firmware_dir(prefix: &str, module: &str) -> String {
    format!("{}/firmware/{module}", prefix.trim_end_matches('/'))
}

/// The firmware folders of an image (KMM's `firmwarePath`s, `/`-rooted): each folder
/// directly in `<prefix>/firmware/`, one per module folder.
pub fn firmware_paths(image_fs: &FileSystem, prefix: &str) -> Vec<String> {
    let root = firmware_dir(prefix, "");
    let root = root.trim_start_matches('/');
    image_fs
        .range(root.to_string()..)
        .take_while(|(p, _)| p.starts_with(root))
        .filter(|(p, node)| {
            matches!(node, Node::Dir)
                && !p[root.len()..].is_empty()
                && !p[root.len()..].contains('/')
        })
        .map(|(p, _)| format!("/{p}"))
        .collect()
}

/// kmodforge's layer of a kernel's image: `<prefix>/lib/modules/<kver>/` and the firmware
/// of its modules, written from the staging tree and the module folders. All the load
/// test needs; the image adds the base.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    pub fingerprint: String,
    /// The epoch every time in the layer is set to.
    pub epoch: u64,
    /// Digest and size of the gzip-compressed layer, and its diff ID.
    pub digest: String,
    pub size: u64,
    pub diff_id: String,
    /// `<prefix>/lib/modules/<kver>`, relative to `/`.
    pub modules_dir: String,
    /// How many `.ko` files it holds.
    pub modules: usize,
    /// The module folders whose firmware it holds (at [`firmware_dir`]).
    #[serde(default)]
    pub firmware: Vec<String>,
    /// The staging tree it was written from ([`crate::steps::depmod::tree_fingerprint`]).
    #[serde(default)]
    pub tree: String,
}

impl LayerRecord {
    fn path(layout: &Layout, kver: &str) -> PathBuf {
        layout.kernel_state(kver).join("layer.json")
    }

    /// The layer's gzip file.
    pub fn blob(layout: &Layout, kver: &str) -> PathBuf {
        layout.kernel_state(kver).join("layer.tar.gz")
    }

    /// The last layer written for `kver`, when it matches `fingerprint` and `epoch`.
    pub fn fresh(
        layout: &Layout,
        kver: &str,
        fingerprint: &str,
        epoch: u64,
    ) -> Option<LayerRecord> {
        let rec: LayerRecord = read_json(&Self::path(layout, kver))?;
        let blob = Self::blob(layout, kver);
        let intact = blob.metadata().is_ok_and(|m| m.len() == rec.size);
        // The same inputs can have made another tree (a module failed once, then built).
        let same_tree =
            crate::steps::depmod::tree_fingerprint(layout, kver).is_some_and(|t| t == rec.tree);
        (rec.fingerprint == fingerprint && rec.epoch == epoch && intact && same_tree).then_some(rec)
    }

    /// The last layer written for `kver`, whatever its inputs.
    pub fn load(layout: &Layout, kver: &str) -> Result<LayerRecord> {
        read_json(&Self::path(layout, kver)).with_context(|| {
            format!("kernel {kver} has no image layer yet\n  help: run `cargo xtask image --kernel {kver}`")
        })
    }
}

/// Checks the staging tree as `verify` does, and writes kmodforge's layer from it and
/// from the firmware of `shipped` (the module folders whose `.ko` files the tree holds).
/// A tree `verify` would refuse (a truncated or foreign `.ko`, a stale modules.dep) gets
/// no layer, so no image replaces the last good one.
pub fn write_layer(
    config: &Config,
    layout: &Layout,
    kver: &str,
    shipped: &[&Module],
    epoch: u64,
    fingerprint: &str,
) -> Result<LayerRecord> {
    let staging = layout.staging_modules(kver);
    let tree = checked_tree(&staging, kver)?;
    let modules_dir = Path::new(config.image.prefix.trim_start_matches('/'))
        .join("lib/modules")
        .join(kver)
        .to_string_lossy()
        .into_owned();
    let modules = tree.files.keys().filter(|p| p.ends_with(".ko")).count();
    let mut entries = tree_entries(&modules_dir, tree);
    let mut with_firmware = Vec::new();
    for m in shipped {
        if let Some(dir) = &m.firmware {
            entries.extend(firmware_entries(&config.image.prefix, m, dir)?);
            with_firmware.push(m.name.clone());
        }
    }
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    entries.dedup_by(|a, b| a.path() == b.path());
    let layer = layer(entries, epoch)?;
    let record = LayerRecord {
        fingerprint: fingerprint.to_string(),
        epoch,
        digest: crate::formats::oci::sha256(&layer.gzip),
        size: layer.gzip.len() as u64,
        diff_id: layer.diff_id,
        modules_dir,
        modules,
        firmware: with_firmware,
        tree: crate::steps::depmod::tree_fingerprint(layout, kver).unwrap_or_default(),
    };
    write_atomic(&LayerRecord::blob(layout, kver), &layer.gzip)?;
    write_json(&LayerRecord::path(layout, kver), &record)?;
    Ok(record)
}

/// The staging tree, when it passes `verify`'s integrity checks.
fn checked_tree(staging: &Path, kver: &str) -> Result<verify::Tree> {
    if !staging.join("modules.dep").is_file() {
        bail!(
            "kernel {kver} has no build output in {}\n  help: run `cargo xtask build --kernel {kver}`",
            display_path(staging)
        );
    }
    let tree = verify::Tree::read(staging)?;
    // A damaged tree gets no image; what a node would refuse of one module is verify's
    // and the load test's to say, and does not keep the others from the node.
    let problems: Vec<String> = verify::tree(&tree, kver, &display_path(staging), None)
        .into_iter()
        .filter(|c| !c.ok && c.integrity)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    if !problems.is_empty() {
        bail!(
            "the staging tree of {kver} fails its checks, so no image is made from it (the last good image is kept):\n  {}\n  help: run `cargo xtask build-all`, which rebuilds a tree that no longer matches its record",
            problems.join("\n  ")
        );
    }
    Ok(tree)
}

/// The tree's files and links under `modules_dir`, with their parent directories.
fn tree_entries(modules_dir: &str, tree: verify::Tree) -> Vec<Entry> {
    let mut entries = parents(modules_dir);
    for (rel, data) in tree.files {
        add_file(&mut entries, format!("{modules_dir}/{rel}"), data);
    }
    for (rel, target) in tree.links {
        entries.push(Entry::Symlink {
            path: format!("{modules_dir}/{rel}"),
            target,
        });
    }
    entries
}

/// Module `m`'s firmware files (from its folder `dir`) under [`firmware_dir`], as plain
/// files (links followed: KMM's copy and the node need no link to resolve).
fn firmware_entries(prefix: &str, m: &Module, dir: &Path) -> Result<Vec<Entry>> {
    let root = firmware_dir(prefix, &m.name)
        .trim_start_matches('/')
        .to_string();
    let files = firmware::files(&m.dir, dir).map_err(|e| {
        anyhow::anyhow!(
            "the firmware of module {}: {e}\n  help: fix [firmware] dir in {}",
            m.name,
            display_path(&m.metadata_file())
        )
    })?;
    if files.is_empty() {
        bail!(
            "the firmware folder {} of module {} is empty: KMM's `cp -R <firmwarePath>/*` would fail on it",
            display_path(dir),
            m.name
        );
    }
    let mut entries = parents(&root);
    for f in files {
        let data = crate::host::fs::read(&f.source)?;
        add_file(&mut entries, format!("{root}/{}", f.name), data);
    }
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    entries.dedup_by(|a, b| a.path() == b.path());
    Ok(entries)
}

/// A file entry (mode 0644) and a directory entry for each of its parents.
fn add_file(entries: &mut Vec<Entry>, path: String, data: Vec<u8>) {
    entries.extend(parents(&path).into_iter().rev().skip(1));
    entries.push(Entry::File {
        path,
        mode: 0o644,
        data,
    });
}

/// A directory entry for `dir` and each of its parents.
fn parents(dir: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut path = String::new();
    for part in dir.split('/') {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(part);
        out.push(Entry::Dir { path: path.clone() });
    }
    out
}

/// The kernel's image: the base's layers and kmodforge's layer, written as an OCI
/// layout that replaces `<out>/images/<kver>/` only when complete.
pub fn assemble(
    config: &Config,
    layout: &Layout,
    kver: &str,
    base: &BaseImage,
    provenance: &Provenance,
) -> Result<BuiltImage> {
    let record = LayerRecord::load(layout, kver)?;
    let reference = reference(config, kver)?;
    let tag = reference
        .rsplit_once(':')
        .map(|(_, t)| t.to_string())
        .expect("references have tags");
    let (base_desc, base_manifest) = base.oci.manifest()?;
    let base_config: ImageConfiguration = base
        .oci
        .read_json(base_manifest.config().digest().as_ref())?;

    let scratch = layout.scratch("image-")?;
    let oci = OciDir::create(scratch.path())?;
    let mut layers = Vec::new();
    for l in base_manifest.layers() {
        oci.import_blob(&base.oci, l.digest().as_ref())?;
        layers.push(l.clone());
    }
    let gzip = crate::host::fs::read(&LayerRecord::blob(layout, kver))?;
    let (layer_digest, layer_size) = oci.write_blob(&gzip)?;
    if layer_digest != record.digest {
        bail!("the image layer of {kver} changed since it was written; run the command again");
    }
    layers.push(descriptor(
        MediaType::ImageLayerGzip,
        &layer_digest,
        layer_size,
    )?);

    let mut annotations = annotations(&reference, kver, &record, provenance);
    if let Some(name) = &base.name {
        annotations.insert("org.opencontainers.image.base.name".into(), name.clone());
        annotations.insert(
            "org.opencontainers.image.base.digest".into(),
            base_desc.digest().to_string(),
        );
    }
    let image_config = image_config(base_config, &record, provenance.epoch, &annotations)?;
    let digest = oci.write_image(&image_config, layers.clone(), Some(annotations), &tag)?;
    let dest = layout.out.join("images").join(kver);
    replace_dir(&scratch.keep(), &dest)?;
    Ok(BuiltImage {
        kver: kver.to_string(),
        reference,
        tag,
        dir: dest,
        digest,
        layers: layers.iter().map(|l| l.digest().to_string()).collect(),
    })
}

fn annotations(
    reference: &str,
    kver: &str,
    layer: &LayerRecord,
    provenance: &Provenance,
) -> HashMap<String, String> {
    let title = reference
        .rsplit_once(':')
        .map(|(r, _)| r.rsplit('/').next().unwrap_or(r))
        .unwrap_or(reference);
    let mut a: HashMap<String, String> = HashMap::new();
    a.insert(
        "org.opencontainers.image.created".into(),
        rfc3339(provenance.epoch),
    );
    a.insert("org.opencontainers.image.title".into(), title.to_string());
    a.insert("org.opencontainers.image.version".into(), kver.to_string());
    a.insert(
        "org.opencontainers.image.description".into(),
        format!("Kernel modules for Linux {kver}, in the layout KMM loads"),
    );
    a.insert("io.kmodforge.kernel".into(), kver.to_string());
    a.insert(
        "io.kmodforge.modules-dir".into(),
        format!("/{}", layer.modules_dir),
    );
    if let Some(r) = &provenance.revision {
        a.insert("org.opencontainers.image.revision".into(), r.clone());
    }
    if let Some(s) = &provenance.source {
        a.insert("org.opencontainers.image.source".into(), s.clone());
    }
    a
}

/// What the layer holds, for the image's history.
fn history_line(layer: &LayerRecord) -> String {
    let mut line = format!(
        "kmodforge: {} .ko files and depmod output in /{}",
        layer.modules, layer.modules_dir
    );
    if !layer.firmware.is_empty() {
        let prefix = layer
            .modules_dir
            .rsplit_once("/lib/modules/")
            .map_or("", |(p, _)| p);
        let dirs: Vec<String> = layer
            .firmware
            .iter()
            .map(|m| firmware_dir(&format!("/{prefix}"), m))
            .collect();
        line.push_str(&format!("; firmware in {}", dirs.join(", ")));
    }
    line
}

/// The base's configuration with kmodforge's layer, its history entry and the labels.
fn image_config(
    mut config: ImageConfiguration,
    layer: &LayerRecord,
    epoch: u64,
    annotations: &HashMap<String, String>,
) -> Result<ImageConfiguration> {
    let created = rfc3339(epoch);
    config.set_created(Some(created.clone()));
    config
        .rootfs_mut()
        .diff_ids_mut()
        .push(layer.diff_id.clone());
    let mut history = config.history().clone().unwrap_or_default();
    history.push(
        HistoryBuilder::default()
            .created(created)
            .created_by(history_line(layer))
            .build()?,
    );
    config.set_history(Some(history));
    let mut runtime = config.config().clone().unwrap_or_default();
    let mut labels = runtime.labels().clone().unwrap_or_default();
    labels.extend(annotations.clone());
    runtime.set_labels(Some(labels));
    config.set_config(Some(runtime));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

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
    fn firmware_goes_to_a_folder_per_module_under_the_prefix() {
        assert_eq!(firmware_dir("/opt", "kmf_fw"), "/opt/firmware/kmf_fw");
        assert_eq!(firmware_dir("/var/opt/", "x"), "/var/opt/firmware/x");
    }

    #[test]
    fn firmware_entries_are_plain_files_with_fixed_metadata() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("kmf_fw");
        fs::create_dir_all(m.join("firmware/kmf_fw")).unwrap();
        fs::write(m.join("Kbuild"), "obj-m := kmf_fw.o\n").unwrap();
        fs::write(m.join("module.toml"), "[firmware]\ndir = \"firmware\"\n").unwrap();
        fs::write(m.join("firmware/kmf_fw/hello.bin"), b"\x00fw\xff").unwrap();
        std::os::unix::fs::symlink("hello.bin", m.join("firmware/kmf_fw/alias.bin")).unwrap();
        let modules = crate::config::modules::discover(d.path()).unwrap();
        let dir = modules[0].firmware.as_ref().unwrap();
        let entries = firmware_entries("/opt", &modules[0], dir).unwrap();
        let layer = layer(entries, 1_700_000_000).unwrap();
        let listed = crate::formats::oci::list_layer(&layer.gzip).unwrap();
        let rows: Vec<(&str, u32, u64)> = listed
            .iter()
            .map(|(p, _, mode, time)| (p.as_str(), *mode, *time))
            .collect();
        let t = 1_700_000_000;
        assert_eq!(
            rows,
            [
                ("opt/", 0o755, t),
                ("opt/firmware/", 0o755, t),
                ("opt/firmware/kmf_fw/", 0o755, t),
                ("opt/firmware/kmf_fw/kmf_fw/", 0o755, t),
                ("opt/firmware/kmf_fw/kmf_fw/alias.bin", 0o644, t),
                ("opt/firmware/kmf_fw/kmf_fw/hello.bin", 0o644, t),
            ]
        );
        assert!(
            listed
                .iter()
                .all(|(_, kind, ..)| kind.is_dir() || kind.is_file())
        );
        let fs = crate::formats::oci::layer_filesystem(&layer.gzip, |_| true).unwrap();
        assert_eq!(firmware_paths(&fs, "/opt"), ["/opt/firmware/kmf_fw"]);
        assert!(matches!(
            &fs["opt/firmware/kmf_fw/kmf_fw/alias.bin"],
            Node::File { data: Some(d), .. } if d == b"\x00fw\xff"
        ));
    }

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
    }
}
