//! kmodforge's own `${NAME}` templates (a module's `make` argv, a toolchain's image and
//! kernel source directory), with the kernel's variables taken from the raw version, as
//! paths in a toolchain have it; and the checks of an image reference.
//!
//! Image names are KMM's business, not this one's: [`super::envsubst`] resolves them
//! exactly as KMM does.

use std::collections::BTreeMap;

/// Values for `${NAME}` references.
#[derive(Clone, Debug, Default)]
pub struct Vars(BTreeMap<&'static str, String>);

impl Vars {
    pub fn new() -> Vars {
        Vars::default()
    }

    pub fn set(mut self, name: &'static str, value: impl Into<String>) -> Vars {
        self.0.insert(name, value.into());
        self
    }

    /// KMM's variables for one kernel (`KERNEL_FULL_VERSION`, `KERNEL_VERSION`,
    /// `KERNEL_XYZ`, `KERNEL_X`, `KERNEL_Y`, `KERNEL_Z`), split as KMM splits them: on
    /// `[.,-]`, the first three parts being X, Y and Z.
    pub fn kernel(kver: &str) -> Vars {
        let parts: Vec<&str> = kver.split(['.', ',', '-']).collect();
        let part = |i: usize| parts.get(i).copied().unwrap_or("").to_string();
        Vars::new()
            .set("KERNEL_FULL_VERSION", kver)
            .set("KERNEL_VERSION", kver)
            .set(
                "KERNEL_XYZ",
                parts.iter().take(3).copied().collect::<Vec<_>>().join("."),
            )
            .set("KERNEL_X", part(0))
            .set("KERNEL_Y", part(1))
            .set("KERNEL_Z", part(2))
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.keys().copied()
    }

    /// Replaces every `${NAME}`; an unknown name or an unclosed `${` is an error that
    /// lists the names that exist.
    pub fn expand(&self, template: &str) -> Result<String, String> {
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in {template:?}"))?;
            let name = &after[..end];
            match self.0.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    let known: Vec<String> = self.names().map(|n| format!("${{{n}}}")).collect();
                    return Err(format!(
                        "unknown variable ${{{name}}} in {template:?}; known: {}",
                        known.join(", ")
                    ));
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Checks a resolved image name is a reference an engine and a registry accept: a
/// lowercase repository path and a tag of `[A-Za-z0-9_.-]` (at most 128 characters, not
/// starting with `.` or `-`). KMM normalizes only the kernel version it substitutes, so
/// a tag that is still invalid here is invalid for KMM too: refused, not rewritten.
pub fn image_reference(expanded: &str) -> Result<String, String> {
    let slash = expanded.rfind('/').map_or(0, |i| i + 1);
    let (repo, tag) = match expanded[slash..].find(':') {
        Some(i) => (&expanded[..slash + i], &expanded[slash + i + 1..]),
        None => {
            return Err(format!(
                "image name {expanded:?} has no tag: end it with :${{KERNEL_FULL_VERSION}}"
            ));
        }
    };
    let (host, path) = match repo.split_once('/') {
        Some((h, p)) if h.contains(['.', ':']) || h == "localhost" => (Some(h), p),
        _ => (None, repo),
    };
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
            && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
            && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
    };
    if path.split('/').any(|c| !component_ok(c))
        || host.is_some_and(|h| h.is_empty() || h.contains(['/', ' ']))
    {
        return Err(format!(
            "image repository {repo:?} is not valid: use lowercase letters, digits, '.', '_', '-' and '/'"
        ));
    }
    let tag_ok = tag
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
    if tag.is_empty() || tag.len() > 128 || !tag_ok {
        return Err(format!(
            "image tag {tag:?} of {expanded:?} is not valid: 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
        ));
    }
    Ok(format!("{repo}:{tag}"))
}

/// The registry host of an image reference (`docker.io` when it names none).
pub fn registry_host(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((h, _)) if h.contains(['.', ':']) || h == "localhost" => h,
        _ => "docker.io",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_vars_split_like_kmm() {
        let v = Vars::kernel("6.12.117+deb12-amd64");
        let e = |t: &str| v.expand(t).unwrap();
        assert_eq!(e("${KERNEL_FULL_VERSION}"), "6.12.117+deb12-amd64");
        assert_eq!(e("${KERNEL_VERSION}"), "6.12.117+deb12-amd64");
        assert_eq!(e("${KERNEL_XYZ}"), "6.12.117+deb12");
        assert_eq!(e("${KERNEL_X}.${KERNEL_Y}/${KERNEL_Z}"), "6.12/117+deb12");

        let v = Vars::kernel("6.1.0-47-amd64");
        assert_eq!(v.expand("${KERNEL_XYZ}").unwrap(), "6.1.0");
        assert_eq!(v.expand("${KERNEL_Z}").unwrap(), "0");
    }

    #[test]
    fn expand_rejects_unknown_and_unclosed() {
        let v = Vars::kernel("6.1.0-47-amd64");
        let err = v.expand("x${KERNEL_MAJOR}").unwrap_err();
        assert!(err.contains("unknown variable ${KERNEL_MAJOR}"), "{err}");
        assert!(err.contains("${KERNEL_XYZ}"), "{err}");
        assert!(v.expand("x${KERNEL_X").unwrap_err().contains("unclosed"));
        assert_eq!(v.expand("no vars $ here").unwrap(), "no vars $ here");
    }

    #[test]
    fn image_references_are_checked_not_rewritten() {
        // KMM normalizes the kernel version it substitutes, never the template's text.
        assert!(
            image_reference("quay.io/a/b:6.12.117+deb12-amd64")
                .unwrap_err()
                .contains("not valid")
        );
        assert!(image_reference("quay.io/a/b:-x").is_err());
        assert_eq!(
            image_reference("quay.io/a/b:_6.12.117_deb12-amd64").unwrap(),
            "quay.io/a/b:_6.12.117_deb12-amd64"
        );
        assert_eq!(
            image_reference("127.0.0.1:5000/kmods:6.1.0-47-amd64").unwrap(),
            "127.0.0.1:5000/kmods:6.1.0-47-amd64"
        );
        assert!(
            image_reference("127.0.0.1:5000/kmods")
                .unwrap_err()
                .contains("has no tag")
        );
        assert!(
            image_reference("quay.io/Upper/b:1")
                .unwrap_err()
                .contains("not valid")
        );
        assert_eq!(registry_host("127.0.0.1:5000/kmods:x"), "127.0.0.1:5000");
        assert_eq!(registry_host("localhost/kmodforge/x:1"), "localhost");
        assert_eq!(registry_host("library/debian:12"), "docker.io");
    }
}
