//! The one way kmodforge runs an external program.
//!
//! A [`Cmd`] knows how to show itself as a shell line. [`Cmd::run_logged`] streams the
//! program's output into a job's log file; when the program fails, the error names the
//! command, its exit status, the log's path and the log's last lines. Every running
//! program is registered so that Ctrl-C (see [`cancel_all`]) can stop it.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::config::diag::display_path;

/// How many lines of a failed job's log an error shows.
pub const TAIL_LINES: usize = 20;

static RUNNING: Mutex<Vec<Arc<duct::Handle>>> = Mutex::new(Vec::new());
static CANCELLED: AtomicBool = AtomicBool::new(false);

/// Stops every registered program and refuses to start new ones.
pub fn cancel_all() {
    CANCELLED.store(true, Ordering::SeqCst);
    for h in RUNNING.lock().unwrap().iter() {
        let _ = h.kill();
    }
}

pub fn cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// A command line, runnable and printable.
#[derive(Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: Option<PathBuf>,
    pipe_into: Option<Box<Cmd>>,
    /// Runs even after [`cancel_all`]: for the clean-up that cancelling needs.
    cleanup: bool,
}

impl Cmd {
    pub fn new(program: impl Into<OsString>) -> Cmd {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            pipe_into: None,
            cleanup: false,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Cmd {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Cmd {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Cmd {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Cmd {
        self.dir = Some(dir.into());
        self
    }

    /// Marks a clean-up command, which runs even while the run is being cancelled.
    pub fn cleanup(mut self) -> Cmd {
        self.cleanup = true;
        self
    }

    /// `self | next`: the pipeline fails when either side fails.
    pub fn pipe(mut self, next: Cmd) -> Cmd {
        self.pipe_into = Some(Box::new(next));
        self
    }

    fn expression(&self) -> duct::Expression {
        let mut e = duct::cmd(&self.program, &self.args);
        for (k, v) in &self.env {
            e = e.env(k, v);
        }
        if let Some(d) = &self.dir {
            e = e.dir(d);
        }
        match &self.pipe_into {
            Some(next) => e.pipe(next.expression()),
            None => e,
        }
    }

    /// The command as a shell line, for logs and errors.
    pub fn shown(&self) -> String {
        let mut words: Vec<String> = self
            .env
            .iter()
            .map(|(k, v)| format!("{}={}", k.to_string_lossy(), quote(&v.to_string_lossy())))
            .collect();
        words.push(quote(&self.program.to_string_lossy()));
        words.extend(self.args.iter().map(|a| quote(&a.to_string_lossy())));
        let line = words.join(" ");
        match &self.pipe_into {
            Some(next) => format!("{line} | {}", next.shown()),
            None => line,
        }
    }

    fn start(&self, expr: duct::Expression) -> Result<Arc<duct::Handle>> {
        if cancelled() && !self.cleanup {
            bail!("cancelled");
        }
        let handle = expr.start().map_err(|e| spawn_error(&self.program, e))?;
        let handle = Arc::new(handle);
        RUNNING.lock().unwrap().push(handle.clone());
        Ok(handle)
    }

    fn finish(handle: &Arc<duct::Handle>) -> std::io::Result<std::process::ExitStatus> {
        let result = handle.wait().map(|o| o.status);
        RUNNING.lock().unwrap().retain(|h| !Arc::ptr_eq(h, handle));
        result
    }

    /// Runs the command with stdout and stderr appended to `log` (after a `$ command`
    /// line). With a `timeout`, the command is killed when it runs longer.
    pub fn run_logged(&self, log: &Path, timeout: Option<Duration>) -> Result<()> {
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open log {}", display_path(log)))?;
        writeln!(file, "$ {}", self.shown())?;
        let expr = self
            .expression()
            .stdin_null()
            .stderr_to_stdout()
            .stdout_file(file.try_clone()?)
            .unchecked();
        let handle = self.start(expr)?;
        let status = match timeout {
            None => Self::finish(&handle)?,
            Some(limit) => {
                let started = Instant::now();
                loop {
                    if handle.try_wait()?.is_some() {
                        break Self::finish(&handle)?;
                    }
                    if started.elapsed() > limit {
                        let _ = handle.kill();
                        Self::finish(&handle).ok();
                        writeln!(
                            file,
                            "kmodforge: killed after {}s (timeout)",
                            limit.as_secs()
                        )?;
                        bail!(self.failure(&format!("timed out after {}s", limit.as_secs()), log));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        if !status.success() {
            let why = if cancelled() {
                "was cancelled".to_string()
            } else {
                format!("failed with {status}")
            };
            writeln!(file, "kmodforge: {why}")?;
            bail!(self.failure(&why, log));
        }
        Ok(())
    }

    fn failure(&self, why: &str, log: &Path) -> String {
        let mut msg = format!("`{}` {why}\n  log: {}", self.shown(), display_path(log));
        let tail = tail(log, TAIL_LINES);
        if !tail.is_empty() {
            msg.push_str("\n  last lines of the log:");
            for line in tail {
                msg.push_str("\n  | ");
                msg.push_str(&line);
            }
        }
        msg
    }

    /// Runs the command and returns its stdout; on failure the error shows stderr.
    pub fn read(&self) -> Result<String> {
        let expr = self
            .expression()
            .stdin_null()
            .stdout_capture()
            .stderr_capture()
            .unchecked();
        let handle = self.start(expr)?;
        let result = handle.wait().cloned();
        RUNNING.lock().unwrap().retain(|h| !Arc::ptr_eq(h, &handle));
        let out = result?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            let shown = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n  | ");
            bail!(
                "`{}` failed with {}\n  | {}",
                self.shown(),
                out.status,
                shown
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the command for its exit status only, output discarded.
    pub fn succeeds(&self) -> Result<bool> {
        let expr = self
            .expression()
            .stdin_null()
            .stdout_null()
            .stderr_null()
            .unchecked();
        let handle = self.start(expr)?;
        Ok(Self::finish(&handle)?.success())
    }
}

fn spawn_error(program: &std::ffi::OsStr, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "cannot run {}: not found on PATH",
            program.to_string_lossy()
        )
    } else {
        anyhow::anyhow!("cannot run {}: {e}", program.to_string_lossy())
    }
}

/// Appends a note to a job's log (creating it), for what kmodforge itself learns.
pub fn append_log(log: &Path, text: &str) -> Result<()> {
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", display_path(dir)))?;
    }
    let mut f = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open log {}", display_path(log)))?;
    writeln!(f, "{text}")?;
    Ok(())
}

/// Shell-quotes a word when it needs it.
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The last `n` lines of a file (empty when it cannot be read). Reads only the end.
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Finds a program on PATH, as a shell would.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_is_shell_safe() {
        assert_eq!(quote("make"), "make");
        assert_eq!(quote("M=/a/b"), "M=/a/b");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn failure_names_command_status_log_and_tail() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("job.log");
        let cmd = Cmd::new("sh")
            .arg("-c")
            .arg("for i in $(seq 1 30); do echo line$i; done; echo oops >&2; exit 3");
        let err = format!("{:#}", cmd.run_logged(&log, None).unwrap_err());
        assert!(err.contains("`sh -c 'for i in"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains(&format!("log: {}", log.display())), "{err}");
        assert!(
            err.contains("| oops") && err.contains("| line30") && !err.contains("| line5\n"),
            "{err}"
        );
        let text = fs::read_to_string(&log).unwrap();
        assert!(
            text.starts_with("$ sh -c") && text.contains("line1\n"),
            "{text}"
        );
    }

    #[test]
    fn timeout_kills_the_program() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("t.log");
        let started = Instant::now();
        let err = Cmd::new("sleep")
            .arg("30")
            .run_logged(&log, Some(Duration::from_millis(300)))
            .unwrap_err();
        assert!(format!("{err}").contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn pipelines_and_read() {
        let out = Cmd::new("printf")
            .arg("b\\na\\n")
            .pipe(Cmd::new("sort"))
            .read()
            .unwrap();
        assert_eq!(out, "a\nb\n");
        let err = Cmd::new("sh")
            .arg("-c")
            .arg("echo bad >&2; exit 1")
            .read()
            .unwrap_err();
        assert!(format!("{err}").contains("| bad"), "{err}");
        let err = Cmd::new("no-such-program-kmodforge").read().unwrap_err();
        assert!(format!("{err}").contains("not found on PATH"), "{err}");
    }
}
