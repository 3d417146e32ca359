//! What leaves kmodforge for other systems, generated from the same plan: the CI
//! [`matrix`] and [`workflow`], and the [`kmm`] manifests a cluster applies.

pub mod kmm;
pub mod matrix;
pub mod workflow;
