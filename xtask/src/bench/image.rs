//! What a kmod image costs beyond the files it carries: kmodforge's added layer (the
//! last of the image, read from the OCI layout `image` wrote) against the sum of the
//! files it holds, uncompressed (tar headers and padding) and as shipped (gzip).

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::formats::oci::OciDir;

/// The added layer of one kernel's image.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LayerSize {
    pub kernel: String,
    /// Regular files in the layer (the stripped `.ko` files and depmod's files).
    pub files: usize,
    pub files_bytes: u64,
    /// The layer as an uncompressed tar.
    pub tar_bytes: u64,
    /// The layer as stored and pulled (gzip).
    pub gzip_bytes: u64,
    /// `tar_bytes / files_bytes - 1`: what the layer adds to the files it holds.
    pub overhead: f64,
}

/// The last layer of the image in the OCI layout `dir`.
pub fn added_layer(dir: &Path, kernel: &str) -> Result<LayerSize> {
    let oci = OciDir::open(dir)?;
    let (_, manifest) = oci.manifest()?;
    let layer = manifest
        .layers()
        .last()
        .with_context(|| format!("the image in {} has no layer", dir.display()))?;
    let gzip = oci.read_blob(layer.digest().as_ref())?;
    let mut size = measure_layer(&gzip)?;
    size.kernel = kernel.to_string();
    Ok(size)
}

/// Sizes of a gzip-compressed layer: its files, its tar, itself.
pub fn measure_layer(gzip: &[u8]) -> Result<LayerSize> {
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gzip)
        .read_to_end(&mut tar)
        .context("the layer is not gzip")?;
    let mut archive = tar::Archive::new(tar.as_slice());
    let (mut files, mut files_bytes) = (0, 0);
    for e in archive.entries()? {
        let e = e?;
        if e.header().entry_type().is_file() {
            files += 1;
            files_bytes += e.header().size()?;
        }
    }
    let overhead = if files_bytes > 0 {
        tar.len() as f64 / files_bytes as f64 - 1.0
    } else {
        0.0
    };
    Ok(LayerSize {
        kernel: String::new(),
        files,
        files_bytes,
        tar_bytes: tar.len() as u64,
        gzip_bytes: gzip.len() as u64,
        overhead,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::oci::{Entry, layer};

    #[test]
    fn the_overhead_is_the_tar_beyond_its_files() {
        let data = vec![7u8; 10_000];
        let l = layer(
            vec![
                Entry::Dir {
                    path: "opt/lib".into(),
                },
                Entry::File {
                    path: "opt/lib/a.ko".into(),
                    mode: 0o644,
                    data: data.clone(),
                },
            ],
            0,
        )
        .unwrap();
        let s = measure_layer(&l.gzip).unwrap();
        assert_eq!((s.files, s.files_bytes), (1, 10_000));
        // A directory header, a file header, the data padded to 512, two end blocks
        // (and tar's padding of the archive to its record size).
        assert!(s.tar_bytes >= 512 + 512 + 10_240 + 1024, "{s:?}");
        assert!(s.overhead > 0.0 && s.gzip_bytes < 1000, "{s:?}");
    }
}
