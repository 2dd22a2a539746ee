//! Spectral analysis of features: singular values and the effective rank of the paper's
//! Appendix B.1 (Roy & Vetterli 2007): with L2-normalised rows, singular values s_k,
//! p_k = s_k / sum(s), erank = exp(-sum p_k log p_k).

/// Singular values of an `n x d` row-major matrix, descending (from the eigenvalues of the
/// smaller Gram matrix, by cyclic Jacobi rotations in f64).
pub fn singular_values(rows: &[f32], n: usize, d: usize) -> Vec<f64> {
    assert_eq!(rows.len(), n * d);
    let (k, gram): (usize, Vec<f64>) = if n <= d {
        let mut g = vec![0.0; n * n];
        for i in 0..n {
            for j in i..n {
                let v: f64 = (0..d)
                    .map(|c| rows[i * d + c] as f64 * rows[j * d + c] as f64)
                    .sum();
                g[i * n + j] = v;
                g[j * n + i] = v;
            }
        }
        (n, g)
    } else {
        let mut g = vec![0.0; d * d];
        for r in 0..n {
            let row = &rows[r * d..(r + 1) * d];
            for i in 0..d {
                for j in i..d {
                    g[i * d + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        for i in 0..d {
            for j in 0..i {
                g[i * d + j] = g[j * d + i];
            }
        }
        (d, g)
    };
    let mut eig = jacobi_eigenvalues(gram, k);
    eig.iter_mut().for_each(|e| *e = e.max(0.0).sqrt());
    eig.sort_by(|a, b| b.partial_cmp(a).unwrap());
    eig
}

fn jacobi_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    let scale: f64 = a.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-300);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off.sqrt() <= 1e-13 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..n).map(|i| a[i * n + i]).collect()
}

/// exp(entropy of s / sum(s)).
pub fn erank_of_spectrum(s: &[f64]) -> f64 {
    let total: f64 = s.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = s
        .iter()
        .map(|v| v / total)
        .filter(|p| *p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    h.exp()
}

pub use crate::eval::features::normalize_rows;

/// Effective rank of L2-normalised features, as in the paper.
pub fn effective_rank(rows: &[f32], n: usize, d: usize) -> f64 {
    let mut r = rows.to_vec();
    normalize_rows(&mut r, d);
    erank_of_spectrum(&singular_values(&r, n, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::Rng;

    #[test]
    fn identity_has_full_rank() {
        let n = 6;
        let rows: Vec<f32> = (0..n * n)
            .map(|i| if i % (n + 1) == 0 { 1.0 } else { 0.0 })
            .collect();
        let s = singular_values(&rows, n, n);
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-9), "{s:?}");
        assert!((effective_rank(&rows, n, n) - 6.0).abs() < 1e-9);
    }

    #[test]
    fn rank_one_has_rank_one() {
        let rows: Vec<f32> = (0..8)
            .flat_map(|i| [1.0 + i as f32, 2.0 * (1.0 + i as f32), 0.0])
            .collect();
        assert!((effective_rank(&rows, 8, 3) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn random_low_rank_is_bounded_by_its_rank() {
        let mut rng = Rng::new(3);
        let (n, d, k) = (40, 16, 3);
        let a: Vec<f64> = (0..n * k).map(|_| rng.normal()).collect();
        let b: Vec<f64> = (0..k * d).map(|_| rng.normal()).collect();
        let (a, b) = (&a, &b);
        let rows: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..d)
                    .map(move |j| (0..k).map(|t| a[i * k + t] * b[t * d + j]).sum::<f64>() as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        let s = singular_values(&rows, n, d);
        assert!(s[k..].iter().all(|v| *v < 1e-3 * s[0]), "{s:?}");
        let e = effective_rank(&rows, n, d);
        assert!(e > 1.5 && e <= 3.0 + 1e-6, "{e}");
        // A known spectrum: s = (3, 1) -> p = (.75, .25).
        let want = (-(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln())).exp();
        assert!((erank_of_spectrum(&[3.0, 1.0]) - want).abs() < 1e-12);
    }
}
