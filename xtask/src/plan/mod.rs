//! Plan first, execute second: kernels.toml and `modules/` turned into a sorted list of
//! jobs with their dependencies, for the whole pipeline: toolchains, compiles, depmod,
//! the image layer, images, pushes, load tests and checks. Pure: reads nothing, starts
//! nothing. Every command is a view of this one plan ([`Scope`] says which jobs it
//! wants); `matrix` and `kmm` read it too, and [`inputs`] says what changed.

pub mod inputs;

use std::collections::BTreeMap;
use std::fmt;

use anyhow::Result;

use crate::config::modules::Module;
use crate::config::{Base, Config, Kernel, Toolchain, ToolchainSource};

pub struct Plan<'c> {
    pub config: &'c Config,
    pub scope: Scope,
    pub kernels: Vec<KernelPlan<'c>>,
    /// Every job, each after the jobs it depends on.
    pub jobs: Vec<Job>,
}

/// Which parts of the pipeline a command wants. Each command is a view of one plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// Toolchains, compiles and depmod: the staging trees.
    pub build: bool,
    /// The kmod images (on top of the build).
    pub image: bool,
    /// Pushing the images (on top of `image`).
    pub push: bool,
    /// The QEMU load test (on top of the build; it needs kmodforge's layer, not the base).
    pub test: bool,
    /// The static checks of what is already there (builds nothing by itself).
    pub verify: bool,
    /// The in-cluster build's builder images (pushed too with `push`), instead of trees.
    pub builders: bool,
    /// A kernel gets a staging tree only when all its modules built (a CI gate);
    /// otherwise every kernel ships what built.
    pub all_or_nothing: bool,
}

impl Scope {
    pub fn build() -> Scope {
        Scope {
            build: true,
            ..Scope::default()
        }
    }

    pub fn image(push: bool) -> Scope {
        Scope {
            image: true,
            push,
            ..Scope::build()
        }
    }

    pub fn test() -> Scope {
        Scope {
            test: true,
            ..Scope::build()
        }
    }

    pub fn builders(push: bool) -> Scope {
        Scope {
            builders: true,
            push,
            ..Scope::default()
        }
    }

    pub fn verify() -> Scope {
        Scope {
            verify: true,
            ..Scope::default()
        }
    }

    /// Everything CI runs for a kernel: what `matrix --changed-since` compares.
    pub fn everything() -> Scope {
        Scope {
            build: true,
            image: true,
            push: true,
            test: true,
            verify: false,
            builders: false,
            all_or_nothing: false,
        }
    }
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
    /// The distinct sets of extra toolchain packages its modules ask for: one derived
    /// toolchain image each.
    pub package_sets: Vec<Vec<String>>,
}

impl KernelPlan<'_> {
    pub fn kver(&self) -> &str {
        &self.kernel.version
    }

    /// The index in `package_sets` of module `m`'s packages, if it asks for any.
    pub fn package_set(&self, m: usize) -> Option<usize> {
        let wanted = package_names(self.modules[m]);
        (!wanted.is_empty()).then(|| {
            self.package_sets
                .iter()
                .position(|s| *s == wanted)
                .expect("every module's set is planned")
        })
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
    /// Derive from the kernel's toolchain an image with the extra packages of set `set`
    /// (an index into the kernel's `package_sets`).
    Packages { kernel: usize, set: usize },
    /// Build module `module` (an index into the kernel's `modules`) for kernel `kernel`.
    Compile { kernel: usize, module: usize },
    /// Assemble kernel `kernel`'s staging tree from what built and run depmod on it.
    Depmod { kernel: usize },
    /// Check the staging tree and write kmodforge's image layer from it.
    Layer { kernel: usize },
    /// Find (or make) the `[image] base`, once for every kernel of the run.
    ImageBase,
    /// The kernel's kmod image: the base plus kmodforge's layer, as an OCI layout.
    Image { kernel: usize },
    /// Push the kernel's image to its registry.
    Push { kernel: usize },
    /// Boot the kernel under QEMU and load the layer's modules as KMM does.
    LoadTest { kernel: usize },
    /// The static checks of the kernel's staging tree and image.
    Verify { kernel: usize },
    /// The kernel's builder image for the in-cluster build.
    Builder { kernel: usize },
    /// Push the kernel's builder image.
    BuilderPush { kernel: usize },
}

impl JobKind {
    /// The kernel (an index into the plan's kernels) the job is for, if any.
    pub fn kernel(&self) -> Option<usize> {
        match self {
            JobKind::Base { .. } | JobKind::ImageBase => None,
            JobKind::Toolchain { kernel }
            | JobKind::Packages { kernel, .. }
            | JobKind::Compile { kernel, .. }
            | JobKind::Depmod { kernel }
            | JobKind::Layer { kernel }
            | JobKind::Image { kernel }
            | JobKind::Push { kernel }
            | JobKind::LoadTest { kernel }
            | JobKind::Verify { kernel }
            | JobKind::Builder { kernel }
            | JobKind::BuilderPush { kernel } => Some(*kernel),
        }
    }

    /// The job's name in labels, logs and the summary table's header (a module's own
    /// name for a compile).
    pub fn step(&self) -> &'static str {
        match self {
            JobKind::Base { .. } => "base",
            JobKind::Toolchain { .. } => "toolchain",
            JobKind::Packages { .. } => "packages",
            JobKind::Compile { .. } => "compile",
            JobKind::Depmod { .. } => "depmod",
            JobKind::Layer { .. } => "layer",
            JobKind::ImageBase => "image base",
            JobKind::Image { .. } => "image",
            JobKind::Push { .. } => "push",
            JobKind::LoadTest { .. } => "test",
            JobKind::Verify { .. } => "verify",
            JobKind::Builder { .. } => "builder",
            JobKind::BuilderPush { .. } => "builder push",
        }
    }
}

/// Names a module folder may not have: they name the pipeline's own steps in labels,
/// logs and the summary table.
pub const RESERVED_NAMES: &[&str] = &[
    "toolchain",
    "depmod",
    "layer",
    "image",
    "push",
    "test",
    "verify",
    "qemu-console",
    "rust-analyzer",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub kind: JobKind,
    /// Jobs that must succeed first; each index smaller than this job's.
    pub deps: Vec<usize>,
    /// Jobs that must settle first but may fail without stopping this one (a kernel's
    /// depmod runs with the modules that built); each index smaller than this job's.
    pub after: Vec<usize>,
}

impl<'c> Plan<'c> {
    /// Plans every kernel, or only `only` (a kernel version from kernels.toml), for the
    /// parts of the pipeline `scope` wants.
    pub fn new(config: &'c Config, only: Option<&str>, scope: Scope) -> Result<Plan<'c>> {
        let selected: Vec<&Kernel> = match only {
            Some(kver) => vec![config.kernel(kver)?],
            None => config.kernels.iter().collect(),
        };
        let kernels = selected
            .into_iter()
            .map(|kernel| {
                let modules = config.modules_for(kernel);
                let mut package_sets: Vec<Vec<String>> = modules
                    .iter()
                    .map(|m| package_names(m))
                    .filter(|s| !s.is_empty())
                    .collect();
                package_sets.sort();
                package_sets.dedup();
                KernelPlan {
                    kernel,
                    toolchain: &config.toolchains[&kernel.toolchain],
                    excluded: config
                        .modules
                        .iter()
                        .filter(|m| !config.selects(kernel, m))
                        .collect(),
                    modules,
                    package_sets,
                }
            })
            .collect();
        let mut plan = Plan {
            config,
            scope,
            kernels,
            jobs: Vec::new(),
        };
        plan.add_jobs();
        Ok(plan)
    }

    fn push(&mut self, kind: JobKind, deps: Vec<usize>, after: Vec<usize>) -> usize {
        self.jobs.push(Job { kind, deps, after });
        self.jobs.len() - 1
    }

    fn add_jobs(&mut self) {
        let scope = self.scope;
        let needs_tree = scope.build || scope.image || scope.test;
        let mut bases: BTreeMap<String, usize> = BTreeMap::new();
        let mut image_base = None;
        for k in 0..self.kernels.len() {
            if !needs_tree && !scope.builders {
                self.push(JobKind::Verify { kernel: k }, vec![], vec![]);
                continue;
            }
            let toolchain = self.add_toolchain(k, &mut bases);
            if scope.builders {
                self.add_builder(k, toolchain);
                continue;
            }
            let depmod = self.add_build(k, toolchain);
            if !(scope.image || scope.test) {
                continue;
            }
            let layer = self.push(JobKind::Layer { kernel: k }, vec![depmod], vec![]);
            if scope.test {
                self.push(
                    JobKind::LoadTest { kernel: k },
                    vec![layer, toolchain],
                    vec![],
                );
            }
            if scope.image {
                let base = *image_base
                    .get_or_insert_with(|| self.push(JobKind::ImageBase, vec![], vec![]));
                let image = self.push(JobKind::Image { kernel: k }, vec![layer, base], vec![]);
                if scope.push {
                    self.push(JobKind::Push { kernel: k }, vec![image], vec![]);
                }
            }
        }
    }

    /// The kernel's toolchain job, after its recipe's base job (shared by kernels).
    fn add_toolchain(&mut self, k: usize, bases: &mut BTreeMap<String, usize>) -> usize {
        let mut deps = Vec::new();
        if let ToolchainSource::Recipe(r) = &self.kernels[k].toolchain.source
            && let Some(base) = &r.base
        {
            let id = match bases.get(&base.image) {
                Some(id) => *id,
                None => {
                    let id = self.push(JobKind::Base { base: base.clone() }, vec![], vec![]);
                    bases.insert(base.image.clone(), id);
                    id
                }
            };
            deps.push(id);
        }
        self.push(JobKind::Toolchain { kernel: k }, deps, vec![])
    }

    /// The kernel's derived toolchains, one per package set.
    fn add_packages(&mut self, k: usize, toolchain: usize) -> Vec<usize> {
        (0..self.kernels[k].package_sets.len())
            .map(|set| {
                self.push(
                    JobKind::Packages { kernel: k, set },
                    vec![toolchain],
                    vec![],
                )
            })
            .collect()
    }

    /// The kernel's builder image (after its toolchain and package sets, whose
    /// packages it holds) and its push.
    fn add_builder(&mut self, k: usize, toolchain: usize) {
        let mut deps = vec![toolchain];
        deps.extend(self.add_packages(k, toolchain));
        let builder = self.push(JobKind::Builder { kernel: k }, deps, vec![]);
        if self.scope.push {
            self.push(JobKind::BuilderPush { kernel: k }, vec![builder], vec![]);
        }
    }

    /// The kernel's derived toolchains, compile jobs (users after their exporters) and
    /// its depmod job, which runs with whatever built unless the scope is all-or-nothing.
    fn add_build(&mut self, k: usize, toolchain: usize) -> usize {
        let sets = self.add_packages(k, toolchain);
        let mut compiles: Vec<usize> = Vec::new();
        for m in 0..self.kernels[k].modules.len() {
            let module = self.kernels[k].modules[m];
            let mut deps = vec![toolchain];
            if let Some(set) = self.kernels[k].package_set(m) {
                deps.push(sets[set]);
            }
            for d in &module.depends {
                let i = self.kernels[k]
                    .module_index(d)
                    .expect("dependencies are selected with their users");
                deps.push(compiles[i]);
            }
            compiles.push(self.push(
                JobKind::Compile {
                    kernel: k,
                    module: m,
                },
                deps,
                vec![],
            ));
        }
        if self.scope.all_or_nothing {
            let mut deps = vec![toolchain];
            deps.extend(&compiles);
            self.push(JobKind::Depmod { kernel: k }, deps, vec![])
        } else {
            self.push(JobKind::Depmod { kernel: k }, vec![toolchain], compiles)
        }
    }

    pub fn label(&self, job: &Job) -> JobLabel {
        let kernel = job
            .kind
            .kernel()
            .map(|k| self.kernels[k].kver().to_string());
        let name = match &job.kind {
            JobKind::Base { base } => format!("base {}", base.image),
            JobKind::Packages { kernel, set } => {
                format!(
                    "packages {}",
                    self.kernels[*kernel].package_sets[*set].join(",")
                )
            }
            JobKind::Compile { kernel, module } => {
                self.kernels[*kernel].modules[*module].name.clone()
            }
            other => other.step().to_string(),
        };
        JobLabel { kernel, name }
    }

    /// The jobs of kernel `k`, in plan order.
    pub fn jobs_of(&self, k: usize) -> impl Iterator<Item = (usize, &Job)> {
        self.jobs
            .iter()
            .enumerate()
            .filter(move |(_, j)| j.kind.kernel() == Some(k))
    }
}

/// The names of the extra toolchain packages a module asks for, sorted.
fn package_names(m: &Module) -> Vec<String> {
    m.packages.iter().map(|p| p.name.clone()).collect()
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

    fn labels(plan: &Plan) -> Vec<String> {
        plan.jobs
            .iter()
            .map(|j| plan.label(j).to_string())
            .collect()
    }

    #[test]
    fn plans_every_kernel_module_pair_in_dependency_order() {
        let (_d, cfg) = config();
        let plan = Plan::new(&cfg, None, Scope::build()).unwrap();
        assert_eq!(
            labels(&plan),
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
        // depmod needs the toolchain, and runs after the compiles whatever they did.
        assert_eq!(plan.jobs[9].deps, [6]);
        assert_eq!(plan.jobs[9].after, [7, 8]);
        for (i, j) in plan.jobs.iter().enumerate() {
            assert!(
                j.deps.iter().chain(&j.after).all(|d| *d < i),
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
    fn all_or_nothing_makes_every_compile_a_hard_dependency_of_depmod() {
        let (_d, cfg) = config();
        let scope = Scope {
            all_or_nothing: true,
            ..Scope::build()
        };
        let plan = Plan::new(&cfg, Some("6.12.117+deb12-amd64"), scope).unwrap();
        assert_eq!(plan.jobs[4].deps, [1, 2, 3]);
        assert!(plan.jobs[4].after.is_empty());
    }

    #[test]
    fn each_command_is_a_view_of_the_one_pipeline() {
        let (_d, cfg) = config();
        let k = Some("6.12.117+deb12-amd64");
        let tail = |scope| {
            let plan = Plan::new(&cfg, k, scope).unwrap();
            labels(&plan)[5..].to_vec()
        };
        let at = |s: &str| format!("{s} @ 6.12.117+deb12-amd64");
        assert!(tail(Scope::build()).is_empty());
        assert_eq!(
            tail(Scope::image(true)),
            [at("layer"), "image base".into(), at("image"), at("push")]
        );
        // The load test needs kmodforge's layer and the kernel, never the image base.
        assert_eq!(tail(Scope::test()), [at("layer"), at("test")]);
        let plan = Plan::new(&cfg, k, Scope::test()).unwrap();
        assert_eq!(plan.jobs[6].deps, [5, 1]);
        // verify checks what is there: no build.
        let plan = Plan::new(&cfg, None, Scope::verify()).unwrap();
        assert_eq!(
            labels(&plan),
            ["verify @ 6.1.0-47-amd64", "verify @ 6.12.117+deb12-amd64"]
        );
        // One image base for every kernel of a run.
        let plan = Plan::new(&cfg, None, Scope::image(false)).unwrap();
        let bases = plan
            .jobs
            .iter()
            .filter(|j| j.kind == JobKind::ImageBase)
            .count();
        assert_eq!(bases, 1);
    }

    #[test]
    fn plans_one_kernel_or_explains_the_choices() {
        let (_d, cfg) = config();
        let plan = Plan::new(&cfg, Some("6.12.117+deb12-amd64"), Scope::build()).unwrap();
        assert_eq!(plan.kernels.len(), 1);
        assert_eq!(plan.jobs.len(), 5);
        let err = Plan::new(&cfg, Some("6.12.117"), Scope::build())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("not listed") && err.contains("6.1.0-47-amd64, 6.12.117+deb12-amd64"),
            "{err}"
        );
    }
}
