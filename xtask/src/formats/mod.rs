//! File formats kmodforge reads and writes: [`oci`] image layouts and layers, the
//! load test's [`initramfs`], the `.modinfo` of kernel modules ([`modinfo`]) and the
//! signature appended to them ([`modsig`]).

pub mod initramfs;
pub mod modinfo;
pub mod modsig;
pub mod oci;
