//! `verify`: static checks of a kernel's staging tree and of its kmod image, without
//! booting anything: what the node's kernel and KMM's worker would check at load time.
//!
//! Integrity (a damaged or foreign tree: no image is made from it): the tree is at
//! `<prefix>/lib/modules/<kver>/`, every `.ko` is an ELF module built for `<kver>`
//! (vermagic), depmod's files are there and modules.dep is current (each module listed,
//! with its dependencies inside the tree). Loadability (what a node would refuse, one
//! module at a time): every dependency outside the tree is one of the kernel's own
//! modules, reachable through KMM's host link; every symbol a module imports is exported
//! by the tree, by the kernel's in-tree modules (through the link) or by the kernel
//! itself, with the CRC the kernel has where it uses modversions; with `[signing]`,
//! every module is signed with the configured certificate's key (what a Secure Boot
//! node checks). And the image gives KMM's worker the `sh`, `mkdir` and `cp` it runs,
//! and a file in every firmware folder (the firmware it holds is listed, with what the
//! modules name that it lacks).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;

use crate::config::Config;
use crate::config::diag::display_path;
use crate::formats::modinfo::{ModInfo, Symbols, Symvers};
use crate::formats::oci::{self, Node, OciDir};
use crate::run::fingerprint::walk_files;
use crate::run::layout::Layout;
use crate::steps::depmod::{DEPMOD_FILES, HOST_LINK, kernel_symvers};
use crate::steps::image::firmware_paths;
use crate::steps::sign;

/// One check and how it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// A failure means the tree is damaged: no image is made from it. Other checks say
    /// what a node would refuse, module by module.
    pub integrity: bool,
}

fn check(name: &'static str, problems: Vec<String>, ok_detail: String) -> Check {
    let integrity = matches!(name, "layout" | "vermagic" | "depmod files" | "modules.dep");
    if problems.is_empty() {
        Check {
            name,
            ok: true,
            detail: ok_detail,
            integrity,
        }
    } else {
        Check {
            name,
            ok: false,
            detail: problems.join("; "),
            integrity,
        }
    }
}

/// The files of a `lib/modules/<kver>/` directory (relative path → bytes) and its
/// symbolic links (relative path → target).
#[derive(Default, Debug)]
pub struct Tree {
    pub files: BTreeMap<String, Vec<u8>>,
    pub links: BTreeMap<String, String>,
}

impl Tree {
    /// Reads a staging tree's `lib/modules/<kver>/`.
    pub fn read(dir: &Path) -> Result<Tree> {
        let mut t = Tree::default();
        if dir.is_dir() {
            for rel in walk_files(dir)? {
                let path = dir.join(&rel);
                let rel = rel.to_string_lossy().into_owned();
                if path.is_symlink() {
                    t.links.insert(
                        rel,
                        std::fs::read_link(&path)?.to_string_lossy().into_owned(),
                    );
                } else {
                    t.files.insert(rel, std::fs::read(&path)?);
                }
            }
        }
        Ok(t)
    }

    fn from_image(fs: &oci::FileSystem, root: &str) -> Tree {
        let mut t = Tree::default();
        for (path, node) in fs.range(format!("{root}/")..) {
            let Some(rel) = path.strip_prefix(&format!("{root}/")) else {
                break;
            };
            match node {
                Node::File { data: Some(d), .. } => {
                    t.files.insert(rel.to_string(), d.clone());
                }
                Node::Symlink(target) => {
                    t.links.insert(rel.to_string(), target.clone());
                }
                _ => {}
            }
        }
        t
    }

    pub fn has_host_link(&self) -> bool {
        self.links.contains_key(HOST_LINK)
    }
}

/// A module's name as modprobe and modinfo's `depends` use it.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Checks a tree; `kernel` is the kernel's Module.symvers, when known.
pub fn tree(t: &Tree, kver: &str, shown_dir: &str, kernel: Option<&Symvers>) -> Vec<Check> {
    let kos: Vec<&String> = t.files.keys().filter(|p| p.ends_with(".ko")).collect();
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
        match ModInfo::from_elf(&t.files[*ko]) {
            Ok(info) => {
                match info.vermagic_release() {
                    Some(r) if r == kver => {}
                    Some(r) => bad.push(format!("{ko} was built for {r}")),
                    None => bad.push(format!("{ko} has no vermagic")),
                }
                infos.insert(module_name(ko), (ko.to_string(), info));
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
        .filter(|f| !t.files.contains_key(**f))
        .map(|f| format!("{f} is missing (was depmod run?)"))
        .collect();
    checks.push(check("depmod files", missing, DEPMOD_FILES.join(", ")));
    let listed = match t.files.get("modules.dep") {
        Some(dep) => parse_modules_dep(&String::from_utf8_lossy(dep)),
        None => {
            checks.push(check(
                "modules.dep",
                vec!["no modules.dep: modprobe cannot find any module".into()],
                String::new(),
            ));
            return checks;
        }
    };
    checks.push(modules_dep(&listed, &infos));
    checks.push(dependencies(&listed, &infos, t.has_host_link(), kernel));
    checks.push(symbols(t, &kos, kernel));
    checks
}

fn parse_modules_dep(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (module, deps) = line.split_once(':').unwrap_or((line, ""));
            (
                module.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            )
        })
        .collect()
}

fn in_tree_entry(path: &str) -> bool {
    path.starts_with(&format!("{HOST_LINK}/"))
}

/// modules.dep must list each module of the tree once, with the transitive closure of
/// what its `.modinfo` says it depends on inside the tree, and list nothing else of the
/// tree (the kernel's own modules, through the host link, are its business).
fn modules_dep(
    listed: &BTreeMap<String, BTreeSet<String>>,
    infos: &BTreeMap<String, (String, ModInfo)>,
) -> Check {
    let mut problems = Vec::new();
    for (path, info) in infos.values() {
        let mut want = BTreeSet::new();
        let mut todo: Vec<String> = info.depends();
        while let Some(d) = todo.pop() {
            if let Some((dpath, dinfo)) = infos.get(&d.replace('-', "_"))
                && want.insert(dpath.clone())
            {
                todo.extend(dinfo.depends());
            }
        }
        match listed.get(path) {
            None => problems.push(format!("{path} is not in modules.dep (stale: run depmod)")),
            Some(got) => {
                let got: BTreeSet<String> =
                    got.iter().filter(|d| !in_tree_entry(d)).cloned().collect();
                if got != want {
                    problems.push(format!(
                        "modules.dep gives {path} the dependencies [{}], its modinfo says [{}] (stale: run depmod)",
                        got.into_iter().collect::<Vec<_>>().join(" "),
                        want.into_iter().collect::<Vec<_>>().join(" ")
                    ));
                }
            }
        }
    }
    let known: BTreeSet<&String> = infos.values().map(|(p, _)| p).collect();
    for path in listed
        .keys()
        .filter(|p| !known.contains(p) && !in_tree_entry(p))
    {
        problems.push(format!(
            "modules.dep lists {path}, which is not in the tree (stale: run depmod)"
        ));
    }
    let ours = listed.keys().filter(|p| !in_tree_entry(p)).count();
    let deps: usize = listed
        .iter()
        .filter(|(p, _)| !in_tree_entry(p))
        .map(|(_, d)| d.len())
        .sum();
    check(
        "modules.dep",
        problems,
        format!("current: {ours} modules, {deps} dependencies"),
    )
}

/// Each dependency outside the tree must be one of the kernel's own modules, which
/// `modprobe -d` only finds through KMM's host link (and depmod listed through it).
fn dependencies(
    listed: &BTreeMap<String, BTreeSet<String>>,
    infos: &BTreeMap<String, (String, ModInfo)>,
    host_link: bool,
    kernel: Option<&Symvers>,
) -> Check {
    let in_tree: BTreeSet<String> = kernel
        .map(|k| k.0.values().map(|(_, owner)| module_name(owner)).collect())
        .unwrap_or_default();
    let mut problems = Vec::new();
    let mut external = 0;
    for (path, info) in infos.values() {
        for d in info.depends().iter().map(|d| d.replace('-', "_")) {
            if infos.contains_key(&d) {
                continue;
            }
            external += 1;
            let through_link = listed
                .get(path)
                .is_some_and(|deps| deps.iter().any(|p| in_tree_entry(p) && module_name(p) == d));
            if through_link {
                continue;
            }
            problems.push(if !host_link && in_tree.contains(&d) {
                format!(
                    "{path} depends on {d}, one of the kernel's own modules, which `modprobe -d` cannot reach: \
                     the image has no host link (set [image] host-link = \"auto\" or \"always\")"
                )
            } else if host_link {
                format!("{path} depends on {d}, which neither the tree nor the kernel's own modules (through the host link) hold")
            } else {
                format!("{path} depends on {d}, which is not in the image: `modprobe -d` cannot load it (add it to the image)")
            });
        }
    }
    let detail = match (external, host_link) {
        (0, _) => "inside the tree".to_string(),
        (n, _) => format!("{n} on the kernel's own modules, through the host link"),
    };
    check("dependencies", problems, detail)
}

/// Every symbol each module imports is exported by a module of the tree, by one of the
/// kernel's own modules (reachable through the host link) or by the kernel itself, and
/// where the kernel has CRCs (modversions) with the CRC the module was built against.
fn symbols(t: &Tree, kos: &[&String], kernel: Option<&Symvers>) -> Check {
    let Some(kernel) = kernel else {
        return check(
            "symbols",
            vec!["not checked: the kernel's Module.symvers is not here (run `cargo xtask build` for this kernel first)".into()],
            String::new(),
        );
    };
    let parsed: Vec<(&String, Symbols)> = kos
        .iter()
        .filter_map(|ko| Symbols::from_elf(&t.files[*ko]).ok().map(|s| (*ko, s)))
        .collect();
    let exported: BTreeSet<&str> = parsed
        .iter()
        .flat_map(|(_, s)| s.exports.iter().map(String::as_str))
        .collect();
    let mut problems = Vec::new();
    let mut count = 0;
    for (ko, syms) in &parsed {
        for sym in &syms.imports {
            count += 1;
            if exported.contains(sym.as_str()) {
                continue;
            }
            match kernel.get(sym) {
                None => problems.push(format!(
                    "{ko} uses {sym}, which no module of the tree, none of the kernel's own modules and not the kernel itself exports (Module.symvers)"
                )),
                Some((_, owner)) if owner != "vmlinux" && !t.has_host_link() => problems.push(format!(
                    "{ko} uses {sym} of the kernel's own module {} ({owner}), which the image cannot reach: it has no host link",
                    module_name(owner)
                )),
                Some((crc, owner)) => {
                    if let Some(built) = syms.crcs.get(sym).filter(|c| *crc != 0 && *c != crc) {
                        problems.push(format!(
                            "{ko} was built against another {sym} than {owner} exports (CRC {built:#010x}, the kernel's {crc:#010x})"
                        ));
                    }
                }
            }
        }
    }
    check("symbols", problems, format!("{count} imports resolved"))
}

/// Every module carries a signature made with the key of `cert` that matches it.
fn signatures(t: &Tree, cert: &Path) -> Result<Check> {
    let mut problems = Vec::new();
    let mut count = 0;
    for (path, data) in t.files.iter().filter(|(p, _)| p.ends_with(".ko")) {
        count += 1;
        match sign::check(data, cert)? {
            sign::Verdict::Valid => {}
            sign::Verdict::Unsigned => problems.push(format!(
                "{path} is not signed: a node that enforces signatures (Secure Boot) refuses it; build it again with [signing]"
            )),
            sign::Verdict::OtherKey(signer) => problems.push(format!(
                "{path} is signed by another key ({signer}), not by the key of {}",
                display_path(cert)
            )),
            sign::Verdict::Invalid(why) => problems.push(format!("{path}: {why}")),
        }
    }
    Ok(check(
        "signature",
        problems,
        format!(
            "{count} modules signed with the key of {}",
            display_path(cert)
        ),
    ))
}

/// The checks of a kernel's staging tree and of its image (`<out>/images/<kver>`, or
/// `image`), each under a heading.
pub fn kernel(
    config: &Config,
    layout: &Layout,
    kver: &str,
    image_dir: Option<&Path>,
) -> Result<Vec<(String, Vec<Check>)>> {
    let symvers = std::fs::read_to_string(kernel_symvers(layout, kver))
        .ok()
        .map(|t| Symvers::parse(&t));
    let staging = layout.staging_modules(kver);
    let cert = config.signing.as_ref().map(|s| s.cert.as_path());
    let tree_checks = if staging.is_dir() {
        let t = Tree::read(&staging)?;
        let mut checks = tree(&t, kver, &format!("lib/modules/{kver}/"), symvers.as_ref());
        if let Some(cert) = cert {
            checks.push(signatures(&t, cert)?);
        }
        checks
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
        Ok(oci) => image(&oci, &config.image.prefix, kver, symvers.as_ref(), cert)?,
        Err(_) if image_dir.is_some() => vec![check(
            "image",
            vec![format!(
                "{} is not an OCI image layout (no index.json)",
                display_path(&dir)
            )],
            String::new(),
        )],
        // Nothing to check yet is not a broken image.
        Err(_) => vec![check(
            "image",
            vec![],
            format!(
                "none made yet (`cargo xtask image --kernel {kver}` makes it at {})",
                display_path(&dir)
            ),
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

/// Checks an image: its tree under `<prefix>/lib/modules/<kver>/` (its signatures
/// against `cert`, when given) and the tools KMM's worker runs in it.
pub fn image(
    oci_dir: &OciDir,
    prefix: &str,
    kver: &str,
    kernel: Option<&Symvers>,
    cert: Option<&Path>,
) -> Result<Vec<Check>> {
    let tree_root = format!("{}/lib/modules/{kver}", prefix.trim_matches('/'));
    let fs = oci::filesystem(oci_dir, |p| p.starts_with(&format!("{tree_root}/")))?;
    let t = Tree::from_image(&fs, &tree_root);
    let mut checks = if fs.contains_key(&tree_root) {
        let mut checks = tree(&t, kver, &format!("/{tree_root}/"), kernel);
        if let Some(cert) = cert {
            checks.push(signatures(&t, cert)?);
        }
        checks
    } else {
        vec![check(
            "layout",
            vec![format!("the image has no /{tree_root}/")],
            String::new(),
        )]
    };
    checks.extend(firmware(&fs, prefix, &t));
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

/// The image's firmware folders (KMM's `firmwarePath`s) and what they hold; the
/// firmware its modules name (`MODULE_FIRMWARE`) that none holds, which the node must
/// have. An empty folder fails: KMM's init container (`cp -R <firmwarePath>/*`) fails on
/// it. No check at all for an image without firmware whose modules name none.
fn firmware(fs: &oci::FileSystem, prefix: &str, t: &Tree) -> Option<Check> {
    let folders = firmware_paths(fs, prefix);
    let mut shipped = BTreeSet::new();
    let (mut problems, mut held) = (Vec::new(), Vec::new());
    for folder in &folders {
        let root = format!("{}/", folder.trim_start_matches('/'));
        let files: Vec<&str> = fs
            .range(root.clone()..)
            .take_while(|(p, _)| p.starts_with(&root))
            .filter(|(_, n)| matches!(n, Node::File { .. }))
            .map(|(p, _)| &p[root.len()..])
            .collect();
        if files.is_empty() {
            problems.push(format!(
                "{folder} holds no file: KMM's init container (cp -R {folder}/*) fails on it"
            ));
        }
        held.push(format!("{folder}: {}", files.join(" ")));
        shipped.extend(files);
    }
    let mut wanted: Vec<String> = Vec::new();
    for (ko, data) in t.files.iter().filter(|(p, _)| p.ends_with(".ko")) {
        let Ok(info) = ModInfo::from_elf(data) else {
            continue;
        };
        for (_, name) in info.fields.iter().filter(|(k, _)| k == "firmware") {
            if !shipped.contains(name.as_str()) {
                wanted.push(format!(
                    "{ko} names {name}, which the image does not hold (the node must have it)"
                ));
            }
        }
    }
    if folders.is_empty() && wanted.is_empty() {
        return None;
    }
    let mut detail = if held.is_empty() {
        vec!["no firmware folder".to_string()]
    } else {
        held
    };
    detail.extend(wanted);
    Some(check("firmware", problems, detail.join("; ")))
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
        let c = modules_dep(
            &parse_modules_dep("a.ko:\nb.ko: a.ko\nc.ko: b.ko a.ko\n"),
            &infos(),
        );
        assert!(c.ok, "{c:?}");
    }

    #[test]
    fn stale_or_incomplete_modules_dep_fails() {
        let c = modules_dep(&parse_modules_dep("a.ko:\nb.ko: a.ko\n"), &infos());
        assert!(
            !c.ok && c.detail.contains("c.ko is not in modules.dep"),
            "{c:?}"
        );
        let c = modules_dep(
            &parse_modules_dep("a.ko:\nb.ko:\nc.ko: b.ko a.ko\n"),
            &infos(),
        );
        assert!(
            c.detail
                .contains("gives b.ko the dependencies [], its modinfo says [a.ko]"),
            "{c:?}"
        );
        let c = modules_dep(
            &parse_modules_dep("a.ko:\nb.ko: a.ko\nc.ko: b.ko a.ko\ngone.ko:\n"),
            &infos(),
        );
        assert!(
            c.detail.contains("lists gone.ko, which is not in the tree"),
            "{c:?}"
        );
        let mut i = infos();
        i.insert("d".into(), ("d.ko".into(), info(&["crc32c"])));
        let dep = parse_modules_dep("a.ko:\nb.ko: a.ko\nc.ko: b.ko a.ko\nd.ko:\n");
        assert!(modules_dep(&dep, &i).ok, "modules.dep itself is current");
        let c = dependencies(&dep, &i, false, None);
        assert!(
            !c.ok
                && c.detail
                    .contains("d.ko depends on crc32c, which is not in the image"),
            "{c:?}"
        );
    }

    #[test]
    fn the_kernels_own_modules_are_reached_through_the_host_link() {
        let mut i = infos();
        i.insert("u".into(), ("updates/dkms/u.ko".into(), info(&["crc7"])));
        let kernel = Symvers::parse("0xba55d23e\tcrc7_be\tlib/crc7\tEXPORT_SYMBOL\t\n");
        let linked = parse_modules_dep(
            "a.ko:\nb.ko: a.ko\nc.ko: b.ko a.ko\nupdates/dkms/u.ko: host/kernel/lib/crc7.ko\nhost/kernel/lib/crc7.ko:\n",
        );
        assert!(
            modules_dep(&linked, &i).ok,
            "{:?}",
            modules_dep(&linked, &i)
        );
        assert!(dependencies(&linked, &i, true, Some(&kernel)).ok);
        // Without the link, modprobe -d cannot reach the kernel's own crc7.
        let unlinked =
            parse_modules_dep("a.ko:\nb.ko: a.ko\nc.ko: b.ko a.ko\nupdates/dkms/u.ko:\n");
        let c = dependencies(&unlinked, &i, false, Some(&kernel));
        assert!(
            !c.ok
                && c.detail
                    .contains("depends on crc7, one of the kernel's own modules")
                && c.detail.contains("host link"),
            "{c:?}"
        );
    }
}
