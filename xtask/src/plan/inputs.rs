//! What changed: the identity of every job's inputs, and the one function that compares
//! them with an earlier state. The incremental build compares them with the records of
//! the last successful runs, `matrix --changed-since` with the plan at a git revision;
//! both ask [`changed`].
//!
//! A job's fingerprint covers its own inputs (files, settings) and its dependencies'
//! fingerprints, so a change anywhere upstream (a recipe, the image base, a module's
//! sources) reaches every job it affects. Provenance (the commit time that dates an
//! image's files) is not an input: it changes with every commit and says nothing about
//! what the job does.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::config::modules::Module;
use crate::config::{Config, ImageBase, Toolchain};
use crate::plan::{JobKind, Plan};
use crate::run::fingerprint::Fingerprint;
use crate::steps::toolchain;

/// Every job's fingerprint, in plan order. Each module folder and each toolchain
/// recipe is read once, however many kernels use it (a no-op run of 200 kernels must
/// not hash a folder 200 times).
pub fn fingerprints(plan: &Plan) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(plan.jobs.len());
    let mut read = ReadOnce::default();
    for job in &plan.jobs {
        let mut f = Fingerprint::new(&format!("{}-v2", job.kind.step()));
        own_inputs(plan, &job.kind, &mut f, &mut read)?;
        for d in job.deps.iter().chain(&job.after) {
            f.field("dep", &out[*d]);
        }
        out.push(f.finish());
    }
    Ok(out)
}

/// What one pass over the plan has read: module folders' digests by folder, recipe
/// files by toolchain.
#[derive(Default)]
struct ReadOnce {
    trees: BTreeMap<std::path::PathBuf, String>,
    recipes: BTreeMap<String, toolchain::RecipeFiles>,
}

impl ReadOnce {
    /// A module folder's files as one digest.
    fn module_tree(&mut self, dir: &std::path::Path) -> Result<String> {
        if let Some(d) = self.trees.get(dir) {
            return Ok(d.clone());
        }
        let digest = Fingerprint::new("module-tree").module_tree(dir)?.finish();
        self.trees.insert(dir.to_path_buf(), digest.clone());
        Ok(digest)
    }

    fn toolchain(&mut self, tc: &Toolchain, kver: &str) -> Result<String> {
        if !self.recipes.contains_key(&tc.name) {
            let files = toolchain::RecipeFiles::read(tc)?;
            self.recipes.insert(tc.name.clone(), files);
        }
        toolchain::fingerprint_with(tc, kver, &self.recipes[&tc.name])
    }
}

fn own_inputs(plan: &Plan, kind: &JobKind, f: &mut Fingerprint, read: &mut ReadOnce) -> Result<()> {
    let config = plan.config;
    if let Some(k) = kind.kernel() {
        f.field("kernel", plan.kernels[k].kver());
    }
    match kind {
        JobKind::Base { base } => {
            f.field("image", &base.image);
            if let Some(b) = &base.bootstrap {
                f.field("bootstrap", &format!("{b:?}"));
            }
        }
        JobKind::Toolchain { kernel } => {
            let kp = &plan.kernels[*kernel];
            f.field("toolchain", &read.toolchain(kp.toolchain, kp.kver())?);
        }
        JobKind::Packages { kernel, set } => {
            for p in &plan.kernels[*kernel].package_sets[*set] {
                f.field("package", p);
            }
        }
        JobKind::Compile { kernel, module } => {
            let m = plan.kernels[*kernel].modules[*module];
            f.field("module", &m.name);
            f.field("tree", &read.module_tree(&m.dir)?);
            // The certificate, never the key: a new certificate signs anew.
            if let Some(s) = &config.signing {
                f.field("signing-cert", &s.cert_sha256);
            }
        }
        JobKind::Depmod { .. } => {
            f.field("host-link", &format!("{:?}", config.image.host_link));
        }
        JobKind::Layer { kernel } => {
            f.field("prefix", &config.image.prefix);
            firmware(&plan.kernels[*kernel].modules, f)?;
        }
        JobKind::ImageBase => image_base(config, f),
        JobKind::Image { .. } => {
            f.field("name", &config.image.name)
                .field("mod-name", &config.kmm.name)
                .field("mod-namespace", &config.kmm.namespace)
                .field("source", config.image.source.as_deref().unwrap_or(""));
        }
        JobKind::Push { kernel } => {
            let reference = crate::steps::image::reference(config, plan.kernels[*kernel].kver())?;
            f.field("tls-verify", &config.tls_verify(&reference).to_string());
        }
        JobKind::LoadTest { kernel } => {
            busybox(config, f);
            for a in &plan.kernels[*kernel].kernel.boot_args {
                f.field("boot-arg", a);
            }
        }
        JobKind::Verify { .. } => {}
        JobKind::Builder { kernel } | JobKind::BuilderPush { kernel } => {
            let kver = plan.kernels[*kernel].kver();
            f.field("builder", &crate::steps::builder::reference(config, kver)?);
        }
    }
    Ok(())
}

/// The firmware files of the modules that may ship them (names and bytes): what the
/// layer copies from the module folders besides the staging tree.
fn firmware(modules: &[&Module], f: &mut Fingerprint) -> Result<()> {
    for m in modules {
        let Some(dir) = &m.firmware else { continue };
        f.field("firmware", &m.name);
        let files = crate::config::firmware::files(&m.dir, dir)
            .map_err(|e| anyhow::anyhow!("the firmware of module {}: {e}", m.name))?;
        for file in files {
            f.field("firmware-file", &file.name);
            f.contents(&file.source)?;
        }
    }
    Ok(())
}

fn image_base(config: &Config, f: &mut Fingerprint) {
    match &config.image.base {
        ImageBase::Reference(r) => {
            f.field("base", r);
        }
        ImageBase::Busybox => busybox(config, f.field("base", "busybox")),
    }
}

fn busybox(config: &Config, f: &mut Fingerprint) {
    f.field("busybox-suite", &config.image.busybox_suite);
    for s in &config.image.busybox_sources {
        f.field("busybox-source", s);
    }
}

/// Which jobs' inputs differ from `before` (fingerprints by job label; a job `before`
/// does not know is changed). The one answer to "what changed", for every consumer.
pub fn changed(plan: &Plan, now: &[String], before: impl Fn(usize) -> Option<String>) -> Vec<bool> {
    (0..plan.jobs.len())
        .map(|i| before(i).as_deref() != Some(now[i].as_str()))
        .collect()
}

/// Fingerprints by job label, to compare plans made from two revisions.
pub fn by_label(plan: &Plan, fingerprints: &[String]) -> BTreeMap<String, String> {
    plan.jobs
        .iter()
        .zip(fingerprints)
        .map(|(j, f)| (plan.label(j).to_string(), f.clone()))
        .collect()
}

/// The kernels (plan indices) with a changed job.
pub fn changed_kernels(plan: &Plan, changed: &[bool]) -> Vec<usize> {
    let mut out: Vec<usize> = plan
        .jobs
        .iter()
        .zip(changed)
        .filter(|(_, c)| **c)
        .filter_map(|(j, _)| j.kind.kernel())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Scope;

    const TOML: &str = "[defaults]\ntoolchain = \"deb\"\n\
        [toolchains.deb]\nrecipe = \"images/tc.Containerfile\"\nbase = \"localhost/b\"\n\
        [[kernel]]\nversion = \"6.1.0-47-amd64\"\n\
        [[kernel]]\nversion = \"6.12.117+deb12-amd64\"\n";

    fn changed_between(
        before_toml: &str,
        after_toml: &str,
        edit: impl Fn(&std::path::Path),
    ) -> Vec<String> {
        let modules = [("a", None), ("b", Some("kernels = '^6\\.1\\.'\n"))];
        let (d1, c1) = crate::testing::scratch(before_toml, &modules);
        let (d2, c2) = crate::testing::scratch(after_toml, &modules);
        edit(d2.path());
        let (c1, c2) = (c1.unwrap(), c2.unwrap());
        let c2 = if d2.path().join("reload").exists() {
            Config::load(&d2.path().join("kernels.toml")).unwrap()
        } else {
            c2
        };
        let (p1, p2) = (
            Plan::new(&c1, None, Scope::everything()).unwrap(),
            Plan::new(&c2, None, Scope::everything()).unwrap(),
        );
        let before = by_label(&p1, &fingerprints(&p1).unwrap());
        let now = fingerprints(&p2).unwrap();
        let c = changed(&p2, &now, |i| {
            before.get(&p2.label(&p2.jobs[i]).to_string()).cloned()
        });
        drop((d1, d2));
        changed_kernels(&p2, &c)
            .into_iter()
            .map(|k| p2.kernels[k].kver().to_string())
            .collect()
    }

    #[test]
    fn nothing_changed_selects_nothing() {
        assert!(changed_between(TOML, TOML, |_| {}).is_empty());
    }

    #[test]
    fn a_module_selects_the_kernels_that_build_it() {
        let edit = |d: &std::path::Path| {
            std::fs::write(d.join("modules/b/b.c"), "int x;\n").unwrap();
        };
        assert_eq!(changed_between(TOML, TOML, edit), ["6.1.0-47-amd64"]);
    }

    #[test]
    fn the_image_settings_select_every_kernel() {
        let after = format!("{TOML}[image]\nbase = \"busybox\"\n");
        assert_eq!(
            changed_between(TOML, &after, |_| {}),
            ["6.1.0-47-amd64", "6.12.117+deb12-amd64"]
        );
        let after = format!("{TOML}[image]\nprefix = \"/var/opt\"\n");
        assert_eq!(changed_between(TOML, &after, |_| {}).len(), 2);
    }

    #[test]
    fn the_signing_certificate_is_an_input_and_the_key_is_not() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/signing");
        let signing = |key: &str, cert: &str| {
            format!(
                "{TOML}[signing]\nkey = \"{fixtures}/{key}.key\"\ncert = \"{fixtures}/{cert}.crt\"\n"
            )
        };
        let test = signing("test", "test");
        assert_eq!(
            changed_between(TOML, &test, |_| {}).len(),
            2,
            "signing rebuilds"
        );
        assert_eq!(
            changed_between(&test, &signing("other", "other"), |_| {}).len(),
            2
        );
        assert!(changed_between(&test, &signing("other", "test"), |_| {}).is_empty());
    }

    #[test]
    fn boot_args_select_their_kernel() {
        let after = TOML.replace(
            "version = \"6.1.0-47-amd64\"\n",
            "version = \"6.1.0-47-amd64\"\nboot-args = [\"module.sig_enforce=1\"]\n",
        );
        assert_eq!(changed_between(TOML, &after, |_| {}), ["6.1.0-47-amd64"]);
    }

    #[test]
    fn the_toolchain_recipe_selects_its_kernels() {
        let edit = |d: &std::path::Path| {
            std::fs::write(d.join("images/tc.Containerfile"), "FROM y\n").unwrap();
            std::fs::write(d.join("reload"), "").unwrap();
        };
        assert_eq!(changed_between(TOML, TOML, edit).len(), 2);
    }

    /// Each kernel's layer fingerprint from its own inputs (not its dependencies').
    fn layer_inputs(plan: &Plan) -> Vec<String> {
        plan.jobs
            .iter()
            .filter(|j| matches!(j.kind, JobKind::Layer { .. }))
            .map(|j| {
                let mut f = Fingerprint::new("t");
                own_inputs(plan, &j.kind, &mut f, &mut Default::default()).unwrap();
                f.finish()
            })
            .collect()
    }

    #[test]
    fn firmware_files_are_inputs_of_the_layers_that_ship_them() {
        let fw = "[firmware]\ndir = \"fw\"\n";
        let only61 = "kernels = '^6\\.1\\.'\n[firmware]\ndir = \"fw\"\n";
        let (d, _) = crate::testing::scratch(TOML, &[("a", Some(fw)), ("b", Some(only61))]);
        for m in ["a", "b"] {
            std::fs::create_dir_all(d.path().join(format!("modules/{m}/fw/{m}"))).unwrap();
            std::fs::write(d.path().join(format!("modules/{m}/fw/{m}/x.bin")), [0u8, 1]).unwrap();
        }
        let load = || Config::load(&d.path().join("kernels.toml")).unwrap();
        let c = load();
        let before = layer_inputs(&Plan::new(&c, None, Scope::image(false)).unwrap());
        // Bytes that are not UTF-8 still count, each one.
        std::fs::write(d.path().join("modules/b/fw/b/x.bin"), [0u8, 2]).unwrap();
        let c = load();
        let after = layer_inputs(&Plan::new(&c, None, Scope::image(false)).unwrap());
        assert_ne!(after[0], before[0], "6.1's layer ships b's firmware");
        assert_eq!(after[1], before[1], "6.12's layer does not");
        std::fs::rename(
            d.path().join("modules/a/fw/a/x.bin"),
            d.path().join("modules/a/fw/a/y.bin"),
        )
        .unwrap();
        let c = load();
        let renamed = layer_inputs(&Plan::new(&c, None, Scope::image(false)).unwrap());
        assert!(
            renamed[0] != after[0] && renamed[1] != after[1],
            "a file's name counts"
        );
    }

    #[test]
    fn what_git_ignores_in_a_module_folder_is_not_an_input() {
        let edit = |d: &std::path::Path| {
            std::fs::write(d.join("modules/a/.gitignore"), "rust-project.json\n*.swp\n").unwrap();
        };
        let add_ignored = |d: &std::path::Path| {
            edit(d);
            std::fs::write(d.join("modules/a/rust-project.json"), "{}").unwrap();
            std::fs::write(d.join("modules/a/.a.c.swp"), "x").unwrap();
        };
        let (d, c) = crate::testing::scratch(TOML, &[("a", None)]);
        edit(d.path());
        let c = c.unwrap();
        let p = Plan::new(&c, None, Scope::build()).unwrap();
        let before = fingerprints(&p).unwrap();
        add_ignored(d.path());
        assert_eq!(fingerprints(&p).unwrap(), before);
        std::fs::write(d.path().join("modules/a/a.c"), "int y;\n").unwrap();
        assert_ne!(fingerprints(&p).unwrap(), before);
    }
}
