//! L-BFGS with a strong-Wolfe line search (Nocedal & Wright, *Numerical Optimization*, 2nd ed.:
//! Algorithm 7.4 for the two-loop recursion, Algorithms 3.5 and 3.6 for the line search with
//! cubic interpolation in the zoom phase), for smooth objectives of a few thousand parameters.

/// When to stop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Stop when the largest gradient component is at most this.
    pub gtol: f64,
    /// Stop when an iteration lowers the objective by at most this, relative to its size
    /// (the precision the objective is computed with sets how small this can usefully be).
    pub ftol: f64,
    pub max_iter: usize,
    /// Correction pairs kept.
    pub history: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gtol: 1e-5,
            ftol: 1e-9,
            max_iter: 1000,
            history: 10,
        }
    }
}

/// Why the minimisation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Gradient,
    Progress,
    MaxIter,
    /// The line search found no acceptable step (the direction was not one of descent at the
    /// precision of the objective): the point is as good as this objective can tell.
    LineSearch,
}

/// The minimiser found.
#[derive(Debug, Clone, PartialEq)]
pub struct Minimum {
    pub x: Vec<f64>,
    pub value: f64,
    pub iterations: usize,
    pub evaluations: usize,
    pub stop: Stop,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(x: &[f64], t: f64, d: &[f64]) -> Vec<f64> {
    x.iter().zip(d).map(|(x, d)| x + t * d).collect()
}

/// Minimise `f`, which returns the value and the gradient at a point, from `x0`.
pub fn minimize<E>(
    mut f: impl FnMut(&[f64]) -> Result<(f64, Vec<f64>), E>,
    x0: Vec<f64>,
    opts: &Options,
) -> Result<Minimum, E> {
    let mut evaluations = 0;
    let mut eval = |x: &[f64]| {
        evaluations += 1;
        f(x)
    };
    let mut x = x0;
    let (mut fx, mut g) = eval(&x)?;
    let mut pairs: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
    let mut stop = Stop::MaxIter;
    let mut iterations = 0;
    for k in 0..opts.max_iter {
        if g.iter().fold(0.0f64, |m, v| m.max(v.abs())) <= opts.gtol {
            stop = Stop::Gradient;
            break;
        }
        // Two-loop recursion: d = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(pairs.len());
        for (s, y, rho) in pairs.iter().rev() {
            let a = rho * dot(s, &q);
            q = axpy(&q, -a, y);
            alphas.push(a);
        }
        let gamma = pairs.back().map_or(1.0, |(s, y, _)| dot(s, y) / dot(y, y));
        let mut r: Vec<f64> = q.iter().map(|v| v * gamma).collect();
        for ((s, y, rho), a) in pairs.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &r);
            r = axpy(&r, a - b, s);
        }
        let d: Vec<f64> = r.iter().map(|v| -v).collect();
        let dg = dot(&d, &g);
        if dg >= 0.0 {
            // Not a descent direction (rounding): start the memory again.
            pairs.clear();
            continue;
        }
        let first = if k == 0 {
            (1.0 / g.iter().map(|v| v.abs()).sum::<f64>()).min(1.0)
        } else {
            1.0
        };
        let Some((t, fnew, gnew)) = wolfe(&mut eval, &x, fx, dg, &d, first)? else {
            stop = Stop::LineSearch;
            break;
        };
        let xnew = axpy(&x, t, &d);
        let s: Vec<f64> = xnew.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = gnew.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 * dot(&y, &y).sqrt() * dot(&s, &s).sqrt() {
            if pairs.len() == opts.history {
                pairs.pop_front();
            }
            pairs.push_back((s, y, 1.0 / sy));
        }
        let decrease = fx - fnew;
        x = xnew;
        g = gnew;
        iterations = k + 1;
        let small = decrease <= opts.ftol * fx.abs().max(fnew.abs()).max(1.0);
        fx = fnew;
        if small {
            stop = Stop::Progress;
            break;
        }
    }
    Ok(Minimum {
        x,
        value: fx,
        iterations,
        evaluations,
        stop,
    })
}

type Point = (f64, f64, f64, Vec<f64>); // step, value, directional derivative, gradient

/// A step `t` along `d` satisfying the strong Wolfe conditions (c1 = 1e-4, c2 = 0.9), with the
/// value and gradient there; `None` if none was found in 25 evaluations.
fn wolfe<E>(
    eval: &mut impl FnMut(&[f64]) -> Result<(f64, Vec<f64>), E>,
    x: &[f64],
    f0: f64,
    dg0: f64,
    d: &[f64],
    first: f64,
) -> Result<Option<(f64, f64, Vec<f64>)>, E> {
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    let mut at = |t: f64| -> Result<Point, E> {
        let (v, g) = eval(&axpy(x, t, d))?;
        Ok((t, v, dot(&g, d), g))
    };
    let mut prev: Point = (0.0, f0, dg0, Vec::new());
    let mut t = first;
    let mut budget = 25;
    let (mut lo, mut hi);
    loop {
        if budget == 0 {
            return Ok(None);
        }
        budget -= 1;
        let cur = at(t)?;
        if !cur.1.is_finite() || cur.1 > f0 + C1 * t * dg0 || (prev.0 > 0.0 && cur.1 >= prev.1) {
            (lo, hi) = (prev, cur);
            break;
        }
        if cur.2.abs() <= -C2 * dg0 {
            return Ok(Some((cur.0, cur.1, cur.3)));
        }
        if cur.2 >= 0.0 {
            (lo, hi) = (cur, prev);
            break;
        }
        prev = cur;
        t *= 2.0;
    }
    // Zoom: `lo` satisfies sufficient decrease with the lowest value seen; the minimiser lies
    // between `lo` and `hi`.
    while budget > 0 {
        budget -= 1;
        let t = interpolate(&lo, &hi);
        let cur = at(t)?;
        if !cur.1.is_finite() || cur.1 > f0 + C1 * t * dg0 || cur.1 >= lo.1 {
            hi = cur;
        } else {
            if cur.2.abs() <= -C2 * dg0 {
                return Ok(Some((cur.0, cur.1, cur.3)));
            }
            if cur.2 * (hi.0 - lo.0) >= 0.0 {
                hi = lo;
            }
            lo = cur;
        }
        if (hi.0 - lo.0).abs() <= 1e-12 * lo.0.abs().max(1e-12) {
            break;
        }
    }
    // No point met the curvature condition: take the best one found if it decreases the value.
    Ok((lo.0 > 0.0 && lo.1 < f0 && !lo.3.is_empty()).then_some((lo.0, lo.1, lo.3)))
}

/// The minimiser of the cubic through two points with their slopes, kept inside the central
/// 80% of the interval (bisection when the cubic has none there).
fn interpolate(a: &Point, b: &Point) -> f64 {
    let (lo, hi) = if a.0 < b.0 { (a, b) } else { (b, a) };
    let w = hi.0 - lo.0;
    let bisect = lo.0 + 0.5 * w;
    if !hi.1.is_finite() || w <= 0.0 {
        return bisect;
    }
    let d1 = lo.2 + hi.2 - 3.0 * (lo.1 - hi.1) / (lo.0 - hi.0);
    let disc = d1 * d1 - lo.2 * hi.2;
    if disc < 0.0 {
        return bisect;
    }
    let d2 = disc.sqrt();
    let t = hi.0 - w * (hi.2 + d2 - d1) / (hi.2 - lo.2 + 2.0 * d2);
    if t.is_finite() && t > lo.0 + 0.1 * w && t < hi.0 - 0.1 * w {
        t
    } else {
        bisect
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rosenbrock(x: &[f64]) -> Result<(f64, Vec<f64>), ()> {
        let (a, b) = (x[0], x[1]);
        let v = (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2);
        let g = vec![
            -2.0 * (1.0 - a) - 400.0 * a * (b - a * a),
            200.0 * (b - a * a),
        ];
        Ok((v, g))
    }

    #[test]
    fn finds_the_rosenbrock_minimum() {
        let m = minimize(rosenbrock, vec![-1.2, 1.0], &Options::default()).unwrap();
        assert_eq!(m.stop, Stop::Gradient, "{m:?}");
        assert!(
            (m.x[0] - 1.0).abs() < 1e-5 && (m.x[1] - 1.0).abs() < 1e-5,
            "{m:?}"
        );
        assert!(m.iterations < 100, "{m:?}");
    }

    #[test]
    fn solves_an_ill_conditioned_quadratic() {
        // f = sum_i c_i (x_i - i)^2 / 2 with curvatures from 1 to 1e4.
        let c: Vec<f64> = (0..20).map(|i| 10f64.powf(i as f64 / 19.0 * 4.0)).collect();
        let f = |x: &[f64]| -> Result<(f64, Vec<f64>), ()> {
            let g: Vec<f64> = x
                .iter()
                .enumerate()
                .map(|(i, v)| c[i] * (v - i as f64))
                .collect();
            let v = x
                .iter()
                .enumerate()
                .map(|(i, v)| 0.5 * c[i] * (v - i as f64).powi(2))
                .sum();
            Ok((v, g))
        };
        // On the gradient alone (the objective's own scale is tiny near the minimum).
        let opts = Options {
            ftol: 0.0,
            ..Options::default()
        };
        let m = minimize(f, vec![0.0; 20], &opts).unwrap();
        assert_eq!(m.stop, Stop::Gradient, "{m:?}");
        for (i, v) in m.x.iter().enumerate() {
            assert!((v - i as f64).abs() < 1e-5, "x[{i}] = {v}: {m:?}");
        }
    }

    #[test]
    fn errors_of_the_objective_pass_through() {
        let r = minimize(
            |_: &[f64]| Err::<(f64, Vec<f64>), _>("boom"),
            vec![0.0],
            &Options::default(),
        );
        assert_eq!(r.unwrap_err(), "boom");
    }
}
