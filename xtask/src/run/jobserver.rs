//! A GNU make jobserver shared by every compile of a run, so a big package's `make`
//! gets the cores no other job is using (the last job running is not stuck on one).
//!
//! The scheduler runs its first job on an implicit token and takes a token from the
//! pipe for each further one; a `make` inside a job takes tokens for its extra
//! parallel commands (`MAKEFLAGS=-jN --jobserver-auth=3,4`). The pipe reaches a
//! container as its descriptors 3 and 4 (podman's `--preserve-fds`); docker has no
//! such option, so there each compile gets a share of the budget instead.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

pub struct Jobserver {
    read: std::fs::File,
    write: std::fs::File,
    jobs: usize,
}

impl Jobserver {
    /// A jobserver for `jobs` parallel jobs: `jobs - 1` tokens in the pipe.
    pub fn new(jobs: usize) -> Result<Jobserver> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot make the jobserver pipe");
        }
        // Above the descriptors a child gets them as (3 and 4), so moving them there
        // never overwrites one with the other.
        let high = |fd: i32| -> Result<std::fs::File> {
            // SAFETY: fd is ours; F_DUPFD_CLOEXEC returns a new descriptor or -1.
            let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
            // SAFETY: closing our own descriptor once.
            unsafe { libc::close(fd) };
            if new < 0 {
                return Err(std::io::Error::last_os_error())
                    .context("cannot place the jobserver pipe");
            }
            // SAFETY: `new` is a fresh descriptor we own.
            Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(new) }))
        };
        let (read, mut write) = (high(fds[0])?, high(fds[1])?);
        write.write_all(&vec![b'+'; jobs.saturating_sub(1)])?;
        Ok(Jobserver { read, write, jobs })
    }

    /// The pipe's descriptors, to pass to a child as its 3 and 4.
    pub fn fds(&self) -> [i32; 2] {
        [self.read.as_raw_fd(), self.write.as_raw_fd()]
    }

    /// MAKEFLAGS for a make that has the pipe as 3 and 4.
    pub fn makeflags(&self) -> String {
        format!(" -j{} --jobserver-auth=3,4", self.jobs)
    }

    /// Takes a token, waiting for one.
    pub fn acquire(&self) -> std::io::Result<()> {
        let mut byte = [0u8];
        (&self.read).read_exact(&mut byte)
    }

    /// Gives a token back.
    pub fn release(&self) -> std::io::Result<()> {
        (&self.write).write_all(b"+")
    }

    /// Tokens in the pipe now (for tests).
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes an int.
        unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut n) };
        n as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_make_shares_the_tokens() {
        let js = Jobserver::new(3).unwrap();
        assert_eq!(js.available(), 2);
        assert!(js.fds().iter().all(|fd| *fd >= 10));
        // A real make, given the pipe as 3 and 4, runs its three commands at once:
        // each waits until all three have started, which they only can in parallel.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Makefile"),
            "all: a b c\na b c:\n\t@touch started.$@; for i in $$(seq 200); do \\\n\
             \t  [ -e started.a ] && [ -e started.b ] && [ -e started.c ] && exit 0; sleep 0.1; done; exit 1\n",
        )
        .unwrap();
        crate::host::process::Cmd::new("make")
            .arg("-s")
            .dir(dir.path())
            .env("MAKEFLAGS", js.makeflags())
            .pass_fds(&js.fds())
            .read()
            .expect("the three commands ran together");
        assert_eq!(js.available(), 2, "make gives its tokens back");
        js.acquire().unwrap();
        js.acquire().unwrap();
        assert_eq!(js.available(), 0);
        js.release().unwrap();
        assert_eq!(js.available(), 1);
    }
}
