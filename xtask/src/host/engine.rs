//! The container engine: podman or docker, through their command-line interfaces.
//!
//! Found on PATH (podman first) or chosen with `--engine` / `KMODFORGE_ENGINE`. The
//! engine also carries the flags this host needs: container rlimits no higher than
//! kmodforge's own (a root without CAP_SYS_RESOURCE cannot raise them, and podman's
//! default asks for 1048576), podman's `runc` on cgroup v1/hybrid hosts (crun refuses
//! them), and docker's `--user` for a non-root caller so outputs stay theirs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

use crate::host::process::{Cmd, process_error, which};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    Podman,
    Docker,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Podman => "podman",
            EngineKind::Docker => "docker",
        })
    }
}

pub struct Engine {
    pub kind: EngineKind,
    program: PathBuf,
    /// Flags for both `run` and `build`.
    host_flags: Vec<String>,
    /// `--user uid:gid` for docker run as a non-root user.
    user: Option<String>,
    /// Labels every container of this run, for cleanup on Ctrl-C.
    pub run_id: String,
    checked: OnceLock<Result<(), String>>,
}

/// A bind mount into a container.
pub struct Mount<'a> {
    pub host: &'a Path,
    pub container: &'a str,
    pub read_only: bool,
}

/// One `engine run --rm` invocation.
pub struct Run<'a> {
    pub image: &'a str,
    pub mounts: Vec<Mount<'a>>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<&'a str>,
    /// `false` means `--network none`.
    pub network: bool,
    pub command: Vec<String>,
    /// Descriptors the container gets as 3, 4, ... (podman's `--preserve-fds`; a
    /// jobserver's pipe). Docker cannot pass them: callers give it none.
    pub pass_fds: Vec<i32>,
}

impl Engine {
    /// Finds the engine without starting anything (a no-op build must stay fast).
    pub fn detect(requested: Option<EngineKind>) -> Result<Engine> {
        let (kind, program) = match requested {
            Some(kind) => {
                let name = kind.to_string();
                let program = which(&name).with_context(|| {
                    format!("{name} is not installed (not found on PATH)\n  help: {}", install_hint(kind))
                })?;
                (kind, program)
            }
            None => [EngineKind::Podman, EngineKind::Docker]
                .into_iter()
                .find_map(|k| which(&k.to_string()).map(|p| (k, p)))
                .with_context(|| {
                    format!(
                        "no container engine found: kmodforge needs podman or docker on PATH\n  help: {}",
                        install_hint(EngineKind::Podman)
                    )
                })?,
        };
        let mut host_flags = Vec::new();
        // The runtime may not set RLIMIT_NPROC above kernel.pid_max (seen in sandboxed
        // VMs); no container can have more processes than that anyway.
        let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        for (flag, name, cap) in [
            ("nofile", "Max open files", None),
            ("nproc", "Max processes", pid_max),
        ] {
            if let Some((soft, hard)) = own_limit(name) {
                let cap = cap.unwrap_or(u64::MAX);
                host_flags.push(format!(
                    "--ulimit={flag}={}:{}",
                    soft.min(cap),
                    hard.min(cap)
                ));
            }
        }
        if kind == EngineKind::Podman && !cgroup_v2_unified() && which("runc").is_some() {
            host_flags.push("--runtime=runc".into());
        }
        let uid = own_uid();
        let user = (kind == EngineKind::Docker && uid != 0).then(|| format!("{uid}:{}", own_gid()));
        let run_id = format!(
            "{:x}{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
        );
        Ok(Engine {
            kind,
            program,
            host_flags,
            user,
            run_id,
            checked: OnceLock::new(),
        })
    }

    /// An engine that is not there: every use fails with `why` (for commands such as
    /// `verify` that may run without one).
    pub fn unavailable(why: &anyhow::Error) -> Engine {
        let checked = OnceLock::new();
        let _ = checked.set(Err(format!("{why:#}")));
        Engine {
            kind: EngineKind::Podman,
            program: "podman".into(),
            host_flags: Vec::new(),
            user: None,
            run_id: String::new(),
            checked,
        }
    }

    pub fn cmd(&self) -> Cmd {
        Cmd::new(&self.program)
    }

    /// Makes sure the engine can be used (docker's daemon is reachable, podman's
    /// storage works), once per process; asked only when a job needs the engine.
    pub fn check(&self) -> Result<()> {
        let result = self.checked.get_or_init(|| {
            let checked = self.cmd().arg("info").read().map(drop);
            if checked.is_ok() {
                self.reap_orphans();
            }
            checked.map_err(|e| {
                let hint = match self.kind {
                    EngineKind::Docker => "start the Docker daemon (`sudo systemctl start docker`, or `sudo dockerd &` where there is no systemd), or use --engine podman",
                    EngineKind::Podman => "run `podman info` to see what is wrong, or use --engine docker",
                };
                format!("{} cannot run containers on this machine: {e:#}\n  help: {hint}", self.kind)
            })
        });
        result.clone().map_err(anyhow::Error::msg)
    }

    /// The image's ID, or `None` when it is not in local storage.
    pub fn image_id(&self, image: &str) -> Result<Option<String>> {
        self.check()?;
        let cmd = self
            .cmd()
            .args(["image", "inspect", "--format", "{{.Id}}", image]);
        match cmd.read() {
            Ok(id) => Ok(Some(id.trim().to_string())),
            // podman: "image not known" (exit 125); docker: "No such image" (exit 1).
            Err(e)
                if process_error(&e).is_some_and(|p| {
                    p.exited_saying("image not known") || p.exited_saying("no such image")
                }) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `build -f <containerfile> -t <tag> --build-arg ... <context>`.
    pub fn build(
        &self,
        containerfile: &Path,
        context: &Path,
        tag: &str,
        args: &[(String, String)],
        labels: &[(String, String)],
    ) -> Cmd {
        let mut cmd = self.cmd().arg("build").args(&self.host_flags);
        if self.kind == EngineKind::Docker {
            // Docker's legacy builder: no BuildKit daemon or buildx plugin needed.
            cmd = cmd.env("DOCKER_BUILDKIT", "0");
        }
        for (k, v) in args {
            cmd = cmd.arg("--build-arg").arg(format!("{k}={v}"));
        }
        for (k, v) in labels {
            cmd = cmd.arg("--label").arg(format!("{k}={v}"));
        }
        cmd.arg("-f")
            .arg(containerfile)
            .arg("-t")
            .arg(tag)
            .arg(context)
    }

    /// `run --rm` with this run's label, so that [`Engine::remove_run_containers`]
    /// finds the container if kmodforge is interrupted.
    pub fn run(&self, run: &Run) -> Cmd {
        let mut cmd = self
            .cmd()
            .args(["run", "--rm", "--pull=never"])
            .args(&self.host_flags);
        cmd = cmd.arg(format!("--label=kmodforge.run={}", self.run_id));
        cmd = cmd.arg(format!("--label=kmodforge.pid={}", std::process::id()));
        cmd = cmd.arg(format!(
            "--label=kmodforge.started={}",
            process_start(std::process::id()).unwrap_or_default()
        ));
        if !run.network {
            cmd = cmd.arg("--network=none");
        }
        if let Some(user) = &self.user {
            cmd = cmd.arg(format!("--user={user}"));
        }
        for m in &run.mounts {
            let opts = if m.read_only { "ro,z" } else { "z" };
            cmd = cmd
                .arg("-v")
                .arg(format!("{}:{}:{opts}", m.host.display(), m.container));
        }
        for (k, v) in &run.env {
            cmd = cmd.arg("-e").arg(format!("{k}={v}"));
        }
        if let Some(w) = run.workdir {
            cmd = cmd.arg(format!("--workdir={w}"));
        }
        if !run.pass_fds.is_empty() && self.kind == EngineKind::Podman {
            cmd = cmd
                .arg(format!("--preserve-fds={}", run.pass_fds.len()))
                .pass_fds(&run.pass_fds);
        }
        cmd.arg(run.image).args(&run.command)
    }

    /// Removes the containers of kmodforge runs whose process is gone (killed outright,
    /// say): each container is labelled with its run's pid and that process's start
    /// time, so a reused pid is not mistaken for the run.
    pub fn reap_orphans(&self) {
        let format =
            "{{.ID}} {{index .Labels \"kmodforge.pid\"}} {{index .Labels \"kmodforge.started\"}}";
        let Ok(listed) = self
            .cmd()
            .args([
                "ps",
                "-a",
                "--filter",
                "label=kmodforge.pid",
                "--format",
                format,
            ])
            .read()
        else {
            return;
        };
        let orphans: Vec<&str> = listed
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let (id, pid, started) = (w.next()?, w.next()?, w.next().unwrap_or(""));
                let alive = pid
                    .parse()
                    .ok()
                    .and_then(process_start)
                    .is_some_and(|s| s == started);
                (!alive).then_some(id)
            })
            .collect();
        if !orphans.is_empty() {
            let _ = self.cmd().args(["rm", "-f"]).args(orphans).read();
        }
    }

    /// Removes every container this run started (used on Ctrl-C).
    pub fn remove_run_containers(&self) {
        let filter = format!("label=kmodforge.run={}", self.run_id);
        if let Ok(ids) = Cmd::new(&self.program)
            .args(["ps", "-aq", "--filter", &filter])
            .cleanup()
            .read()
        {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = Cmd::new(&self.program)
                    .args(["rm", "-f"])
                    .args(ids)
                    .cleanup()
                    .read();
            }
        }
    }

    /// `import - <image>` reading a root file system tarball from the previous command.
    pub fn import(&self, image: &str) -> Cmd {
        self.cmd().args(["import", "-", image])
    }

    /// `pull`; `verify_tls: false` is podman's `--tls-verify=false` (docker decides per
    /// registry in its daemon's configuration, where 127.0.0.0/8 is already insecure).
    pub fn pull(&self, image: &str, verify_tls: bool) -> Cmd {
        let cmd = self.cmd().arg("pull");
        let cmd = if self.kind == EngineKind::Podman && !verify_tls {
            cmd.arg("--tls-verify=false")
        } else {
            cmd
        };
        cmd.arg(image)
    }

    /// A subcommand with the engine's program, for steps that need more (save, push...).
    pub fn program(&self) -> &Path {
        &self.program
    }
}

fn install_hint(kind: EngineKind) -> &'static str {
    match kind {
        EngineKind::Podman => {
            "install podman with `cargo xtask deps --install` (or `sudo apt-get install -y podman runc`), or install docker"
        }
        EngineKind::Docker => {
            "install docker (`sudo apt-get install -y docker.io`) and start its daemon, or use --engine podman"
        }
    }
}

/// When process `pid` started (clock ticks after boot, from /proc), to tell it from
/// a later process with the same pid.
pub fn process_start(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after its ')' are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19).map(str::to_string)
}

/// This process's soft and hard limit from /proc/self/limits ("unlimited" gives none).
fn own_limit(name: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
    Some((fields.first()?.parse().ok()?, fields.get(1)?.parse().ok()?))
}

/// A pure cgroup v2 host has cgroup.controllers at the root of /sys/fs/cgroup.
fn cgroup_v2_unified() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

pub fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

fn own_gid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.gid())
        .unwrap_or(0)
}

/// Refuses to go on when the engine was asked for but the host lacks what it needs.
pub fn require_program(name: &str, apt_package: &str, what_for: &str) -> Result<PathBuf> {
    match which(name) {
        Some(p) => Ok(p),
        None => bail!(
            "{name} is not installed, and {what_for}\n  help: sudo apt-get install -y {apt_package}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_read_from_proc() {
        let (soft, hard) = own_limit("Max open files").expect("Linux has nofile limits");
        assert!(soft <= hard && soft > 0);
    }

    #[test]
    fn run_command_isolates_and_labels() {
        let engine = Engine {
            kind: EngineKind::Podman,
            program: "podman".into(),
            host_flags: vec!["--ulimit=nofile=1024:4096".into()],
            user: None,
            run_id: "r1".into(),
            checked: OnceLock::new(),
        };
        let src = Path::new("/src/m");
        let cmd = engine.run(&Run {
            image: "img",
            mounts: vec![Mount {
                host: src,
                container: "/in",
                read_only: true,
            }],
            env: vec![("A".into(), "b c".into())],
            workdir: Some("/w"),
            network: false,
            command: vec!["make".into()],
            pass_fds: vec![],
        });
        assert_eq!(
            cmd.shown(),
            format!(
                "podman run --rm --pull=never --ulimit=nofile=1024:4096 --label=kmodforge.run=r1 --label=kmodforge.pid={} --label=kmodforge.started={} \
                 --network=none -v /src/m:/in:ro,z -e 'A=b c' --workdir=/w img make",
                std::process::id(),
                process_start(std::process::id()).unwrap()
            )
        );
    }
}
