//! A gzip-compressed `newc` cpio archive: the initramfs the load test boots.
//!
//! Entries are written sorted, parents first, owned by root, all times 0, so the same
//! contents give the same bytes.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;

use crate::formats::oci::Entry;

#[derive(Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    /// Adds an entry (a path relative to `/`) and any parent directory it lacks.
    pub fn add(&mut self, entry: Entry) {
        let path = entry.path().trim_matches('/').to_string();
        let mut parent = String::new();
        for part in path.split('/').take(path.split('/').count() - 1) {
            parent = if parent.is_empty() {
                part.to_string()
            } else {
                format!("{parent}/{part}")
            };
            self.entries.entry(parent.clone()).or_insert(Entry::Dir {
                path: parent.clone(),
            });
        }
        self.entries.insert(path, entry);
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.add(Entry::File {
            path: path.into(),
            mode,
            data,
        });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.add(Entry::Symlink {
            path: path.into(),
            target: target.into(),
        });
    }

    /// The bytes of its files (what it takes once unpacked).
    pub fn bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match e {
                Entry::File { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_matches('/'))
    }

    /// The archive, gzip-compressed.
    pub fn finish(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for (ino, entry) in (1u32..).zip(self.entries.values()) {
            let (mode, data): (u32, &[u8]) = match entry {
                Entry::Dir { .. } => (0o040_755, &[]),
                Entry::File { mode, data, .. } => (0o100_000 | mode, data),
                Entry::Symlink { target, .. } => (0o120_777, target.as_bytes()),
            };
            record(&mut out, ino, mode, entry.path().trim_matches('/'), data);
        }
        record(&mut out, 0, 0, "TRAILER!!!", &[]);
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), flate2::Compression::fast());
        gz.write_all(&out)?;
        Ok(gz.finish()?)
    }
}

fn record(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_list_parents_first_and_read_back_with_cpio() {
        let mut i = Initramfs::default();
        i.file("opt/lib/modules/k/a.ko", 0o644, b"module".to_vec());
        i.symlink("sbin/modprobe", "/bin/kmod");
        i.file("init", 0o755, b"#!/bin/sh\n".to_vec());
        let gz = i.finish().unwrap();
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut raw)
            .unwrap();
        let text = String::from_utf8_lossy(&raw);
        let order: Vec<&str> = [
            "init\0",
            "opt\0",
            "opt/lib\0",
            "opt/lib/modules/k/a.ko\0",
            "sbin/modprobe\0",
            "TRAILER!!!\0",
        ]
        .into_iter()
        .collect();
        let mut last = 0;
        for name in order {
            let at = text.find(name).unwrap_or_else(|| panic!("{name} missing"));
            assert!(at >= last, "{name} out of order");
            last = at;
        }
        assert_eq!(raw.len() % 4, 0);
        assert_eq!(
            i.finish().unwrap(),
            gz,
            "the same contents give the same bytes"
        );
    }
}
