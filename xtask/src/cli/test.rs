//! `cargo xtask test`: boot each kernel under QEMU and load its image's modules as KMM
//! does; a pass/fail table per module.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::{BuildArgs, Cli, Session, indent};
use crate::config::Kernel;
use crate::formats::oci::{self, OciDir};
use crate::host::process;
use crate::plan::{KernelPlan, Plan};
use crate::steps::compile::Record;
use crate::steps::image::{self, Provenance};
use crate::steps::loadtest;
use crate::steps::toolchain;

#[derive(Args)]
pub(super) struct TestArgs {
    #[command(flatten)]
    kernels: super::KernelChoice,

    /// Test this OCI image layout (e.g. `skopeo copy docker://... oci:DIR`) instead of
    /// the one kmodforge builds; needs --kernel.
    #[arg(long, value_name = "DIR")]
    image: Option<PathBuf>,

    /// Seconds a boot may take before QEMU is killed.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,

    #[command(flatten)]
    build: BuildArgs,
}

pub(super) fn run(cli: &Cli, config: crate::config::Config, args: &TestArgs) -> Result<ExitCode> {
    if args.image.is_some() && args.kernels.only().is_none() {
        bail!("--image tests one image: give the kernel it was built for with --kernel");
    }
    let session = Session::open(cli, config, &args.build)?;
    let plan = Plan::new(&session.config, args.kernels.only())?;
    let report = session.build(&plan, &args.build)?;
    if report.not_ok() > 0 && args.image.is_none() {
        eprintln!("\nerror: the build failed; nothing was booted");
        return Ok(ExitCode::FAILURE);
    }
    let provenance =
        Provenance::detect(&session.config.root, session.config.image.source.as_deref())?;
    let mut failed = 0usize;
    let mut rows = Vec::new();
    for kp in &plan.kernels {
        if process::cancelled() {
            return Ok(ExitCode::from(130));
        }
        match one(&session, kp, &provenance, args) {
            Ok(verdicts) => {
                for v in verdicts {
                    if v.reason.is_some() {
                        failed += 1;
                    }
                    rows.push((kp.kver().to_string(), v));
                }
            }
            Err(e) => {
                eprintln!(
                    "error: load test of {}: {}",
                    kp.kver(),
                    indent(&format!("{e:#}"))
                );
                failed += 1;
            }
        }
    }
    print!("{}", table(&rows));
    if failed > 0 {
        eprintln!("\n{failed} load test failure(s)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Boots one kernel with its image's modules and judges each module.
fn one(
    session: &Session,
    kp: &KernelPlan,
    provenance: &Provenance,
    args: &TestArgs,
) -> Result<Vec<loadtest::Verdict>> {
    let config = &session.config;
    let kver = kp.kver();
    let log = session.layout.log(kver, "loadtest");
    let _ = std::fs::remove_file(&log);
    let oci_dir = match &args.image {
        Some(dir) => OciDir::open(dir)?,
        None => OciDir::open(
            &image::assemble(
                config,
                kp.kernel,
                &session.engine,
                &session.layout,
                provenance,
                &log,
            )?
            .dir,
        )?,
    };
    let prefix = config.image.prefix.clone();
    let tree = prefix.trim_start_matches('/').to_string();
    let image_fs = oci::filesystem(&oci_dir, |p| p.starts_with(&format!("{tree}/")))?;
    let modules_dir = format!("{tree}/lib/modules/{kver}");
    if !image_fs.contains_key(&modules_dir) {
        bail!(
            "the image has no {prefix}/lib/modules/{kver}/: it was not built for this kernel, or with another prefix"
        );
    }
    let subjects = loadtest::subjects(&image_fs, &modules_dir, &parameters(session, kp.kernel))?;
    if subjects.is_empty() {
        bail!("the image holds no .ko file in {prefix}/lib/modules/{kver}/");
    }

    let fingerprint = toolchain::fingerprint(kp.toolchain, kver)?;
    let facts = toolchain::ensure(
        &session.engine,
        &session.layout,
        config,
        kp.kernel,
        &fingerprint,
        &log,
    )?;
    let vmlinuz = loadtest::kernel_image(
        &session.engine,
        &session.layout,
        &facts.image,
        &fingerprint,
        kver,
        &log,
    )?;
    let busybox = image::busybox_binary(config, &session.layout, &log)?;
    let initrd = loadtest::initramfs(busybox, &image_fs, &prefix, kver, &subjects)?;
    let initrd_path = session.layout.kernel_state(kver).join("initrd.gz");
    crate::host::fs::write_atomic(&initrd_path, &initrd)?;

    let console_log = session.layout.log(kver, "qemu-console");
    let (console, wall, accel) = loadtest::boot(
        &vmlinuz,
        &initrd_path,
        &console_log,
        Duration::from_secs(args.timeout),
    )
    .with_context(|| format!("QEMU did not boot {kver}"))?;
    let accel = accel.describe();
    println!(
        "{kver}: booted under QEMU with {accel}, {} modules, {:.1} s wall; console: {}",
        subjects.len(),
        wall.as_secs_f64(),
        crate::config::diag::display_path(&console_log)
    );
    let modules_dep = image_fs.contains_key(&format!("{modules_dir}/modules.dep"));
    Ok(loadtest::judge(&console, kver, &subjects, modules_dep))
}

/// Test parameters by module name: each module folder's `[test] parameters` apply to
/// every `.ko` that folder built for this kernel (or to the `.ko` of its own name).
fn parameters(session: &Session, kernel: &Kernel) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for m in &session.config.modules {
        if m.test.parameters.is_empty() {
            continue;
        }
        let record: Option<Record> =
            crate::host::fs::read_json(&Record::path(&session.layout, &kernel.version, &m.name));
        let kos = record
            .map(|r| r.modules)
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| vec![format!("{}.ko", m.name)]);
        for ko in kos {
            out.insert(
                ko.trim_end_matches(".ko").replace('-', "_"),
                m.test.parameters.clone(),
            );
        }
    }
    out
}

fn table(rows: &[(String, loadtest::Verdict)]) -> String {
    let yes = |b: bool| if b { "ok" } else { "-" };
    let mut lines = vec![[
        "kernel".to_string(),
        "module".into(),
        "load".into(),
        "unload".into(),
        "result".into(),
        "reason".into(),
    ]];
    for (k, v) in rows {
        lines.push([
            k.clone(),
            v.module.clone(),
            yes(v.loaded).into(),
            yes(v.unloaded).into(),
            if v.reason.is_none() {
                "PASS".into()
            } else {
                "FAIL".into()
            },
            v.reason.clone().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = (0..5)
            .map(|c| format!("{:<w$}", l[c], w = widths[c]))
            .collect();
        out.push_str(format!("{}  {}", cells.join("  "), l[5]).trim_end());
        out.push('\n');
    }
    out
}
