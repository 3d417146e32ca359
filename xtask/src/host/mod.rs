//! The machine kmodforge runs on: the one [`process`] runner, the container
//! [`engine`], file-system helpers ([`fs`]) and the host packages it needs ([`deps`]).

pub mod deps;
pub mod engine;
pub mod fs;
pub mod process;
pub mod skopeo;
