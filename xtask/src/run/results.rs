//! What the last build produced, as far as it still holds: each (kernel, module)'s
//! outcome, read from the compile records and checked against the plan's fingerprints,
//! so that a consumer (the KMM manifests, the load test) never trusts a record of other
//! inputs. A stale or missing record is "not built", with the reason.

use anyhow::Result;

use crate::plan::{JobKind, Plan, inputs};
use crate::run::layout::Layout;
use crate::steps::compile::Record;

/// One module folder's outcome for one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Built from the current inputs: the `.ko` file names, where they go in the tree.
    Built {
        modules: Vec<String>,
        location: String,
    },
    /// Deliberately not built (a BUILD_EXCLUSIVE_*, a Rust module for a kernel without
    /// Rust), with the reason.
    Skipped(String),
    /// No record of a build from the current inputs: never built, failed, or changed since.
    NotBuilt,
}

/// The outcome of every (kernel, module) pair of a plan, by plan indices.
pub struct Results {
    pub outcomes: Vec<Vec<Outcome>>,
}

impl Results {
    pub fn read(plan: &Plan, layout: &Layout) -> Result<Results> {
        let fingerprints = inputs::fingerprints(plan)?;
        let mut outcomes: Vec<Vec<Outcome>> = plan
            .kernels
            .iter()
            .map(|kp| vec![Outcome::NotBuilt; kp.modules.len()])
            .collect();
        for (job, fp) in plan.jobs.iter().zip(&fingerprints) {
            let JobKind::Compile { kernel, module } = job.kind else {
                continue;
            };
            let kp = &plan.kernels[kernel];
            let m = kp.modules[module];
            outcomes[kernel][module] = match plan.config.cannot_build(kp.kernel, m) {
                Some(why) => Outcome::Skipped(why),
                None => match Record::fresh(layout, kp.kver(), &m.name, fp) {
                    Some(Record {
                        skipped: Some(why), ..
                    }) => Outcome::Skipped(why),
                    Some(r) => Outcome::Built {
                        modules: r.modules,
                        location: r.location,
                    },
                    None => Outcome::NotBuilt,
                },
            };
        }
        Ok(Results { outcomes })
    }

    /// The outcome of module folder `name` for kernel `k` (`None`: not planned there).
    pub fn of(&self, plan: &Plan, k: usize, name: &str) -> Option<&Outcome> {
        plan.kernels[k]
            .module_index(name)
            .map(|m| &self.outcomes[k][m])
    }
}
