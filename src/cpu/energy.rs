//! energy on the CPU, with the GPU kernels' accumulation rules (kernels/energy.cu):
//! distances are taken from differences in f32, squared and summed by fused multiply-adds,
//! powered distances are summed in f32
//! over tiles of [`PAIR_TILE`] columns and the tile sums in f64, in a fixed order. The
//! second set of every pair sum is held transposed (one row per dimension), so the inner
//! loops run over [`LANES`] columns at once, for [`ROW_GROUP`] points of the first set
//! (or blocks of columns, or dimensions of the gradient) at a time, each its own chain of
//! adds; tiles start at multiples of [`PAIR_TILE`], so a point's bits do not depend on its
//! group. Within-set sums take the pairs i < j once and double them (the diagonal is 0).
//! The pair sums, the score and the distance's gradient run through `run_best` (AVX-512
//! where the CPU has it).

use rayon::prelude::*;

use crate::cpu::{
    lane_sum, map_chunks, run_best, scalar, CpuBackend, Floats, Work, CHUNK_ELEMENTS, LANES,
};
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::energy::Statistic;
use crate::spec::energy::{
    check_weight_values, EnergyDistanceCall, EnergyDistanceOutput, EnergyKernels, EnergyScoreCall,
    EnergyScoreOutput,
};

/// Columns per f32 partial sum before it is added to the f64 total.
const PAIR_TILE: usize = 4 * LANES;
/// Rows of the first set per task of a pair sum.
const ROW_TILE: usize = 64;
/// Rows of the first set a pair sum takes against each block of columns at once: that
/// many independent chains of adds per lane (one row alone was a single dependent chain
/// per block, bound by the add's latency).
const ROW_GROUP: usize = 8;

/// How ||u||^beta is formed from s = ||u||^2.
#[derive(Clone, Copy)]
enum Power {
    /// beta = 1: sqrt(s).
    Sqrt,
    /// beta = 2: s itself.
    Square,
    /// Any other beta: s^(beta / 2) in f64, so the power adds one f32 rounding only.
    Other(f64),
}

impl Power {
    fn new(beta: f64) -> Power {
        if beta == 1.0 {
            Power::Sqrt
        } else if beta == 2.0 {
            Power::Square
        } else {
            Power::Other(beta)
        }
    }

    #[inline(always)]
    fn of(self, s: f32) -> f32 {
        match self {
            Power::Sqrt => s.sqrt(),
            Power::Square => s,
            Power::Other(beta) => f64::from(s).powf(0.5 * beta) as f32,
        }
    }

    /// `of` over a lane array, the power chosen once for all the lanes.
    #[inline(always)]
    fn of_lanes(self, s: &[f32; LANES]) -> [f32; LANES] {
        match self {
            Power::Sqrt => s.map(f32::sqrt),
            Power::Square => *s,
            Power::Other(_) => s.map(|v| self.of(v)),
        }
    }

    /// `slope` over a lane array, the power chosen once for all the lanes.
    #[inline(always)]
    fn slope_lanes(self, s: &[f32; LANES]) -> [f32; LANES] {
        match self {
            Power::Sqrt => s.map(|v| if v == 0.0 { 0.0 } else { 1.0 / v.sqrt() }),
            Power::Square => s.map(|v| if v == 0.0 { 0.0 } else { 2.0 }),
            Power::Other(_) => s.map(|v| self.slope(v)),
        }
    }

    /// beta ||u||^(beta - 2), the factor of u in d||u||^beta / du, with the sub-gradient
    /// 0 at u = 0 (NaN stays NaN).
    fn slope(self, s: f32) -> f32 {
        if s == 0.0 {
            return 0.0;
        }
        match self {
            Power::Sqrt => 1.0 / s.sqrt(),
            Power::Square => 2.0,
            Power::Other(beta) => (beta * f64::from(s).powf(0.5 * beta - 1.0)) as f32,
        }
    }
}

/// A set of points decoded to f32, transposed to [d, padded] (columns past `len` are 0)
/// with its weights (0 past `len`).
struct Columns {
    len: usize,
    padded: usize,
    values: Vec<f32>,
    weights: Vec<f32>,
}

impl Columns {
    /// Points `first .. first + len` of `points` ([_, d] row-major).
    fn new(
        points: Floats<'_>,
        first: usize,
        len: usize,
        d: usize,
        weights: Option<&[f32]>,
    ) -> Columns {
        let padded = len.div_ceil(LANES) * LANES;
        let mut values = vec![0.0f32; d * padded];
        let mut row = vec![0.0f32; d];
        for j in 0..len {
            let p = points.read((first + j) * d, &mut row);
            for (k, &v) in p.iter().enumerate() {
                values[k * padded + j] = v;
            }
        }
        let mut w = vec![0.0f32; padded];
        for (j, wj) in w.iter_mut().take(len).enumerate() {
            *wj = weights.map_or(1.0, |w| w[first + j]);
        }
        Columns {
            len,
            padded,
            values,
            weights: w,
        }
    }

    /// s_r,l = ||a_r - column (block + l)||^2 for the LANES columns from `block` and the
    /// R points a_r = a[r d .. (r + 1) d]: each sum over the dimensions in order, so a
    /// point's bits do not depend on R.
    #[inline(always)]
    fn squares<const R: usize>(&self, a: &[f32], block: usize) -> [[f32; LANES]; R] {
        let d = a.len() / R;
        let mut s = [[0.0f32; LANES]; R];
        for k in 0..d {
            // A copy, so that the block is loaded once for the R points.
            let mut column = [0.0f32; LANES];
            column.copy_from_slice(&self.values[k * self.padded + block..][..LANES]);
            for (r, sr) in s.iter_mut().enumerate() {
                let ak = a[r * d + k];
                for l in 0..LANES {
                    let diff = ak - column[l];
                    sr[l] = diff.mul_add(diff, sr[l]);
                }
            }
        }
        s
    }

    /// out_q = sum_j w_j h(||a - b_j||^2) (a_q - b_jq) over the columns in order, h the
    /// power's slope (padding weighs 0): f32 per lane, the lanes summed in a fixed order.
    /// `slopes` is scratch of at least `padded`.
    #[inline(always)]
    fn slope_sums(&self, a: &[f32], power: Power, slopes: &mut [f32], out: &mut [f32]) {
        let mut block = 0;
        while block + ROW_GROUP * LANES <= self.padded {
            self.block_slopes::<ROW_GROUP>(a, block, power, slopes);
            block += ROW_GROUP * LANES;
        }
        for block in (block..self.padded).step_by(LANES) {
            self.block_slopes::<1>(a, block, power, slopes);
        }
        let mut q = 0;
        while q + ROW_GROUP <= out.len() {
            let sums = self.column_sums::<ROW_GROUP>(a, q, slopes);
            out[q..q + ROW_GROUP].copy_from_slice(&sums);
            q += ROW_GROUP;
        }
        for (q, o) in out.iter_mut().enumerate().skip(q) {
            [*o] = self.column_sums::<1>(a, q, slopes);
        }
    }

    /// slopes_j = w_j h(||a - b_j||^2) for the C blocks of LANES columns from `block`,
    /// each block's sums its own chain (its bits do not depend on C).
    #[inline(always)]
    fn block_slopes<const C: usize>(
        &self,
        a: &[f32],
        block: usize,
        power: Power,
        slopes: &mut [f32],
    ) {
        let mut s = [[0.0f32; LANES]; C];
        for (k, &ak) in a.iter().enumerate() {
            let at = k * self.padded + block;
            for (c, sc) in s.iter_mut().enumerate() {
                let column = &self.values[at + c * LANES..at + (c + 1) * LANES];
                for l in 0..LANES {
                    let diff = ak - column[l];
                    sc[l] = diff.mul_add(diff, sc[l]);
                }
            }
        }
        for (c, sc) in s.iter().enumerate() {
            let from = block + c * LANES;
            let h = power.slope_lanes(sc);
            let weights = &self.weights[from..from + LANES];
            for ((slope, &w), &hl) in slopes[from..from + LANES].iter_mut().zip(weights).zip(&h) {
                *slope = w * hl;
            }
        }
    }

    /// out_q = sum_j slopes_j (a_q - b_jq) for the Q dimensions from q0, over the columns
    /// in order (f32 per lane, the lanes summed in a fixed order), each its own chain.
    #[inline(always)]
    fn column_sums<const Q: usize>(&self, a: &[f32], q0: usize, slopes: &[f32]) -> [f32; Q] {
        let m = self.padded;
        let mut acc = [[0.0f32; LANES]; Q];
        for block in (0..m).step_by(LANES) {
            let hb = &slopes[block..block + LANES];
            for (dq, accq) in acc.iter_mut().enumerate() {
                let q = q0 + dq;
                let cb = &self.values[q * m + block..q * m + block + LANES];
                for l in 0..LANES {
                    accq[l] = hb[l].mul_add(a[q] - cb[l], accq[l]);
                }
            }
        }
        acc.map(|lanes| lane_sum(&lanes))
    }

    /// sum over columns j >= `from` of w_j ||a - b_j||^beta: f32 per tile, f64 across.
    #[inline(always)]
    fn weighted_sum(&self, a: &[f32], from: usize, power: Power) -> f64 {
        let [total] = self.weighted_sums::<1>(a, [from], power);
        total
    }

    /// weighted_sum for the R points a_r = a[r d .. (r + 1) d], point r from column
    /// from[r]. Tiles start at multiples of PAIR_TILE, whatever `from`, so a point's tile
    /// sums, hence its bits, do not depend on R or on the points beside it.
    #[inline(always)]
    fn weighted_sums<const R: usize>(&self, a: &[f32], from: [usize; R], power: Power) -> [f64; R] {
        let mut total = [0.0f64; R];
        let first = from.iter().copied().min().unwrap_or(0) / PAIR_TILE * PAIR_TILE;
        for tile in (first..self.padded).step_by(PAIR_TILE) {
            let mut acc = [[0.0f32; LANES]; R];
            for block in (tile..(tile + PAIR_TILE).min(self.padded)).step_by(LANES) {
                let s = self.squares::<R>(a, block);
                let weights = &self.weights[block..block + LANES];
                for ((accr, sr), &fr) in acc.iter_mut().zip(&s).zip(&from) {
                    let powered = power.of_lanes(sr);
                    for l in 0..LANES {
                        // Columns before `from`, and the padding, add an exact 0, not a
                        // 0 weight times their term: an infinite distance to a padding
                        // column (a point with an infinite coordinate) must not turn the
                        // sum to NaN, as the GPU kernels mask too.
                        let column = block + l;
                        let kept = column >= fr && column < self.len;
                        accr[l] += if kept { weights[l] * powered[l] } else { 0.0 };
                    }
                }
            }
            for (t, accr) in total.iter_mut().zip(&acc) {
                *t += f64::from(lane_sum(accr));
            }
        }
        total
    }
}

/// sum_i wa_i sum_j wb_j ||a_i - b_j||^beta over all pairs, or over i < j when `same`
/// (b is a itself), in tasks of ROW_TILE rows merged in row order.
fn pair_sum(
    a: Floats<'_>,
    wa: Option<&[f32]>,
    b: &Columns,
    d: usize,
    rows: usize,
    same: bool,
    power: Power,
) -> f64 {
    let tiles = map_chunks(rows, ROW_TILE, |rows| {
        run_best(PairRows {
            a,
            wa,
            b,
            d,
            rows,
            same,
            power,
        })
    });
    tiles.iter().sum()
}

/// One task of [`pair_sum`]: its rows' weighted sums, added in row order.
struct PairRows<'a> {
    a: Floats<'a>,
    wa: Option<&'a [f32]>,
    b: &'a Columns,
    d: usize,
    rows: std::ops::Range<usize>,
    same: bool,
    power: Power,
}

impl PairRows<'_> {
    /// The weighted sums of the R rows from row i, times their weights.
    #[inline(always)]
    fn group<const R: usize>(&self, i: usize, buf: &mut [f32]) -> [f64; R] {
        let from: [usize; R] = std::array::from_fn(|r| if self.same { i + r + 1 } else { 0 });
        let p = self.a.read(i * self.d, &mut buf[..R * self.d]);
        let sums = self.b.weighted_sums::<R>(p, from, self.power);
        std::array::from_fn(|r| self.wa.map_or(1.0, |w| f64::from(w[i + r])) * sums[r])
    }
}

impl Work for PairRows<'_> {
    type Output = f64;

    #[inline(always)]
    fn run(self) -> f64 {
        let mut buf = vec![0.0f32; ROW_GROUP * self.d];
        let mut total = 0.0f64;
        let mut i = self.rows.start;
        while i + ROW_GROUP <= self.rows.end {
            for term in self.group::<ROW_GROUP>(i, &mut buf) {
                total += term;
            }
            i += ROW_GROUP;
        }
        for i in i..self.rows.end {
            let [term] = self.group::<1>(i, &mut buf);
            total += term;
        }
        total
    }
}

/// The weights, after the value check every backend makes (finite, >= 0, not all 0).
fn checked_weights<'a>(name: &str, weights: Option<&'a Tensor>) -> Result<Option<&'a [f32]>> {
    let Some(w) = weights else { return Ok(None) };
    let values = w.host_slice::<f32>()?;
    let wide: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
    check_weight_values(name, &wide)?;
    Ok(Some(values))
}

/// The total weight W and the weight of the off-diagonal pairs W^2 - sum w^2 (exactly 0
/// for one point), in f64.
fn weight_totals(weights: Option<&[f32]>, len: usize) -> (f64, f64) {
    match weights {
        Some(w) => {
            let total: f64 = w.iter().map(|&v| f64::from(v)).sum();
            let squares: f64 = w.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            (total, total * total - squares)
        }
        None => (len as f64, len as f64 * (len as f64 - 1.0)),
    }
}

/// The factor of sum_k w_i w_k g(x_i - x_k) in d distance / dx_i (raw weights): -2 over
/// the weight the within-set sum is divided by (0 for a U statistic without pairs).
fn within_coef((total, off_diagonal): (f64, f64), statistic: Statistic) -> f64 {
    match statistic {
        Statistic::V => -2.0 / (total * total),
        Statistic::U if off_diagonal == 0.0 => 0.0,
        Statistic::U => -2.0 / off_diagonal,
    }
}

/// d distance / d(points) [rows, d] f32: per row i, w_i times the two terms' coefficients
/// times their slope sums (the cross term against the other set, the within term against
/// the set itself), in tasks of ROW_TILE rows.
fn distance_gradient(
    points: Floats<'_>,
    weights: Option<&[f32]>,
    rows: usize,
    d: usize,
    [(cross, cross_coef), (within, within_coef)]: [(&Columns, f64); 2],
    power: Power,
) -> Result<Tensor> {
    let mut grad = Tensor::host_output(&[rows, d], DType::F32)?;
    grad.host_slice_mut::<f32>()?
        .par_chunks_mut(ROW_TILE * d)
        .enumerate()
        .for_each(|(task, out)| {
            run_best(GradientRows {
                points,
                weights,
                first: task * ROW_TILE,
                d,
                terms: [(cross, cross_coef), (within, within_coef)],
                power,
                out,
            })
        });
    Ok(grad)
}

/// One task of [`distance_gradient`]: the gradient rows from row `first`, into `out`.
struct GradientRows<'a> {
    points: Floats<'a>,
    weights: Option<&'a [f32]>,
    first: usize,
    d: usize,
    terms: [(&'a Columns, f64); 2],
    power: Power,
    out: &'a mut [f32],
}

impl Work for GradientRows<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let d = self.d;
        let [(cross, cross_coef), (within, within_coef)] = self.terms;
        let (mut row, mut cross_sums) = (vec![0.0f32; d], vec![0.0f32; d]);
        let mut slopes = vec![0.0f32; cross.padded.max(within.padded)];
        for (k, g) in self.out.chunks_mut(d).enumerate() {
            let i = self.first + k;
            let a = self.points.read(i * d, &mut row);
            let wi = self.weights.map_or(1.0, |w| f64::from(w[i]));
            cross.slope_sums(a, self.power, &mut slopes, &mut cross_sums);
            within.slope_sums(a, self.power, &mut slopes, g);
            for (gq, &cq) in g.iter_mut().zip(&cross_sums) {
                let sum = cross_coef * f64::from(cq) + within_coef * f64::from(*gq);
                *gq = (wi * sum) as f32;
            }
        }
    }
}

/// The within-set term from the sum over pairs i < j.
fn within(pairs: f64, (total, off_diagonal): (f64, f64), statistic: Statistic) -> f64 {
    match statistic {
        Statistic::V => 2.0 * pairs / (total * total),
        Statistic::U if off_diagonal == 0.0 => 0.0,
        Statistic::U => 2.0 * pairs / off_diagonal,
    }
}

/// One sample's predictions [m, d] transposed, its target and the power, for the score.
struct Sample<'a> {
    preds: &'a Columns,
    /// Prediction j as a row (from the row-major input).
    rows: &'a [f32],
    y: &'a [f32],
    d: usize,
    power: Power,
}

impl Sample<'_> {
    #[inline(always)]
    fn row(&self, j: usize) -> &[f32] {
        &self.rows[j * self.d..(j + 1) * self.d]
    }

    /// ||p_j - y||^2.
    #[inline(always)]
    fn target_square(&self, j: usize) -> f32 {
        let mut s = 0.0f32;
        for (&p, &y) in self.row(j).iter().zip(self.y) {
            let u = p - y;
            s = u.mul_add(u, s);
        }
        s
    }

    /// The gradient of prediction j: c1 h(s1) (p_j - y) + c2 sum_k h(s_jk) (p_j - p_k),
    /// the pair sum in k order over each dimension.
    #[inline(always)]
    fn grad_row(&self, j: usize, c1: f32, c2: f32, slopes: &mut [f32], out: &mut [f32]) {
        let p = self.row(j);
        let h1 = c1 * self.power.slope(self.target_square(j));
        // p_j against itself has s = 0, so slope 0.
        self.preds.slope_sums(p, self.power, slopes, out);
        for (q, g) in out.iter_mut().enumerate() {
            *g = c2.mul_add(*g, h1 * (p[q] - self.y[q]));
        }
    }
}

/// One chunk of the energy score's samples: its sums of ||p_ij - y_i||^beta and of
/// ||p_ij - p_ik||^beta, each in sample and prediction order, and its gradient rows.
struct ScoreSamples<'a> {
    preds: Floats<'a>,
    y: Floats<'a>,
    samples: std::ops::Range<usize>,
    m: usize,
    d: usize,
    power: Power,
    /// The gradient's coefficients of term1 and term2.
    coefs: (f32, f32),
    grad: Option<&'a mut [f32]>,
}

impl Work for ScoreSamples<'_> {
    type Output = (f64, f64);

    #[inline(always)]
    fn run(mut self) -> (f64, f64) {
        let (m, d, power) = (self.m, self.d, self.power);
        let (c1, c2) = self.coefs;
        let (mut sum1, mut sum2) = (0.0f64, 0.0f64);
        let (mut rows, mut target) = (vec![0.0f32; m * d], vec![0.0f32; d]);
        let mut slopes = vec![0.0f32; m.div_ceil(LANES) * LANES];
        let first = self.samples.start;
        for i in self.samples {
            let columns = Columns::new(self.preds, i * m, m, d, None);
            let sample = Sample {
                preds: &columns,
                rows: self.preds.read(i * m * d, &mut rows),
                y: self.y.read(i * d, &mut target),
                d,
                power,
            };
            let mut j = 0;
            while j + ROW_GROUP <= m {
                let group = &sample.rows[j * d..(j + ROW_GROUP) * d];
                for sum in columns.weighted_sums::<ROW_GROUP>(group, [0; ROW_GROUP], power) {
                    sum2 += sum;
                }
                j += ROW_GROUP;
            }
            for j in j..m {
                sum2 += columns.weighted_sum(sample.row(j), 0, power);
            }
            for j in 0..m {
                sum1 += f64::from(power.of(sample.target_square(j)));
                if let Some(g) = self.grad.as_deref_mut() {
                    let at = ((i - first) * m + j) * d;
                    sample.grad_row(j, c1, c2, &mut slopes, &mut g[at..at + d]);
                }
            }
        }
        (sum1, sum2)
    }
}

impl EnergyKernels for CpuBackend {
    fn energy_score(&self, bound: &EnergyScoreCall<'_>) -> Result<EnergyScoreOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let (n, m, d) = (spec.n, spec.m, spec.d);
        let (y, preds) = (Floats::of(call.y)?, Floats::of(call.preds)?);
        let power = Power::new(spec.beta);
        let samples = (CHUNK_ELEMENTS / (m * m * d).max(1)).max(1);
        let mut grad = spec
            .grad
            .then(|| Tensor::host_output(&[n, m, d], DType::F32))
            .transpose()?;
        let grad_chunks: Vec<Option<&mut [f32]>> = match grad.as_mut() {
            Some(g) => g
                .host_slice_mut::<f32>()?
                .chunks_mut(samples * m * d)
                .map(Some)
                .collect(),
            None => (0..n.div_ceil(samples)).map(|_| None).collect(),
        };
        // The gradient's coefficients: 1 / (n m) for term1, -m / (m - 1) / (n m m) for
        // the ordered pairs of term2 (p_ij is first and second of one, hence twice 0.5).
        let c1 = (1.0 / (n * m) as f64) as f32;
        let c2 = if m < 2 {
            0.0
        } else {
            (-(m as f64) / (m - 1) as f64 / (n * m * m) as f64) as f32
        };
        let sums: Vec<(f64, f64)> = grad_chunks
            .into_par_iter()
            .enumerate()
            .map(|(chunk, grad)| {
                run_best(ScoreSamples {
                    preds,
                    y,
                    samples: chunk * samples..((chunk + 1) * samples).min(n),
                    m,
                    d,
                    power,
                    coefs: (c1, c2),
                    grad,
                })
            })
            .collect();
        let (mut sum1, mut sum2) = (0.0, 0.0);
        for &(s1, s2) in &sums {
            sum1 += s1;
            sum2 += s2;
        }
        let term1 = sum1 / (n * m) as f64;
        let term2 = if m < 2 {
            0.0
        } else {
            -0.5 * (m as f64 / (m - 1) as f64) * sum2 / (n * m * m) as f64
        };
        Ok(EnergyScoreOutput {
            term1: scalar(term1)?,
            term2: scalar(term2)?,
            loss: scalar(term1 + term2)?,
            grad,
        })
    }

    fn energy_distance(&self, bound: &EnergyDistanceCall<'_>) -> Result<EnergyDistanceOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let (n, m, d) = (spec.n, spec.m, spec.d);
        let (x, y) = (Floats::of(call.x)?, Floats::of(call.y)?);
        let wx = checked_weights("weights_x", call.weights_x)?;
        let wy = checked_weights("weights_y", call.weights_y)?;
        let power = Power::new(spec.beta);
        let (x_columns, y_columns) = (Columns::new(x, 0, n, d, wx), Columns::new(y, 0, m, d, wy));
        let (totals_x, totals_y) = (weight_totals(wx, n), weight_totals(wy, m));
        let cross = pair_sum(x, wx, &y_columns, d, n, false, power) / (totals_x.0 * totals_y.0);
        let within_x = within(
            pair_sum(x, wx, &x_columns, d, n, true, power),
            totals_x,
            spec.statistic,
        );
        let within_y = within(
            pair_sum(y, wy, &y_columns, d, m, true, power),
            totals_y,
            spec.statistic,
        );
        let (grad_x, grad_y) = if spec.grad {
            let cross_coef = 2.0 / (totals_x.0 * totals_y.0);
            let within_x_coef = within_coef(totals_x, spec.statistic);
            let within_y_coef = within_coef(totals_y, spec.statistic);
            let gradient = |points, weights, rows, terms| {
                distance_gradient(points, weights, rows, d, terms, power).map(Some)
            };
            (
                gradient(
                    x,
                    wx,
                    n,
                    [(&y_columns, cross_coef), (&x_columns, within_x_coef)],
                )?,
                gradient(
                    y,
                    wy,
                    m,
                    [(&x_columns, cross_coef), (&y_columns, within_y_coef)],
                )?,
            )
        } else {
            (None, None)
        };
        Ok(EnergyDistanceOutput {
            distance: scalar(2.0 * cross - within_x - within_y)?,
            cross: scalar(cross)?,
            within_x: scalar(within_x)?,
            within_y: scalar(within_y)?,
            grad_x,
            grad_y,
        })
    }
}

#[cfg(test)]
mod tests {
    use losskern_reference::energy as reference;

    use super::{Columns, Power, ROW_GROUP};
    use crate::check::Rng;
    use crate::cpu::{Floats, LANES};
    use crate::device::{Device, Tensor};
    use crate::ops::energy::{energy_distance, EnergyDistance, Statistic};

    /// A point's sums and slopes have the same bits alone and in a group (the tiles start
    /// at fixed columns, and each point or block is its own chain), for each power.
    #[test]
    fn grouped_points_give_the_bits_of_single_points() {
        let (n, d) = (ROW_GROUP * LANES + 5, ROW_GROUP + 3);
        let values: Vec<f32> = Rng::new(5)
            .normals(n * d, 2.0)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let columns = Columns::new(Floats::F32(&values), 0, n, d, None);
        let group = &values[..ROW_GROUP * d];
        for power in [Power::Sqrt, Power::Square, Power::Other(1.5)] {
            let from: [usize; ROW_GROUP] = std::array::from_fn(|r| 2 * r + LANES - 3);
            let grouped = columns.weighted_sums::<ROW_GROUP>(group, from, power);
            for (r, sum) in grouped.iter().enumerate() {
                let alone = columns.weighted_sum(&group[r * d..(r + 1) * d], from[r], power);
                assert_eq!(sum.to_bits(), alone.to_bits(), "point {r}");
            }
            let a = &values[d..2 * d];
            let (mut wide, mut narrow) = (vec![0.0; columns.padded], vec![0.0; columns.padded]);
            columns.block_slopes::<ROW_GROUP>(a, 0, power, &mut wide);
            for c in 0..ROW_GROUP {
                columns.block_slopes::<1>(a, c * LANES, power, &mut narrow);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&wide[..ROW_GROUP * LANES]),
                bits(&narrow[..ROW_GROUP * LANES])
            );
            let grouped: [f32; ROW_GROUP] = columns.column_sums::<ROW_GROUP>(a, 0, &wide);
            for (q, sum) in grouped.iter().enumerate() {
                let [alone] = columns.column_sums::<1>(a, q, &wide);
                assert_eq!(sum.to_bits(), alone.to_bits(), "dimension {q}");
            }
        }
    }

    /// A point with an infinite coordinate: its distances are infinite, and the terms
    /// the reference makes infinite stay infinite (padding columns must not make NaN).
    #[test]
    fn an_infinite_coordinate_gives_the_references_infinities() {
        let x = [0.5, f64::INFINITY, -1.0, 0.25, 2.0, -0.5];
        let y = [1.0, 1.5, -0.75, 0.0];
        let want = reference::energy_distance(&reference::EnergyDistanceProblem {
            x: &x,
            y: &y,
            n: 3,
            m: 2,
            d: 2,
            weights_x: None,
            weights_y: None,
            beta: 1.0,
            statistic: Statistic::U,
            grad: false,
        });
        assert_eq!((want.cross, want.within_x), (f64::INFINITY, f64::INFINITY));
        let tensor = |v: &[f64], rows| {
            Tensor::from_slice(
                &Device::Cpu,
                &v.iter().map(|&a| a as f32).collect::<Vec<_>>(),
                &[rows, 2],
            )
            .unwrap()
        };
        let (xt, yt) = (tensor(&x, 3), tensor(&y, 2));
        let out = energy_distance(&EnergyDistance {
            x: &xt,
            y: &yt,
            weights_x: None,
            weights_y: None,
            beta: 1.0,
            statistic: Statistic::U,
            grad: false,
        })
        .unwrap();
        let value = |t: &Tensor| t.to_f64_vec().unwrap()[0];
        assert_eq!(value(&out.cross), f64::INFINITY);
        assert_eq!(value(&out.within_x), f64::INFINITY);
        assert!((value(&out.within_y) - want.within_y).abs() <= 1e-6 * want.within_y);
        assert!(value(&out.distance).is_nan() && want.distance.is_nan());
    }
}
