//! The table printed after a run: one row per kernel, one column per step (a column per
//! module for the compiles), for the steps the run's view of the plan has.

use std::fmt::Write;

use crate::plan::{JobKind, Plan};
use crate::run::pipeline::{Report, by_kernel};
use crate::run::progress::Status;

fn cell(status: &Status, secs: f64) -> String {
    match status {
        Status::Done => format!("ok {secs:.1}s"),
        other => other.short().to_string(),
    }
}

/// The columns: each step present in the plan, in pipeline order, with the modules
/// (every module of the config, in its order) where the compiles are.
fn columns(plan: &Plan) -> Vec<String> {
    let mut columns: Vec<String> = Vec::new();
    for job in &plan.jobs {
        let names: Vec<String> = match &job.kind {
            JobKind::Compile { .. } => plan.config.modules.iter().map(|m| m.name.clone()).collect(),
            JobKind::Base { .. } | JobKind::ImageBase | JobKind::Packages { .. } => vec![],
            other => vec![other.step().to_string()],
        };
        for n in names {
            if !columns.contains(&n) {
                columns.push(n);
            }
        }
    }
    columns
}

pub fn table(plan: &Plan, report: &Report) -> String {
    let columns = columns(plan);
    let rows = by_kernel(report);
    let mut table: Vec<Vec<String>> = vec![
        std::iter::once("kernel".to_string())
            .chain(columns.iter().cloned())
            .collect(),
    ];
    for kp in &plan.kernels {
        let jobs = rows.get(kp.kver()).map(Vec::as_slice).unwrap_or_default();
        let mut row = vec![kp.kver().to_string()];
        for col in &columns {
            row.push(match jobs.iter().find(|j| &j.label.name == col) {
                Some(j) => cell(&j.status, j.elapsed.as_secs_f64()),
                None => "-".into(),
            });
        }
        table.push(row);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}
