//! `[signing]` in kernels.toml: the key and certificate every module is signed with, for
//! nodes that boot with Secure Boot (their kernels refuse modules no trusted key signed).
//!
//! Both are PEM files named by path, relative to kernels.toml or absolute, so the key
//! can live outside the repository; `KMODFORGE_SIGNING_KEY` names the key file instead
//! (a CI secret written to a file, say), relative to the current directory.
//!
//! To kmodforge the key is only ever a path. It is checked here to be a readable,
//! unencrypted PEM private key outside `modules/` (whose folders are mounted into
//! module builds), then mounted read-only into the one container that runs `sign-file`
//! (`steps/sign.rs`): never copied, hashed, logged or quoted in an error. The
//! certificate is public: its hash is an input of every compile, so a new certificate
//! rebuilds every module.
//!
//! A problem with the certificate is a configuration error like any other. A problem
//! with the key is found here too, at the key's line, but reported only by the
//! commands that compile: `plan`, `matrix`, `kmm`, `workflow` and `verify` never touch
//! the key, so a CI job or a checkout without the secret can still run them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;
use toml::Spanned;

use crate::config::diag::{Diagnostic, Diagnostics, Source, display_path};

/// The environment variable that names the key file (it overrides `key`).
pub const KEY_ENV: &str = "KMODFORGE_SIGNING_KEY";

/// The validated `[signing]` table.
#[derive(Debug, Clone)]
pub struct Signing {
    /// The certificate (PEM) that goes with the key; `verify` checks signatures with it.
    pub cert: PathBuf,
    /// `sha256:<hex>` of the certificate file: an input of every compile.
    pub cert_sha256: String,
    /// The key file, or the configuration error that says why there is no usable one.
    key: Result<PathBuf, String>,
}

impl Signing {
    /// The key file to mount into the signing container; its problem (a config error
    /// at the key's line) when it is missing, unreadable or not a usable key.
    pub fn key(&self) -> Result<&Path> {
        self.key.as_deref().map_err(|e| anyhow::anyhow!("{e}"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSigning {
    key: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
}

/// `[signing]`, with the key taken from `KMODFORGE_SIGNING_KEY` when that is set.
pub fn settings(
    source: &Source,
    root: &Path,
    raw: Option<&Spanned<RawSigning>>,
    diags: &mut Diagnostics,
) -> Option<Signing> {
    let env = std::env::var_os(KEY_ENV).filter(|v| !v.is_empty());
    from_parts(source, root, raw, env, diags)
}

fn from_parts(
    source: &Source,
    root: &Path,
    raw: Option<&Spanned<RawSigning>>,
    env_key: Option<OsString>,
    diags: &mut Diagnostics,
) -> Option<Signing> {
    let Some(raw) = raw else {
        if let Some(k) = env_key {
            diags.push(
                Diagnostic::new(format!(
                    "{KEY_ENV} names a signing key ({}), but {} has no [signing] table",
                    Path::new(&k).display(),
                    display_path(&source.path)
                ))
                .help("add [signing] with cert = \"<the key's certificate, PEM>\", or unset KMODFORGE_SIGNING_KEY"),
            );
        }
        return None;
    };
    let table = raw.get_ref();
    let Some(cert_value) = &table.cert else {
        diags.push(
            source
                .error(&raw.span(), "[signing] has no `cert`")
                .help("cert = \"<path of the key's certificate, PEM>\" (relative to kernels.toml, or absolute)"),
        );
        return None;
    };
    let cert = root.join(cert_value.get_ref());
    let cert_sha256 = match read_cert(&cert) {
        Ok(bytes) => crate::formats::oci::sha256(&bytes),
        Err((what, help)) => {
            diags.push(source.error(&cert_value.span(), what).help(help));
            return None;
        }
    };
    let key = match (env_key, &table.key) {
        (Some(env), _) => {
            let path = std::path::absolute(PathBuf::from(&env)).unwrap_or_else(|_| env.into());
            match check_key(&path, root) {
                Ok(()) => Ok(path),
                Err((what, help)) => Err(Diagnostic::new(format!("{KEY_ENV}: {what}"))
                    .help(help)
                    .to_string()),
            }
        }
        (None, Some(k)) => {
            let path = root.join(k.get_ref());
            match check_key(&path, root) {
                Ok(()) => Ok(path),
                Err((what, help)) => Err(source.error(&k.span(), what).help(help).to_string()),
            }
        }
        (None, None) => Err(source
            .error(&raw.span(), "[signing] has no `key`")
            .help(format!(
                "key = \"<path of the PEM private key>\" (relative to kernels.toml, or absolute: keep it outside the repository), or {KEY_ENV}=<file>"
            ))
            .to_string()),
    };
    Some(Signing {
        cert,
        cert_sha256,
        key,
    })
}

/// A problem with a file: what is wrong, and what to do.
type Problem = (String, String);

/// The certificate's bytes, when it is a readable PEM certificate and nothing else.
fn read_cert(path: &Path) -> Result<Vec<u8>, Problem> {
    let shown = display_path(path);
    let bytes = std::fs::read(path).map_err(|e| {
        (
            format!("certificate {shown} cannot be read: {e}"),
            "give the path of the key's certificate (PEM), relative to kernels.toml or absolute"
                .to_string(),
        )
    })?;
    let text = String::from_utf8_lossy(&bytes);
    if text.contains("PRIVATE KEY-----") {
        return Err((
            format!("certificate {shown} holds a private key too"),
            "the certificate is public (its hash is a build input): give a file with the certificate alone, e.g. `openssl x509 -in both.pem -out cert.pem`".into(),
        ));
    }
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err((
            format!("{shown} is not a PEM certificate"),
            "give the X.509 certificate of the signing key in PEM (-----BEGIN CERTIFICATE-----); `openssl x509 -inform DER -in cert.der -out cert.pem` converts DER".into(),
        ));
    }
    Ok(bytes)
}

/// Whether the key file is one `sign-file` can use and kmodforge may mount. Its
/// contents are read to look at the PEM armour only, and never quoted.
fn check_key(path: &Path, root: &Path) -> Result<(), Problem> {
    let shown = display_path(path);
    if path.starts_with(root.join("modules")) {
        return Err((
            format!(
                "signing key {shown} is inside modules/, whose folders are mounted into module builds"
            ),
            "keep the key outside modules/ (outside the repository is best)".into(),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| {
        (
            format!("signing key {shown} cannot be read: {e}"),
            format!("give the path of the PEM private key (relative to kernels.toml, or absolute), or set {KEY_ENV}"),
        )
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let pem = text.contains("-----BEGIN ") && text.contains("PRIVATE KEY-----");
    if !pem {
        return Err((
            format!("signing key {shown} is not a PEM private key"),
            "the kernel's sign-file takes a PEM key (-----BEGIN PRIVATE KEY-----), e.g. made with `openssl req -new -x509 -newkey rsa:4096 -nodes -keyout key.pem -out cert.pem`".into(),
        ));
    }
    if text.contains("ENCRYPTED") {
        return Err((
            format!("signing key {shown} is encrypted"),
            "kmodforge runs sign-file without a passphrase: give it an unencrypted copy that only the build can read (`openssl pkey -in encrypted.pem -out key.pem`)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/signing");

    /// A project dir with kernels.toml holding `text`, and the fixture key pair copied
    /// into `keys/`.
    fn parse(
        text: &str,
        env: Option<&str>,
    ) -> (tempfile::TempDir, Result<Option<Signing>, String>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        for f in ["test.key", "test.crt", "other.crt"] {
            std::fs::copy(Path::new(FIXTURES).join(f), dir.path().join("keys").join(f)).unwrap();
        }
        let path = dir.path().join("kernels.toml");
        std::fs::write(&path, text).unwrap();
        #[derive(Deserialize)]
        struct File {
            signing: Option<Spanned<RawSigning>>,
        }
        let source = Source::read(&path).unwrap();
        let raw: File = match source.parse() {
            Ok(raw) => raw,
            Err(e) => return (dir, Err(e.to_string())),
        };
        let mut diags = Diagnostics::default();
        let s = from_parts(
            &source,
            dir.path(),
            raw.signing.as_ref(),
            env.map(|e| dir.path().join(e).into_os_string()),
            &mut diags,
        );
        let result = diags.into_result().map(|()| s).map_err(|e| e.to_string());
        (dir, result)
    }

    const BOTH: &str = "[signing]\nkey = \"keys/test.key\"\ncert = \"keys/test.crt\"\n";

    #[test]
    fn a_key_and_its_certificate_are_taken_relative_to_kernels_toml() {
        let (d, s) = parse(BOTH, None);
        let s = s.unwrap().unwrap();
        assert_eq!(s.key().unwrap(), d.path().join("keys/test.key"));
        assert_eq!(s.cert, d.path().join("keys/test.crt"));
        let cert = std::fs::read(d.path().join("keys/test.crt")).unwrap();
        assert_eq!(s.cert_sha256, crate::formats::oci::sha256(&cert));
        // No table, no signing.
        assert!(parse("", None).1.unwrap().is_none());
    }

    #[test]
    fn the_environment_names_the_key_and_overrides_the_file() {
        let (d, s) = parse(
            "[signing]\ncert = \"keys/test.crt\"\n",
            Some("keys/test.key"),
        );
        assert_eq!(
            s.unwrap().unwrap().key().unwrap(),
            d.path().join("keys/test.key")
        );
        let (d, s) = parse(
            "[signing]\nkey = \"keys/missing.key\"\ncert = \"keys/test.crt\"\n",
            Some("keys/test.key"),
        );
        assert_eq!(
            s.unwrap().unwrap().key().unwrap(),
            d.path().join("keys/test.key")
        );
        let e = parse("", Some("keys/test.key")).1.unwrap_err();
        assert!(
            e.contains("KMODFORGE_SIGNING_KEY names a signing key")
                && e.contains("no [signing] table"),
            "{e}"
        );
    }

    #[test]
    fn key_problems_are_config_errors_at_the_keys_line_kept_for_the_commands_that_sign() {
        let key_problem = |text: &str, env: Option<&str>| {
            let (_d, s) = parse(text, env);
            format!("{:#}", s.unwrap().unwrap().key().unwrap_err())
        };
        let e = key_problem(
            "[signing]\ncert = \"keys/test.crt\"\nkey = \"keys/nope.key\"\n",
            None,
        );
        assert!(
            e.contains("kernels.toml:3:7: signing key ")
                && e.contains("keys/nope.key cannot be read"),
            "{e}"
        );
        // A certificate is no key; the error never quotes the file.
        let e = key_problem(
            "[signing]\ncert = \"keys/test.crt\"\nkey = \"keys/other.crt\"\n",
            None,
        );
        assert!(
            e.contains("is not a PEM private key") && !e.contains("MII"),
            "{e}"
        );
        let e = key_problem("[signing]\ncert = \"keys/test.crt\"\n", None);
        assert!(
            e.contains("kernels.toml:1:1: [signing] has no `key`") && e.contains(KEY_ENV),
            "{e}"
        );
        let e = key_problem(
            "[signing]\ncert = \"keys/test.crt\"\n",
            Some("keys/gone.key"),
        );
        assert!(
            e.contains("KMODFORGE_SIGNING_KEY: signing key ")
                && e.contains("gone.key cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn encrypted_keys_and_keys_in_module_folders_are_refused() {
        let (d, _) = parse("", None);
        let enc = d.path().join("enc.key");
        std::fs::write(&enc, "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIsecret\n-----END ENCRYPTED PRIVATE KEY-----\n").unwrap();
        let (what, _) = check_key(&enc, d.path()).unwrap_err();
        assert!(
            what.contains("is encrypted") && !what.contains("MIIsecret"),
            "{what}"
        );
        let inside = d.path().join("modules/m/test.key");
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::copy(Path::new(FIXTURES).join("test.key"), &inside).unwrap();
        let (what, help) = check_key(&inside, d.path()).unwrap_err();
        assert!(
            what.contains("inside modules/") && help.contains("outside"),
            "{what}"
        );
    }

    #[test]
    fn the_rust_kernel_trusts_the_test_certificate() {
        // images/ is the recipe's build context; the pair lives with the tests.
        let trusted = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../images/rust-kernel-trusted-test.crt"
        );
        assert_eq!(
            std::fs::read(trusted).unwrap(),
            std::fs::read(Path::new(FIXTURES).join("test.crt")).unwrap(),
            "images/rust-kernel-trusted-test.crt must be tests/fixtures/signing/test.crt"
        );
    }

    #[test]
    fn certificate_problems_are_config_errors_at_the_certs_line() {
        let e = parse(
            "[signing]\nkey = \"keys/test.key\"\ncert = \"keys/none.crt\"\n",
            None,
        )
        .1
        .unwrap_err();
        assert!(
            e.contains("kernels.toml:3:8: certificate ") && e.contains("cannot be read"),
            "{e}"
        );
        let e = parse(
            "[signing]\nkey = \"keys/test.key\"\ncert = \"keys/test.key\"\n",
            None,
        )
        .1
        .unwrap_err();
        assert!(
            e.contains("holds a private key too") && !e.contains("MII"),
            "{e}"
        );
        let e = parse("[signing]\nkey = \"keys/test.key\"\n", None)
            .1
            .unwrap_err();
        assert!(e.contains("[signing] has no `cert`"), "{e}");
        let e = parse(
            "[signing]\nkey = \"keys/test.key\"\ncert = \"keys/test.crt\"\nhash = \"sha1\"\n",
            None,
        )
        .1
        .unwrap_err();
        assert!(
            e.contains("kernels.toml:4:1") && e.contains("unknown field `hash`"),
            "{e}"
        );
    }
}
