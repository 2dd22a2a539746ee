//! Exact t-SNE (van der Maaten & Hinton 2008) for a few thousand points: Gaussian affinities
//! with a per-point bandwidth matched to the perplexity, Student-t similarities in 2-D, gradient
//! descent with momentum, gains and early exaggeration.

use umae_api::Rng;

/// t-SNE settings.
#[derive(Debug, Clone)]
pub struct TsneSpec {
    pub perplexity: f64,
    pub iterations: usize,
    pub learning_rate: f64,
    pub seed: u64,
}

impl Default for TsneSpec {
    fn default() -> Self {
        TsneSpec {
            perplexity: 30.0,
            iterations: 1000,
            learning_rate: 200.0,
            seed: 0,
        }
    }
}

/// Squared euclidean distances of `n` rows of width `d`.
fn sq_distances(x: &[f32], n: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let s: f64 = (0..d)
                .map(|k| (x[i * d + k] - x[j * d + k]) as f64)
                .map(|v| v * v)
                .sum();
            out[i * n + j] = s;
            out[j * n + i] = s;
        }
    }
    out
}

/// Symmetric joint probabilities P with the given perplexity.
fn affinities(dist: &[f64], n: usize, perplexity: f64) -> Vec<f64> {
    let target = perplexity.ln();
    let mut p = vec![0.0; n * n];
    for i in 0..n {
        let row = &dist[i * n..(i + 1) * n];
        let (mut lo, mut hi, mut beta) = (0.0f64, f64::INFINITY, 1.0f64);
        let mut probs = vec![0.0; n];
        for _ in 0..64 {
            let mut sum = 0.0;
            for j in 0..n {
                probs[j] = if j == i { 0.0 } else { (-row[j] * beta).exp() };
                sum += probs[j];
            }
            let sum = sum.max(1e-300);
            let h: f64 = sum.ln() + beta * (0..n).map(|j| row[j] * probs[j]).sum::<f64>() / sum;
            probs.iter_mut().for_each(|v| *v /= sum);
            if (h - target).abs() < 1e-5 {
                break;
            }
            if h > target {
                lo = beta;
                beta = if hi.is_finite() {
                    (beta + hi) / 2.0
                } else {
                    beta * 2.0
                };
            } else {
                hi = beta;
                beta = (beta + lo) / 2.0;
            }
        }
        p[i * n..(i + 1) * n].copy_from_slice(&probs);
    }
    let mut sym = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            sym[i * n + j] = ((p[i * n + j] + p[j * n + i]) / (2.0 * n as f64)).max(1e-12);
        }
    }
    sym
}

/// 2-D embedding of `n` rows of width `d`: `[x0, y0, x1, y1, ...]`.
pub fn tsne(x: &[f32], n: usize, d: usize, spec: &TsneSpec) -> Result<Vec<f32>, String> {
    if n < 4 {
        return Err(format!("t-SNE needs at least 4 points, got {n}"));
    }
    if spec.perplexity.is_nan() || spec.perplexity <= 0.0 || spec.perplexity * 3.0 >= n as f64 {
        return Err(format!(
            "perplexity {} is too large for {n} points (it must be below n / 3)",
            spec.perplexity
        ));
    }
    let p = affinities(&sq_distances(x, n, d), n, spec.perplexity);
    let mut rng = Rng::new(spec.seed);
    let mut y: Vec<f64> = (0..2 * n).map(|_| rng.normal() * 1e-4).collect();
    let mut vel = vec![0.0; 2 * n];
    let mut gains = vec![1.0; 2 * n];
    let mut num = vec![0.0; n * n];
    for it in 0..spec.iterations {
        let exaggeration = if it < 250 { 12.0 } else { 1.0 };
        let momentum = if it < 250 { 0.5 } else { 0.8 };
        let mut z = 0.0;
        for i in 0..n {
            for j in i + 1..n {
                let dx = y[2 * i] - y[2 * j];
                let dy = y[2 * i + 1] - y[2 * j + 1];
                let q = 1.0 / (1.0 + dx * dx + dy * dy);
                num[i * n + j] = q;
                num[j * n + i] = q;
                z += 2.0 * q;
            }
        }
        for i in 0..n {
            let (mut gx, mut gy) = (0.0, 0.0);
            for j in 0..n {
                if i == j {
                    continue;
                }
                let q = num[i * n + j];
                let f = (exaggeration * p[i * n + j] - q / z) * q;
                gx += 4.0 * f * (y[2 * i] - y[2 * j]);
                gy += 4.0 * f * (y[2 * i + 1] - y[2 * j + 1]);
            }
            for (k, g) in [(2 * i, gx), (2 * i + 1, gy)] {
                gains[k] = if (g > 0.0) != (vel[k] > 0.0) {
                    gains[k] + 0.2
                } else {
                    (gains[k] * 0.8f64).max(0.01)
                };
                vel[k] = momentum * vel[k] - spec.learning_rate * gains[k] * g;
            }
        }
        for k in 0..2 * n {
            y[k] += vel[k];
        }
        let (mx, my) = (
            (0..n).map(|i| y[2 * i]).sum::<f64>() / n as f64,
            (0..n).map(|i| y[2 * i + 1]).sum::<f64>() / n as f64,
        );
        for i in 0..n {
            y[2 * i] -= mx;
            y[2 * i + 1] -= my;
        }
    }
    if y.iter().any(|v| !v.is_finite()) {
        return Err("t-SNE diverged: lower the learning rate".into());
    }
    Ok(y.into_iter().map(|v| v as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separated_clusters_stay_separated() {
        let mut rng = Rng::new(1);
        let (n, d) = (60, 10);
        let x: Vec<f32> = (0..n)
            .flat_map(|i| {
                let c = (i % 3) as f64 * 20.0;
                (0..d)
                    .map(|k| (if k == i % 3 { c } else { 0.0 } + rng.normal()) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        let spec = TsneSpec {
            perplexity: 10.0,
            iterations: 500,
            learning_rate: 50.0,
            ..TsneSpec::default()
        };
        let y = tsne(&x, n, d, &spec).unwrap();
        // Every point's nearest neighbour in 2-D is of its own cluster.
        for i in 0..n {
            let nearest = (0..n)
                .filter(|&j| j != i)
                .min_by(|&a, &b| {
                    let da = (y[2 * i] - y[2 * a]).powi(2) + (y[2 * i + 1] - y[2 * a + 1]).powi(2);
                    let db = (y[2 * i] - y[2 * b]).powi(2) + (y[2 * i + 1] - y[2 * b + 1]).powi(2);
                    da.total_cmp(&db)
                })
                .unwrap();
            assert_eq!(nearest % 3, i % 3, "point {i}");
        }
    }

    #[test]
    fn rejects_too_few_points() {
        assert!(tsne(&[0.0; 6], 3, 2, &TsneSpec::default()).is_err());
        assert!(tsne(&[0.0; 40], 20, 2, &TsneSpec::default()).is_err());
    }
}
