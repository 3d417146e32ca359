//! `[kmm]` of kernels.toml: the KMM Modules the images are for.
//!
//! The defaults fit a real cluster: every amd64 node (`kubernetes.io/arch` is set by the
//! kubelet everywhere; `node-role.kubernetes.io/worker` is not set by kubeadm), and
//! NoSchedule taints tolerated, since accelerator nodes are usually tainted. Narrow the
//! selector to the nodes that have the hardware.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::config::diag::{Diagnostics, Source};

/// The KMM Modules (`[kmm]`): `${MOD_NAME}`, `${MOD_NAMESPACE}` of the image names.
#[derive(Debug, Clone)]
pub struct KmmSettings {
    /// The images' `${MOD_NAME}`, and the prefix of every Module's name.
    pub name: String,
    pub namespace: String,
    /// The pull secret of the images (KMM's `imageRepoSecret`).
    pub image_repo_secret: Option<String>,
    /// The nodes to load the modules on (KMM's `selector`).
    pub selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    /// The image the in-cluster build starts from on a cluster without the Driver Toolkit
    /// (kmodforge's toolchain plus the kernel's modules), a template like `[image] name`.
    pub builder: String,
    /// KMM signs the modules in the cluster (the Module's `sign` section).
    pub sign: Option<KmmSign>,
}

/// `[kmm.sign]`: Secrets holding the key and certificate, and where the signed image goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmmSign {
    pub key_secret: String,
    pub cert_secret: String,
    /// The signed image's name (a template like `[image] name`); the pushed image is the
    /// unsigned one KMM signs.
    pub image: String,
}

/// A Kubernetes toleration, as the Module's `tolerations` carry it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Toleration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default = "exists")]
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}

fn exists() -> String {
    "Exists".into()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawKmm {
    name: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    image_repo_secret: Option<Spanned<String>>,
    selector: Option<BTreeMap<String, String>>,
    tolerations: Option<Vec<Spanned<Toleration>>>,
    builder: Option<Spanned<String>>,
    sign: Option<RawSign>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSign {
    key_secret: Spanned<String>,
    cert_secret: Spanned<String>,
    image: Option<Spanned<String>>,
}

/// The repository of an image template with `suffix` appended, same tag: the default
/// builder (`-builder`) and signed (`-signed`) image names.
pub fn sibling_image(image: &str, suffix: &str) -> String {
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].find(':') {
        Some(i) => format!("{}{suffix}{}", &image[..slash + i], &image[slash + i..]),
        None => format!("{image}{suffix}"),
    }
}

/// A Kubernetes object name (RFC 1123 label, as KMM's names must be).
pub fn is_dns_label(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| ok(c) || c == '-')
        && s.starts_with(ok)
        && s.ends_with(ok)
}

pub(super) fn settings(
    source: &Source,
    raw: &RawKmm,
    image: &str,
    diags: &mut Diagnostics,
) -> KmmSettings {
    let mut name = |v: &Option<Spanned<String>>, default: &str, what: &str| match v {
        Some(s) if is_dns_label(s.get_ref()) => s.get_ref().clone(),
        Some(s) => {
            diags.push(
                source
                    .error(
                        &s.span(),
                        format!("{what} {:?} is not a valid Kubernetes name", s.get_ref()),
                    )
                    .help("use lowercase letters, digits and '-', at most 63 characters"),
            );
            default.to_string()
        }
        None => default.to_string(),
    };
    let image_repo_secret = raw
        .image_repo_secret
        .as_ref()
        .map(|_| name(&raw.image_repo_secret, "", "kmm.image-repo-secret"));
    let sign = raw.sign.as_ref().map(|s| KmmSign {
        key_secret: name(&Some(s.key_secret.clone()), "", "kmm.sign.key-secret"),
        cert_secret: name(&Some(s.cert_secret.clone()), "", "kmm.sign.cert-secret"),
        image: s
            .image
            .as_ref()
            .map_or_else(|| sibling_image(image, "-signed"), |i| i.get_ref().clone()),
    });
    KmmSettings {
        name: name(&raw.name, "kmodforge", "kmm.name"),
        namespace: name(&raw.namespace, "default", "kmm.namespace"),
        image_repo_secret,
        selector: raw
            .selector
            .clone()
            .unwrap_or_else(|| [("kubernetes.io/arch".to_string(), "amd64".to_string())].into()),
        tolerations: tolerations(source, raw, diags),
        builder: raw
            .builder
            .as_ref()
            .map_or_else(|| sibling_image(image, "-builder"), |b| b.get_ref().clone()),
        sign,
    }
}

/// `[[kmm.tolerations]]`, checked as the API server checks them; by default every
/// NoSchedule taint is tolerated.
fn tolerations(source: &Source, raw: &RawKmm, diags: &mut Diagnostics) -> Vec<Toleration> {
    let Some(list) = &raw.tolerations else {
        return vec![Toleration {
            key: None,
            operator: exists(),
            value: None,
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        }];
    };
    for t in list {
        if let Err(why) = check_toleration(t.get_ref()) {
            diags.push(source.error(&t.span(), why).help(
                "e.g. { key = \"nvidia.com/gpu\", operator = \"Exists\", effect = \"NoSchedule\" }",
            ));
        }
    }
    list.iter().map(|t| t.get_ref().clone()).collect()
}

fn check_toleration(t: &Toleration) -> Result<(), String> {
    match (t.operator.as_str(), &t.key, &t.value) {
        ("Exists", _, Some(v)) if !v.is_empty() => {
            return Err("a toleration with operator Exists has no value".into());
        }
        ("Equal", None, _) => return Err("a toleration with operator Equal needs a key".into()),
        ("Exists" | "Equal", _, _) => {}
        (other, _, _) => {
            return Err(format!(
                "toleration operator {other:?} is not Exists or Equal"
            ));
        }
    }
    match t.effect.as_deref() {
        None | Some("NoSchedule" | "PreferNoSchedule" | "NoExecute") => {}
        Some(other) => {
            return Err(format!(
                "toleration effect {other:?} is not NoSchedule, PreferNoSchedule or NoExecute"
            ));
        }
    }
    if t.toleration_seconds.is_some() && t.effect.as_deref() != Some("NoExecute") {
        return Err("tolerationSeconds only applies to effect NoExecute".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_images_keep_the_tag_template() {
        assert_eq!(
            sibling_image("quay.io/a/${MOD_NAME}:${KERNEL_FULL_VERSION}", "-builder"),
            "quay.io/a/${MOD_NAME}-builder:${KERNEL_FULL_VERSION}"
        );
        assert_eq!(
            sibling_image("127.0.0.1:5000/k:$KERNEL_X", "-signed"),
            "127.0.0.1:5000/k-signed:$KERNEL_X"
        );
    }

    #[test]
    fn tolerations_are_checked_like_the_api_server() {
        let t = |op: &str, key: Option<&str>, value: Option<&str>, effect: Option<&str>| {
            check_toleration(&Toleration {
                key: key.map(str::to_string),
                operator: op.into(),
                value: value.map(str::to_string),
                effect: effect.map(str::to_string),
                toleration_seconds: None,
            })
        };
        assert!(t("Exists", None, None, Some("NoSchedule")).is_ok());
        assert!(t("Equal", Some("gpu"), Some("a100"), None).is_ok());
        assert!(t("Exists", Some("k"), Some("v"), None).is_err());
        assert!(t("Equal", None, Some("v"), None).is_err());
        assert!(t("In", Some("k"), None, None).is_err());
        assert!(t("Exists", None, None, Some("NoRun")).is_err());
        assert!(is_dns_label("kmf-demo") && !is_dns_label("Kmf") && !is_dns_label("-a"));
    }
}
