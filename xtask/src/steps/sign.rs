//! Module signing for Secure Boot: every `.ko` signed with the configured key by the
//! kernel's own `scripts/sign-file` (sha256), and the signatures checked against the
//! configured certificate (`verify`).
//!
//! Why a second, short container after the build's, rather than signing inside the
//! build's: that container runs the module's own build (its Makefile, a DKMS
//! package's PRE_BUILD and POST_BUILD scripts), third-party code that must never see
//! the key. So the build's container ends; kmodforge checks each `.ko`'s vermagic on
//! the host (a module built for the wrong kernel is never signed); then a container
//! from the same toolchain image, with no network, holding only the stripped modules
//! and the key and certificate mounted read-only as files, runs `sign-file` on each.
//! The key is never copied: not into the output directory, a log, an image or a
//! fingerprint. The unstripped copies the build keeps stay unsigned (a signature covers
//! exact bytes, and they never enter an image). Signing comes last because stripping
//! after it would break the signature, and depmod reads the signed files.
//!
//! The check runs the host's `openssl cms -verify` on the PKCS#7 signature a module
//! carries, over the bytes before it (as the kernel does), with the certificate as the
//! only signer it may use: a module signed by another key is named as such, with the
//! signer its signature gives.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::config::diag::display_path;
use crate::config::signing::Signing;
use crate::formats::modsig;
use crate::host::engine::{Engine, Mount, Run, require_program};
use crate::host::process::{Cmd, process_error};

const MODULES: &str = "/kmodforge/modules";
const KEY: &str = "/run/kmodforge/signing/key.pem";
const CERT: &str = "/run/kmodforge/signing/cert.pem";
/// The signing container's exit status when the toolchain has no sign-file.
const NO_SIGN_FILE: i32 = 3;

/// One line, so that the log shows the container's command line as one line.
const SCRIPT: &str = concat!(
    r#"set -eu; sign_file="$1/scripts/sign-file"; shift; "#,
    r#"if ! [ -x "$sign_file" ]; then echo "kmodforge: no $sign_file in this toolchain" >&2; exit 3; fi; "#,
    r#"for m in "$@"; do "$sign_file" sha256 "$KEY" "$CERT" "$MODULES/$m"; echo "kmodforge: signed $m"; done"#
);

/// Signs modules in one kernel's toolchain.
pub struct Signer<'a> {
    pub engine: &'a Engine,
    pub signing: &'a Signing,
    /// The kernel's toolchain image and its build tree there.
    pub image: &'a str,
    pub kdir: &'a str,
    pub kver: &'a str,
}

impl Signer<'_> {
    /// Signs the modules `names` of `dir` in place, each exactly once (a signature a
    /// build left is dropped first), and checks that each now carries one.
    pub fn sign(&self, dir: &Path, names: &[String], log: &Path) -> Result<()> {
        let key = self.signing.key()?;
        for name in names {
            drop_signature(&dir.join(name))?;
        }
        let mut command = vec!["sh".to_string(), "-c".into(), SCRIPT.into()];
        command.extend(["sign-file".into(), self.kdir.to_string()]);
        command.extend(names.iter().cloned());
        let run = Run {
            image: self.image,
            mounts: vec![
                Mount {
                    host: dir,
                    container: MODULES,
                    read_only: false,
                },
                Mount {
                    host: key,
                    container: KEY,
                    read_only: true,
                },
                Mount {
                    host: &self.signing.cert,
                    container: CERT,
                    read_only: true,
                },
            ],
            env: [("KEY", KEY), ("CERT", CERT), ("MODULES", MODULES)]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            workdir: None,
            network: false,
            command,
            pass_fds: vec![],
        };
        if let Err(e) = self.engine.run(&run).run_logged(log, None) {
            return Err(self.explain(e));
        }
        for name in names {
            let data = std::fs::read(dir.join(name))?;
            if modsig::split(&data)?.is_none() {
                bail!("{name} carries no signature after sign-file ran");
            }
        }
        Ok(())
    }

    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        let (what, help) = match process_error(&e).and_then(|p| p.code()) {
            Some(NO_SIGN_FILE) => (
                format!(
                    "kernel {}'s toolchain has no {}/scripts/sign-file to sign modules with",
                    self.kver, self.kdir
                ),
                "Debian's headers have it (from linux-kbuild-<version>), and so does a kernel build with CONFIG_MODULE_SIG; remove [signing] to build unsigned modules".to_string(),
            ),
            _ => (
                format!("signing the modules for kernel {} failed", self.kver),
                format!(
                    "check that [signing] key and cert are a pair (sign-file refuses a key that is not the certificate's) and that the key is an unencrypted PEM key; the certificate is {}",
                    display_path(&self.signing.cert)
                ),
            ),
        };
        e.context(format!("{what}\n  help: {help}"))
    }
}

/// Removes a signature the build itself appended, so that sign-file appends the only one.
fn drop_signature(path: &Path) -> Result<()> {
    let data =
        std::fs::read(path).with_context(|| format!("cannot read {}", display_path(path)))?;
    if let Some(signed) = modsig::split(&data)? {
        std::fs::write(path, signed.content)?;
    }
    Ok(())
}

/// How a module's signature compares with the configured certificate.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Signed with the certificate's key, and the signature matches the module.
    Valid,
    Unsigned,
    /// Signed by another key: the signer, as the signature names it.
    OtherKey(String),
    /// A signature that does not hold: the module changed after signing, or it is
    /// damaged (openssl's or kmodforge's reason).
    Invalid(String),
}

/// Checks `module`'s signature against the certificate `cert` with the host's openssl.
pub fn check(module: &[u8], cert: &Path) -> Result<Verdict> {
    let signed = match modsig::split(module) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(Verdict::Unsigned),
        Err(e) => return Ok(Verdict::Invalid(format!("{e:#}"))),
    };
    require_program(
        "openssl",
        "openssl",
        "verify checks module signatures with it",
    )?;
    let tmp = tempfile::Builder::new()
        .prefix("kmodforge-sig-")
        .tempdir()?;
    let (content, pkcs7) = (tmp.path().join("content"), tmp.path().join("signature.p7s"));
    std::fs::write(&content, signed.content)?;
    std::fs::write(&pkcs7, signed.pkcs7)?;
    let verified = Cmd::new("openssl")
        .args(["cms", "-verify", "-binary", "-inform", "DER", "-in"])
        .arg(&pkcs7)
        .arg("-content")
        .arg(&content)
        .arg("-certfile")
        .arg(cert)
        // The certificate is the only signer allowed; whether a node trusts it is the
        // node's business (its kernel's keys, the MOK list), not a CA chain's.
        .args(["-nointern", "-noverify", "-out", "/dev/null"])
        .read();
    let e = match verified {
        Ok(_) => return Ok(Verdict::Valid),
        Err(e) => e,
    };
    let Some(p) = process_error(&e).filter(|p| p.code().is_some()) else {
        return Err(e);
    };
    if p.exited_saying("signer certificate not found") {
        let printed = Cmd::new("openssl")
            .args([
                "cms", "-cmsout", "-print", "-noout", "-inform", "DER", "-in",
            ])
            .arg(&pkcs7)
            .read()
            .unwrap_or_default();
        return Ok(Verdict::OtherKey(signer(&printed)));
    }
    // openssl's last error line says what failed in the end ("content verify error").
    let why = p
        .stderr
        .lines()
        .filter(|l| l.contains(":error:"))
        .filter_map(|l| l.split(':').nth(5))
        .next_back()
        .unwrap_or("openssl could not verify it");
    Ok(Verdict::Invalid(format!(
        "the signature does not hold ({why}): the module changed after it was signed, or the signature is damaged"
    )))
}

/// The signer a PKCS#7 signature names (issuer and serial number, or key identifier),
/// from `openssl cms -cmsout -print`.
fn signer(printed: &str) -> String {
    let mut lines = printed.lines().map(str::trim);
    let mut parts = Vec::new();
    while let Some(l) = lines.next() {
        if let Some(issuer) = l.strip_prefix("issuer: ") {
            parts.push(issuer.to_string());
        } else if let Some(serial) = l.strip_prefix("serialNumber: ") {
            parts.push(format!("serial {serial}"));
        } else if l == "d.subjectKeyIdentifier:" {
            // "0000 - 4a fa ca 7f-5e 4b   J...^K": the bytes, then their ASCII.
            let dump = lines
                .next()
                .and_then(|d| d.split_once(" - "))
                .map_or("", |d| d.1);
            let id: Vec<String> = dump
                .replace('-', " ")
                .split_whitespace()
                .take_while(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
                .map(str::to_uppercase)
                .collect();
            parts.push(format!("key id {}", id.join(":")));
        }
    }
    if parts.is_empty() {
        "an unnamed signer".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/signing");

    /// `content` signed as sign-file signs it: a detached PKCS#7 with no certificates
    /// and no attributes, sha256, appended with the kernel's trailer.
    fn signed_with(key: &str, content: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("content"), content).unwrap();
        let fixture = |f: &str| Path::new(FIXTURES).join(f);
        Cmd::new("openssl")
            .args([
                "cms",
                "-sign",
                "-binary",
                "-nocerts",
                "-noattr",
                "-nosmimecap",
            ])
            .args(["-outform", "DER", "-md", "sha256", "-signer"])
            .arg(fixture(&format!("{key}.crt")))
            .arg("-inkey")
            .arg(fixture(&format!("{key}.key")))
            .arg("-in")
            .arg(dir.path().join("content"))
            .arg("-out")
            .arg(dir.path().join("sig"))
            .read()
            .expect("openssl signs (Debian package openssl)");
        modsig::append(content, &std::fs::read(dir.path().join("sig")).unwrap())
    }

    #[test]
    fn signatures_are_checked_against_the_certificate() {
        let cert = Path::new(FIXTURES).join("test.crt");
        let module = b"\x7fELF not really a module, but signed bytes all the same";
        let signed = signed_with("test", module);
        assert_eq!(check(&signed, &cert).unwrap(), Verdict::Valid);
        assert_eq!(check(module, &cert).unwrap(), Verdict::Unsigned);
        match check(&signed_with("other", module), &cert).unwrap() {
            Verdict::OtherKey(who) => assert!(
                who.contains("CN=kmodforge other signing key") && who.contains("serial 0x"),
                "{who}"
            ),
            v => panic!("{v:?}"),
        }
        let mut changed = signed.clone();
        changed[5] ^= 1;
        match check(&changed, &cert).unwrap() {
            Verdict::Invalid(why) => assert!(why.contains("content verify error"), "{why}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn the_signer_is_read_from_what_openssl_prints() {
        let printed = "    signerInfos:\n        version: 1\n        d.issuerAndSerialNumber: \n          issuer: O=x, CN=other\n          serialNumber: 0x1F\n";
        assert_eq!(signer(printed), "O=x, CN=other, serial 0x1F");
        let by_id = "        d.subjectKeyIdentifier: \n          0000 - 4a fa ca 7f-5e   J...^\n";
        assert_eq!(signer(by_id), "key id 4A:FA:CA:7F:5E");
        assert_eq!(signer(""), "an unnamed signer");
    }
}
