//! The signature a signed kernel module carries, appended after its ELF image as the
//! kernel's `scripts/sign-file` writes it and the kernel reads it
//! (`kernel/module/signing.c`):
//!
//! ```text
//! <module ELF> <PKCS#7 signature, DER> <struct module_signature, 12 bytes> "~Module signature appended~\n"
//! ```
//!
//! `struct module_signature` is `algo, hash, id_type, signer_len, key_id_len` (one byte
//! each), three bytes of padding and `sig_len` (big-endian u32); for PKCS#7 signatures
//! `id_type` is 2 and every field but `sig_len` is 0 (the signer is inside the PKCS#7).
//! The kernel verifies the last signature over everything before it; so does `verify`.

use anyhow::{Result, bail};

/// What ends a signed module.
pub const MARKER: &[u8] = b"~Module signature appended~\n";

/// `PKEY_ID_PKCS7`: the only signature type the kernel accepts for modules.
const PKEY_ID_PKCS7: u8 = 2;
const INFO_LEN: usize = 12;

/// A signed module, split.
#[derive(Debug, PartialEq, Eq)]
pub struct Signed<'a> {
    /// What the signature covers: the module as it was before signing.
    pub content: &'a [u8],
    /// The detached PKCS#7 (CMS) signature, DER.
    pub pkcs7: &'a [u8],
}

/// Splits a module into what is signed and its signature; `None` when it carries no
/// signature, an error when what it carries is not one the kernel could read.
pub fn split(module: &[u8]) -> Result<Option<Signed<'_>>> {
    let Some(rest) = module.strip_suffix(MARKER) else {
        return Ok(None);
    };
    if rest.len() < INFO_LEN {
        bail!("the signature marker follows no signature");
    }
    let (before, info) = rest.split_at(rest.len() - INFO_LEN);
    if info[2] != PKEY_ID_PKCS7 {
        bail!(
            "the signature is not PKCS#7 (id_type {}): the kernel only accepts PKCS#7 module signatures",
            info[2]
        );
    }
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    if sig_len == 0 || sig_len > before.len() {
        bail!(
            "the signature claims {sig_len} bytes, the module has {} before it",
            before.len()
        );
    }
    let (content, pkcs7) = before.split_at(before.len() - sig_len);
    Ok(Some(Signed { content, pkcs7 }))
}

/// `module` with its appended signature appended, as sign-file writes it.
pub fn append(content: &[u8], pkcs7: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + pkcs7.len() + INFO_LEN + MARKER.len());
    out.extend_from_slice(content);
    out.extend_from_slice(pkcs7);
    out.extend_from_slice(&[0, 0, PKEY_ID_PKCS7, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&(pkcs7.len() as u32).to_be_bytes());
    out.extend_from_slice(MARKER);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_module_splits_into_content_and_signature() {
        let signed = append(b"\x7fELF module", b"0\x82pkcs7");
        let s = split(&signed).unwrap().unwrap();
        assert_eq!(s.content, b"\x7fELF module");
        assert_eq!(s.pkcs7, b"0\x82pkcs7");
        // Signed twice, the last signature covers the first: the kernel checks the last.
        let twice = append(&signed, b"second");
        let s = split(&twice).unwrap().unwrap();
        assert_eq!((s.content, s.pkcs7), (&signed[..], &b"second"[..]));
    }

    #[test]
    fn unsigned_and_malformed_modules_are_told_apart() {
        assert_eq!(split(b"\x7fELF module").unwrap(), None);
        let short = [&b"ab"[..], MARKER].concat();
        assert!(format!("{:#}", split(&short).unwrap_err()).contains("follows no signature"));
        let mut long = append(b"ELF", b"sig");
        let at = long.len() - MARKER.len() - 1;
        long[at] = 200;
        assert!(format!("{:#}", split(&long).unwrap_err()).contains("claims"));
        let mut other = append(b"ELF", b"sig");
        let at = other.len() - MARKER.len() - INFO_LEN + 2;
        other[at] = 1;
        assert!(format!("{:#}", split(&other).unwrap_err()).contains("not PKCS#7"));
    }
}
