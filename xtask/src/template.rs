//! `${NAME}` templates, KMM's kernel-version variables and KMM's tag normalization.
//!
//! KMM expands `containerImage` with `${KERNEL_FULL_VERSION}`, `${KERNEL_XYZ}`, ... and
//! turns every character outside `[A-Za-z0-9._-]` into `_` where the result is an image
//! tag. kmodforge names its images the same way, so the names it pushes are the names
//! KMM looks for.

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

/// KMM's tag normalization: every character outside `[A-Za-z0-9._-]` becomes `_`.
pub fn normalize_tag(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
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
    fn tags_are_normalized_like_kmm() {
        assert_eq!(
            normalize_tag("6.12.117+deb12-amd64"),
            "6.12.117_deb12-amd64"
        );
        assert_eq!(
            normalize_tag("5.14.0-427.el9.x86_64"),
            "5.14.0-427.el9.x86_64"
        );
        assert_eq!(normalize_tag("a b/c~d"), "a_b_c_d");
    }
}
