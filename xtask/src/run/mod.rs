//! Executing a plan: the [`pipeline`] turns jobs into work, the [`schedule`]r runs it on
//! a bounded pool, [`progress`] reports through a small trait, [`fingerprint`]s decide
//! what is fresh, and [`layout`] says where everything lives in the output directory.

pub mod fingerprint;
pub mod jobs;
pub mod jobserver;
pub mod layout;
pub mod pipeline;
pub mod progress;
pub mod results;
pub mod schedule;
