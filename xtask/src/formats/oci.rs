//! OCI image layouts on disk and deterministic layers.
//!
//! Blobs are written to a temporary file and renamed to their digest; JSON is written
//! canonically (keys sorted), so the same image always has the same digest. A layer is
//! a tar with sorted entries, owner 0:0, fixed modes and every time set to one epoch,
//! gzip-compressed with a fixed header.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use oci_spec::image::{Descriptor, DescriptorBuilder, ImageIndexBuilder, ImageManifest, MediaType};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

use crate::config::diag::display_path;
use crate::run::fingerprint::hex;

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// JSON with sorted keys and no insignificant white space.
pub fn canonical_json(value: &impl Serialize) -> Result<Vec<u8>> {
    // serde_json's Map is a BTreeMap: going through Value sorts every object's keys,
    // including oci-spec's HashMaps.
    Ok(serde_json::to_vec(&serde_json::to_value(value)?)?)
}

/// An OCI image layout directory.
pub struct OciDir {
    pub dir: PathBuf,
}

impl OciDir {
    pub fn create(dir: &Path) -> Result<OciDir> {
        crate::host::fs::create_dir_all(&dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(OciDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn open(dir: &Path) -> Result<OciDir> {
        if !dir.join("index.json").is_file() {
            bail!(
                "{} is not an OCI image layout (no index.json)",
                display_path(dir)
            );
        }
        Ok(OciDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs").join(digest.replacen(':', "/", 1))
    }

    pub fn write_blob(&self, bytes: &[u8]) -> Result<(String, u64)> {
        let digest = sha256(bytes);
        let path = self.blob_path(&digest);
        if !path.exists() {
            let mut tmp = tempfile::NamedTempFile::new_in(self.dir.join("blobs/sha256"))?;
            tmp.write_all(bytes)?;
            tmp.persist(&path)?;
        }
        Ok((digest, bytes.len() as u64))
    }

    pub fn write_json(&self, value: &impl Serialize) -> Result<(String, u64)> {
        self.write_blob(&canonical_json(value)?)
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        fs::read(&path).with_context(|| format!("cannot read blob {}", display_path(&path)))
    }

    pub fn read_json<T: DeserializeOwned>(&self, digest: &str) -> Result<T> {
        serde_json::from_slice(&self.read_blob(digest)?)
            .with_context(|| format!("blob {digest} is not the JSON expected"))
    }

    /// Makes `digest` from `other` available here (a hard link when possible).
    pub fn import_blob(&self, other: &OciDir, digest: &str) -> Result<()> {
        let (from, to) = (other.blob_path(digest), self.blob_path(digest));
        if to.exists() {
            return Ok(());
        }
        if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).with_context(|| format!("cannot copy {}", display_path(&from)))?;
        }
        Ok(())
    }

    /// Writes index.json with the one manifest, named `tag`.
    pub fn set_index(&self, manifest: &Descriptor, tag: &str) -> Result<()> {
        let mut desc = manifest.clone();
        desc.set_annotations(Some(
            [(
                "org.opencontainers.image.ref.name".to_string(),
                tag.to_string(),
            )]
            .into(),
        ));
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![desc])
            .build()?;
        crate::host::fs::write(&self.dir.join("index.json"), canonical_json(&index)?)?;
        Ok(())
    }

    /// Writes an image's config and manifest (the layers' blobs are already here) and
    /// names it `tag` in index.json; returns the manifest's digest.
    pub fn write_image(
        &self,
        config: &oci_spec::image::ImageConfiguration,
        layers: Vec<Descriptor>,
        annotations: Option<std::collections::HashMap<String, String>>,
        tag: &str,
    ) -> Result<String> {
        let (config_digest, config_size) = self.write_json(config)?;
        let mut manifest = oci_spec::image::ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(descriptor(
                MediaType::ImageConfig,
                &config_digest,
                config_size,
            )?)
            .layers(layers)
            .build()?;
        manifest.set_annotations(annotations);
        let (digest, size) = self.write_json(&manifest)?;
        self.set_index(&descriptor(MediaType::ImageManifest, &digest, size)?, tag)?;
        Ok(digest)
    }

    /// The layout's one manifest (the first in index.json) and its descriptor.
    pub fn manifest(&self) -> Result<(Descriptor, ImageManifest)> {
        let index: serde_json::Value =
            serde_json::from_slice(&crate::host::fs::read(&self.dir.join("index.json"))?)?;
        let first = index["manifests"]
            .get(0)
            .context("index.json lists no manifest")?;
        let desc: Descriptor = serde_json::from_value(first.clone())?;
        let manifest = self.read_json(desc.digest().as_ref())?;
        Ok((desc, manifest))
    }
}

pub fn descriptor(media_type: MediaType, digest: &str, size: u64) -> Result<Descriptor> {
    Ok(DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest.parse::<oci_spec::image::Digest>()?)
        .size(size)
        .build()?)
}

/// One entry of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path } | Entry::File { path, .. } | Entry::Symlink { path, .. } => path,
        }
    }
}

/// A gzip-compressed layer and the digest of its uncompressed tar (the diff ID).
pub struct Layer {
    pub gzip: Vec<u8>,
    pub diff_id: String,
}

/// Writes `entries` (paths relative to `/`) as a reproducible layer: sorted, 0:0,
/// directories 0755, every time `epoch`.
pub fn layer(mut entries: Vec<Entry>, epoch: u64) -> Result<Layer> {
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    let mut builder = tar::Builder::new(Vec::new());
    for e in &entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(epoch);
        match e {
            Entry::Dir { path } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                builder.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Entry::File { path, mode, data } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                builder.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                builder.append_link(&mut h, path, target)?;
            }
        }
    }
    let tar = builder.into_inner()?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar)?;
    Ok(Layer {
        gzip: gz.finish()?,
        diff_id: sha256(&tar),
    })
}

/// The entries of a gzip-compressed layer, in order (for checks and tests).
pub fn list_layer(gzip: &[u8]) -> Result<Vec<(String, tar::EntryType, u32, u64)>> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gzip));
    let mut out = Vec::new();
    for e in archive.entries()? {
        let e = e?;
        let h = e.header();
        out.push((
            e.path()?.to_string_lossy().into_owned(),
            h.entry_type(),
            h.mode()?,
            h.mtime()?,
        ));
    }
    Ok(out)
}

/// A node of an image's file system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    /// A regular file; `data` is kept only where the caller asked for it.
    File {
        mode: u32,
        data: Option<Vec<u8>>,
    },
    Symlink(String),
}

/// An image's file system: paths relative to `/`, without a trailing slash.
pub type FileSystem = std::collections::BTreeMap<String, Node>;

/// The image's file system: every layer applied in order, whiteouts honoured. File
/// contents are kept for the paths `keep_data` accepts.
pub fn filesystem(oci: &OciDir, keep_data: impl Fn(&str) -> bool) -> Result<FileSystem> {
    let (_, manifest) = oci.manifest()?;
    let mut fs = FileSystem::new();
    for l in manifest.layers() {
        apply_layer(&mut fs, &oci.read_blob(l.digest().as_ref())?, &keep_data)?;
    }
    Ok(fs)
}

/// The file system of one layer (gzip-compressed or plain tar) on its own.
pub fn layer_filesystem(blob: &[u8], keep_data: impl Fn(&str) -> bool) -> Result<FileSystem> {
    let mut fs = FileSystem::new();
    apply_layer(&mut fs, blob, &keep_data)?;
    Ok(fs)
}

fn apply_layer(fs: &mut FileSystem, blob: &[u8], keep_data: &dyn Fn(&str) -> bool) -> Result<()> {
    let reader: Box<dyn std::io::Read> = if blob.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(blob))
    } else {
        Box::new(blob)
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path()?.to_string_lossy().into_owned();
        let path = raw
            .trim_start_matches("./")
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_string();
        if path.is_empty() || path == "." || whiteout(fs, &path) {
            continue;
        }
        let header = entry.header().clone();
        let node = match header.entry_type() {
            tar::EntryType::Directory => Node::Dir,
            tar::EntryType::Symlink => Node::Symlink(
                entry
                    .link_name()?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            tar::EntryType::Link => {
                let target = entry
                    .link_name()?
                    .map(|l| l.to_string_lossy().trim_start_matches("./").to_string())
                    .unwrap_or_default();
                fs.get(&target).cloned().unwrap_or(Node::File {
                    mode: 0o644,
                    data: None,
                })
            }
            _ => {
                let data = if keep_data(&path) {
                    let mut d = Vec::new();
                    std::io::Read::read_to_end(&mut entry, &mut d)?;
                    Some(d)
                } else {
                    None
                };
                Node::File {
                    mode: header.mode()?,
                    data,
                }
            }
        };
        if node != Node::Dir {
            fs.retain(|p, _| !p.starts_with(&format!("{path}/")));
        }
        fs.insert(path, node);
    }
    Ok(())
}

/// Applies `path` when it is a whiteout (`.wh.<name>` removes a name, `.wh..wh..opq`
/// empties its directory); says whether it was one.
fn whiteout(fs: &mut FileSystem, path: &str) -> bool {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    let child_of = |d: &str, p: &str| d.is_empty() || p.starts_with(&format!("{d}/"));
    if name == ".wh..wh..opq" {
        fs.retain(|p, _| !(child_of(dir, p) && p != dir));
        return true;
    }
    let Some(gone) = name.strip_prefix(".wh.") else {
        return false;
    };
    let gone = if dir.is_empty() {
        gone.to_string()
    } else {
        format!("{dir}/{gone}")
    };
    fs.retain(|p, _| p != &gone && !p.starts_with(&format!("{gone}/")));
    true
}

/// Follows symbolic links (absolute or relative, in any component) to the node a path
/// names in `fs`, as the kernel would inside the image.
pub fn resolve<'a>(fs: &'a FileSystem, path: &str) -> Option<(String, &'a Node)> {
    let mut parts: Vec<String> = Vec::new();
    let mut todo: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .rev()
        .map(str::to_string)
        .collect();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                parts.pop();
                continue;
            }
            _ => {}
        }
        parts.push(c);
        let here = parts.join("/");
        if let Some(Node::Symlink(target)) = fs.get(&here) {
            hops += 1;
            if hops > 40 {
                return None;
            }
            parts.pop();
            if target.starts_with('/') {
                parts.clear();
            }
            todo.extend(
                target
                    .split('/')
                    .filter(|c| !c.is_empty())
                    .rev()
                    .map(str::to_string),
            );
        }
    }
    let here = parts.join("/");
    fs.get(&here).map(|n| (here, n))
}

/// Writes the directory `dir` as a tar at `dest` with sorted entries and fixed
/// metadata: an `oci-archive` that is the same bytes for the same layout.
pub fn archive(dir: &Path, dest: &Path) -> Result<()> {
    let mut entries = Vec::new();
    for rel in crate::run::fingerprint::walk_files(dir)? {
        let data = crate::host::fs::read(&dir.join(&rel))?;
        entries.push(Entry::File {
            path: rel.to_string_lossy().into_owned(),
            mode: 0o644,
            data,
        });
    }
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs_done = std::collections::BTreeSet::new();
    for e in &entries {
        let Entry::File { path, data, .. } = e else {
            continue;
        };
        let mut parent = String::new();
        for part in Path::new(path)
            .parent()
            .into_iter()
            .flat_map(|p| p.components())
        {
            parent = if parent.is_empty() {
                part.as_os_str().to_string_lossy().into()
            } else {
                format!("{parent}/{}", part.as_os_str().to_string_lossy())
            };
            if dirs_done.insert(parent.clone()) {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_mtime(0);
                builder.append_data(&mut h, format!("{parent}/"), std::io::empty())?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        builder.append_data(&mut h, path, data.as_slice())?;
    }
    crate::host::fs::write_atomic(dest, &builder.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry::File {
                path: "opt/lib/modules/6.1.0-47-amd64/b.ko".into(),
                mode: 0o644,
                data: b"b".to_vec(),
            },
            Entry::Dir { path: "opt".into() },
            Entry::Dir {
                path: "opt/lib/modules/6.1.0-47-amd64".into(),
            },
            Entry::Symlink {
                path: "bin/sh".into(),
                target: "busybox".into(),
            },
        ]
    }

    #[test]
    fn layers_are_reproducible_sorted_and_owned_by_root() {
        let a = layer(sample(), 1700000000).unwrap();
        let mut reversed = sample();
        reversed.reverse();
        let b = layer(reversed, 1700000000).unwrap();
        assert_eq!(a.gzip, b.gzip, "entry order must not matter");
        assert_eq!(a.diff_id, b.diff_id);
        let listed = list_layer(&a.gzip).unwrap();
        let paths: Vec<&str> = listed.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin/sh",
                "opt/",
                "opt/lib/modules/6.1.0-47-amd64/",
                "opt/lib/modules/6.1.0-47-amd64/b.ko"
            ]
        );
        assert!(listed.iter().all(|e| e.3 == 1700000000));
        assert_eq!(listed[3].2, 0o644);
        assert_ne!(
            layer(sample(), 1).unwrap().gzip,
            a.gzip,
            "the epoch is in the layer"
        );
    }

    #[test]
    fn filesystems_apply_layers_whiteouts_and_links() {
        let d = tempfile::tempdir().unwrap();
        let oci = OciDir::create(d.path()).unwrap();
        let file = |p: &str, data: &[u8]| Entry::File {
            path: p.into(),
            mode: 0o755,
            data: data.to_vec(),
        };
        let l1 = layer(
            vec![
                Entry::Dir { path: "usr".into() },
                Entry::Dir {
                    path: "usr/bin".into(),
                },
                file("usr/bin/coreutils", b"x"),
                Entry::Symlink {
                    path: "usr/bin/cp".into(),
                    target: "coreutils".into(),
                },
                Entry::Symlink {
                    path: "bin".into(),
                    target: "usr/bin".into(),
                },
                Entry::Dir { path: "etc".into() },
                file("etc/secret", b"s"),
                file("etc/keep", b"k"),
            ],
            0,
        )
        .unwrap();
        let l2 = layer(
            vec![file("etc/.wh.secret", b""), file("usr/bin/mkdir", b"m")],
            0,
        )
        .unwrap();
        let mut layers = Vec::new();
        for l in [&l1, &l2] {
            let (digest, size) = oci.write_blob(&l.gzip).unwrap();
            layers.push(descriptor(MediaType::ImageLayerGzip, &digest, size).unwrap());
        }
        let (cd, cs) = oci.write_blob(b"{}").unwrap();
        let manifest = oci_spec::image::ImageManifestBuilder::default()
            .schema_version(2u32)
            .config(descriptor(MediaType::ImageConfig, &cd, cs).unwrap())
            .layers(layers)
            .build()
            .unwrap();
        let (md, ms) = oci.write_json(&manifest).unwrap();
        oci.set_index(&descriptor(MediaType::ImageManifest, &md, ms).unwrap(), "t")
            .unwrap();

        let fs = filesystem(&oci, |p| p.starts_with("etc/")).unwrap();
        assert!(!fs.contains_key("etc/secret"), "whiteout removes the file");
        assert_eq!(
            fs.get("etc/keep"),
            Some(&Node::File {
                mode: 0o755,
                data: Some(b"k".to_vec())
            })
        );
        assert_eq!(
            fs.get("usr/bin/coreutils"),
            Some(&Node::File {
                mode: 0o755,
                data: None
            })
        );
        let (path, node) = resolve(&fs, "/bin/cp").unwrap();
        assert_eq!(path, "usr/bin/coreutils");
        assert!(matches!(node, Node::File { .. }));
        assert_eq!(resolve(&fs, "/bin/mkdir").unwrap().0, "usr/bin/mkdir");
        assert!(resolve(&fs, "/bin/sh").is_none());
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let mut m = std::collections::HashMap::new();
        for k in ["z", "a", "m"] {
            m.insert(k.to_string(), 1);
        }
        assert_eq!(canonical_json(&m).unwrap(), br#"{"a":1,"m":1,"z":1}"#);
    }

    #[test]
    fn blobs_are_named_by_digest_and_archives_are_stable() {
        let d = tempfile::tempdir().unwrap();
        let oci = OciDir::create(d.path()).unwrap();
        let (digest, size) = oci.write_blob(b"hello").unwrap();
        assert_eq!(
            digest,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(size, 5);
        assert_eq!(fs::read(oci.blob_path(&digest)).unwrap(), b"hello");
        let (a, b) = (d.path().join("../a.tar"), d.path().join("../b.tar"));
        archive(d.path(), &a).unwrap();
        archive(d.path(), &b).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        fs::remove_file(a).unwrap();
        fs::remove_file(b).unwrap();
    }
}
