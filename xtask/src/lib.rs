//! kmodforge: turns out-of-tree Linux kernel modules into KMM kmod images.
//!
//! The folders follow the pipeline:
//! - [`config`]: kernels.toml, module folders (module.toml), diagnostics, templates;
//! - [`plan`]: the whole pipeline as a sorted list of jobs (pure);
//! - [`run`]: executes a plan: the scheduler, progress, fingerprints, the output layout;
//! - [`steps`]: what each job does: toolchain, compile, depmod, image, publish, load
//!   test, verify (and rust-analyzer for editors);
//! - [`handoff`]: what leaves kmodforge: the CI matrix and workflow, KMM manifests;
//! - [`host`]: the machine: processes, the container engine, files, host packages;
//! - [`formats`]: file formats read and written: OCI layouts, initramfs, modinfo;
//! - [`bench`]: `cargo xtask bench`, kmodforge against DKMS and at CI scale;
//! - [`cli`]: the command line and everything that prints.

pub mod bench;
pub mod cli;
pub mod config;
pub mod formats;
pub mod handoff;
pub mod host;
pub mod plan;
pub mod run;
pub mod steps;
#[cfg(test)]
mod testing;
