//! File formats kmodforge reads and writes: [`oci`] image layouts and layers, the
//! load test's [`initramfs`], and the `.modinfo` of kernel modules ([`modinfo`]).

pub mod initramfs;
pub mod modinfo;
pub mod oci;
