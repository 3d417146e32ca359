//! `kmm --preflight <kver>`: KMM's `PreflightValidation` (or, for OpenShift,
//! `PreflightValidationOCP`) for a kernel the cluster is about to run, written only
//! after checking here what KMM will check there: every Module has a mapping for the
//! kernel and an image the cluster can pull (or build).

use anyhow::{Result, bail};

use super::crd::*;
use super::{Handoff, Options};

pub struct Preflight {
    pub kver: String,
    /// `PreflightValidationOCP`, with the release's Driver Toolkit image if given.
    pub ocp: bool,
    pub dtk_image: Option<String>,
}

/// The PreflightValidation for `p.kver`, or every reason KMM's would fail.
pub fn preflight(h: &Handoff, p: &Preflight, options: &Options) -> Result<String> {
    let Some(k) = h.plan.kernels.iter().position(|kp| kp.kver() == p.kver) else {
        bail!(
            "kernel {} is not in {}: no Module has a mapping for it\n  help: add it as a [[kernel]], run `cargo xtask image --push --kernel {}`, then this again",
            p.kver,
            crate::config::diag::display_path(&h.plan.config.path),
            p.kver
        );
    };
    let mut problems = Vec::new();
    for m in &h.modules {
        if !m.kernels.contains(&k) {
            let why = h
                .notes
                .iter()
                .find(|n| n.starts_with(&format!("{}: not mapped to {}", m.folder.name, p.kver)))
                .map_or(String::new(), |n| format!(" ({n})"));
            problems.push(format!(
                "Module {} has no mapping for {}{why}",
                m.name, p.kver
            ));
        }
    }
    let in_cluster = options.in_cluster.is_some();
    if !in_cluster && h.images[k].1.is_none() {
        problems.push(format!(
            "{} is not pushed from the current inputs: the cluster cannot pull it\n  help: `cargo xtask image --push --kernel {}`",
            h.images[k].0, p.kver
        ));
    }
    if !problems.is_empty() {
        bail!(
            "KMM's preflight check of {} would fail:\n  {}",
            p.kver,
            problems.join("\n  ")
        );
    }
    let mut out = String::new();
    let metadata = Metadata {
        name: format!("{}-{}", h.plan.config.kmm.name, dns_safe(&p.kver)),
        namespace: None,
        labels: labels(),
    };
    let spec = PreflightSpec {
        kernel_version: p.kver.clone(),
        push_built_image: in_cluster,
        dtk_image: p.dtk_image.clone().filter(|_| p.ocp),
    };
    push_doc(
        &mut out,
        &Doc {
            api_version: "kmm.sigs.x-k8s.io/v1beta2",
            kind: if p.ocp {
                "PreflightValidationOCP"
            } else {
                "PreflightValidation"
            },
            metadata,
            body: Spec { spec },
        },
    )?;
    Ok(out)
}

/// A kernel version as a Kubernetes object name (KMM's DNSSafeKernelVersion).
pub fn dns_safe(kver: &str) -> String {
    crate::config::envsubst::normalize(kver)
        .to_lowercase()
        .replace(['_', '.'], "-")
        .trim_matches('-')
        .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_versions_become_object_names() {
        assert_eq!(
            super::dns_safe("6.12.117+deb12-amd64"),
            "6-12-117-deb12-amd64"
        );
        assert_eq!(
            super::dns_safe("5.14.0-427.el9_4.x86_64"),
            "5-14-0-427-el9-4-x86-64"
        );
    }
}
