//! `verify`: static checks of a kernel's staging tree and of its kmod image, without
//! booting anything.
//!
//! The tree must be at `<prefix>/lib/modules/<kver>/`, every `.ko` built for `<kver>`
//! (vermagic), depmod's files present and current (modules.dep lists exactly the
//! modules there, each with the transitive closure of its `depends`, all of them in
//! the tree, since `modprobe -d` finds nothing else), and the image must give KMM's
//! worker the `sh`, `mkdir` and `cp` it runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;

use crate::config::Config;
use crate::config::diag::display_path;
use crate::formats::modinfo::ModInfo;
use crate::formats::oci::{self, Node, OciDir};
use crate::run::fingerprint::walk_files;
use crate::run::layout::Layout;
use crate::steps::depmod::DEPMOD_FILES;

/// One check and how it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &'static str, problems: Vec<String>, ok_detail: String) -> Check {
    if problems.is_empty() {
        Check {
            name,
            ok: true,
            detail: ok_detail,
        }
    } else {
        Check {
            name,
            ok: false,
            detail: problems.join("; "),
        }
    }
}

/// Checks the files of a `lib/modules/<kver>/` directory (relative path → bytes).
pub fn tree(files: &BTreeMap<String, Vec<u8>>, kver: &str, shown_dir: &str) -> Vec<Check> {
    let kos: Vec<&String> = files.keys().filter(|p| p.ends_with(".ko")).collect();
    let mut checks = vec![check(
        "layout",
        if kos.is_empty() {
            vec![format!("{shown_dir} holds no .ko file")]
        } else {
            vec![]
        },
        format!("{shown_dir} holds {} modules", kos.len()),
    )];

    let mut infos: BTreeMap<String, (String, ModInfo)> = BTreeMap::new();
    let mut bad = Vec::new();
    for ko in &kos {
        match ModInfo::from_elf(&files[*ko]) {
            Ok(info) => {
                match info.vermagic_release() {
                    Some(r) if r == kver => {}
                    Some(r) => bad.push(format!("{ko} was built for {r}")),
                    None => bad.push(format!("{ko} has no vermagic")),
                }
                let name = Path::new(ko)
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .replace('-', "_");
                infos.insert(name, (ko.to_string(), info));
            }
            Err(e) => bad.push(format!("{ko}: {e:#}")),
        }
    }
    checks.push(check(
        "vermagic",
        bad,
        format!("every .ko is built for {kver}"),
    ));

    let missing: Vec<String> = DEPMOD_FILES
        .iter()
        .filter(|f| !files.contains_key(**f))
        .map(|f| format!("{f} is missing"))
        .collect();
    let depmod_ran = missing.is_empty();
    checks.push(check(
        "depmod files",
        missing
            .into_iter()
            .map(|m| format!("{m} (was depmod run?)"))
            .collect(),
        DEPMOD_FILES.join(", "),
    ));
    if let Some(dep) = files.get("modules.dep") {
        checks.push(modules_dep(&String::from_utf8_lossy(dep), &infos));
    } else if !depmod_ran {
        checks.push(check(
            "modules.dep",
            vec!["no modules.dep: modprobe cannot find any module".into()],
            String::new(),
        ));
    }
    checks
}

/// modules.dep must list each module once, with the transitive closure of what its
/// `.modinfo` says it depends on, and every dependency must be in the tree.
fn modules_dep(text: &str, infos: &BTreeMap<String, (String, ModInfo)>) -> Check {
    let mut listed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (module, deps) = line.split_once(':').unwrap_or((line, ""));
        listed.insert(
            module.trim().to_string(),
            deps.split_whitespace().map(str::to_string).collect(),
        );
    }
    let mut problems = Vec::new();
    for (name, (path, _)) in infos {
        let mut want = BTreeSet::new();
        let mut todo: Vec<String> = infos[name].1.depends();
        while let Some(d) = todo.pop() {
            let d = d.replace('-', "_");
            match infos.get(&d) {
                Some((dpath, dinfo)) => {
                    if want.insert(dpath.clone()) {
                        todo.extend(dinfo.depends());
                    }
                }
                None => problems.push(format!(
                    "{path} depends on {d}, which is not in the image: `modprobe -d` cannot load it (add it to the image)"
                )),
            }
        }
        match listed.get(path) {
            None => problems.push(format!("{path} is not in modules.dep (stale: run depmod)")),
            Some(got) if *got != want => problems.push(format!(
                "modules.dep gives {path} the dependencies [{}], its modinfo says [{}] (stale: run depmod)",
                got.iter().cloned().collect::<Vec<_>>().join(" "),
                want.iter().cloned().collect::<Vec<_>>().join(" ")
            )),
            Some(_) => {}
        }
    }
    let known: BTreeSet<&String> = infos.values().map(|(p, _)| p).collect();
    for path in listed.keys().filter(|p| !known.contains(p)) {
        problems.push(format!(
            "modules.dep lists {path}, which is not in the tree (stale: run depmod)"
        ));
    }
    let deps: usize = listed.values().map(BTreeSet::len).sum();
    check(
        "modules.dep",
        problems,
        format!("current: {} modules, {deps} dependencies", listed.len()),
    )
}

/// Reads a staging tree's `lib/modules/<kver>/` into memory.
pub fn read_dir(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    if dir.is_dir() {
        for rel in walk_files(dir)? {
            files.insert(
                rel.to_string_lossy().into_owned(),
                std::fs::read(dir.join(&rel))?,
            );
        }
    }
    Ok(files)
}

/// The checks of a kernel's staging tree and of its image (`<out>/images/<kver>`, or
/// `image`), each under a heading.
pub fn kernel(
    config: &Config,
    layout: &Layout,
    kver: &str,
    image_dir: Option<&Path>,
) -> Result<Vec<(String, Vec<Check>)>> {
    let staging = layout.staging_modules(kver);
    let tree_checks = if staging.is_dir() {
        tree(&read_dir(&staging)?, kver, &format!("lib/modules/{kver}/"))
    } else {
        vec![check(
            "layout",
            vec![format!(
                "no build output: run `cargo xtask build --kernel {kver}`"
            )],
            String::new(),
        )]
    };
    let dir = image_dir.map_or_else(|| layout.out.join("images").join(kver), Path::to_path_buf);
    let image_checks = match OciDir::open(&dir) {
        Ok(oci) => image(&oci, &config.image.prefix, kver)?,
        Err(_) if image_dir.is_some() => vec![check(
            "image",
            vec![format!(
                "{} is not an OCI image layout (no index.json)",
                display_path(&dir)
            )],
            String::new(),
        )],
        Err(_) => vec![check(
            "image",
            vec![format!(
                "no image at {}: run `cargo xtask image --kernel {kver}`",
                display_path(&dir)
            )],
            String::new(),
        )],
    };
    Ok(vec![
        (
            format!(
                "{kver}: staging tree {}",
                display_path(&layout.staging(kver))
            ),
            tree_checks,
        ),
        (
            format!("{kver}: image {}", display_path(&dir)),
            image_checks,
        ),
    ])
}

/// Checks an image: its tree under `<prefix>/lib/modules/<kver>/` and the tools KMM's
/// worker runs in it.
pub fn image(oci_dir: &OciDir, prefix: &str, kver: &str) -> Result<Vec<Check>> {
    let tree_root = format!("{}/lib/modules/{kver}", prefix.trim_matches('/'));
    let fs = oci::filesystem(oci_dir, |p| p.starts_with(&format!("{tree_root}/")))?;
    let mut files = BTreeMap::new();
    for (path, node) in fs.range(format!("{tree_root}/")..) {
        let Some(rel) = path.strip_prefix(&format!("{tree_root}/")) else {
            break;
        };
        if let Node::File { data: Some(d), .. } = node {
            files.insert(rel.to_string(), d.clone());
        }
    }
    let mut checks = if fs.contains_key(&tree_root) {
        tree(&files, kver, &format!("/{tree_root}/"))
    } else {
        vec![check(
            "layout",
            vec![format!("the image has no /{tree_root}/")],
            String::new(),
        )]
    };
    let mut missing = Vec::new();
    for tool in ["sh", "mkdir", "cp"] {
        let found = ["bin", "usr/bin"]
            .iter()
            .find_map(|d| oci::resolve(&fs, &format!("{d}/{tool}")));
        match found {
            Some((_, Node::File { mode, .. })) if mode & 0o111 != 0 => {}
            Some((p, _)) => missing.push(format!("/{p} ({tool}) is not an executable file")),
            None => missing.push(format!("no {tool} in /bin or /usr/bin")),
        }
    }
    checks.push(check(
        "tools",
        missing,
        "sh, mkdir and cp, which KMM's worker runs".into(),
    ));
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(depends: &[&str]) -> ModInfo {
        ModInfo::parse(
            format!(
                "depends={}\0vermagic=6.1.0-47-amd64 SMP\0",
                depends.join(",")
            )
            .as_bytes(),
        )
    }

    fn infos() -> BTreeMap<String, (String, ModInfo)> {
        [("a", &[][..]), ("b", &["a"][..]), ("c", &["b"][..])]
            .into_iter()
            .map(|(n, d)| (n.to_string(), (format!("{n}.ko"), info(d))))
            .collect()
    }

    #[test]
    fn a_current_modules_dep_passes() {
        let c = modules_dep("a.ko:\nb.ko: a.ko\nc.ko: b.ko a.ko\n", &infos());
        assert!(c.ok, "{c:?}");
    }

    #[test]
    fn stale_or_incomplete_modules_dep_fails() {
        let c = modules_dep("a.ko:\nb.ko: a.ko\n", &infos());
        assert!(
            !c.ok && c.detail.contains("c.ko is not in modules.dep"),
            "{c:?}"
        );
        let c = modules_dep("a.ko:\nb.ko:\nc.ko: b.ko a.ko\n", &infos());
        assert!(
            c.detail
                .contains("gives b.ko the dependencies [], its modinfo says [a.ko]"),
            "{c:?}"
        );
        let c = modules_dep("a.ko:\nb.ko: a.ko\nc.ko: b.ko a.ko\ngone.ko:\n", &infos());
        assert!(
            c.detail.contains("lists gone.ko, which is not in the tree"),
            "{c:?}"
        );
        let mut i = infos();
        i.insert("d".into(), ("d.ko".into(), info(&["crc32c"])));
        let c = modules_dep("a.ko:\nb.ko: a.ko\nc.ko: b.ko a.ko\nd.ko:\n", &i);
        assert!(
            c.detail
                .contains("d.ko depends on crc32c, which is not in the image"),
            "{c:?}"
        );
    }
}
