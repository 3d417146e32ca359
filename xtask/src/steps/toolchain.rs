//! Toolchains: DTK-style images that hold one kernel's headers and its compiler.
//!
//! A recipe toolchain is built once per kernel from a Containerfile in `images/` and
//! tagged with a fingerprint of its inputs (the recipe's bytes, the build args, the
//! base), so a second run finds it and a changed recipe builds anew. Its base image,
//! where no registry is reachable, is made from the Debian archive with mmdebstrap. A
//! prebuilt toolchain (the real Driver Toolkit) is pulled when not already local.
//! Either way the image is probed once: is there a kernel build tree for this kernel,
//! which kernel does it say it is, was it built with CONFIG_RUST, which compilers.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::envsubst::normalize as normalize_tag;
use crate::config::template::Vars;
use crate::config::{Base, Config, Kernel, Toolchain, ToolchainSource};
use crate::host::engine::{Engine, Run, require_program};
use crate::host::fs::{read_json, write_json};
use crate::host::process::{self, Cmd};
use crate::run::fingerprint::Fingerprint;
use crate::run::layout::{Layout, machine_lock};

/// What the probe of a toolchain image found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Facts {
    /// The image the module builds run in.
    pub image: String,
    /// The kernel's build tree inside the image.
    pub kernel_source_dir: String,
    /// The kernel was configured with CONFIG_RUST=y.
    pub rust: bool,
    /// `CONFIG_CC_VERSION_TEXT`: the compiler the kernel was built with.
    pub kernel_cc: Option<String>,
    /// `gcc --version` in the image.
    pub cc: Option<String>,
    /// `rustc --version` in the image.
    pub rustc: Option<String>,
}

/// The identity of a kernel's toolchain: what goes into building (or naming) its image.
pub fn fingerprint(tc: &Toolchain, kver: &str) -> Result<String> {
    fingerprint_with(tc, kver, &RecipeFiles::read(tc)?)
}

/// A recipe's files (the Containerfile, then what it copies), as fingerprints take
/// them: read once for all the kernels a toolchain serves.
#[derive(Default)]
pub struct RecipeFiles(Vec<(String, String)>);

impl RecipeFiles {
    pub fn read(tc: &Toolchain) -> Result<RecipeFiles> {
        let ToolchainSource::Recipe(r) = &tc.source else {
            return Ok(RecipeFiles::default());
        };
        let text = |path: &Path| -> Result<String> {
            let bytes = crate::host::fs::read(path)?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        let mut files = vec![("recipe".to_string(), text(&r.containerfile)?)];
        for rel in context_files(&r.containerfile, &r.context)? {
            let t = text(&r.context.join(&rel))?;
            files.push((rel, t));
        }
        Ok(RecipeFiles(files))
    }
}

/// [`fingerprint`], with the recipe's files already read.
pub fn fingerprint_with(tc: &Toolchain, kver: &str, files: &RecipeFiles) -> Result<String> {
    let mut f = Fingerprint::new("toolchain-v1");
    f.field("kernel", kver)
        .field("kernel_source_dir", &tc.kernel_source_dir);
    match &tc.source {
        ToolchainSource::Recipe(r) => {
            for (name, text) in &files.0 {
                f.field(name, text);
            }
            for (k, v) in &r.build_args {
                f.field(k, v);
            }
            if let Some(base) = &r.base {
                f.field("base", &base.image);
                if let Some(b) = &base.bootstrap {
                    f.field("bootstrap", &format!("{b:?}"));
                }
            }
        }
        ToolchainSource::Image(template) => {
            f.field(
                "image",
                &Vars::kernel(kver)
                    .expand(template)
                    .map_err(anyhow::Error::msg)?,
            );
        }
    }
    Ok(f.finish())
}

/// The files of the recipe's folder that its `COPY`/`ADD` instructions read (all of
/// the folder when a source has a wildcard), sorted. They are part of the toolchain's
/// identity and of its build context.
pub fn context_files(containerfile: &Path, context: &Path) -> Result<Vec<String>> {
    let text = crate::host::fs::read_to_string(containerfile)?;
    let joined = text.replace("\\\n", " ");
    let mut files = std::collections::BTreeSet::new();
    for line in joined.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = words.first() else { continue };
        if !first.eq_ignore_ascii_case("COPY") && !first.eq_ignore_ascii_case("ADD") {
            continue;
        }
        if words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        let args: Vec<&str> = words[1..]
            .iter()
            .copied()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in args.iter().take(args.len().saturating_sub(1)) {
            let src = src.trim_matches(|c| c == '[' || c == ']' || c == ',' || c == '"');
            if src.contains(['*', '?', '[']) || src == "." || src.ends_with('/') {
                return Ok(crate::run::fingerprint::walk_files(context)?
                    .into_iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect());
            }
            let src = src.trim_start_matches("./");
            let path = Path::new(src);
            if path.is_absolute()
                || path
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                anyhow::bail!(
                    "{} copies {src}, which is outside its folder {}: a build context holds only the recipe's folder\n  help: put the file beside the recipe",
                    crate::config::diag::display_path(containerfile),
                    crate::config::diag::display_path(context)
                );
            }
            // Made by kmodforge for every build, not a file of the recipe.
            if src != HOST_CA {
                files.insert(src.to_string());
            }
        }
    }
    Ok(files.into_iter().collect())
}

/// The name of the host's CA bundle in every recipe's build context.
pub const HOST_CA: &str = "host-ca-certificates.crt";

/// Where the host keeps its CA bundle (a TLS-intercepting proxy's CA included).
fn host_ca_bundle() -> Option<std::path::PathBuf> {
    std::env::var_os("SSL_CERT_FILE")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
            ]
            .map(Into::into),
        )
        .find(|p| p.is_file())
}

/// A build context with just what the recipe reads, plus `host-ca-certificates.crt`:
/// the host's CA bundle (empty when it has none), for recipes that fetch over HTTPS
/// through the same proxies the host trusts.
fn build_context(r: &crate::config::Recipe, layout: &Layout) -> Result<tempfile::TempDir> {
    let dir = layout.scratch("context-")?;
    let name = r.containerfile.file_name().context("a recipe is a file")?;
    crate::host::fs::copy_file(&r.containerfile, &dir.path().join(name))?;
    for rel in context_files(&r.containerfile, &r.context)? {
        let dest = dir.path().join(&rel);
        crate::host::fs::create_dir_all(dest.parent().unwrap_or(dir.path()))?;
        std::fs::copy(r.context.join(&rel), &dest).with_context(|| {
            format!(
                "{} copies {rel}, which is not in {}",
                r.containerfile.display(),
                r.context.display()
            )
        })?;
    }
    let ca = host_ca_bundle()
        .map(std::fs::read)
        .transpose()?
        .unwrap_or_default();
    crate::host::fs::write(&dir.path().join(HOST_CA), ca)?;
    Ok(dir)
}

/// The image name: for a recipe, a local tag that carries the fingerprint; for a
/// prebuilt toolchain, its reference with KMM's kernel variables expanded.
pub fn image_name(tc: &Toolchain, kver: &str, fingerprint: &str) -> Result<String> {
    Ok(match &tc.source {
        ToolchainSource::Recipe(_) => {
            format!(
                "localhost/kmodforge/toolchain-{}:{}-{}",
                tc.name,
                normalize_tag(kver),
                &fingerprint[..12]
            )
        }
        ToolchainSource::Image(t) => Vars::kernel(kver).expand(t).map_err(anyhow::Error::msg)?,
    })
}

pub fn kernel_source_dir(tc: &Toolchain, kver: &str) -> String {
    Vars::kernel(kver)
        .expand(&tc.kernel_source_dir)
        .expect("validated when the config was loaded")
}

/// Makes sure a recipe's base image is in local storage. Returns a note when it had
/// to be made or pulled.
pub fn ensure_base(
    engine: &Engine,
    base: &Base,
    verify_tls: bool,
    log: &Path,
) -> Result<Option<String>> {
    if engine.image_id(&base.image)?.is_some() {
        return Ok(None);
    }
    let _lock = machine_lock(&format!("{} {}", engine.kind, base.image))?;
    if engine.image_id(&base.image)?.is_some() {
        return Ok(None);
    }
    match &base.bootstrap {
        Some(b) => {
            require_program(
                "mmdebstrap",
                "mmdebstrap",
                &format!(
                    "kernels.toml asks for it to make the base image {} from the Debian archive",
                    base.image
                ),
            )?;
            let mut mm = Cmd::new("mmdebstrap")
                .arg(format!("--variant={}", b.variant))
                .arg("--quiet");
            if !b.include.is_empty() {
                mm = mm.arg(format!("--include={}", b.include.join(",")));
            }
            mm = mm.arg(&b.suite).arg("-").args(&b.sources);
            mm.pipe(engine.import(&base.image))
                .run_logged(log, None)
                .with_context(|| {
                    format!("cannot make the base image {} with mmdebstrap", base.image)
                })?;
            Ok(Some(format!(
                "made base image {} from the Debian archive",
                base.image
            )))
        }
        None => {
            engine.pull(&base.image, verify_tls).run_logged(log, None).with_context(|| {
                format!(
                    "the base image {} is not in local storage and cannot be pulled\n  help: pull or load it by hand, \
                     or add a [toolchains.<name>.bootstrap] table so kmodforge makes it from the Debian archive",
                    base.image
                )
            })?;
            Ok(Some(format!("pulled base image {}", base.image)))
        }
    }
}

/// Makes sure the kernel's toolchain image exists (building or pulling it) and returns
/// what its probe found, from the cache when the same image was probed before.
pub fn ensure(
    engine: &Engine,
    layout: &Layout,
    config: &Config,
    kernel: &Kernel,
    fingerprint: &str,
    log: &Path,
) -> Result<Facts> {
    let tc = &config.toolchains[&kernel.toolchain];
    let kver = &kernel.version;
    let image = image_name(tc, kver, fingerprint)?;
    let facts_path = layout.toolchain_facts(fingerprint);
    let mut present = engine.image_id(&image)?.is_some();
    if present && let Some(facts) = read_json::<Facts>(&facts_path) {
        return Ok(facts);
    }
    let _lock = machine_lock(&format!("{} {image}", engine.kind))?;
    if !present {
        present = engine.image_id(&image)?.is_some();
    }
    if !present {
        match &tc.source {
            ToolchainSource::Recipe(r) => {
                let mut args = vec![("KERNEL_FULL_VERSION".to_string(), kver.clone())];
                if let Some(base) = &r.base {
                    args.push(("BASE_IMAGE".into(), base.image.clone()));
                }
                args.extend(r.build_args.iter().map(|(k, v)| (k.clone(), v.clone())));
                let labels = [
                    ("io.kmodforge.kernel".to_string(), kver.clone()),
                    ("io.kmodforge.toolchain".into(), tc.name.clone()),
                    ("io.kmodforge.fingerprint".into(), fingerprint.to_string()),
                ];
                let context = build_context(r, layout)?;
                let containerfile = context
                    .path()
                    .join(r.containerfile.file_name().unwrap_or_default());
                engine
                    .build(&containerfile, context.path(), &image, &args, &labels)
                    .run_logged(log, None)
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot build toolchain image {image}: {e:#}{}",
                            headers_hint(log, kernel)
                        )
                    })?;
            }
            ToolchainSource::Image(_) => {
                engine.pull(&image, config.tls_verify(&image)).run_logged(log, None).with_context(|| {
                    format!(
                        "cannot pull toolchain image {image}\n  help: where no registry is reachable, load the image into \
                         local storage first (`{} load`), or build the toolchain from a recipe",
                        engine.kind
                    )
                })?;
            }
        }
    }
    let facts = probe(engine, &image, &kernel_source_dir(tc, kver), kver, log)?;
    if tc.rust && !facts.rust {
        bail!(
            "kernels.toml says toolchain {} builds Rust modules (rust = true), but kernel {kver} in {image} was built without CONFIG_RUST\n  \
             help: remove rust = true, or use a toolchain whose kernel has CONFIG_RUST=y",
            tc.name
        );
    }
    write_json(&facts_path, &facts)?;
    Ok(facts)
}

/// The derived toolchain: the kernel's toolchain plus `packages`, installed with the
/// image's own package manager (apt-get, else dnf). Tagged with the toolchain's tag and
/// a fingerprint of the set, built once per machine; returns the toolchain's facts with
/// the derived image.
pub fn ensure_packages(
    engine: &Engine,
    layout: &Layout,
    base: &Facts,
    packages: &[String],
    fingerprint: &str,
    log: &Path,
) -> Result<Facts> {
    let (repo, tag) = base
        .image
        .rsplit_once(':')
        .unwrap_or((&base.image, "latest"));
    let image = format!("{repo}:{tag}-p{}", &fingerprint[..10]);
    let facts = Facts {
        image: image.clone(),
        ..base.clone()
    };
    if engine.image_id(&image)?.is_some() {
        return Ok(facts);
    }
    let _lock = machine_lock(&format!("{} {image}", engine.kind))?;
    if engine.image_id(&image)?.is_some() {
        return Ok(facts);
    }
    let list = packages.join(" ");
    let recipe = format!(
        "ARG TOOLCHAIN\nFROM ${{TOOLCHAIN}}\n\
         RUN set -eu; if command -v apt-get >/dev/null; then apt-get update; \\\n\
         DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {list}; rm -rf /var/lib/apt/lists/*; \\\n\
         elif command -v dnf >/dev/null; then dnf install -y {list}; dnf clean all; \\\n\
         else echo 'the toolchain has neither apt-get nor dnf to install packages with' >&2; exit 1; fi\n"
    );
    let context = layout.scratch("packages-")?;
    let containerfile = context.path().join("Containerfile");
    crate::host::fs::write(&containerfile, recipe)?;
    let args = [("TOOLCHAIN".to_string(), base.image.clone())];
    let labels = [("io.kmodforge.packages".to_string(), list.clone())];
    engine
        .build(&containerfile, context.path(), &image, &args, &labels)
        .run_logged(log, None)
        .with_context(|| format!("cannot add {list} to the toolchain {}", base.image))?;
    Ok(facts)
}

/// The packages a failed package installation's log says the archive does not have.
pub fn missing_packages(log: &Path, packages: &[String]) -> Vec<String> {
    let tail = process::tail(log, 80).join("\n");
    packages
        .iter()
        .filter(|p| {
            tail.contains(&format!("Unable to locate package {p}"))
                || tail.contains(&format!("Package '{p}' has no installation candidate"))
                || tail.contains(&format!("No match for argument: {p}"))
        })
        .cloned()
        .collect()
}

/// When a recipe failed because the archive has no headers for the kernel, says so and
/// points at the kernel in kernels.toml.
fn headers_hint(log: &Path, kernel: &Kernel) -> String {
    let tail = process::tail(log, 60).join("\n");
    let missing = format!("linux-headers-{}", kernel.version);
    let rhel = format!("kernel-devel-{}", kernel.version);
    if (tail.contains("Unable to locate package")
        || tail.contains("has no installation candidate")
        || tail.contains("No match for argument"))
        && (tail.contains(&missing) || tail.contains(&rhel))
    {
        format!(
            "\nthe archive has no headers package for kernel {} ({})\n  help: check the version at {}; \
             `apt-cache search linux-headers-` (Debian) or `dnf list kernel-devel` (RHEL) lists the ones that exist",
            kernel.version,
            if tail.contains(&missing) {
                missing
            } else {
                rhel
            },
            kernel.at
        )
    } else {
        String::new()
    }
}

const PROBE: &str = r#"d="$1"
[ -f "$d/Makefile" ] || { echo "kmodforge-probe: no kernel build tree (kernel-devel) at $d" >&2; exit 3; }
u="$d/include/generated/utsrelease.h"
[ -f "$u" ] && sed -n 's/^#define UTS_RELEASE "\(.*\)"$/release=\1/p' "$u"
for f in "$d/.config" "$d/include/config/auto.conf"; do
  if [ -f "$f" ]; then grep -E '^CONFIG_(RUST|CC_VERSION_TEXT)=' "$f"; break; fi
done
for t in make depmod; do command -v "$t" >/dev/null || echo "missing=$t"; done
cc=$(gcc --version 2>/dev/null | head -n1) && echo "cc=$cc"
r=$(rustc --version 2>/dev/null) && echo "rustc=$r"
exit 0
"#;

fn probe(engine: &Engine, image: &str, kdir: &str, kver: &str, log: &Path) -> Result<Facts> {
    let run = Run {
        image,
        mounts: vec![],
        env: vec![],
        workdir: None,
        network: false,
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            PROBE.into(),
            "kmodforge-probe".into(),
            kdir.into(),
        ],
        pass_fds: vec![],
    };
    let out = engine
        .run(&run)
        .read()
        .with_context(|| format!("cannot probe toolchain image {image}"))?;
    process::append_log(log, &format!("probe of {image}:\n{out}"))?;
    parse_probe(&out, image, kdir, kver)
}

fn parse_probe(out: &str, image: &str, kdir: &str, kver: &str) -> Result<Facts> {
    let mut facts = Facts {
        image: image.into(),
        kernel_source_dir: kdir.into(),
        rust: false,
        kernel_cc: None,
        cc: None,
        rustc: None,
    };
    let mut missing = Vec::new();
    for line in out.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k {
            "release" if v != kver => bail!(
                "toolchain image {image} holds the build tree of kernel {v} at {kdir}, not {kver}\n  \
                 help: point the kernel at the right toolchain, or fix the toolchain's kernel-source-dir"
            ),
            "CONFIG_RUST" => facts.rust = v == "y",
            "CONFIG_CC_VERSION_TEXT" => facts.kernel_cc = Some(v),
            "missing" => missing.push(v),
            "cc" => facts.cc = Some(v),
            "rustc" => facts.rustc = Some(v),
            _ => {}
        }
    }
    if !missing.is_empty() {
        bail!(
            "toolchain image {image} lacks {}: a toolchain needs make and kmod (depmod)",
            missing.join(" and ")
        );
    }
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copied_files_are_part_of_a_recipe() {
        let d = tempfile::tempdir().unwrap();
        let cf = d.path().join("r.Containerfile");
        std::fs::write(d.path().join("a.config"), "x").unwrap();
        std::fs::write(d.path().join("b.sh"), "x").unwrap();
        std::fs::write(
            &cf,
            "FROM x AS k\nCOPY a.config /k/\nCOPY --chown=0:0 \\\n  b.sh ./a.config /k/\nCOPY --from=k /out /\nRUN echo COPY nothing\n",
        )
        .unwrap();
        assert_eq!(context_files(&cf, d.path()).unwrap(), ["a.config", "b.sh"]);
        std::fs::write(&cf, "FROM x\nADD *.sh /k/\n").unwrap();
        assert_eq!(
            context_files(&cf, d.path()).unwrap(),
            ["a.config", "b.sh", "r.Containerfile"]
        );
    }

    #[test]
    fn probe_output_is_parsed_and_checked() {
        let out = "release=6.1.0-47-amd64\nCONFIG_CC_VERSION_TEXT=\"gcc-12 (Debian 12.2.0-14) 12.2.0\"\ncc=gcc (Debian 12.2.0-14) 12.2.0\n";
        let f = parse_probe(out, "img", "/k", "6.1.0-47-amd64").unwrap();
        assert!(!f.rust);
        assert_eq!(
            f.kernel_cc.as_deref(),
            Some("gcc-12 (Debian 12.2.0-14) 12.2.0")
        );
        let f = parse_probe(
            "CONFIG_RUST=y\nrustc=rustc 1.96.0\n",
            "img",
            "/k",
            "6.12.117-kmodforge-rust",
        )
        .unwrap();
        assert!(f.rust && f.rustc.is_some());
        let e = parse_probe("release=6.1.0-50-amd64\n", "img", "/k", "6.1.0-47-amd64")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds the build tree of kernel 6.1.0-50-amd64"),
            "{e}"
        );
        let e = parse_probe("missing=depmod\n", "img", "/k", "6.1.0-47-amd64")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lacks depmod"), "{e}");
    }
}
