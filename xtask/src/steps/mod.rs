//! What each job of a plan does, one file per step, in pipeline order:
//! [`toolchain`] → [`compile`] (and [`sign`]) → [`depmod`] → [`image`] → [`publish`],
//! with the [`loadtest`] (QEMU) and [`verify`] (static checks) on the results; [`builder`]
//! makes the images an in-cluster build starts from.

pub mod builder;
pub mod compile;
pub mod depmod;
pub mod image;
pub mod image_base;
pub mod kernel_files;
pub mod loadtest;
pub mod publish;
pub mod rust_analyzer;
pub mod sign;
pub mod toolchain;
pub mod verify;
