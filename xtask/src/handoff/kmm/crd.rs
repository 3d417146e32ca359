//! The Kubernetes objects `kmm` writes, as KMM's CRDs spell them (v1beta1 Module,
//! v1beta2 PreflightValidation, core ConfigMap). Only the fields kmodforge sets.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::kmm::Toleration;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Doc<S> {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: Metadata,
    #[serde(flatten)]
    pub body: S,
}

#[derive(Serialize)]
pub struct Metadata {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
pub struct Spec<S> {
    pub spec: S,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleSpec {
    pub module_loader: ModuleLoader,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_repo_secret: Option<NameRef>,
    pub selector: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

#[derive(Serialize)]
pub struct ModuleLoader {
    pub container: Container,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub modprobe: Modprobe,
    pub kernel_mappings: Vec<KernelMapping>,
    #[serde(skip_serializing_if = "Option::is_none", rename = "registryTLS")]
    pub registry_tls: Option<RegistryTls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Modprobe {
    pub module_name: String,
    pub dir_name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modules_loading_order: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware_path: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelMapping {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub literal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regexp: Option<String>,
    pub container_image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sign: Option<Sign>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    pub dockerfile_config_map: NameRef,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub build_args: Vec<BuildArg>,
}

#[derive(Serialize)]
pub struct BuildArg {
    pub name: String,
    pub value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sign {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsigned_image: Option<String>,
    pub key_secret: NameRef,
    pub cert_secret: NameRef,
    pub files_to_sign: Vec<String>,
}

#[derive(Serialize)]
pub struct NameRef {
    pub name: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryTls {
    pub insecure: bool,
    #[serde(rename = "insecureSkipTLSVerify")]
    pub insecure_skip_tls_verify: bool,
}

#[derive(Serialize)]
pub struct ConfigMapBody {
    pub data: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreflightSpec {
    pub kernel_version: String,
    pub push_built_image: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtk_image: Option<String>,
}

/// The labels of everything kmodforge writes.
pub fn labels() -> BTreeMap<String, String> {
    [(
        "app.kubernetes.io/managed-by".to_string(),
        "kmodforge".to_string(),
    )]
    .into()
}

/// Appends `doc` to a multi-document YAML stream.
pub fn push_doc(out: &mut String, doc: &impl Serialize) -> anyhow::Result<()> {
    if !out.is_empty() {
        out.push_str("---\n");
    }
    out.push_str(&serde_yaml_ng::to_string(doc)?);
    Ok(())
}
