//! A sweep's summary: per combination of swept values, the mean and sample standard deviation
//! over seeds of each cell's final numbers, as markdown, CSV and figures with error bars.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{combinations, Axis, Cell};
use crate::analysis::plot::{self, ErrorSeries};
use crate::checkpoint::write_file_atomic;
use crate::Error;

/// The numbers of a finished cell, by metric key.
pub type CellMetrics = BTreeMap<String, f64>;

/// Metrics read from the last epoch row (the final target loss, online probe, effective rank)
/// and the last evaluation row (linear probe, kNN, fine-tuning).
const EPOCH_KEYS: [&str; 2] = ["erank", "probe.test_acc"];
const EVAL_KEYS: [&str; 3] = ["linear.top1", "knn.top1", "finetune.top1"];

/// A cell's final numbers from its `metrics.jsonl`.
pub fn cell_metrics(run_dir: &Path) -> Result<CellMetrics, String> {
    let rows = crate::train::read_jsonl(&run_dir.join("metrics.jsonl"))?;
    let mut out = CellMetrics::new();
    let last = |kind: &str| rows.iter().rev().find(|r| r["kind"] == kind);
    if let Some(Value::Object(row)) = last("epoch") {
        for (k, v) in row {
            let wanted = k.starts_with("target.") || EPOCH_KEYS.contains(&k.as_str());
            if let (true, Some(x)) = (wanted, v.as_f64()) {
                out.insert(k.clone(), x);
            }
        }
    }
    if let Some(row) = last("eval") {
        for k in EVAL_KEYS {
            if let Some(x) = row.get(k).and_then(Value::as_f64) {
                out.insert(k.to_string(), x);
            }
        }
    }
    Ok(out)
}

/// Mean, sample standard deviation (None for one value) and count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub std: Option<f64>,
    pub n: usize,
}

impl Stat {
    pub fn of(xs: &[f64]) -> Option<Stat> {
        let n = xs.len();
        if n == 0 {
            return None;
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        let std = (n > 1)
            .then(|| (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
        Some(Stat { mean, std, n })
    }
}

/// One combination of swept values over its seeds.
#[derive(Debug, Clone)]
pub struct Group {
    pub values: Vec<String>,
    /// Seeds in the sweep, and how many of them finished.
    pub seeds: usize,
    pub finished: usize,
    pub stats: BTreeMap<String, Stat>,
}

/// Metric columns in a fixed order: target terms, effective rank, then accuracies.
pub fn metric_order(groups: &[Group]) -> Vec<String> {
    let mut keys: Vec<String> = groups
        .iter()
        .flat_map(|g| g.stats.keys().cloned())
        .collect();
    keys.sort_by_key(|k| {
        let rank = if k.starts_with("target.") {
            0
        } else {
            1 + EPOCH_KEYS
                .iter()
                .chain(&EVAL_KEYS)
                .position(|e| e == k)
                .unwrap_or(9)
        };
        (rank, k.clone())
    });
    keys.dedup();
    keys
}

/// Group finished cells by combination, in grid order.
pub fn groups(axes: &[Axis], cells: &[(&Cell, Option<CellMetrics>)]) -> Vec<Group> {
    combinations(axes)
        .into_iter()
        .enumerate()
        .map(|(i, values)| {
            let mine: Vec<&Option<CellMetrics>> = cells
                .iter()
                .filter(|(c, _)| c.combination == i)
                .map(|(_, m)| m)
                .collect();
            let done: Vec<&CellMetrics> = mine.iter().filter_map(|m| m.as_ref()).collect();
            let mut keys: Vec<&String> = done.iter().flat_map(|m| m.keys()).collect();
            keys.sort();
            keys.dedup();
            let stats = keys
                .into_iter()
                .filter_map(|k| {
                    let xs: Vec<f64> = done.iter().filter_map(|m| m.get(k).copied()).collect();
                    Some((k.clone(), Stat::of(&xs)?))
                })
                .collect();
            Group {
                values,
                seeds: mine.len(),
                finished: done.len(),
                stats,
            }
        })
        .collect()
}

fn is_accuracy(key: &str) -> bool {
    key.ends_with("_acc") || key.ends_with(".top1")
}

/// `mean ± std` for people: accuracies in percent.
fn human(key: &str, s: &Stat) -> String {
    let (scale, digits) = if is_accuracy(key) {
        (100.0, 2)
    } else {
        (1.0, 4)
    };
    match s.std {
        Some(sd) => format!(
            "{:.digits$} ± {:.digits$}",
            s.mean * scale,
            sd * scale,
            digits = digits
        ),
        None => format!("{:.digits$}", s.mean * scale, digits = digits),
    }
}

/// The markdown table.
pub fn markdown(axes: &[Axis], groups: &[Group]) -> String {
    let keys = metric_order(groups);
    let mut head: Vec<String> = axes.iter().map(|a| format!("`{}`", a.path)).collect();
    head.push("seeds".into());
    head.extend(keys.iter().map(|k| {
        if is_accuracy(k) {
            format!("{k} (%)")
        } else {
            k.clone()
        }
    }));
    let mut out = format!("| {} |\n", head.join(" | "));
    out += &format!("|{}\n", "---|".repeat(head.len()));
    for g in groups {
        let mut cells: Vec<String> = g.values.iter().map(|v| format!("`{v}`")).collect();
        cells.push(if g.finished == g.seeds {
            g.seeds.to_string()
        } else {
            format!("{} of {}", g.finished, g.seeds)
        });
        cells.extend(keys.iter().map(|k| {
            g.stats
                .get(k)
                .map(|s| human(k, s))
                .unwrap_or_else(|| "–".into())
        }));
        out += &format!("| {} |\n", cells.join(" | "));
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The CSV table: raw values (accuracies as fractions), `_mean`, `_std` and `_n` per metric.
pub fn csv(axes: &[Axis], groups: &[Group]) -> String {
    let keys = metric_order(groups);
    let mut head: Vec<String> = axes.iter().map(|a| csv_field(&a.path)).collect();
    head.extend(["seeds".into(), "finished".into()]);
    for k in &keys {
        head.extend([format!("{k}_mean"), format!("{k}_std"), format!("{k}_n")]);
    }
    let mut out = head.join(",") + "\n";
    for g in groups {
        let mut row: Vec<String> = g.values.iter().map(|v| csv_field(v)).collect();
        row.extend([g.seeds.to_string(), g.finished.to_string()]);
        for k in &keys {
            match g.stats.get(k) {
                Some(s) => row.extend([
                    s.mean.to_string(),
                    s.std.map(|v| v.to_string()).unwrap_or_default(),
                    s.n.to_string(),
                ]),
                None => row.extend([String::new(), String::new(), "0".into()]),
            }
        }
        out += &(row.join(",") + "\n");
    }
    out
}

/// One figure per axis: each metric against the axis's values (in grid order, equally spaced),
/// one line per combination of the other axes, error bars of one standard deviation.
pub fn figures(dir: &Path, axes: &[Axis], groups: &[Group]) -> Result<Vec<PathBuf>, String> {
    let keys: Vec<String> = metric_order(groups)
        .into_iter()
        .filter(|k| k == "erank" || is_accuracy(k))
        .collect();
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut written = Vec::new();
    for (a, axis) in axes.iter().enumerate() {
        // The other axes' values name the lines.
        let mut lines: Vec<(String, Vec<&Group>)> = Vec::new();
        for g in groups {
            let label: Vec<String> = axes
                .iter()
                .zip(&g.values)
                .enumerate()
                .filter(|(b, _)| *b != a)
                .map(|(_, (ax, v))| format!("{}={v}", ax.path))
                .collect();
            let label = label.join(", ");
            match lines.iter_mut().find(|(l, _)| *l == label) {
                Some((_, gs)) => gs.push(g),
                None => lines.push((label, vec![g])),
            }
        }
        let charts: Vec<(String, String, Vec<ErrorSeries>)> = keys
            .iter()
            .map(|k| {
                let scale = if is_accuracy(k) { 100.0 } else { 1.0 };
                let series = lines
                    .iter()
                    .map(|(label, gs)| {
                        let pts = gs
                            .iter()
                            .filter_map(|g| {
                                let x = axis.values.iter().position(|v| *v == g.values[a])?;
                                let s = g.stats.get(k)?;
                                Some((x, s.mean * scale, s.std.map(|sd| sd * scale)))
                            })
                            .collect();
                        (label.clone(), pts)
                    })
                    .collect();
                let y = if is_accuracy(k) {
                    format!("{k} (%)")
                } else {
                    k.clone()
                };
                let title = match k.as_str() {
                    "erank" => "effective rank",
                    "probe.test_acc" => "online probe top-1",
                    "linear.top1" => "linear probe top-1",
                    "knn.top1" => "kNN top-1",
                    "finetune.top1" => "fine-tuned top-1",
                    other => other,
                };
                (title.to_string(), y, series)
            })
            .collect();
        let path = dir.join(format!("sweep-{}.png", super::file_safe(&axis.path)));
        plot::error_bar_panels(&path, &axis.path, &axis.values, &charts)?;
        written.push(path);
    }
    Ok(written)
}

/// Write `summary.md`, `summary.csv` and the figures into the sweep directory. Returns the
/// files and, when the figures could not be drawn (no font), why: the tables are written
/// regardless.
pub fn write(
    dir: &Path,
    axes: &[Axis],
    cells: &[Cell],
) -> crate::Result<(Vec<PathBuf>, Option<String>)> {
    let results: Vec<(&Cell, Option<CellMetrics>)> = cells
        .iter()
        .map(|c| {
            let m = c
                .done_marker()
                .exists()
                .then(|| cell_metrics(&c.dir))
                .transpose()
                .map_err(Error::Failed)?;
            Ok((c, m))
        })
        .collect::<crate::Result<_>>()?;
    let groups = groups(axes, &results);
    let md = dir.join("summary.md");
    let seeds: Vec<String> = {
        let mut s: Vec<u64> = cells.iter().map(|c| c.seed).collect();
        s.sort();
        s.dedup();
        s.iter().map(u64::to_string).collect()
    };
    let text = format!(
        "# Sweep summary\n\nMean ± sample standard deviation over seeds {} of each cell's last epoch (target loss, effective rank, online probe) and last evaluation (linear probe, kNN); `–`: not measured.\n\n{}",
        seeds.join(", "),
        markdown(axes, &groups)
    );
    write_file_atomic(&md, &text).map_err(Error::Failed)?;
    let csv_path = dir.join("summary.csv");
    write_file_atomic(&csv_path, &csv(axes, &groups)).map_err(Error::Failed)?;
    let mut files = vec![md, csv_path];
    match figures(dir, axes, &groups) {
        Ok(f) => {
            files.extend(f);
            Ok((files, None))
        }
        Err(e) => Ok((files, Some(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_the_mean_and_sample_std() {
        let s = Stat::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.mean, 2.5);
        // sum of squares 5, over n - 1 = 3.
        assert!((s.std.unwrap() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(Stat::of(&[7.0]).unwrap().std, None);
        assert!(Stat::of(&[]).is_none());
    }

    #[test]
    fn tables_group_seeds_and_show_missing_cells() {
        let axes = [Axis::parse("w=0,1e-2").unwrap()];
        let cells = super::super::cells(Path::new("/s"), &axes, 0, 2);
        let m = |loss: f64, acc: f64| {
            Some(CellMetrics::from([
                ("target.pixels".to_string(), loss),
                ("linear.top1".to_string(), acc),
            ]))
        };
        let results = vec![
            (&cells[0], m(0.5, 0.80)),
            (&cells[1], m(0.7, 0.84)),
            (&cells[2], m(0.6, 0.81)),
            (&cells[3], None),
        ];
        let g = groups(&axes, &results);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].seeds, g[0].finished), (2, 2));
        assert!((g[0].stats["target.pixels"].mean - 0.6).abs() < 1e-12);
        assert_eq!((g[1].seeds, g[1].finished), (2, 1));
        let md = markdown(&axes, &g);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(
            lines[0],
            "| `w` | seeds | target.pixels | linear.top1 (%) |"
        );
        assert_eq!(lines[2], "| `0` | 2 | 0.6000 ± 0.1414 | 82.00 ± 2.83 |");
        assert_eq!(lines[3], "| `1e-2` | 1 of 2 | 0.6000 | 81.00 |");
        let csv = csv(&axes, &g);
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(
            rows[0],
            "w,seeds,finished,target.pixels_mean,target.pixels_std,target.pixels_n,linear.top1_mean,linear.top1_std,linear.top1_n"
        );
        assert!(
            rows[2].starts_with("1e-2,2,1,0.6,,1,0.81,,1"),
            "{}",
            rows[2]
        );
    }
}
