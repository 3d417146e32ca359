//! kmodforge: turns out-of-tree Linux kernel modules into KMM kmod images.
//!
//! The pipeline, one file per step: [`config`] (kernels.toml) and [`modules`] →
//! [`plan`] → [`toolchain`] → [`build`] → [`depmod`]; [`pipeline`] executes a plan on
//! the [`schedule`]r through the container [`engine`], with every program run by
//! [`process`]. The command line and everything that prints is in [`cli`].

pub mod build;
pub mod cli;
pub mod config;
pub mod depmod;
pub mod deps;
pub mod diag;
pub mod engine;
pub mod image;
pub mod initramfs;
pub mod kmm;
pub mod loadtest;
pub mod matrix;
pub mod modinfo;
pub mod modules;
pub mod oci;
pub mod pipeline;
pub mod plan;
pub mod process;
pub mod progress;
pub mod publish;
pub mod rust_analyzer;
pub mod schedule;
pub mod state;
pub mod template;
#[cfg(test)]
mod testing;
pub mod toolchain;
pub mod verify;
pub mod workflow;
