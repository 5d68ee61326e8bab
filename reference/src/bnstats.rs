//! Batch-norm statistics in every layout, running stats, mergeable Welford partials.

/// Memory layout of x.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    /// [N, C, H, W]
    #[default]
    Nchw,
    /// [N, H, W, C]
    Nhwc,
    /// [N, C] (H = W = 1)
    Nc,
}

/// Shape of x: `spatial` = H * W (1 for NC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnShape {
    pub n: usize,
    pub c: usize,
    pub spatial: usize,
    pub layout: Layout,
}

/// Welford partial of one channel: merges across batches and devices by Chan's formula.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Welford {
    pub count: f64,
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

/// Per-channel statistics, each of length C.
#[derive(Clone, Debug, PartialEq)]
pub struct BnStats {
    pub mean: Vec<f64>,
    pub var_biased: Vec<f64>,
    /// NaN when count = 1 (as PyTorch).
    pub var_unbiased: Vec<f64>,
    /// 1 / sqrt(var_biased + eps)
    pub invstd: Vec<f64>,
    pub partial: Vec<Welford>,
}

/// Offset of element (n, c, s) of x, where s indexes the H * W positions.
pub fn index(shape: BnShape, n: usize, c: usize, s: usize) -> usize {
    match shape.layout {
        Layout::Nchw => (n * shape.c + c) * shape.spatial + s,
        Layout::Nhwc => (n * shape.spatial + s) * shape.c + c,
        Layout::Nc => n * shape.c + c,
    }
}

/// Statistics of x over N, H, W for each channel.
///
/// Two passes (mean first, then the sum of squared deviations from it): slower than
/// Welford but the most accurate plain formula, which is what a reference should be.
pub fn stats(x: &[f64], shape: BnShape, eps: f64) -> BnStats {
    let count = shape.n * shape.spatial;
    let mut partials = Vec::with_capacity(shape.c);
    for c in 0..shape.c {
        let mut sum = 0.0;
        for n in 0..shape.n {
            for s in 0..shape.spatial {
                sum += x[index(shape, n, c, s)];
            }
        }
        let mean = sum / count as f64;
        let mut m2 = 0.0;
        for n in 0..shape.n {
            for s in 0..shape.spatial {
                let dev = x[index(shape, n, c, s)] - mean;
                m2 += dev * dev;
            }
        }
        partials.push(Welford {
            count: count as f64,
            mean,
            m2,
        });
    }
    finalize(&partials, eps)
}

/// Chan's parallel merge of two partials of the same channel.
pub fn merge(a: Welford, b: Welford) -> Welford {
    // An empty side would make the formula divide 0 by 0.
    if a.count == 0.0 {
        return b;
    }
    if b.count == 0.0 {
        return a;
    }
    let count = a.count + b.count;
    let delta = b.mean - a.mean;
    Welford {
        count,
        mean: a.mean + delta * b.count / count,
        m2: a.m2 + b.m2 + delta * delta * a.count * b.count / count,
    }
}

/// Statistics (biased var, unbiased var, invstd) from a merged partial.
///
/// `partials` holds one partial per channel. A count of 1 gives NaN unbiased variance,
/// as PyTorch.
pub fn finalize(partials: &[Welford], eps: f64) -> BnStats {
    let mut out = BnStats {
        mean: Vec::with_capacity(partials.len()),
        var_biased: Vec::with_capacity(partials.len()),
        var_unbiased: Vec::with_capacity(partials.len()),
        invstd: Vec::with_capacity(partials.len()),
        partial: partials.to_vec(),
    };
    for p in partials {
        let var_biased = p.m2 / p.count;
        let var_unbiased = if p.count > 1.0 {
            p.m2 / (p.count - 1.0)
        } else {
            f64::NAN
        };
        out.mean.push(p.mean);
        out.var_biased.push(var_biased);
        out.var_unbiased.push(var_unbiased);
        out.invstd.push(1.0 / (var_biased + eps).sqrt());
    }
    out
}

/// The factor of one running-statistics step: the momentum, or for `momentum = None` the
/// cumulative average's 1 / num_batches_tracked, where `num_batches_tracked` is the count
/// after this batch (>= 1).
pub fn running_factor(momentum: Option<f64>, num_batches_tracked: u64) -> f64 {
    match momentum {
        Some(m) => m,
        None => 1.0 / num_batches_tracked as f64,
    }
}

/// PyTorch BatchNorm running statistics, updated in place with `factor` (see
/// [`running_factor`]): rm = (1 - f) rm + f mean; rv = (1 - f) rv + f var_unbiased.
pub fn update_running(
    running_mean: &mut [f64],
    running_var: &mut [f64],
    batch_mean: &[f64],
    batch_var_unbiased: &[f64],
    factor: f64,
) {
    for c in 0..running_mean.len() {
        running_mean[c] = (1.0 - factor) * running_mean[c] + factor * batch_mean[c];
        running_var[c] = (1.0 - factor) * running_var[c] + factor * batch_var_unbiased[c];
    }
}

/// y = (x - mean) * invstd * gamma + beta, in the layout of x; gamma and beta default to 1 and 0.
pub fn normalize(
    x: &[f64],
    shape: BnShape,
    stats: &BnStats,
    gamma: Option<&[f64]>,
    beta: Option<&[f64]>,
) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for c in 0..shape.c {
        let g = gamma.map_or(1.0, |g| g[c]);
        let b = beta.map_or(0.0, |b| b[c]);
        for n in 0..shape.n {
            for s in 0..shape.spatial {
                let at = index(shape, n, c, s);
                y[at] = (x[at] - stats.mean[c]) * stats.invstd[c] * g + b;
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// N = 2, C = 2, H * W = 2 in NCHW: channel 0 holds 1, 2, 5, 8; channel 1 holds 0, 0, 3, -3.
    const NCHW: [f64; 8] = [1.0, 2.0, 0.0, 0.0, 5.0, 8.0, 3.0, -3.0];

    fn shape(n: usize, layout: Layout) -> BnShape {
        BnShape {
            n,
            c: 2,
            spatial: if layout == Layout::Nc { 1 } else { 2 },
            layout,
        }
    }

    #[test]
    fn stats_by_hand_in_every_layout() {
        let nhwc = [1.0, 0.0, 2.0, 0.0, 5.0, 3.0, 8.0, -3.0];
        let nc = nhwc;
        let cases = [
            (NCHW, shape(2, Layout::Nchw)),
            (nhwc, shape(2, Layout::Nhwc)),
            (nc, shape(4, Layout::Nc)),
        ];
        for (x, shape) in cases {
            let s = stats(&x, shape, 1e-5);
            // channel 0: mean 4, deviations -3, -2, 1, 4 -> M2 = 30
            // channel 1: mean 0, M2 = 18
            assert_eq!(s.mean, vec![4.0, 0.0]);
            assert_eq!(s.var_biased, vec![7.5, 4.5]);
            assert_eq!(s.var_unbiased, vec![10.0, 6.0]);
            assert!(close(s.invstd[0], 1.0 / (7.5f64 + 1e-5).sqrt(), 1e-15));
            assert_eq!(
                s.partial[0],
                Welford {
                    count: 4.0,
                    mean: 4.0,
                    m2: 30.0
                }
            );
        }
    }

    #[test]
    fn merged_halves_equal_whole_batch() {
        let whole = stats(&NCHW, shape(2, Layout::Nchw), 1e-5);
        let first = stats(&NCHW[..4], shape(1, Layout::Nchw), 1e-5);
        let second = stats(&NCHW[4..], shape(1, Layout::Nchw), 1e-5);
        let merged: Vec<Welford> = (0..2)
            .map(|c| merge(first.partial[c], second.partial[c]))
            .collect();
        let from_partials = finalize(&merged, 1e-5);
        for c in 0..2 {
            assert!(close(from_partials.mean[c], whole.mean[c], 1e-15));
            assert!(close(
                from_partials.var_biased[c],
                whole.var_biased[c],
                1e-14
            ));
            assert!(close(
                from_partials.var_unbiased[c],
                whole.var_unbiased[c],
                1e-14
            ));
            assert!(close(from_partials.invstd[c], whole.invstd[c], 1e-14));
        }
        let empty = Welford {
            count: 0.0,
            mean: 0.0,
            m2: 0.0,
        };
        assert_eq!(merge(empty, first.partial[0]), first.partial[0]);
        assert_eq!(merge(first.partial[0], empty), first.partial[0]);
    }

    #[test]
    fn running_stats_follow_pytorch() {
        let s = stats(&NCHW, shape(2, Layout::Nchw), 1e-5);
        // PyTorch BatchNorm2d starts from running_mean 0, running_var 1.
        let (mut rm, mut rv) = (vec![0.0, 0.0], vec![1.0, 1.0]);
        update_running(
            &mut rm,
            &mut rv,
            &s.mean,
            &s.var_unbiased,
            running_factor(Some(0.1), 1),
        );
        assert!(close(rm[0], 0.4, 1e-15) && close(rm[1], 0.0, 1e-15));
        assert!(close(rv[0], 0.9 + 1.0, 1e-15) && close(rv[1], 0.9 + 0.6, 1e-15));

        // momentum None: the cumulative average of the batches seen so far.
        let t = stats(
            &[0.0, 2.0, 1.0, 1.0, 4.0, 6.0, 1.0, 1.0],
            shape(2, Layout::Nchw),
            1e-5,
        );
        let (mut rm, mut rv) = (vec![0.0, 0.0], vec![1.0, 1.0]);
        update_running(
            &mut rm,
            &mut rv,
            &s.mean,
            &s.var_unbiased,
            running_factor(None, 1),
        );
        assert_eq!(rm, s.mean);
        assert_eq!(rv, s.var_unbiased);
        update_running(
            &mut rm,
            &mut rv,
            &t.mean,
            &t.var_unbiased,
            running_factor(None, 2),
        );
        assert_eq!(rm, vec![(4.0 + 3.0) / 2.0, (0.0 + 1.0) / 2.0]);
        // t: channel 0 holds 0, 2, 4, 6 (unbiased var 20/3); channel 1 is constant.
        assert!(close(rv[0], (10.0 + 20.0 / 3.0) / 2.0, 1e-14));
        assert!(close(rv[1], 3.0, 1e-15));
    }

    #[test]
    fn single_value_per_channel_has_nan_unbiased_var() {
        let s = stats(&[3.0, -1.0], shape(1, Layout::Nc), 0.5);
        assert_eq!(s.mean, vec![3.0, -1.0]);
        assert_eq!(s.var_biased, vec![0.0, 0.0]);
        assert!(s.var_unbiased.iter().all(|v| v.is_nan()));
        assert!(close(s.invstd[0], 2f64.sqrt(), 1e-15));
    }

    #[test]
    fn normalize_by_hand() {
        let shape = shape(2, Layout::Nchw);
        let s = stats(&NCHW, shape, 0.0);
        let y = normalize(&NCHW, shape, &s, Some(&[2.0, 1.0]), Some(&[0.0, 10.0]));
        let sd0 = 7.5f64.sqrt();
        let sd1 = 4.5f64.sqrt();
        let expected = [
            -3.0 / sd0 * 2.0,
            -2.0 / sd0 * 2.0,
            10.0,
            10.0,
            1.0 / sd0 * 2.0,
            4.0 / sd0 * 2.0,
            3.0 / sd1 + 10.0,
            -3.0 / sd1 + 10.0,
        ];
        for k in 0..8 {
            assert!(close(y[k], expected[k], 1e-14), "{y:?}");
        }
        let plain = normalize(&NCHW, shape, &s, None, None);
        assert!(close(plain[0], -3.0 / sd0, 1e-15));
    }
}
