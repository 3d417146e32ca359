//! The one way kmodforge runs an external program.
//!
//! A [`Cmd`] knows how to show itself as a shell line. [`Cmd::run_logged`] streams the
//! program's output into a job's log file; [`Cmd::read`] captures it. A failure is a
//! [`ProcessError`]: the command, what happened (not found, an exit status, a timeout,
//! a cancel) and the output's tail, kept as data so callers decide from the status and
//! the stderr, never from a formatted message. Every running program is registered so
//! that Ctrl-C or SIGTERM ([`cancel_all`]) stops it, and every program dies with
//! kmodforge (a parent-death signal), even when kmodforge is killed outright.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::config::diag::display_path;

/// How many lines of a failed job's log an error shows.
pub const TAIL_LINES: usize = 20;

/// The most output of one command a log keeps: past it, the middle goes and the log
/// keeps the first eighth and at least the last quarter (`KMODFORGE_LOG_CAP` in bytes
/// overrides it). A build that writes a gigabyte does not keep one.
const LOG_CAP: u64 = 32 << 20;

static LOG_CAP_BYTES: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    std::env::var("KMODFORGE_LOG_CAP")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v >= 1024)
        .unwrap_or(LOG_CAP)
});

static RUNNING: Mutex<Vec<Arc<duct::Handle>>> = Mutex::new(Vec::new());
static SPAWN_DELAY: std::sync::LazyLock<Option<u64>> = std::sync::LazyLock::new(|| {
    std::env::var("KMODFORGE_TEST_SPAWN_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
});
static CANCELLED: AtomicBool = AtomicBool::new(false);

/// Stops every registered program and refuses to start new ones. The registry's lock
/// is held while the flag is set, and [`Cmd`] holds it from its check of the flag to
/// the new program's registration: no program can start unseen by a cancel.
pub fn cancel_all() {
    let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    CANCELLED.store(true, Ordering::SeqCst);
    for h in running.iter() {
        let _ = h.kill();
    }
}

pub fn cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// What went wrong with a program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The program is not on PATH.
    NotFound,
    /// It could not be started for another reason.
    Spawn(String),
    /// It ran and exited unsuccessfully.
    Exit(ExitStatus),
    /// It ran longer than allowed and was killed.
    TimedOut(Duration),
    /// The run was cancelled (Ctrl-C, SIGTERM) and the program stopped or not started.
    Cancelled,
}

/// A program that did not succeed, as data.
#[derive(Debug, Clone)]
pub struct ProcessError {
    /// The command as a shell line.
    pub command: String,
    pub program: String,
    pub failure: Failure,
    /// Its standard error, when it was captured ([`Cmd::read`]).
    pub stderr: String,
    /// The job log its output went to ([`Cmd::run_logged`]).
    pub log: Option<PathBuf>,
    /// The last lines of the log or of stderr.
    pub tail: Vec<String>,
}

impl ProcessError {
    /// The exit code, when the program ran and exited with one.
    pub fn code(&self) -> Option<i32> {
        match &self.failure {
            Failure::Exit(s) => s.code(),
            _ => None,
        }
    }

    /// Whether the program exited unsuccessfully and its stderr holds `needle`
    /// (ignoring case).
    pub fn exited_saying(&self, needle: &str) -> bool {
        matches!(self.failure, Failure::Exit(_))
            && self.stderr.to_lowercase().contains(&needle.to_lowercase())
    }
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.failure {
            Failure::NotFound => {
                return write!(f, "cannot run {}: not found on PATH", self.program);
            }
            Failure::Spawn(e) => return write!(f, "cannot run {}: {e}", self.program),
            Failure::Exit(s) => write!(f, "`{}` failed with {s}", self.command)?,
            Failure::TimedOut(d) => {
                write!(f, "`{}` timed out after {}s", self.command, d.as_secs())?
            }
            Failure::Cancelled => write!(f, "`{}` was cancelled", self.command)?,
        }
        if let Some(log) = &self.log {
            write!(f, "\n  log: {}", display_path(log))?;
            if !self.tail.is_empty() {
                write!(f, "\n  last lines of the log:")?;
            }
        }
        for line in &self.tail {
            write!(f, "\n  | {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProcessError {}

/// The [`ProcessError`] behind an error, if a program's failure caused it.
pub fn process_error(e: &anyhow::Error) -> Option<&ProcessError> {
    e.chain().find_map(|c| c.downcast_ref::<ProcessError>())
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
    /// File descriptors passed to the program as 3, 4, ... (a jobserver's pipe).
    pass_fds: Vec<i32>,
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
            pass_fds: Vec::new(),
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

    /// Gives the program these open file descriptors as its fds 3, 4, ...
    pub fn pass_fds(mut self, fds: &[i32]) -> Cmd {
        self.pass_fds = fds.to_vec();
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
        let fds = self.pass_fds.clone();
        e = e.before_spawn(move |cmd| {
            let fds = fds.clone();
            // SAFETY: only async-signal-safe calls (prctl, dup2, fcntl) between fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(cmd, move || child_setup(&fds));
            }
            Ok(())
        });
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

    fn error(&self, failure: Failure) -> ProcessError {
        ProcessError {
            command: self.shown(),
            program: self.program.to_string_lossy().into_owned(),
            failure,
            stderr: String::new(),
            log: None,
            tail: Vec::new(),
        }
    }

    fn start(&self, expr: duct::Expression) -> Result<Arc<duct::Handle>, Box<ProcessError>> {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        if cancelled() && !self.cleanup {
            return Err(Box::new(self.error(Failure::Cancelled)));
        }
        // Widens the window between the check above and the registration below, so a
        // test can prove that a cancel never misses a program started in it.
        if let Some(ms) = *SPAWN_DELAY {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let handle = expr.start().map_err(|e| {
            Box::new(self.error(if e.kind() == std::io::ErrorKind::NotFound {
                Failure::NotFound
            } else {
                Failure::Spawn(e.to_string())
            }))
        })?;
        let handle = Arc::new(handle);
        running.push(handle.clone());
        Ok(handle)
    }

    fn forget(handle: &Arc<duct::Handle>) {
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|h| !Arc::ptr_eq(h, handle));
    }

    fn finish(handle: &Arc<duct::Handle>) -> std::io::Result<ExitStatus> {
        let result = handle.wait().map(|o| o.status);
        Self::forget(handle);
        result
    }

    /// Runs the command with stdout and stderr appended to `log` (after a `$ command`
    /// line). With a `timeout`, the command is killed when it runs longer.
    pub fn run_logged(&self, log: &Path, timeout: Option<Duration>) -> Result<()> {
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", display_path(dir)))?;
        }
        let mut file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open log {}", display_path(log)))?;
        writeln!(file, "$ {}", self.shown())
            .with_context(|| format!("cannot write log {}", display_path(log)))?;
        let mut cap = LogCap::new(&file, log)?;
        let expr = self
            .expression()
            .stdin_null()
            .stderr_to_stdout()
            .stdout_file(file.try_clone()?)
            .unchecked();
        let handle = self.start(expr).map_err(|e| self.logged(*e, log))?;
        let started = Instant::now();
        let status = loop {
            if handle.try_wait()?.is_some() {
                let status = Self::finish(&handle)?;
                cap.check(&file, true);
                break status;
            }
            cap.check(&file, false);
            if let Some(limit) = timeout.filter(|l| started.elapsed() > *l) {
                let _ = handle.kill();
                Self::finish(&handle).ok();
                let _ = writeln!(
                    file,
                    "kmodforge: killed after {}s (timeout)",
                    limit.as_secs()
                );
                return Err(self
                    .logged(self.error(Failure::TimedOut(limit)), log)
                    .into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if status.success() {
            return Ok(());
        }
        let failure = if cancelled() {
            Failure::Cancelled
        } else {
            Failure::Exit(status)
        };
        let _ = writeln!(
            file,
            "kmodforge: {}",
            match &failure {
                Failure::Cancelled => "cancelled".to_string(),
                _ => format!("failed with {status}"),
            }
        );
        Err(self.logged(self.error(failure), log).into())
    }

    fn logged(&self, mut e: ProcessError, log: &Path) -> ProcessError {
        e.log = Some(log.to_path_buf());
        // The `$ command` lines repeat what the error already shows.
        e.tail = tail(log, TAIL_LINES)
            .into_iter()
            .filter(|l| !l.starts_with("$ "))
            .collect();
        e
    }

    /// Runs the command and returns its stdout; a failure carries its stderr.
    pub fn read(&self) -> Result<String> {
        let expr = self
            .expression()
            .stdin_null()
            .stdout_capture()
            .stderr_capture()
            .unchecked();
        let handle = self.start(expr).map_err(|e| *e)?;
        let result = handle.wait().cloned();
        Self::forget(&handle);
        let out = result?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let mut e = self.error(if cancelled() {
            Failure::Cancelled
        } else {
            Failure::Exit(out.status)
        });
        e.stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let lines: Vec<&str> = e.stderr.lines().collect();
        e.tail = lines[lines.len().saturating_sub(TAIL_LINES)..]
            .iter()
            .map(|l| l.to_string())
            .collect();
        Err(e.into())
    }

    /// Runs the command for its exit status only, output discarded.
    pub fn succeeds(&self) -> Result<bool> {
        let expr = self
            .expression()
            .stdin_null()
            .stdout_null()
            .stderr_null()
            .unchecked();
        let handle = self.start(expr).map_err(|e| *e)?;
        Ok(Self::finish(&handle)?.success())
    }
}

/// In the child, before exec: die with kmodforge, and put the passed descriptors at
/// 3, 4, ... (inheritable).
fn child_setup(fds: &[i32]) -> std::io::Result<()> {
    // SAFETY: plain system calls on integers.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (i, fd) in fds.iter().enumerate() {
            let target = 3 + i as i32;
            if *fd != target && libc::dup2(*fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let flags = libc::fcntl(target, libc::F_GETFD);
            if flags < 0 || libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
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
    writeln!(f, "{text}").with_context(|| format!("cannot write log {}", display_path(log)))?;
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

/// Keeps one command's output in its log within [`LOG_CAP_BYTES`]: the log is opened
/// for appending, so cutting it back to the head and writing the saved tail after it
/// leaves the program writing on at the new end.
struct LogCap {
    path: PathBuf,
    /// Where this command's output starts in the log.
    base: u64,
    cut: u64,
    checks: u32,
}

impl LogCap {
    fn new(file: &File, path: &Path) -> Result<LogCap> {
        Ok(LogCap {
            path: path.to_path_buf(),
            base: file.metadata()?.len(),
            cut: 0,
            checks: 0,
        })
    }

    /// Cuts the log's middle when it has grown past the cap (looked at every 0.5 s, and
    /// at the end).
    fn check(&mut self, file: &File, now: bool) {
        self.checks += 1;
        if !now && self.checks % 25 != 1 {
            return;
        }
        let cap = *LOG_CAP_BYTES;
        let Ok(len) = file.metadata().map(|m| m.len()) else {
            return;
        };
        if len <= self.base + cap {
            return;
        }
        let (head, tail) = (cap / 8, cap / 4);
        let Ok(kept) = read_tail(&self.path, tail) else {
            return;
        };
        self.cut += len - self.base - head - kept.len() as u64;
        let marker = format!(
            "\n[kmodforge: {} bytes of output cut here; the log keeps the first {head} and the last ones]\n",
            self.cut
        );
        let _ = file.set_len(self.base + head);
        let mut f = file;
        let _ = f
            .write_all(marker.as_bytes())
            .and_then(|()| f.write_all(&kept));
    }
}

fn read_tail(path: &Path, n: u64) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(n)))?;
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut buf)?;
    Ok(buf)
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
