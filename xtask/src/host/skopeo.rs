//! skopeo, which copies images between the engine's local storage, OCI layouts and
//! registries. Every skopeo command line is made here.
//!
//! TLS follows KMM's `registryTLS`: a registry's certificate is verified unless
//! kernels.toml opts it out; skopeo has one switch for both opt-ins. skopeo does not
//! read `DOCKER_HOST`, so a docker daemon elsewhere than the default socket is named
//! with `--src-daemon-host`/`--dest-daemon-host`.

use std::path::Path;

use crate::host::engine::{Engine, EngineKind};
use crate::host::process::Cmd;

/// Where an image is, as skopeo names it.
pub enum Location<'a> {
    /// The engine's local storage.
    Storage {
        engine: &'a Engine,
        reference: &'a str,
    },
    /// An OCI layout directory, the image named `tag` in its index.
    Oci { dir: &'a Path, tag: &'a str },
    /// A registry; `verify_tls` is false where kernels.toml opts the registry out.
    Registry {
        reference: &'a str,
        verify_tls: bool,
    },
}

impl Location<'_> {
    fn transport(&self) -> String {
        match self {
            Location::Storage { engine, reference } => match engine.kind {
                EngineKind::Podman => format!("containers-storage:{reference}"),
                EngineKind::Docker => format!("docker-daemon:{reference}"),
            },
            Location::Oci { dir, tag } => format!("oci:{}:{tag}", dir.display()),
            Location::Registry { reference, .. } => format!("docker://{reference}"),
        }
    }

    /// `--src-...`/`--dest-...` flags this location needs (`side` is "src" or "dest").
    fn flags(&self, side: &str) -> Vec<String> {
        match self {
            Location::Registry { verify_tls, .. } => {
                vec![format!("--{side}-tls-verify={verify_tls}")]
            }
            Location::Storage { engine, .. } if engine.kind == EngineKind::Docker => {
                match std::env::var("DOCKER_HOST") {
                    Ok(host) => vec![format!("--{side}-daemon-host={host}")],
                    Err(_) => vec![],
                }
            }
            _ => vec![],
        }
    }
}

/// `skopeo copy` from one location to another.
pub fn copy(from: &Location, to: &Location) -> Cmd {
    Cmd::new("skopeo")
        .args(["copy", "--quiet"])
        .args(from.flags("src"))
        .args(to.flags("dest"))
        .arg(from.transport())
        .arg(to.transport())
}

/// `skopeo inspect --raw` of an image in a registry: its manifest, as stored.
pub fn inspect_raw(reference: &str, verify_tls: bool) -> Cmd {
    Cmd::new("skopeo")
        .args(["inspect", "--raw", &format!("--tls-verify={verify_tls}")])
        .arg(format!("docker://{reference}"))
}

/// Whether a failed `skopeo inspect` says the registry has no such image (rather than
/// that it could not be asked).
pub fn says_absent(e: &anyhow::Error) -> bool {
    crate::host::process::process_error(e).is_some_and(|p| {
        ["manifest unknown", "name unknown", "not found"]
            .iter()
            .any(|n| p.exited_saying(n))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_name_both_sides_and_their_tls() {
        let cmd = copy(
            &Location::Oci {
                dir: Path::new("/o"),
                tag: "t",
            },
            &Location::Registry {
                reference: "r.example:5000/k:t",
                verify_tls: false,
            },
        );
        assert_eq!(
            cmd.shown(),
            "skopeo copy --quiet --dest-tls-verify=false oci:/o:t docker://r.example:5000/k:t"
        );
        assert_eq!(
            inspect_raw("q.io/a:b", true).shown(),
            "skopeo inspect --raw --tls-verify=true docker://q.io/a:b"
        );
    }

    #[test]
    fn only_a_registry_saying_so_means_absent() {
        let absent = Cmd::new("sh")
            .args([
                "-c",
                "echo 'manifest unknown: manifest unknown' >&2; exit 1",
            ])
            .read()
            .unwrap_err();
        assert!(says_absent(&absent));
        // A missing skopeo is not "the image is not there yet".
        let missing = Cmd::new("kmodforge-no-such-skopeo").read().unwrap_err();
        assert!(!says_absent(&missing));
        let refused = Cmd::new("sh")
            .args([
                "-c",
                "echo 'x509: certificate signed by unknown authority' >&2; exit 1",
            ])
            .read()
            .unwrap_err();
        assert!(!says_absent(&refused));
    }
}
