//! `umae analyze rank | mask-ratio | tsne | reconstruct` and `umae plot`.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use umae_runtime::analysis::maskratio::{MaskRatioStudy, PatchDistance};
use umae_runtime::analysis::plot::{self, Series};
use umae_runtime::analysis::tsne::TsneSpec;
use umae_runtime::analysis::{self, MaskRatioSpec, RankPoint, TsneResult};
use umae_runtime::eval::features::Pool;
use umae_runtime::train::read_jsonl;

use super::eval::{load, SourceArgs};
use super::Error;

#[derive(Subcommand)]
pub enum AnalyzeCommand {
    /// Effective rank (the paper's Appendix B.1) and singular spectrum of L2-normalised features
    /// of the first N test images, for every checkpoint of a run (the erank-vs-epoch curve of
    /// Figure 1c) or one checkpoint; writes <run>/analysis/rank.json.
    Rank {
        #[command(flatten)]
        source: SourceArgs,
        /// Test images.
        #[arg(long, default_value_t = 100)]
        samples: usize,
        /// Only the latest (or --checkpoint) instead of every checkpoint.
        #[arg(long)]
        last: bool,
    },
    /// The mask-ratio study (Section 4.2, Figure 2): intra- and inter-class distances between
    /// randomly masked test images as the mask ratio grows, and the sweet spot of their ratio.
    MaskRatio {
        #[command(flatten)]
        source: SourceArgs,
        /// Mask ratios, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])]
        ratios: Vec<f64>,
        /// Classes (the first ones met in the test split).
        #[arg(long, default_value_t = 10)]
        classes: usize,
        /// Images per class.
        #[arg(long, default_value_t = 20)]
        per_class: usize,
        /// Independent mask draws per ratio.
        #[arg(long, default_value_t = 3)]
        draws: usize,
        /// max (the paper's Appendix B.2) or mean patch distance.
        #[arg(long, default_value = "max")]
        distance: String,
    },
    /// t-SNE of the features of N test images (Figure 3a); writes <run>/analysis/tsne.json.
    Tsne {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, default_value_t = 1000)]
        samples: usize,
        #[arg(long, default_value_t = 30.0)]
        perplexity: f64,
        #[arg(long, default_value_t = 1000)]
        iterations: usize,
    },
    /// Original, masked and reconstructed test images as a PNG (<run>/figures/reconstruction.png).
    Reconstruct {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, default_value_t = 8)]
        images: usize,
        /// Output PNG (default: <run>/figures/reconstruction.png).
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

fn pool_of(s: &SourceArgs) -> Result<Pool, Error> {
    Pool::parse(&s.pool).map_err(Error::command_line)
}

fn out_dir(loaded: &umae_runtime::checkpoint::source::Loaded) -> PathBuf {
    analysis::analysis_dir(loaded.run_dir.as_deref(), &loaded.recipe.name)
}

pub fn run(cmd: AnalyzeCommand) -> Result<(), Error> {
    match cmd {
        AnalyzeCommand::Rank {
            source,
            samples,
            last,
        } => {
            let pool = pool_of(&source)?;
            if samples < 2 {
                return Err(Error::command_line("--samples must be at least 2"));
            }
            let (recipe, _, _) = umae_runtime::checkpoint::source::resolve(
                &source.source,
                source.checkpoint.as_deref(),
                &source.sets,
            )?;
            let device = super::device_for(source.device.as_deref(), &recipe)?;
            if !source.json {
                println!(
                    "{:<12} {:>6} {:>8} {:>8}  top singular values",
                    "checkpoint", "epoch", "step", "erank"
                );
            }
            let (run_dir, points) = analysis::rank_series(
                &source.source,
                source.checkpoint.as_deref(),
                !last,
                &source.sets,
                samples,
                pool,
                &device,
                |p| {
                    if !source.json {
                        let top: Vec<String> = p
                            .spectrum
                            .iter()
                            .take(4)
                            .map(|v| format!("{v:.3}"))
                            .collect();
                        println!(
                            "{:<12} {:>6} {:>8} {:>8.2}  {}",
                            p.checkpoint,
                            p.epoch,
                            p.step,
                            p.erank,
                            top.join(" ")
                        );
                    }
                },
            )?;
            let path = analysis::analysis_dir(run_dir.as_deref(), &recipe.name).join("rank.json");
            analysis::write_json(&path, &points).map_err(Error::Failed)?;
            if source.json {
                super::print_json(&points)?;
            } else {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        AnalyzeCommand::MaskRatio {
            source,
            ratios,
            classes,
            per_class,
            draws,
            distance,
        } => {
            let distance = match distance.as_str() {
                "max" => PatchDistance::Max,
                "mean" => PatchDistance::Mean,
                d => {
                    return Err(Error::command_line(format!(
                        "unknown distance `{d}`: use max or mean"
                    )))
                }
            };
            if classes < 2 || per_class < 2 || ratios.is_empty() {
                return Err(Error::command_line(
                    "need --classes >= 2, --per-class >= 2 and at least one ratio",
                ));
            }
            if let Some(r) = ratios.iter().find(|r| !(0.0..1.0).contains(*r)) {
                return Err(Error::command_line(format!(
                    "mask ratio {r} is outside [0, 1)"
                )));
            }
            let (loaded, _) = load(&source)?;
            let spec = MaskRatioSpec {
                ratios,
                classes,
                per_class,
                draws,
                distance,
                seed: loaded.recipe.seed,
            };
            let study = analysis::mask_ratio(&loaded, &spec)?;
            let path = out_dir(&loaded).join("mask-ratio.json");
            analysis::write_json(&path, &study).map_err(Error::Failed)?;
            if source.json {
                super::print_json(&study)?;
            } else {
                println!(
                    "{} images of {} classes, {} patches each, {:?} patch distance, {} draws",
                    study.images, study.classes, study.num_patches, study.distance, study.draws
                );
                println!(
                    "{:>6} {:>10} {:>10} {:>10}",
                    "ratio", "intra", "inter", "intra/inter"
                );
                for r in &study.rows {
                    println!(
                        "{:>6.2} {:>10.4} {:>10.4} {:>10.4}{}",
                        r.ratio,
                        r.intra,
                        r.inter,
                        r.relative,
                        if r.ratio == study.sweet_spot {
                            "  <- sweet spot"
                        } else {
                            ""
                        }
                    );
                }
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        AnalyzeCommand::Tsne {
            source,
            samples,
            perplexity,
            iterations,
        } => {
            let pool = pool_of(&source)?;
            let (loaded, device) = load(&source)?;
            let spec = TsneSpec {
                perplexity,
                iterations,
                seed: loaded.recipe.seed,
                ..TsneSpec::default()
            };
            let r = analysis::tsne_of(&loaded, samples, pool, &spec, &device)?;
            let path = out_dir(&loaded).join("tsne.json");
            analysis::write_json(&path, &r).map_err(Error::Failed)?;
            println!(
                "t-SNE of {} points of {} -> {}",
                r.points.len(),
                r.model,
                path.display()
            );
            Ok(())
        }
        AnalyzeCommand::Reconstruct {
            source,
            images,
            output,
        } => {
            let (mut loaded, device) = load(&source)?;
            analysis::load_decoder(&mut loaded, &device).map_err(Error::command_line)?;
            let path = output.unwrap_or_else(|| {
                out_dir(&loaded)
                    .parent()
                    .map(|p| p.join("figures"))
                    .unwrap_or_else(|| PathBuf::from("figures"))
                    .join("reconstruction.png")
            });
            analysis::reconstruction_figure(
                &loaded,
                images.max(1),
                loaded.recipe.seed,
                &path,
                &device,
            )?;
            println!(
                "wrote {} (rows: original, masked, reconstruction)",
                path.display()
            );
            Ok(())
        }
    }
}

/// One run's metrics rows.
fn read_opt<T: umae_api::serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| format!("{} is damaged: {e}", path.display()))
}

fn curve(rows: &[serde_json::Value], kind: &str, x: &str, y: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter(|r| r["kind"] == kind)
        .filter_map(|r| Some((r[x].as_f64()?, r[y].as_f64()?)))
        .collect()
}

/// Make every figure the run directories have data for; returns the files written.
pub fn plot_runs(runs: &[PathBuf], out: &Path, names: &[String]) -> Result<Vec<PathBuf>, Error> {
    let mut metrics = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let path = r.join("metrics.jsonl");
        if !path.exists() {
            return Err(Error::command_line(format!(
                "{} has no metrics.jsonl: is it a run directory?",
                r.display()
            )));
        }
        let label = names.get(i).cloned().unwrap_or_else(|| {
            r.file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        metrics.push((
            label,
            read_jsonl(&path).map_err(Error::command_line)?,
            r.clone(),
        ));
    }
    std::fs::create_dir_all(out)
        .map_err(|e| Error::Failed(format!("cannot create {}: {e}", out.display())))?;
    let mut written = Vec::new();
    let series = |kind: &str, x: &str, y: &str| -> Vec<Series> {
        metrics
            .iter()
            .map(|(n, rows, _)| (n.clone(), curve(rows, kind, x, y)))
            .filter(|s| !s.1.is_empty())
            .collect()
    };
    let mut emit = |file: &str, f: &dyn Fn(&Path) -> Result<(), String>| -> Result<(), Error> {
        let p = out.join(file);
        f(&p).map_err(Error::Failed)?;
        written.push(p);
        Ok(())
    };
    // Training loss (the target term) per step.
    let loss: Vec<Series> = metrics
        .iter()
        .map(|(n, rows, _)| {
            let key = rows
                .iter()
                .find(|r| r["kind"] == "step")
                .and_then(|r| {
                    r.as_object()?
                        .keys()
                        .find(|k| k.starts_with("target."))
                        .cloned()
                })
                .unwrap_or_else(|| "loss".into());
            (n.clone(), curve(rows, "step", "step", &key))
        })
        .filter(|s| !s.1.is_empty())
        .collect();
    if !loss.is_empty() {
        emit("loss.png", &|p| {
            plot::line_chart(
                p,
                "Reconstruction loss",
                "step",
                "target loss",
                &loss,
                false,
            )
        })?;
    }
    let probe = series("epoch", "epoch", "probe.test_acc");
    if !probe.is_empty() {
        let probe: Vec<Series> = probe
            .into_iter()
            .map(|(n, pts)| (n, pts.into_iter().map(|(x, y)| (x, y * 100.0)).collect()))
            .collect();
        emit("probe.png", &|p| {
            plot::line_chart(
                p,
                "Online linear probe",
                "epoch",
                "test accuracy (%)",
                &probe,
                false,
            )
        })?;
    }
    // Effective rank per epoch: from training metrics, else from `analyze rank`.
    let mut erank = series("epoch", "epoch", "erank");
    let mut spectra: Vec<Series> = Vec::new();
    for (n, _, dir) in &metrics {
        let ranks: Option<Vec<RankPoint>> =
            read_opt(&dir.join("analysis/rank.json")).map_err(Error::command_line)?;
        if let Some(ranks) = ranks {
            if !erank.iter().any(|s| &s.0 == n) {
                erank.push((
                    n.clone(),
                    ranks.iter().map(|p| (p.epoch as f64, p.erank)).collect(),
                ));
            }
            if let Some(last) = ranks.last() {
                let top = last.spectrum.first().copied().unwrap_or(1.0).max(1e-30);
                spectra.push((
                    format!("{n} ({})", last.checkpoint),
                    last.spectrum
                        .iter()
                        .enumerate()
                        .map(|(i, s)| ((i + 1) as f64, s / top))
                        .collect(),
                ));
            }
        }
    }
    if !erank.is_empty() {
        emit("erank.png", &|p| {
            plot::line_chart(
                p,
                "Effective rank of features",
                "epoch",
                "effective rank",
                &erank,
                false,
            )
        })?;
    }
    if !spectra.is_empty() {
        emit("spectrum.png", &|p| {
            plot::line_chart(
                p,
                "Singular value spectrum (normalised)",
                "index",
                "s_k / s_1",
                &spectra,
                true,
            )
        })?;
    }
    for (n, _, dir) in &metrics {
        let study: Option<MaskRatioStudy> =
            read_opt(&dir.join("analysis/mask-ratio.json")).map_err(Error::command_line)?;
        if let Some(s) = study {
            let pts = |f: &dyn Fn(&umae_runtime::analysis::maskratio::RatioRow) -> f64| -> Vec<(f64, f64)> {
                s.rows.iter().map(|r| (r.ratio, f(r))).collect()
            };
            let dist = vec![
                ("intra-class".to_string(), pts(&|r| r.intra)),
                ("inter-class".to_string(), pts(&|r| r.inter)),
            ];
            let rel = vec![("intra / inter".to_string(), pts(&|r| r.relative))];
            let file = if metrics.len() > 1 {
                format!("mask-ratio-{n}.png")
            } else {
                "mask-ratio.png".into()
            };
            emit(&file, &|p| {
                plot::panels(
                    p,
                    &[
                        (
                            "Distance between masked images",
                            "mask ratio",
                            "average distance",
                            dist.clone(),
                            false,
                        ),
                        (
                            "Relative distance",
                            "mask ratio",
                            "intra / inter",
                            rel.clone(),
                            false,
                        ),
                    ],
                )
            })?;
        }
    }
    let mut tsne_panels = Vec::new();
    for (n, _, dir) in &metrics {
        let t: Option<TsneResult> =
            read_opt(&dir.join("analysis/tsne.json")).map_err(Error::command_line)?;
        if let Some(t) = t {
            tsne_panels.push((n.clone(), t.points));
        }
    }
    if !tsne_panels.is_empty() {
        let classes: Vec<String> = Vec::new();
        emit("tsne.png", &|p| {
            plot::scatter_panels(p, &tsne_panels, &classes)
        })?;
    }
    Ok(written)
}
