//! What the last build produced, as far as it still holds: each (kernel, module)'s
//! outcome, read from the compile records and checked against the plan's fingerprints,
//! so that a consumer (the KMM manifests, the load test) never trusts a record of other
//! inputs. A stale or missing record is "not built", with the reason.

use std::path::Path;

use anyhow::Result;

use crate::config::modules::Module;
use crate::plan::{JobKind, Plan, inputs};
use crate::run::layout::Layout;
use crate::steps::compile::{Record, Records};

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
        Ok(Results::with_fingerprints(
            plan,
            layout,
            &inputs::fingerprints(plan)?,
        ))
    }

    /// The same, with the plan's fingerprints already at hand (a running pipeline's).
    pub fn with_fingerprints(plan: &Plan, layout: &Layout, fingerprints: &[String]) -> Results {
        let mut outcomes: Vec<Vec<Outcome>> = plan
            .kernels
            .iter()
            .map(|kp| vec![Outcome::NotBuilt; kp.modules.len()])
            .collect();
        let records: Vec<Records> = plan
            .kernels
            .iter()
            .map(|kp| Records::load(layout, kp.kver()))
            .collect();
        for (job, fp) in plan.jobs.iter().zip(fingerprints) {
            let JobKind::Compile { kernel, module } = job.kind else {
                continue;
            };
            let kp = &plan.kernels[kernel];
            let m = kp.modules[module];
            outcomes[kernel][module] = match plan.config.cannot_build(kp.kernel, m) {
                Some(why) => Outcome::Skipped(why),
                None => match records[kernel].fresh(layout, kp.kver(), &m.name, fp) {
                    Some(Record {
                        skipped: Some(why), ..
                    }) => Outcome::Skipped(why.clone()),
                    Some(r) => Outcome::Built {
                        modules: r.modules.clone(),
                        location: r.location.clone(),
                    },
                    None => Outcome::NotBuilt,
                },
            };
        }
        Results { outcomes }
    }

    /// The module folders of kernel `k` whose `.ko` files the staging tree `staging`
    /// (its `lib/modules/<kver>`) holds: built from the current inputs, each file in its
    /// place. What ships with a module (its firmware) ships with these only.
    pub fn in_tree<'c>(&self, plan: &Plan<'c>, k: usize, staging: &Path) -> Vec<&'c Module> {
        plan.kernels[k]
            .modules
            .iter()
            .zip(&self.outcomes[k])
            .filter(|(_, o)| match o {
                Outcome::Built { modules, location } => {
                    !modules.is_empty()
                        && modules
                            .iter()
                            .all(|ko| staging.join(location).join(ko).is_file())
                }
                _ => false,
            })
            .map(|(m, _)| *m)
            .collect()
    }

    /// The outcome of module folder `name` for kernel `k` (`None`: not planned there).
    pub fn of(&self, plan: &Plan, k: usize, name: &str) -> Option<&Outcome> {
        plan.kernels[k]
            .module_index(name)
            .map(|m| &self.outcomes[k][m])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Scope;

    #[test]
    fn only_modules_built_from_the_current_inputs_and_in_the_tree_are_in_it() {
        let (d, c) = crate::testing::scratch(
            "[defaults]\ntoolchain = \"deb\"\n[toolchains.deb]\nrecipe = \"images/tc.Containerfile\"\n\
             [[kernel]]\nversion = \"6.1.0-47-amd64\"\n",
            &[
                ("built", None),
                ("stale", None),
                ("gone", None),
                ("never", None),
            ],
        );
        let c = c.unwrap();
        let plan = Plan::new(&c, None, Scope::build()).unwrap();
        let layout = Layout::new(&d.path().join("out")).unwrap();
        let fingerprints = inputs::fingerprints(&plan).unwrap();
        let kver = "6.1.0-47-amd64";
        let staging = layout.staging_modules(kver);
        for (job, fp) in plan.jobs.iter().zip(&fingerprints) {
            let JobKind::Compile { module, .. } = job.kind else {
                continue;
            };
            let name = &plan.kernels[0].modules[module].name;
            let ko = format!("{name}.ko");
            let record = Record {
                fingerprint: if name == "stale" {
                    "old".into()
                } else {
                    fp.clone()
                },
                modules: vec![ko.clone()],
                location: String::new(),
                skipped: None,
                package: None,
                bytes: 0,
                unstripped_bytes: 0,
            };
            if name == "never" {
                continue;
            }
            record.save(&layout, kver, name).unwrap();
            let artifacts = layout.artifacts(kver, name);
            for file in [artifacts.join(&ko), artifacts.join("unstripped").join(&ko)] {
                crate::host::fs::write_atomic(&file, b"ko").unwrap();
            }
            if name != "gone" {
                crate::host::fs::write_atomic(&staging.join(&ko), b"ko").unwrap();
            }
        }
        let results = Results::with_fingerprints(&plan, &layout, &fingerprints);
        let names: Vec<&str> = results
            .in_tree(&plan, 0, &staging)
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(names, ["built"]);
    }
}
