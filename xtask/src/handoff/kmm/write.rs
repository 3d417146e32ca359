//! The YAML: a header saying what is left out, the in-cluster build's ConfigMap, and one
//! Module per top-level folder.

use anyhow::{Result, bail};

use super::crd::*;
use super::{Handoff, InCluster, KmmModule, Options};
use crate::config::envsubst;
use crate::config::template::{image_reference, registry_host};

/// The most a ConfigMap may hold (Kubernetes refuses larger ones).
pub const CONFIG_MAP_MAX: usize = 1 << 20;

/// The manifests, as multi-document YAML.
pub fn manifests(h: &Handoff, options: &Options) -> Result<String> {
    if options.regexp && (options.in_cluster.is_some() || h.plan.config.kmm.sign.is_some()) {
        bail!(
            "--regexp gives one mapping for all kernels, but an in-cluster build or KMM signing is set per kernel\n  help: leave out --regexp"
        );
    }
    let mut out = header(h);
    let mut docs = String::new();
    if let Some(mode) = options.in_cluster {
        push_doc(&mut docs, &config_map(h, mode)?)?;
    }
    for m in &h.modules {
        push_doc(&mut docs, &module_doc(h, m, options)?)?;
    }
    out.push_str(&docs);
    Ok(out)
}

fn header(h: &Handoff) -> String {
    let mut s = format!(
        "# KMM manifests for the kmod images of {}, written by `cargo xtask kmm`.\n",
        crate::config::diag::display_path(&h.plan.config.path)
    );
    for n in &h.notes {
        s.push_str(&format!("# {n}\n"));
    }
    s
}

pub fn config_map_name(h: &Handoff) -> String {
    format!("{}-dockerfile", h.plan.config.kmm.name)
}

fn config_map(h: &Handoff, mode: InCluster) -> Result<Doc<ConfigMapBody>> {
    let dockerfile = super::dockerfile::dockerfile(h, mode)?;
    if dockerfile.len() > CONFIG_MAP_MAX {
        bail!(
            "the in-cluster build's Dockerfile is {} bytes with the module sources in it; a ConfigMap holds at most {CONFIG_MAP_MAX} (1 MiB)\n  help: leave large files out of modules/ (modules/.gitignore), or build here and push the images (`cargo xtask image --push`) instead of --in-cluster-build",
            dockerfile.len()
        );
    }
    Ok(Doc {
        api_version: "v1",
        kind: "ConfigMap",
        metadata: Metadata {
            name: config_map_name(h),
            namespace: Some(h.plan.config.kmm.namespace.clone()),
            labels: labels(),
        },
        body: ConfigMapBody {
            data: [("dockerfile".to_string(), dockerfile)].into(),
        },
    })
}

fn module_doc(h: &Handoff, m: &KmmModule, options: &Options) -> Result<Doc<Spec<ModuleSpec>>> {
    let config = h.plan.config;
    let mappings = if options.regexp {
        vec![regexp_mapping(h, m)?]
    } else {
        m.kernels
            .iter()
            .map(|&k| literal_mapping(h, m, k, options))
            .collect::<Result<_>>()?
    };
    let tls = config
        .registries
        .get(registry_host(&mappings[0].container_image))
        .filter(|t| t.insecure || t.insecure_skip_tls_verify)
        .map(|t| RegistryTls {
            insecure: t.insecure,
            insecure_skip_tls_verify: t.insecure_skip_tls_verify,
        });
    let container =
        Container {
            modprobe: Modprobe {
                module_name: m.spec.module_name.clone(),
                dir_name: config.image.prefix.clone(),
                parameters: m.spec.parameters.clone(),
                modules_loading_order: m.spec.order.clone(),
                // KMM copies it to the node's firmware directory before modprobe.
                firmware_path: m.folder.firmware.as_ref().map(|_| {
                    crate::steps::image::firmware_dir(&config.image.prefix, &m.folder.name)
                }),
            },
            kernel_mappings: mappings,
            registry_tls: tls,
            version: options.version.clone(),
        };
    Ok(Doc {
        api_version: "kmm.sigs.x-k8s.io/v1beta1",
        kind: "Module",
        metadata: Metadata {
            name: m.name.clone(),
            namespace: Some(config.kmm.namespace.clone()),
            labels: labels(),
        },
        body: Spec {
            spec: ModuleSpec {
                module_loader: ModuleLoader { container },
                image_repo_secret: config
                    .kmm
                    .image_repo_secret
                    .clone()
                    .map(|name| NameRef { name }),
                selector: config.kmm.selector.clone(),
                tolerations: config.kmm.tolerations.clone(),
            },
        },
    })
}

/// What KMM makes of a template on kernel `k`, for `[kmm] name` (every Module shares
/// the kernel's one image).
fn resolve(h: &Handoff, template: &str, k: usize) -> Result<String> {
    let kmm = &h.plan.config.kmm;
    let kver = h.plan.kernels[k].kver();
    let resolved = envsubst::kmm_resolve(template, kver, Some((&kmm.name, &kmm.namespace)))
        .map_err(anyhow::Error::msg)?;
    image_reference(&resolved).map_err(anyhow::Error::msg)
}

fn pinned(h: &Handoff, k: usize) -> String {
    match &h.images[k] {
        (reference, Some(digest)) => format!("{reference}@{digest}"),
        (reference, None) => reference.clone(),
    }
}

/// The first Module mapped to kernel `k` builds and signs its image.
fn owns(h: &Handoff, m: &KmmModule, k: usize) -> bool {
    h.modules
        .iter()
        .find(|o| o.kernels.contains(&k))
        .map(|o| &o.name)
        == Some(&m.name)
}

fn literal_mapping(
    h: &Handoff,
    m: &KmmModule,
    k: usize,
    options: &Options,
) -> Result<KernelMapping> {
    let config = h.plan.config;
    let owner = owns(h, m, k);
    let container_image = match (&config.kmm.sign, options.in_cluster) {
        (Some(sign), _) => resolve(h, &sign.image, k)?,
        (None, Some(_)) => h.images[k].0.clone(),
        (None, None) => pinned(h, k),
    };
    let build = match options.in_cluster {
        Some(mode) if owner => Some(Build {
            dockerfile_config_map: NameRef {
                name: config_map_name(h),
            },
            build_args: match mode {
                InCluster::Builder => vec![BuildArg {
                    name: super::dockerfile::BUILDER_ARG.into(),
                    value: resolve(h, &config.kmm.builder, k)?,
                }],
                InCluster::Dtk => Vec::new(),
            },
        }),
        _ => None,
    };
    let sign = config.kmm.sign.as_ref().filter(|_| owner).map(|s| Sign {
        unsigned_image: options.in_cluster.is_none().then(|| pinned(h, k)),
        key_secret: NameRef {
            name: s.key_secret.clone(),
        },
        cert_secret: NameRef {
            name: s.cert_secret.clone(),
        },
        files_to_sign: h.trees[k]
            .iter()
            .map(|rel| format!("{}/lib/modules/*/{rel}", config.image.prefix))
            .collect(),
    });
    Ok(KernelMapping {
        literal: Some(h.plan.kernels[k].kver().to_string()),
        regexp: None,
        container_image,
        build,
        sign,
    })
}

/// One mapping for all the Module's kernels: the image name template with `[kmm]
/// name` filled in, which KMM must resolve to each kernel's image.
fn regexp_mapping(h: &Handoff, m: &KmmModule) -> Result<KernelMapping> {
    let config = h.plan.config;
    let mut vars: Vec<(&str, String)> = envsubst::KERNEL_VARS
        .into_iter()
        .map(|v| (v, format!("${{{v}}}")))
        .collect();
    vars.push(("MOD_NAME", config.kmm.name.clone()));
    vars.push(("MOD_NAMESPACE", config.kmm.namespace.clone()));
    let template = envsubst::substitute(&config.image.name, &vars).map_err(anyhow::Error::msg)?;
    let mut kvers = Vec::new();
    for &k in &m.kernels {
        let kver = h.plan.kernels[k].kver();
        let got = envsubst::kmm_resolve(&template, kver, Some((&m.name, &config.kmm.namespace)));
        if got.as_deref().ok() != Some(h.images[k].0.as_str()) {
            bail!(
                "with one regexp mapping KMM would pull {got:?} for {kver}, not {}\n  help: leave out --regexp",
                h.images[k].0
            );
        }
        kvers.push(regex::escape(kver));
    }
    Ok(KernelMapping {
        literal: None,
        regexp: Some(format!("^({})$", kvers.join("|"))),
        container_image: template,
        build: None,
        sign: None,
    })
}
