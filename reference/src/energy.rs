//! Energy score / engression loss and two-sample energy distance.

/// Engression / energy-score loss: y [n, d], preds [n, m, d].
#[derive(Clone, Copy, Debug)]
pub struct EnergyScoreProblem<'a> {
    pub y: &'a [f64],
    pub preds: &'a [f64],
    pub n: usize,
    pub m: usize,
    pub d: usize,
    /// Exponent beta in (0, 2]: distances enter as ||.||^beta.
    pub beta: f64,
    pub grad: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EnergyScoreOutput {
    /// mean_{i,j} ||preds_ij - y_i||^beta
    pub term1: f64,
    /// -0.5 m/(m-1) mean_{i,j,k} ||preds_ij - preds_ik||^beta (0 when m = 1)
    pub term2: f64,
    pub loss: f64,
    /// d loss / d preds [n, m, d]; sub-gradient 0 where a distance is 0.
    pub grad: Option<Vec<f64>>,
}

/// Engression / energy-score loss and, when asked, its gradient w.r.t. preds.
///
/// term2 sums over all ordered pairs (j, k), j = k included (those are 0), so each
/// unordered pair counts twice; this is the engression paper's estimator.
pub fn energy_score(problem: &EnergyScoreProblem<'_>) -> EnergyScoreOutput {
    let (n, m, d) = (problem.n, problem.m, problem.d);
    let beta = problem.beta;
    let pred = |i: usize, j: usize| &problem.preds[(i * m + j) * d..(i * m + j + 1) * d];
    let target = |i: usize| &problem.y[i * d..(i + 1) * d];

    let mut sum1 = 0.0;
    let mut sum2 = 0.0;
    for i in 0..n {
        for j in 0..m {
            sum1 += distance(pred(i, j), target(i)).powf(beta);
            for k in 0..m {
                sum2 += distance(pred(i, j), pred(i, k)).powf(beta);
            }
        }
    }
    let term1 = sum1 / (n * m) as f64;
    let term2 = if m < 2 {
        0.0
    } else {
        -0.5 * (m as f64 / (m - 1) as f64) * sum2 / (n * m * m) as f64
    };

    let grad = if problem.grad {
        let mut grad = vec![0.0; n * m * d];
        // p_ij appears in term2 as both the first and the second of an ordered pair,
        // hence the factor 2 on the pair coefficient.
        let c1 = 1.0 / (n * m) as f64;
        let c2 = if m < 2 {
            0.0
        } else {
            -0.5 * (m as f64 / (m - 1) as f64) / (n * m * m) as f64 * 2.0
        };
        for i in 0..n {
            for j in 0..m {
                let g = &mut grad[(i * m + j) * d..(i * m + j + 1) * d];
                add_power_gradient(g, c1, pred(i, j), target(i), beta);
                for k in 0..m {
                    add_power_gradient(g, c2, pred(i, j), pred(i, k), beta);
                }
            }
        }
        Some(grad)
    } else {
        None
    };

    EnergyScoreOutput {
        term1,
        term2,
        loss: term1 + term2,
        grad,
    }
}

/// Euclidean distance taken from the differences (never from norms and dot products).
fn distance(a: &[f64], b: &[f64]) -> f64 {
    let mut s = 0.0;
    for (x, y) in a.iter().zip(b) {
        s += (x - y) * (x - y);
    }
    s.sqrt()
}

/// g += c * d||u||^beta / du with u = a - b, i.e. c * beta ||u||^(beta - 2) u.
/// At u = 0 the sub-gradient 0 is taken, so coinciding points never give NaN.
fn add_power_gradient(g: &mut [f64], c: f64, a: &[f64], b: &[f64], beta: f64) {
    let norm = distance(a, b);
    if norm == 0.0 {
        return;
    }
    let factor = c * beta * norm.powf(beta - 2.0);
    for k in 0..g.len() {
        g[k] += factor * (a[k] - b[k]);
    }
}

/// V-statistic (diagonal included) or U-statistic (diagonal excluded) for the within-set means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Statistic {
    #[default]
    V,
    U,
}

/// Two-sample energy distance: X [N, d], Y [M, d], optional non-negative sample weights.
#[derive(Clone, Copy, Debug)]
pub struct EnergyDistanceProblem<'a> {
    pub x: &'a [f64],
    pub y: &'a [f64],
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub weights_x: Option<&'a [f64]>,
    pub weights_y: Option<&'a [f64]>,
    pub beta: f64,
    pub statistic: Statistic,
    /// Also return d distance / dX and d distance / dY.
    pub grad: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EnergyDistanceOutput {
    /// 2 E||x - y|| - E||x - x'|| - E||y - y'||
    pub distance: f64,
    pub cross: f64,
    pub within_x: f64,
    pub within_y: f64,
    /// d distance / dX [N, d] and d distance / dY [M, d] when asked; sub-gradient 0
    /// where a distance is 0.
    pub grad_x: Option<Vec<f64>>,
    pub grad_y: Option<Vec<f64>>,
}

/// Two-sample energy distance with its three terms.
///
/// Weights are normalised to sum 1 per set; no weights means uniform weights.
/// cross = sum_ij wx_i wy_j ||x_i - y_j||^beta. V: within_x = sum_{i,i'} wx_i wx_i'
/// ||x_i - x_i'||^beta. U: the same sum over i != i' divided by the weight of those pairs,
/// sum_{i != i'} wx_i wx_i' = 1 - sum_i wx_i^2 (without weights: 1 / (N (N - 1)) times the
/// sum over i != i'). A set with no weighted pair (N = 1) has U within-set term 0.
/// distance = 2 cross - within_x - within_y.
///
/// The gradient: x_i enters cross through the pairs (i, j) and within_x through the
/// ordered pairs (i, k) and (k, i), so d distance / dx_i is 2 sum_j wx_i wy_j g(x_i - y_j)
/// minus (2 / P_x) sum_k wx_i wx_k g(x_i - x_k), with g(u) = d||u||^beta / du and P_x = 1
/// (V) or the off-diagonal pair weight (U; a set with no pair contributes 0); likewise y.
pub fn energy_distance(problem: &EnergyDistanceProblem<'_>) -> EnergyDistanceOutput {
    let d = problem.d;
    let beta = problem.beta;
    let wx = normalized_weights(problem.weights_x, problem.n);
    let wy = normalized_weights(problem.weights_y, problem.m);
    let x = |i: usize| &problem.x[i * d..(i + 1) * d];
    let y = |j: usize| &problem.y[j * d..(j + 1) * d];

    let mut cross = 0.0;
    for i in 0..problem.n {
        for j in 0..problem.m {
            cross += wx[i] * wy[j] * distance(x(i), y(j)).powf(beta);
        }
    }
    let (within_x, pair_weight_x) = within(&wx, x, beta, problem.statistic);
    let (within_y, pair_weight_y) = within(&wy, y, beta, problem.statistic);

    let (grad_x, grad_y) = if problem.grad {
        let set_x = WeightedSet {
            w: &wx,
            point: x,
            pair_weight: pair_weight_x,
        };
        let set_y = WeightedSet {
            w: &wy,
            point: y,
            pair_weight: pair_weight_y,
        };
        (
            Some(distance_gradient(&set_x, &set_y, d, beta)),
            Some(distance_gradient(&set_y, &set_x, d, beta)),
        )
    } else {
        (None, None)
    };

    EnergyDistanceOutput {
        distance: 2.0 * cross - within_x - within_y,
        cross,
        within_x,
        within_y,
        grad_x,
        grad_y,
    }
}

/// One sample set: normalised weights, its points, and the divisor of its within-set
/// sum (1 for V, the off-diagonal pair weight for U).
struct WeightedSet<'a, F: Fn(usize) -> &'a [f64]> {
    w: &'a [f64],
    point: F,
    pair_weight: f64,
}

/// d distance / d(points of `own`): the cross pairs against `other` and the within pairs.
fn distance_gradient<'a, F, G>(
    own: &WeightedSet<'a, F>,
    other: &WeightedSet<'a, G>,
    d: usize,
    beta: f64,
) -> Vec<f64>
where
    F: Fn(usize) -> &'a [f64],
    G: Fn(usize) -> &'a [f64],
{
    let mut grad = vec![0.0; own.w.len() * d];
    for i in 0..own.w.len() {
        let g = &mut grad[i * d..(i + 1) * d];
        for j in 0..other.w.len() {
            let c = 2.0 * own.w[i] * other.w[j];
            add_power_gradient(g, c, (own.point)(i), (other.point)(j), beta);
        }
        if own.pair_weight != 0.0 {
            for k in 0..own.w.len() {
                let c = -2.0 * own.w[i] * own.w[k] / own.pair_weight;
                add_power_gradient(g, c, (own.point)(i), (own.point)(k), beta);
            }
        }
    }
    grad
}

fn normalized_weights(weights: Option<&[f64]>, len: usize) -> Vec<f64> {
    match weights {
        Some(w) => {
            let mut total = 0.0;
            for &wi in w {
                total += wi;
            }
            w.iter().map(|&wi| wi / total).collect()
        }
        None => vec![1.0 / len as f64; len],
    }
}

/// The within-set term and the divisor it took (1 for V; the off-diagonal pair weight
/// for U, 0 when there is no pair).
fn within<'a>(
    w: &[f64],
    point: impl Fn(usize) -> &'a [f64],
    beta: f64,
    statistic: Statistic,
) -> (f64, f64) {
    let mut sum = 0.0;
    // Weight of the off-diagonal pairs, summed directly so that it is exactly 0 when
    // there is no pair, where 1 - sum w^2 could round to a tiny non-zero value.
    let mut pair_weight = 0.0;
    for i in 0..w.len() {
        for k in 0..w.len() {
            if i == k && statistic == Statistic::U {
                continue;
            }
            sum += w[i] * w[k] * distance(point(i), point(k)).powf(beta);
            if i != k {
                pair_weight += w[i] * w[k];
            }
        }
    }
    match statistic {
        Statistic::V => (sum, 1.0),
        Statistic::U if pair_weight == 0.0 => (0.0, 0.0),
        Statistic::U => (sum / pair_weight, pair_weight),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    fn score(
        y: &[f64],
        preds: &[f64],
        n: usize,
        m: usize,
        d: usize,
        beta: f64,
    ) -> EnergyScoreOutput {
        energy_score(&EnergyScoreProblem {
            y,
            preds,
            n,
            m,
            d,
            beta,
            grad: true,
        })
    }

    #[test]
    fn engression_hand_example() {
        // y = 0, preds 1 and 3: term1 = (1 + 3) / 2; term2 = -0.5 * 2 * (0 + 2 + 2 + 0) / 4.
        let out = score(&[0.0], &[1.0, 3.0], 1, 2, 1, 1.0);
        assert_eq!(out.term1, 2.0);
        assert_eq!(out.term2, -1.0);
        assert_eq!(out.loss, 1.0);
        // loss = (|p1| + |p2|) / 2 - |p1 - p2| / 2.
        assert_eq!(out.grad.unwrap(), vec![1.0, 0.0]);
    }

    #[test]
    fn engression_single_sample_has_no_term2() {
        let out = score(&[0.0, 0.0], &[3.0, 4.0], 1, 1, 2, 1.0);
        assert_eq!(out.term2, 0.0);
        assert_eq!(out.loss, 5.0);
        let grad = out.grad.unwrap();
        assert!(close(grad[0], 0.6, 1e-15) && close(grad[1], 0.8, 1e-15));
    }

    fn check_grad_against_finite_differences(beta: f64) {
        let (n, m, d) = (2, 3, 2);
        let y = [0.1, -0.3, 1.2, 0.4];
        let preds = [
            0.5, 0.2, -0.7, 0.9, 1.1, -0.4, //
            1.0, 1.3, 0.2, 0.6, 2.1, -0.5,
        ];
        let grad = score(&y, &preds, n, m, d, beta).grad.unwrap();
        let h = 1e-6;
        for p in 0..preds.len() {
            let mut plus = preds;
            let mut minus = preds;
            plus[p] += h;
            minus[p] -= h;
            let numeric = (score(&y, &plus, n, m, d, beta).loss
                - score(&y, &minus, n, m, d, beta).loss)
                / (2.0 * h);
            assert!(
                close(grad[p], numeric, 1e-8),
                "beta {beta} at {p}: {} vs {numeric}",
                grad[p]
            );
        }
    }

    #[test]
    fn engression_grad_matches_finite_differences() {
        check_grad_against_finite_differences(1.0);
        check_grad_against_finite_differences(1.5);
    }

    #[test]
    fn engression_grad_finite_where_points_coincide() {
        for beta in [0.5, 1.0, 1.5, 2.0] {
            let out = score(&[1.0, 2.0], &[1.0, 2.0, 1.0, 2.0], 1, 2, 2, beta);
            assert_eq!(out.loss, 0.0);
            assert_eq!(out.grad.unwrap(), vec![0.0; 4]);
        }
    }

    fn distance_of(
        x: &[f64],
        y: &[f64],
        d: usize,
        weights: (Option<&[f64]>, Option<&[f64]>),
        statistic: Statistic,
    ) -> EnergyDistanceOutput {
        energy_distance(&EnergyDistanceProblem {
            x,
            y,
            n: x.len() / d,
            m: y.len() / d,
            d,
            weights_x: weights.0,
            weights_y: weights.1,
            beta: 1.0,
            statistic,
            grad: false,
        })
    }

    #[test]
    fn energy_distance_of_a_set_with_itself_is_zero() {
        let x = [0.0, 1.0, 2.5, -1.0, 3.0, 0.5];
        let out = distance_of(&x, &x, 2, (None, None), Statistic::V);
        assert!(close(out.distance, 0.0, 1e-14));
        let w = [1.0, 2.0, 3.0];
        let out = distance_of(&x, &x, 2, (Some(&w), Some(&w)), Statistic::V);
        assert!(close(out.distance, 0.0, 1e-14));
    }

    #[test]
    fn energy_distance_is_symmetric() {
        let x = [0.0, 1.0, 2.5, -1.0, 3.0, 0.5];
        let y = [1.0, 1.0, -2.0, 0.5];
        let (wx, wy) = ([1.0, 2.0, 3.0], [0.5, 4.0]);
        for statistic in [Statistic::V, Statistic::U] {
            let a = distance_of(&x, &y, 2, (Some(&wx), Some(&wy)), statistic);
            let b = distance_of(&y, &x, 2, (Some(&wy), Some(&wx)), statistic);
            assert!(close(a.distance, b.distance, 1e-14));
            assert!(a.distance > 0.0);
        }
    }

    #[test]
    fn energy_distance_by_hand() {
        // X = {0, 1, 3}: pair distances 1, 3, 2, each twice among ordered pairs.
        let x = [0.0, 1.0, 3.0];
        let y = [0.0];
        let v = distance_of(&x, &y, 1, (None, None), Statistic::V);
        assert!(close(v.within_x, 12.0 / 9.0, 1e-15));
        assert!(close(v.cross, 4.0 / 3.0, 1e-15));
        assert_eq!(v.within_y, 0.0);
        assert!(close(v.distance, 8.0 / 3.0 - 4.0 / 3.0, 1e-15));

        let u = distance_of(&x, &y, 1, (None, None), Statistic::U);
        assert!(close(u.within_x, 2.0, 1e-15));
        // A single point has no pair: its U within-set term is 0.
        assert_eq!(u.within_y, 0.0);

        // Equal weights equal no weights; weights are normalised.
        let w = [2.0, 2.0, 2.0];
        let weighted = distance_of(&x, &y, 1, (Some(&w), None), Statistic::U);
        assert!(close(weighted.distance, u.distance, 1e-15));
    }

    fn check_distance_grad_against_finite_differences(beta: f64, statistic: Statistic) {
        let d = 2;
        let x = [0.3, -1.2, 2.0, 0.4, -0.6, 1.1];
        let y = [1.5, 0.2, -0.8, -0.9];
        let (wx, wy) = ([1.0, 2.5, 0.5], [3.0, 1.0]);
        let problem = |x: &[f64], y: &[f64]| {
            energy_distance(&EnergyDistanceProblem {
                x,
                y,
                n: 3,
                m: 2,
                d,
                weights_x: Some(&wx),
                weights_y: Some(&wy),
                beta,
                statistic,
                grad: true,
            })
        };
        let out = problem(&x, &y);
        let (grad_x, grad_y) = (out.grad_x.unwrap(), out.grad_y.unwrap());
        let h = 1e-6;
        for p in 0..x.len() + y.len() {
            let (mut xp, mut xm, mut yp, mut ym) = (x, x, y, y);
            let (analytic, numeric) = if p < x.len() {
                xp[p] += h;
                xm[p] -= h;
                let diff = problem(&xp, &y).distance - problem(&xm, &y).distance;
                (grad_x[p], diff / (2.0 * h))
            } else {
                yp[p - x.len()] += h;
                ym[p - x.len()] -= h;
                let diff = problem(&x, &yp).distance - problem(&x, &ym).distance;
                (grad_y[p - x.len()], diff / (2.0 * h))
            };
            assert!(
                close(analytic, numeric, 1e-8),
                "beta {beta} {statistic:?} at {p}: {analytic} vs {numeric}"
            );
        }
    }

    #[test]
    fn energy_distance_grad_matches_finite_differences() {
        for statistic in [Statistic::V, Statistic::U] {
            check_distance_grad_against_finite_differences(1.0, statistic);
            check_distance_grad_against_finite_differences(1.5, statistic);
            check_distance_grad_against_finite_differences(2.0, statistic);
        }
    }

    #[test]
    fn energy_distance_grad_is_zero_for_a_set_against_itself_at_beta_2() {
        // beta = 2: d/dx_i = 4 wx_i (mean x - mean y) for V, which vanishes for Y = X.
        let x = [0.0, 1.0, 2.5, -1.0, 3.0, 0.5];
        let out = energy_distance(&EnergyDistanceProblem {
            x: &x,
            y: &x,
            n: 3,
            m: 3,
            d: 2,
            weights_x: None,
            weights_y: None,
            beta: 2.0,
            statistic: Statistic::V,
            grad: true,
        });
        for g in out.grad_x.unwrap().iter().chain(&out.grad_y.unwrap()) {
            assert!(close(*g, 0.0, 1e-14), "{g}");
        }
    }
}
