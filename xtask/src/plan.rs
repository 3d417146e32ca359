//! Plan first, execute second: kernels.toml and `modules/` turned into a sorted list of
//! jobs with their dependencies. Pure: reads nothing, starts nothing. `build-all`
//! executes this plan, `matrix` serializes it for CI, `kmm` writes manifests from it.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::Result;

use crate::config::modules::Module;
use crate::config::{Base, Config, Kernel, Toolchain, ToolchainSource};

pub struct Plan<'c> {
    pub config: &'c Config,
    pub kernels: Vec<KernelPlan<'c>>,
    /// Every job, each after the jobs it depends on.
    pub jobs: Vec<Job>,
}

/// What is built for one kernel.
pub struct KernelPlan<'c> {
    pub kernel: &'c Kernel,
    pub toolchain: &'c Toolchain,
    /// Modules built for this kernel, exporters before their users.
    pub modules: Vec<&'c Module>,
    /// Modules this kernel does not build (its `modules` list or their `kernels`
    /// expression leaves them out).
    pub excluded: Vec<&'c Module>,
}

impl KernelPlan<'_> {
    pub fn kver(&self) -> &str {
        &self.kernel.version
    }

    pub fn module_index(&self, name: &str) -> Option<usize> {
        self.modules.iter().position(|m| m.name == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// Make sure a recipe's base image is in local storage (bootstrap or pull it).
    Base { base: Base },
    /// Build or pull kernel `kernel`'s toolchain image and probe it.
    Toolchain { kernel: usize },
    /// Build module `module` (an index into the kernel's `modules`) for kernel `kernel`.
    Compile { kernel: usize, module: usize },
    /// Assemble kernel `kernel`'s staging tree and run depmod on it.
    Depmod { kernel: usize },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub kind: JobKind,
    /// Indices of the jobs that must finish first; always smaller than this job's.
    pub deps: Vec<usize>,
}

impl<'c> Plan<'c> {
    /// Plans every kernel, or only `only` (a kernel version from kernels.toml).
    pub fn new(config: &'c Config, only: Option<&str>) -> Result<Plan<'c>> {
        let selected: Vec<&Kernel> = match only {
            Some(kver) => vec![config.kernel(kver)?],
            None => config.kernels.iter().collect(),
        };
        let kernels: Vec<KernelPlan> = selected
            .into_iter()
            .map(|kernel| {
                let modules = config.modules_for(kernel);
                let excluded = config
                    .modules
                    .iter()
                    .filter(|m| !config.selects(kernel, m))
                    .collect();
                KernelPlan {
                    kernel,
                    toolchain: &config.toolchains[&kernel.toolchain],
                    modules,
                    excluded,
                }
            })
            .collect();

        let mut jobs = Vec::new();
        let mut base_jobs: BTreeMap<String, usize> = BTreeMap::new();
        for (k, kp) in kernels.iter().enumerate() {
            let mut tc_deps = Vec::new();
            if let ToolchainSource::Recipe(r) = &kp.toolchain.source
                && let Some(base) = &r.base
            {
                let id = *base_jobs.entry(base.image.clone()).or_insert_with(|| {
                    jobs.push(Job {
                        kind: JobKind::Base { base: base.clone() },
                        deps: vec![],
                    });
                    jobs.len() - 1
                });
                tc_deps.push(id);
            }
            jobs.push(Job {
                kind: JobKind::Toolchain { kernel: k },
                deps: tc_deps,
            });
            let toolchain_job = jobs.len() - 1;
            let mut compile_jobs: Vec<usize> = Vec::new();
            for (m, module) in kp.modules.iter().enumerate() {
                let mut deps = vec![toolchain_job];
                for d in &module.depends {
                    let i = kp
                        .module_index(d)
                        .expect("dependencies are selected with their users");
                    deps.push(compile_jobs[i]);
                }
                jobs.push(Job {
                    kind: JobKind::Compile {
                        kernel: k,
                        module: m,
                    },
                    deps,
                });
                compile_jobs.push(jobs.len() - 1);
            }
            let mut deps = vec![toolchain_job];
            deps.extend(&compile_jobs);
            jobs.push(Job {
                kind: JobKind::Depmod { kernel: k },
                deps,
            });
        }
        Ok(Plan {
            config,
            kernels,
            jobs,
        })
    }

    pub fn label(&self, job: &Job) -> JobLabel {
        match &job.kind {
            JobKind::Base { base } => JobLabel {
                kernel: None,
                name: format!("base {}", base.image),
            },
            JobKind::Toolchain { kernel } => JobLabel {
                kernel: Some(self.kernels[*kernel].kver().into()),
                name: "toolchain".into(),
            },
            JobKind::Compile { kernel, module } => {
                let kp = &self.kernels[*kernel];
                JobLabel {
                    kernel: Some(kp.kver().into()),
                    name: kp.modules[*module].name.clone(),
                }
            }
            JobKind::Depmod { kernel } => JobLabel {
                kernel: Some(self.kernels[*kernel].kver().into()),
                name: "depmod".into(),
            },
        }
    }
}

/// How a job is named in progress lines, logs and the summary.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct JobLabel {
    pub kernel: Option<String>,
    pub name: String,
}

impl fmt::Display for JobLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kernel {
            Some(k) => write!(f, "{} @ {k}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> (tempfile::TempDir, Config) {
        let (d, c) = crate::testing::scratch(
            "[defaults]\ntoolchain = \"deb\"\n\
             [toolchains.deb]\nrecipe = \"images/tc.Containerfile\"\nbase = \"localhost/b\"\n\
             [[kernel]]\nversion = \"6.1.0-47-amd64\"\n\
             [[kernel]]\nversion = \"6.12.117+deb12-amd64\"\n",
            &[
                ("exp", None),
                ("user", Some("depends = [\"exp\"]\n")),
                ("only61", Some("kernels = '^6\\.1\\.'\n")),
            ],
        );
        (d, c.unwrap())
    }

    #[test]
    fn plans_every_kernel_module_pair_in_dependency_order() {
        let (_d, cfg) = config();
        let plan = Plan::new(&cfg, None).unwrap();
        let labels: Vec<String> = plan
            .jobs
            .iter()
            .map(|j| plan.label(j).to_string())
            .collect();
        assert_eq!(
            labels,
            [
                "base localhost/b",
                "toolchain @ 6.1.0-47-amd64",
                "exp @ 6.1.0-47-amd64",
                "only61 @ 6.1.0-47-amd64",
                "user @ 6.1.0-47-amd64",
                "depmod @ 6.1.0-47-amd64",
                "toolchain @ 6.12.117+deb12-amd64",
                "exp @ 6.12.117+deb12-amd64",
                "user @ 6.12.117+deb12-amd64",
                "depmod @ 6.12.117+deb12-amd64",
            ]
        );
        // One base job shared by both toolchains; users wait for their exporters.
        assert_eq!(plan.jobs[6].deps, [0]);
        assert_eq!(plan.jobs[4].deps, [1, 2]);
        assert_eq!(plan.jobs[9].deps, [6, 7, 8]);
        for (i, j) in plan.jobs.iter().enumerate() {
            assert!(
                j.deps.iter().all(|d| *d < i),
                "job {i} depends on a later job"
            );
        }
        assert_eq!(
            plan.kernels[1]
                .excluded
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["only61"]
        );
    }

    #[test]
    fn plans_one_kernel_or_explains_the_choices() {
        let (_d, cfg) = config();
        let plan = Plan::new(&cfg, Some("6.12.117+deb12-amd64")).unwrap();
        assert_eq!(plan.kernels.len(), 1);
        assert_eq!(plan.jobs.len(), 5);
        let err = Plan::new(&cfg, Some("6.12.117")).err().unwrap().to_string();
        assert!(
            err.contains("not listed") && err.contains("6.1.0-47-amd64, 6.12.117+deb12-amd64"),
            "{err}"
        );
    }
}
