//! `kmm`: the KMM `Module` manifests for the images, from the same plan as the build.
//!
//! KMM loads one `moduleName` per Module (with what it depends on), so there is one
//! Module per top-level module: a module no other module depends on. Its
//! `kernelMappings` hold one `literal` per kernel the module is built for (or one
//! `regexp` on request), `containerImage` is the `[image] name` template with
//! `${MOD_NAME}`/`${MOD_NAMESPACE}` filled in and `${KERNEL_FULL_VERSION}` left for KMM,
//! which normalizes the tag the way kmodforge does when it pushes. `dirName` is the
//! image prefix; `registryTLS`, `imageRepoSecret` and the node selector come from
//! kernels.toml.
//!
//! With `--in-cluster-build`, a ConfigMap carries a multi-stage Dockerfile that builds
//! the C modules inside the cluster: `FROM ${DTK_AUTO}` (the Driver Toolkit KMM injects
//! on OpenShift), then a small image with `<prefix>/lib/modules/${KERNEL_FULL_VERSION}/`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::config::modules::{self, Language, Module, make_vars};
use crate::config::template::{Vars, registry_host};
use crate::config::{Config, ImageBase};
use crate::plan::Plan;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Doc<S> {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    #[serde(flatten)]
    body: S,
}

#[derive(Serialize)]
struct Metadata {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct ModuleBody {
    spec: ModuleSpec,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModuleSpec {
    module_loader: ModuleLoader,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_repo_secret: Option<NameRef>,
    selector: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct ModuleLoader {
    container: Container,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    modprobe: Modprobe,
    kernel_mappings: Vec<KernelMapping>,
    #[serde(skip_serializing_if = "Option::is_none")]
    build: Option<Build>,
    #[serde(skip_serializing_if = "Option::is_none", rename = "registryTLS")]
    registry_tls: Option<RegistryTls>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Modprobe {
    module_name: String,
    dir_name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    modules_loading_order: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KernelMapping {
    #[serde(skip_serializing_if = "Option::is_none")]
    literal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    regexp: Option<String>,
    container_image: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Build {
    dockerfile_config_map: NameRef,
}

#[derive(Serialize)]
struct NameRef {
    name: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RegistryTls {
    insecure: bool,
    #[serde(rename = "insecureSkipTLSVerify")]
    insecure_skip_tls_verify: bool,
}

#[derive(Serialize)]
struct ConfigMapBody {
    data: BTreeMap<String, String>,
}

pub struct Options {
    /// One `regexp` mapping matching every kernel instead of a `literal` each.
    pub regexp: bool,
    pub in_cluster_build: bool,
}

/// The image reference as KMM receives it: `${MOD_NAME}`/`${MOD_NAMESPACE}` filled in
/// (every Module shares the one image), KMM's kernel variables left for KMM.
pub fn container_image(config: &Config) -> Result<String> {
    let mut vars = Vars::new()
        .set("MOD_NAME", config.kmm.name.clone())
        .set("MOD_NAMESPACE", config.kmm.namespace.clone());
    for name in Vars::kernel("1.2.3").names() {
        vars = vars.set(name, format!("${{{name}}}"));
    }
    vars.expand(&config.image.name).map_err(anyhow::Error::msg)
}

/// What KMM makes of `containerImage` on a node running `kver`: the variables
/// expanded, the tag normalized.
pub fn kmm_resolves(container_image: &str, kver: &str) -> Result<String> {
    let expanded = Vars::kernel(kver)
        .expand(container_image)
        .map_err(anyhow::Error::msg)?;
    crate::config::template::image_reference(&expanded).map_err(anyhow::Error::msg)
}

/// Modules no other module depends on: each gets a Module of its own.
fn top_level(config: &Config) -> Vec<&Module> {
    let needed: BTreeSet<&str> = config
        .modules
        .iter()
        .flat_map(|m| m.depends.iter().map(String::as_str))
        .collect();
    config
        .modules
        .iter()
        .filter(|m| !needed.contains(m.name.as_str()))
        .collect()
}

/// `name` followed by what it depends on, depth first: KMM's `modulesLoadingOrder`.
fn loading_order(config: &Config, m: &Module) -> Vec<String> {
    let mut order = vec![m.name.clone()];
    let mut i = 0;
    while i < order.len() {
        if let Some(module) = config.module(&order[i]) {
            for d in &module.depends {
                if !order.contains(d) {
                    order.push(d.clone());
                }
            }
        }
        i += 1;
    }
    order
}

/// The manifests, as multi-document YAML: a function of the plan and the configuration.
/// Kernels a module cannot be built for (a Rust module for a kernel whose toolchain
/// has no Rust) are left out of its mappings.
pub fn manifests(plan: &Plan, options: &Options) -> Result<String> {
    let config = plan.config;
    let image = container_image(config)?;
    let tls = config
        .registries
        .get(registry_host(&image))
        .filter(|t| t.insecure || t.insecure_skip_tls_verify);
    let dockerfile_name = format!("{}-dockerfile", config.kmm.name);
    let labels: BTreeMap<String, String> = [(
        "app.kubernetes.io/managed-by".to_string(),
        "kmodforge".to_string(),
    )]
    .into();
    let mut out = String::new();

    if options.in_cluster_build {
        let mut data = BTreeMap::new();
        data.insert("dockerfile".to_string(), dockerfile(plan)?);
        let doc = Doc {
            api_version: "v1",
            kind: "ConfigMap",
            metadata: Metadata {
                name: dockerfile_name.clone(),
                namespace: config.kmm.namespace.clone(),
                labels: labels.clone(),
            },
            body: ConfigMapBody { data },
        };
        push_doc(&mut out, &doc)?;
    }

    for m in top_level(config) {
        let kernels: Vec<&str> = plan
            .kernels
            .iter()
            .filter(|kp| kp.module_index(&m.name).is_some())
            .filter(|kp| config.cannot_build(kp.kernel, m).is_none())
            .map(|kp| kp.kver())
            .collect();
        if kernels.is_empty() {
            continue;
        }
        let kernel_mappings = if options.regexp {
            let alternatives: Vec<String> = kernels.iter().map(|k| regex::escape(k)).collect();
            vec![KernelMapping {
                literal: None,
                regexp: Some(format!("^({})$", alternatives.join("|"))),
                container_image: image.clone(),
            }]
        } else {
            kernels
                .iter()
                .map(|k| KernelMapping {
                    literal: Some(k.to_string()),
                    regexp: None,
                    container_image: image.clone(),
                })
                .collect()
        };
        let order = loading_order(config, m);
        let name = format!(
            "{}-{}",
            config.kmm.name,
            m.name.replace('_', "-").to_lowercase()
        );
        if name.len() > 63 {
            bail!("the Module name {name} is longer than 63 characters: shorten [kmm] name");
        }
        let doc = Doc {
            api_version: "kmm.sigs.x-k8s.io/v1beta1",
            kind: "Module",
            metadata: Metadata {
                name,
                namespace: config.kmm.namespace.clone(),
                labels: labels.clone(),
            },
            body: ModuleBody {
                spec: ModuleSpec {
                    module_loader: ModuleLoader {
                        container: Container {
                            modprobe: Modprobe {
                                module_name: m.name.clone(),
                                dir_name: config.image.prefix.clone(),
                                modules_loading_order: if order.len() > 1 { order } else { vec![] },
                            },
                            kernel_mappings,
                            build: (options.in_cluster_build && m.language == Language::C).then(
                                || Build {
                                    dockerfile_config_map: NameRef {
                                        name: dockerfile_name.clone(),
                                    },
                                },
                            ),
                            registry_tls: tls.map(|t| RegistryTls {
                                insecure: t.insecure,
                                insecure_skip_tls_verify: t.insecure_skip_tls_verify,
                            }),
                        },
                    },
                    image_repo_secret: config
                        .kmm
                        .image_repo_secret
                        .clone()
                        .map(|name| NameRef { name }),
                    selector: config.kmm.selector.clone(),
                },
            },
        };
        push_doc(&mut out, &doc)?;
    }
    Ok(out)
}

fn push_doc(out: &mut String, doc: &impl Serialize) -> Result<()> {
    if !out.is_empty() {
        out.push_str("---\n");
    }
    out.push_str(&serde_yaml_ng::to_string(doc)?);
    Ok(())
}

/// A word for a shell `RUN` line: double-quoted so `${KERNEL_FULL_VERSION}` expands.
fn dquote(word: &str) -> String {
    if word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%${}".contains(c))
    {
        word.to_string()
    } else {
        format!("\"{}\"", word.replace(['"', '\\', '`'], "\\$0"))
    }
}

/// The in-cluster build's Dockerfile: the C modules built in the Driver Toolkit, depmod
/// run on the tree, and the tree copied into a small image. The module sources travel
/// inside it (a base64 tarball), so the build needs no access to this repository.
pub fn dockerfile(plan: &Plan) -> Result<String> {
    let config = plan.config;
    let ImageBase::Reference(base) = &config.image.base else {
        bail!(
            "--in-cluster-build needs [image] base to be an image reference (KMM builds FROM it), not \"busybox\""
        );
    };
    let c_modules: Vec<&Module> = crate::config::modules::dependency_order(&config.modules)
        .into_iter()
        .filter(|m| m.language == Language::C)
        .collect();
    let prefix = config.image.prefix.trim_end_matches('/');
    let kdir = "/lib/modules/${KERNEL_FULL_VERSION}/build";

    let mut tar = tar::Builder::new(Vec::new());
    for m in &c_modules {
        for rel in crate::run::fingerprint::walk_files(&m.dir)? {
            let data = std::fs::read(m.dir.join(&rel))?;
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_mtime(0);
            tar.append_data(
                &mut h,
                format!("{}/{}", m.name, rel.display()),
                data.as_slice(),
            )?;
        }
    }
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar.into_inner()?)?;
    let sources = base64(&gz.finish()?);

    let mut steps = Vec::new();
    for m in &c_modules {
        let kernels: Vec<&str> = plan
            .kernels
            .iter()
            .filter(|kp| kp.module_index(&m.name).is_some())
            .map(|kp| kp.kver())
            .collect();
        if kernels.is_empty() {
            continue;
        }
        let dir = format!("/build/{}", m.name);
        let modules::Build::Kbuild {
            make,
            built_modules,
            ..
        } = &m.build
        else {
            continue;
        };
        let argv = match make {
            Some(argv) => {
                let vars = make_vars("${KERNEL_FULL_VERSION}", kdir, &dir);
                argv.iter()
                    .map(|a| vars.expand(a).map_err(anyhow::Error::msg))
                    .collect::<Result<Vec<_>>>()?
            }
            None => vec![
                "make".into(),
                "-C".into(),
                kdir.into(),
                format!("M={dir}"),
                "modules".into(),
            ],
        };
        let symvers: Vec<String> = m
            .depends
            .iter()
            .map(|d| format!("/build/{d}/Module.symvers"))
            .collect();
        let env = if symvers.is_empty() {
            String::new()
        } else {
            format!("KBUILD_EXTRA_SYMBOLS={} ", dquote(&symvers.join(" ")))
        };
        let copy = match built_modules {
            Some(list) => list
                .iter()
                .map(|p| format!("cp {dir}/{p} {prefix}/lib/modules/${{KERNEL_FULL_VERSION}}/"))
                .collect::<Vec<_>>()
                .join("; "),
            None => format!(
                "find {dir} -name '*.ko' -exec cp -t {prefix}/lib/modules/${{KERNEL_FULL_VERSION}}/ {{}} +"
            ),
        };
        let cmd = argv.iter().map(|a| dquote(a)).collect::<Vec<_>>().join(" ");
        steps.push(format!(
            "# {name}\nRUN case \"${{KERNEL_FULL_VERSION}}\" in {list}) \\\n      cd {dir} && {env}{cmd} && {copy};; \\\n    esac",
            name = m.name,
            list = kernels.iter().map(|k| dquote(k)).collect::<Vec<_>>().join("|"),
        ));
    }
    Ok(format!(
        "# Generated by `cargo xtask kmm --in-cluster-build` from kmodforge's modules/.\n\
         # KMM sets KERNEL_FULL_VERSION for every build, and on OpenShift DTK_AUTO: the\n\
         # Driver Toolkit image (kernel-devel, gcc, kmod) of the cluster's release.\n\
         # Rust modules are not built here: the Driver Toolkit has no rustc.\n\
         ARG DTK_AUTO\n\
         FROM ${{DTK_AUTO}} AS builder\n\
         ARG KERNEL_FULL_VERSION\n\
         WORKDIR /build\n\
         # The module sources, a gzipped tar in base64: the build needs no repository.\n\
         RUN echo '{sources}' | base64 -d | tar -xzf - \\\n    && mkdir -p {prefix}/lib/modules/${{KERNEL_FULL_VERSION}}\n\
         {steps}\n\
         # modules.dep and the other indexes modprobe reads, made where kmod is at hand.\n\
         RUN depmod -b {prefix} ${{KERNEL_FULL_VERSION}}\n\
         \n\
         FROM {base}\n\
         ARG KERNEL_FULL_VERSION\n\
         COPY --from=builder {prefix}/lib/modules/${{KERNEL_FULL_VERSION}} {prefix}/lib/modules/${{KERNEL_FULL_VERSION}}\n",
        steps = steps.join("\n"),
    ))
}

fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn kmm_resolves_images_to_the_tags_kmodforge_pushes() {
        assert_eq!(
            kmm_resolves(
                "quay.io/x/kmf:${KERNEL_FULL_VERSION}",
                "6.12.117+deb12-amd64"
            )
            .unwrap(),
            "quay.io/x/kmf:6.12.117_deb12-amd64"
        );
    }

    #[test]
    fn shell_words_keep_variables_expandable() {
        assert_eq!(
            dquote("KVER=${KERNEL_FULL_VERSION}"),
            "KVER=${KERNEL_FULL_VERSION}"
        );
        assert_eq!(dquote("a b"), "\"a b\"");
    }
}
