//! The table printed after a build: one row per kernel, one column per job.

use std::fmt::Write;

use crate::plan::Plan;
use crate::run::pipeline::{BuildReport, by_kernel};
use crate::run::progress::Status;

fn cell(status: &Status, secs: f64) -> String {
    match status {
        Status::Done => format!("ok {secs:.1}s"),
        other => other.short().to_string(),
    }
}

pub fn table(plan: &Plan, report: &BuildReport) -> String {
    let mut columns: Vec<String> = vec!["toolchain".into()];
    for m in &plan.config.modules {
        columns.push(m.name.clone());
    }
    columns.push("depmod".into());
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
