//! What KMM loads for a module folder: `moduleName`, `modulesLoadingOrder` and
//! `parameters`, from the `.ko` files the folder (and the folders it depends on) really
//! built. The load test passes the parameters to the same module, so it checks what the
//! manifests deploy.
//!
//! KMM turns `modulesLoadingOrder: [a, b, c]` into `softdep a pre: b` and `softdep b
//! pre: c`, and runs `modprobe a`: `c` loads first, `a` last. So the list runs from the
//! module nothing else needs down to the ones everything needs: dependents before their
//! dependencies, `moduleName` first, and every module of the folder in it.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;

use crate::config::diag::display_path;
use crate::config::modules::Module;
use crate::formats::modinfo::ModInfo;
use crate::run::layout::Layout;
use crate::steps::compile::Record;

/// One built `.ko`: its module name (`-` as `_`) and what its `.modinfo` depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ko {
    pub name: String,
    pub depends: Vec<String>,
}

/// A module folder and what it built for one kernel.
pub struct Folder<'a> {
    pub module: &'a Module,
    pub kos: Vec<Ko>,
}

/// How KMM loads a top-level folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadSpec {
    pub module_name: String,
    /// Empty when `module_name` is the only module.
    pub order: Vec<String>,
    pub parameters: Vec<String>,
}

pub fn module_name(file: &str) -> String {
    file.trim_end_matches(".ko").replace('-', "_")
}

/// The `.ko` files a compile record names, with their dependencies read from the
/// artifacts.
pub fn kos(layout: &Layout, kver: &str, folder: &str, record: &Record) -> Result<Vec<Ko>> {
    record
        .modules
        .iter()
        .map(|file| {
            let info = ModInfo::read(&layout.artifacts(kver, folder).join(file))?;
            Ok(Ko {
                name: module_name(file),
                depends: info.depends().iter().map(|d| module_name(d)).collect(),
            })
        })
        .collect()
}

/// The spec of `top` (first) loading with `deps`, the folders it depends on.
pub fn spec(top: &Folder, deps: &[Folder]) -> Result<LoadSpec, String> {
    let all: Vec<&Ko> = std::iter::once(top)
        .chain(deps)
        .flat_map(|f| &f.kos)
        .collect();
    let order = dependents_first(&all);
    let needed: BTreeSet<&str> = all
        .iter()
        .flat_map(|k| k.depends.iter().map(String::as_str))
        .collect();
    let own: Vec<&str> = top.kos.iter().map(|k| k.name.as_str()).collect();
    let tops: Vec<&str> = own
        .iter()
        .copied()
        .filter(|n| !needed.contains(n))
        .collect();
    let chosen = choose(top.module, &own, &tops)?;
    let mut order: Vec<String> = order
        .into_iter()
        .filter(|n| *n != chosen)
        .map(str::to_string)
        .collect();
    order.insert(0, chosen.to_string());
    Ok(LoadSpec {
        module_name: chosen.to_string(),
        order: if order.len() > 1 { order } else { Vec::new() },
        parameters: top.module.test.parameters.clone(),
    })
}

/// The module KMM loads by name: module.toml's `[kmm] module`, else the one named like
/// the folder (or its DKMS package), else the folder's only top module. It must be a
/// top: one no other module of the list depends on, since it loads last.
fn choose<'k>(m: &Module, own: &[&'k str], tops: &[&'k str]) -> Result<&'k str, String> {
    let file = display_path(&m.dir.join("module.toml"));
    if let Some(wanted) = &m.kmm.module {
        let wanted = module_name(wanted);
        return match tops.iter().find(|t| **t == wanted) {
            Some(t) => Ok(t),
            None if own.contains(&wanted.as_str()) => Err(format!(
                "{file}: [kmm] module = {wanted:?} is needed by another module of the folder, so KMM cannot load it last; name one of {}",
                tops.join(", ")
            )),
            None => Err(format!(
                "{file}: [kmm] module = {wanted:?}, but {} builds {}",
                m.name,
                own.join(", ")
            )),
        };
    }
    let folder = module_name(&m.name);
    let package = match &m.build {
        crate::config::modules::Build::Dkms(c) => c.package_name.as_deref().map(module_name),
        crate::config::modules::Build::Kbuild { .. } => None,
    };
    if let Some(t) = tops
        .iter()
        .find(|t| **t == folder || Some(t.to_string()) == package)
    {
        return Ok(t);
    }
    match tops {
        [only] => Ok(only),
        [] => Err(format!("{} built no module KMM can load last", m.name)),
        _ => Err(format!(
            "{} builds {}: say which one KMM loads by name with [kmm] module = \"<name>\" in {file}",
            m.name,
            tops.join(", ")
        )),
    }
}

/// The modules ordered so that each comes before every module it depends on (ties by
/// name), so KMM's softdep chain loads dependencies first.
fn dependents_first<'k>(all: &[&'k Ko]) -> Vec<&'k str> {
    let names: BTreeSet<&str> = all.iter().map(|k| k.name.as_str()).collect();
    let deps: BTreeMap<&str, BTreeSet<&str>> = all
        .iter()
        .map(|k| {
            let d = k
                .depends
                .iter()
                .map(String::as_str)
                .filter(|d| names.contains(d));
            (k.name.as_str(), d.collect())
        })
        .collect();
    // Post-order (dependencies first), then reversed.
    let mut done: Vec<&str> = Vec::new();
    fn visit<'k>(
        n: &'k str,
        deps: &BTreeMap<&'k str, BTreeSet<&'k str>>,
        done: &mut Vec<&'k str>,
        path: &mut Vec<&'k str>,
    ) {
        if done.contains(&n) || path.contains(&n) {
            return;
        }
        path.push(n);
        for d in deps.get(n).into_iter().flatten() {
            visit(d, deps, done, path);
        }
        path.pop();
        done.push(n);
    }
    for n in names.iter().rev() {
        visit(n, &deps, &mut done, &mut Vec::new());
    }
    done.reverse();
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ko(name: &str, depends: &[&str]) -> Ko {
        Ko {
            name: name.into(),
            depends: depends.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn module(name: &str, kmm_module: Option<&str>) -> Module {
        let mut m = crate::testing::module(name);
        m.kmm.module = kmm_module.map(str::to_string);
        m
    }

    #[test]
    fn a_single_module_needs_no_order() {
        let m = module("kmf_hello", None);
        let top = Folder {
            module: &m,
            kos: vec![ko("kmf_hello", &[])],
        };
        let s = spec(&top, &[]).unwrap();
        assert_eq!(s.module_name, "kmf_hello");
        assert!(s.order.is_empty());
    }

    #[test]
    fn dependencies_come_after_their_dependents() {
        let m = module("kmf_user", None);
        let e = module("kmf_export", None);
        let top = Folder {
            module: &m,
            kos: vec![ko("kmf_user", &["kmf_export"])],
        };
        let dep = Folder {
            module: &e,
            kos: vec![ko("kmf_export", &[])],
        };
        let s = spec(&top, &[dep]).unwrap();
        assert_eq!(s.order, ["kmf_user", "kmf_export"]);
    }

    #[test]
    fn a_package_of_several_modules_loads_all_core_last() {
        // dahdi-like: drivers need the core; the folder-named core cannot load last.
        let m = module("dahdi", None);
        let top = Folder {
            module: &m,
            kos: vec![
                ko("dahdi", &[]),
                ko("dahdi_dummy", &["dahdi"]),
                ko("dahdi_echocan_oslec", &["dahdi"]),
            ],
        };
        let err = spec(&top, &[]).unwrap_err();
        assert!(err.contains("dahdi_dummy, dahdi_echocan_oslec"), "{err}");
        let m = module("dahdi", Some("dahdi_dummy"));
        let top = Folder {
            module: &m,
            kos: top.kos,
        };
        let s = spec(&top, &[]).unwrap();
        assert_eq!(s.order, ["dahdi_dummy", "dahdi_echocan_oslec", "dahdi"]);
        let m = module("dahdi", Some("dahdi"));
        let top = Folder {
            module: &m,
            kos: top.kos,
        };
        assert!(
            spec(&top, &[])
                .unwrap_err()
                .contains("needed by another module")
        );
    }

    #[test]
    fn the_folder_named_module_is_preferred() {
        let m = module("tp_smapi", None);
        let top = Folder {
            module: &m,
            kos: vec![
                ko("hdaps", &["thinkpad_ec"]),
                ko("thinkpad_ec", &[]),
                ko("tp_smapi", &["thinkpad_ec"]),
            ],
        };
        let s = spec(&top, &[]).unwrap();
        assert_eq!(s.module_name, "tp_smapi");
        assert_eq!(s.order, ["tp_smapi", "hdaps", "thinkpad_ec"]);
    }
}
