//! What each kind of job does when the pipeline runs it: a thin adapter from a job of
//! the plan to its step in `steps/`, with the shared state of the run ([`Context`]):
//! the toolchains' probe results, the image base, the images made.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context as _, Result};

use crate::config::HostLink;
use crate::config::envsubst::normalize as normalize_tag;
use crate::host::engine::{Engine, EngineKind};
use crate::plan::{JobKind, Plan};
use crate::run::jobserver::Jobserver;
use crate::run::layout::Layout;
use crate::run::pipeline::Options;
use crate::run::progress::Status;
use crate::run::results::Results;
use crate::steps::builder;
use crate::steps::compile::{Compile, MakeJobs, Records};
use crate::steps::image::{BuiltImage, LayerRecord, Provenance};
use crate::steps::image_base::BaseImage;
use crate::steps::toolchain::{self, Facts};
use crate::steps::{depmod, image, image_base, kernel_files, loadtest, publish, verify};

/// Counts a job as running until dropped.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The state one run shares between its jobs.
pub struct Context<'a> {
    pub plan: &'a Plan<'a>,
    pub engine: &'a Engine,
    pub layout: &'a Layout,
    pub options: &'a Options,
    pub fingerprints: Vec<String>,
    /// Where the images' files come from (times, revision); for runs that make layers.
    pub provenance: Option<Provenance>,
    /// Each kernel's toolchain, once its job has probed it.
    facts: Vec<OnceLock<Facts>>,
    /// Each kernel's compile records as the run found them, read once for the
    /// freshness checks of all its compiles.
    records: Vec<OnceLock<Records>>,
    /// The derived toolchains, by (kernel, package set).
    derived: Mutex<BTreeMap<(usize, usize), Facts>>,
    base: OnceLock<BaseImage>,
    images: Vec<OnceLock<BuiltImage>>,
    /// Lines for the user about a job (an image's digest, a push), by job index.
    pub details: Mutex<BTreeMap<usize, Vec<String>>>,
    /// The make jobserver the compiles share (with podman).
    pub jobserver: Option<Jobserver>,
    /// How many jobs are running, for a compile's share of `-j` without a jobserver.
    busy: AtomicUsize,
}

impl<'a> Context<'a> {
    pub fn new(
        plan: &'a Plan<'a>,
        engine: &'a Engine,
        layout: &'a Layout,
        options: &'a Options,
        fingerprints: Vec<String>,
        provenance: Option<Provenance>,
    ) -> Context<'a> {
        let n = plan.kernels.len();
        Context {
            plan,
            engine,
            layout,
            options,
            fingerprints,
            provenance,
            facts: (0..n).map(|_| OnceLock::new()).collect(),
            records: (0..n).map(|_| OnceLock::new()).collect(),
            derived: Mutex::new(BTreeMap::new()),
            base: OnceLock::new(),
            images: (0..n).map(|_| OnceLock::new()).collect(),
            details: Mutex::new(BTreeMap::new()),
            jobserver: (engine.kind == EngineKind::Podman)
                .then(|| Jobserver::new(options.jobs).ok())
                .flatten(),
            busy: AtomicUsize::new(0),
        }
    }

    /// The job's log file (cleared before it runs).
    pub fn log(&self, i: usize) -> PathBuf {
        let job = &self.plan.jobs[i];
        let label = self.plan.label(job);
        let name = match &job.kind {
            JobKind::Base { base } => normalize_tag(&base.image),
            JobKind::ImageBase => "image-base".into(),
            JobKind::LoadTest { .. } => "loadtest".into(),
            JobKind::Packages { set, .. } => format!("packages-{set}"),
            _ => label.name,
        };
        self.layout
            .log(label.kernel.as_deref().unwrap_or("_base"), &name)
    }

    fn note(&self, i: usize, line: String) {
        self.details
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(i)
            .or_default()
            .push(line);
    }

    fn kver(&self, k: usize) -> &str {
        self.plan.kernels[k].kver()
    }

    fn facts(&self, k: usize) -> &Facts {
        self.facts[k].get().expect("the toolchain job ran first")
    }

    /// Runs job `i`, given the statuses of its dependencies (hard, then soft).
    pub fn work(&self, i: usize, deps: &[Status]) -> Status {
        let job = &self.plan.jobs[i];
        // A skip propagates as a skip: what needs a skipped job is skipped too (depmod
        // builds a tree of what built, skips included, and decides for itself).
        let hard = &deps[..job.deps.len()];
        if !matches!(job.kind, JobKind::Depmod { .. })
            && let Some((d, _)) = job
                .deps
                .iter()
                .zip(hard)
                .find(|(_, s)| matches!(s, Status::Skipped(_)))
        {
            let name = self.plan.label(&self.plan.jobs[*d]).name;
            return Status::Skipped(format!("needs {name}, which is skipped"));
        }
        let log = self.log(i);
        self.busy.fetch_add(1, Ordering::SeqCst);
        let _running = Running(&self.busy);
        let result = match &job.kind {
            JobKind::Base { base } => toolchain::ensure_base(
                self.engine,
                base,
                self.plan.config.tls_verify(&base.image),
                &log,
            )
            .map(|_| Status::Done),
            JobKind::Toolchain { kernel } => self.toolchain(*kernel, &log),
            JobKind::Packages { kernel, set } => self.packages(i, *kernel, *set, &log),
            JobKind::Compile { kernel, module } => self.compile(i, *kernel, *module, &log),
            // Its compiles' statuses, whether hard (all-or-nothing) or soft dependencies:
            // everything after the toolchain's.
            JobKind::Depmod { kernel } => self.depmod(i, *kernel, &deps[1..], &log),
            JobKind::Layer { kernel } => self.layer(i, *kernel),
            JobKind::ImageBase => self.image_base(&log),
            JobKind::Image { kernel } => self.image(i, *kernel, &log),
            JobKind::Push { kernel } => self.push(i, *kernel, &log),
            JobKind::LoadTest { kernel } => self.load_test(i, *kernel, &log),
            JobKind::Verify { kernel } => self.verify(i, *kernel),
            JobKind::Builder { kernel } => self.builder(i, *kernel, &log),
            JobKind::BuilderPush { kernel } => self.builder_push(i, *kernel, &log),
        };
        result.unwrap_or_else(|e| Status::Failed(format!("{e:#}")))
    }

    fn toolchain(&self, k: usize, log: &std::path::Path) -> Result<Status> {
        let kp = &self.plan.kernels[k];
        let fingerprint = toolchain::fingerprint(kp.toolchain, kp.kver())?;
        let facts = toolchain::ensure(
            self.engine,
            self.layout,
            self.plan.config,
            kp.kernel,
            &fingerprint,
            log,
        )?;
        let _ = self.facts[k].set(facts);
        Ok(Status::Done)
    }

    fn packages(&self, i: usize, k: usize, set: usize, log: &std::path::Path) -> Result<Status> {
        let kp = &self.plan.kernels[k];
        let packages = &kp.package_sets[set];
        match toolchain::ensure_packages(
            self.engine,
            self.layout,
            self.facts(k),
            packages,
            &self.fingerprints[i],
            log,
        ) {
            Ok(facts) => {
                self.derived
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((k, set), facts);
                Ok(Status::Done)
            }
            Err(e) => {
                let missing = toolchain::missing_packages(log, packages);
                if missing.is_empty() {
                    return Err(e);
                }
                let wanted_at: Vec<String> = kp
                    .modules
                    .iter()
                    .flat_map(|m| &m.packages)
                    .filter(|p| missing.contains(&p.name))
                    .map(|p| {
                        format!(
                            "{}: package {} does not exist in the archive of kernel {}'s toolchain",
                            p.at,
                            p.name,
                            kp.kver()
                        )
                    })
                    .collect();
                Err(e.context(format!(
                    "{}\n  help: check the package names (`apt-cache search <name>` in the toolchain), or remove them",
                    wanted_at.join("\n")
                )))
            }
        }
    }

    fn compile(&self, i: usize, k: usize, m: usize, log: &std::path::Path) -> Result<Status> {
        let kp = &self.plan.kernels[k];
        let module = kp.modules[m];
        let derived;
        let f = match kp.package_set(m) {
            Some(set) => {
                derived = self.derived.lock().unwrap_or_else(|e| e.into_inner())[&(k, set)].clone();
                &derived
            }
            None => self.facts(k),
        };
        let compile = Compile {
            engine: self.engine,
            layout: self.layout,
            module,
            kver: kp.kver(),
            image: &f.image,
            kdir: &f.kernel_source_dir,
            kernel_has_rust: f.rust,
            deps: module.depends.iter().map(String::as_str).collect(),
            fingerprint: &self.fingerprints[i],
            signing: self.plan.config.signing.as_ref(),
            jobs: match &self.jobserver {
                Some(js) => MakeJobs::Server(js),
                None => {
                    let others = self.busy.load(Ordering::SeqCst).saturating_sub(1);
                    MakeJobs::Share(self.options.jobs.saturating_sub(others).max(1))
                }
            },
            log,
        };
        Ok(match compile.run()? {
            None => Status::Done,
            Some(reason) => Status::Skipped(reason),
        })
    }

    /// Gathers what built (the compiles that are done or fresh; `after` holds their
    /// statuses in the kernel's module order) and runs depmod on it.
    fn depmod(
        &self,
        i: usize,
        k: usize,
        compiles: &[Status],
        log: &std::path::Path,
    ) -> Result<Status> {
        let kp = &self.plan.kernels[k];
        let mut built = Vec::new();
        let mut missing = Vec::new();
        let records = Records::load(self.layout, kp.kver());
        for (m, status) in kp.modules.iter().zip(compiles) {
            match status {
                Status::Done | Status::Fresh => {
                    let rec = records
                        .get(&m.name)
                        .with_context(|| format!("no build record for {}", m.name))?;
                    built.push((m.name.clone(), rec.clone()));
                }
                Status::Skipped(_) => {}
                _ => missing.push(m.name.as_str()),
            }
        }
        if built.is_empty() && !missing.is_empty() {
            anyhow::bail!(
                "none of the kernel's modules built ({}), so it has no staging tree",
                missing.join(", ")
            );
        }
        if built.is_empty() {
            return Ok(Status::Skipped("no module is built for this kernel".into()));
        }
        // A tree without some modules is not the tree these inputs promise: record it
        // so that the next run builds again.
        let fingerprint = if missing.is_empty() {
            self.fingerprints[i].clone()
        } else {
            format!("partial, without {}", missing.join(" "))
        };
        let facts = self.facts(k);
        let link = match self.plan.config.image.host_link {
            HostLink::Always => true,
            HostLink::Never => false,
            HostLink::Auto => depmod::needs_in_tree(self.layout, kp.kver(), &built)?,
        };
        let files = match link {
            true => Some(self.kernel_files(k, log)?),
            false => None,
        };
        let host_modules = files.as_ref().map(|f| f.modules());
        let kernel = depmod::Kernel {
            kver: kp.kver(),
            image: &facts.image,
            kdir: &facts.kernel_source_dir,
            host_modules: host_modules.as_deref(),
        };
        depmod::run(self.engine, self.layout, &kernel, &built, &fingerprint, log)?;
        if !missing.is_empty() {
            self.note(
                i,
                format!("staging tree without {} (failed)", missing.join(", ")),
            );
        }
        Ok(Status::Done)
    }

    /// The kernel's own files (its image, its in-tree modules), through its toolchain.
    fn kernel_files(&self, k: usize, log: &std::path::Path) -> Result<kernel_files::KernelFiles> {
        let kp = &self.plan.kernels[k];
        let facts = self.facts(k);
        let fingerprint = toolchain::fingerprint(kp.toolchain, kp.kver())?;
        kernel_files::ensure(
            self.engine,
            self.layout,
            &facts.image,
            &fingerprint,
            kp.kver(),
            &facts.kernel_source_dir,
            log,
        )
    }

    fn layer(&self, i: usize, k: usize) -> Result<Status> {
        let epoch = self.provenance.as_ref().map_or(0, |p| p.epoch);
        // The firmware of the modules the tree holds, not of those that failed or were
        // skipped for this kernel.
        let results = Results::with_fingerprints(self.plan, self.layout, &self.fingerprints);
        let shipped = results.in_tree(self.plan, k, &self.layout.staging_modules(self.kver(k)));
        image::write_layer(
            self.plan.config,
            self.layout,
            self.kver(k),
            &shipped,
            epoch,
            &self.fingerprints[i],
        )?;
        Ok(Status::Done)
    }

    fn image_base(&self, log: &std::path::Path) -> Result<Status> {
        let epoch = self.provenance.as_ref().map_or(0, |p| p.epoch);
        let base = image_base::resolve(self.plan.config, self.engine, self.layout, epoch, log)?;
        let _ = self.base.set(base);
        Ok(Status::Done)
    }

    fn image(&self, i: usize, k: usize, log: &std::path::Path) -> Result<Status> {
        let base = self.base.get().expect("the image base job ran first");
        let provenance = self
            .provenance
            .as_ref()
            .expect("image runs have provenance");
        let built = image::assemble(
            self.plan.config,
            self.layout,
            self.kver(k),
            base,
            provenance,
        )?;
        self.note(i, format!("{} {}", built.reference, built.digest));
        if self.options.load {
            publish::load(self.engine, &built, log)?;
            self.note(i, format!("loaded into {}'s storage", self.engine.kind));
        }
        if let Some(dir) = &self.options.oci_archive {
            let path = dir.join(format!("{}.tar", built.tag));
            crate::formats::oci::archive(&built.dir, &path)?;
            self.note(
                i,
                format!("wrote {}", crate::config::diag::display_path(&path)),
            );
        }
        let _ = self.images[k].set(built);
        Ok(Status::Done)
    }

    fn push(&self, i: usize, k: usize, log: &std::path::Path) -> Result<Status> {
        let built = self.images[k].get().expect("the image job ran first");
        let (line, digest) = match publish::push(
            self.plan.config,
            built,
            self.options.force_push,
            log,
        )? {
            publish::Pushed::Pushed(digest) => {
                (format!("pushed {}@{digest}", built.reference), digest)
            }
            publish::Pushed::Identical(digest) => (
                format!(
                    "skipped push: {} already holds an image with the same content ({digest}); --force pushes anyway",
                    built.reference
                ),
                digest,
            ),
        };
        publish::PushRecord {
            fingerprint: self.fingerprints[i].clone(),
            reference: built.reference.clone(),
            digest,
        }
        .save(self.layout, &built.kver)?;
        self.note(i, line);
        Ok(Status::Done)
    }

    fn builder(&self, i: usize, k: usize, log: &std::path::Path) -> Result<Status> {
        let kp = &self.plan.kernels[k];
        let kernel = self.kernel_files(k, log)?;
        let mut packages: Vec<String> = kp.package_sets.concat();
        packages.sort();
        packages.dedup();
        let reference = builder::reference(self.plan.config, kp.kver())?;
        builder::build(
            self.engine,
            self.layout,
            &self.facts(k).image,
            &packages,
            &kernel,
            &reference,
            log,
        )?;
        self.note(i, format!("built {reference}"));
        Ok(Status::Done)
    }

    fn builder_push(&self, i: usize, k: usize, log: &std::path::Path) -> Result<Status> {
        let reference = builder::reference(self.plan.config, self.kver(k))?;
        builder::push(self.plan.config, self.engine, &reference, log)?;
        self.note(i, format!("pushed {reference}"));
        Ok(Status::Done)
    }

    fn load_test(&self, i: usize, k: usize, log: &std::path::Path) -> Result<Status> {
        let kp = &self.plan.kernels[k];
        let kernel = self.kernel_files(k, log)?;
        let report = loadtest::run(&loadtest::Request {
            config: self.plan.config,
            layout: self.layout,
            kver: kp.kver(),
            kernel: &kernel,
            image: self.options.image.as_deref(),
            timeout: self.options.boot_timeout,
            log,
            boot_args: &kp.kernel.boot_args,
        })?;
        if !kp.kernel.boot_args.is_empty() {
            self.note(i, format!("kernel command line: {}", report.command_line));
        }
        let firmware = match report.firmware.as_slice() {
            [] => String::new(),
            dirs => format!(", firmware from {}", dirs.join(" ")),
        };
        self.note(
            i,
            format!(
                "booted under QEMU with {}, {} modules ({} of the kernel's own){firmware}, {} MiB, {:.1} s wall; console: {}",
                report.accel,
                report.verdicts.len(),
                report.in_tree_modules,
                report.memory_mb,
                report.wall_seconds,
                crate::config::diag::display_path(&report.console)
            ),
        );
        match report.failures() {
            0 => Ok(Status::Done),
            n => Ok(Status::Failed(format!(
                "{n} of {} modules did not load and unload cleanly (see the load test table)",
                report.verdicts.len()
            ))),
        }
    }

    fn verify(&self, i: usize, k: usize) -> Result<Status> {
        let kver = self.kver(k);
        let sections = verify::kernel(
            self.plan.config,
            self.layout,
            kver,
            self.options.image.as_deref(),
        )?;
        let mut failed = 0;
        for (heading, checks) in &sections {
            self.note(i, heading.clone());
            for c in checks {
                self.note(
                    i,
                    format!(
                        "  {:<5} {:<13} {}",
                        if c.ok { "ok" } else { "FAIL" },
                        c.name,
                        c.detail
                    ),
                );
                failed += usize::from(!c.ok);
            }
        }
        Ok(match failed {
            0 => Status::Done,
            n => Status::Failed(format!("{n} check(s) failed")),
        })
    }

    /// The status a job can be settled with without running, from its record.
    pub fn fresh(&self, i: usize) -> Option<Status> {
        let fp = &self.fingerprints[i];
        match &self.plan.jobs[i].kind {
            JobKind::Compile { kernel, module } => {
                let kp = &self.plan.kernels[*kernel];
                let m = kp.modules[*module];
                if let Some(why) = self.plan.config.cannot_build(kp.kernel, m) {
                    return Some(Status::Skipped(why));
                }
                self.records[*kernel]
                    .get_or_init(|| Records::load(self.layout, kp.kver()))
                    .fresh(self.layout, kp.kver(), &m.name, fp)
                    .map(|r| r.skipped.clone().map_or(Status::Fresh, Status::Skipped))
            }
            JobKind::Depmod { kernel } => {
                depmod::is_fresh(self.layout, self.kver(*kernel), fp).then_some(Status::Fresh)
            }
            JobKind::Layer { kernel } => {
                let epoch = self.provenance.as_ref().map_or(0, |p| p.epoch);
                LayerRecord::fresh(self.layout, self.kver(*kernel), fp, epoch)
                    .map(|_| Status::Fresh)
            }
            _ => None,
        }
    }
}
