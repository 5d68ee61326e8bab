//! xent on the CPU, with the GPU kernels' accumulation rules (kernels/xent.cu): per
//! row, one pass over tiles of [`TILE`] columns keeps an online max, s = sum e^((z - m) / T)
//! and t = sum e^((z - m) / T) (z - m) in f32, rescaled when the tile raises the max; the
//! order statistics are taken on z (exact) and divided by T once per row. With a
//! gradient, a second pass over the row (just read, so from cache) writes it in place.
//! The loss of a row is C_f log s + D / T (+ the target column's term), two non-negative
//! parts with no cancellation, D kept against the running max. Batch sums are f64 in
//! row order. Rows are cut into chunks of a size fixed by V, so any number of threads
//! gives the same bits.

use rayon::prelude::*;

use crate::cpu::{
    chunk_rows, exp, lane_sum, run_best, scalar, CpuBackend, Floats, FloatsMut, Work, LANES,
};
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::xent::{Gap, RadiusOptions, Reduction, RhoReduce};
use crate::spec::xent::{
    DirectionalCall, DirectionalOutput, Targets, XentCall, XentKernels, XentOutput, XentSpec,
};

/// Columns per tile: the unit in which the running max moves.
const TILE: usize = 16 * LANES;

/// The first class target outside [0, V) that is not `ignore_index`, as an error.
fn check_targets(targets: &[i64], spec: &XentSpec) -> Result<()> {
    let ignore_index = spec.options.ignore_index;
    let bad = targets.iter().position(|&target| {
        let in_range = usize::try_from(target).is_ok_and(|t| t < spec.classes);
        !in_range && target != ignore_index
    });
    match bad {
        Some(row) => Err(Error::Target {
            row,
            classes: spec.classes,
            ignore_index,
        }),
        None => Ok(()),
    }
}

/// `if b > a { b } else { a }`: a NaN `b` is skipped, as fmaxf skips it, and it
/// compiles to one vector max.
#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

#[inline(always)]
fn min(a: f32, b: f32) -> f32 {
    if b < a {
        b
    } else {
        a
    }
}

/// The per-column target coefficients c_k of -log p_k that a row accumulates (the
/// (1 - eps) w_y part of a class target's c_y is added apart, from z_y).
#[derive(Clone, Copy)]
enum Coefficients<'a> {
    /// Unsmoothed class targets and ignored rows: no per-column coefficient.
    None,
    /// Label smoothing over class targets: c_k = eps / V * w_k.
    Smooth {
        weights: Option<&'a [f32]>,
        eps_per_class: f32,
    },
    /// Soft targets: c_k = w_k ((1 - eps) q_k + eps / V), `q` this row's targets.
    Soft {
        q: Floats<'a>,
        start: usize,
        weights: Option<&'a [f32]>,
        one_minus_eps: f32,
        eps_per_class: f32,
    },
}

impl Coefficients<'_> {
    fn any(&self) -> bool {
        !matches!(self, Coefficients::None)
    }

    /// c_k for the `out.len()` columns from `col` (0 where there is no coefficient).
    #[inline(always)]
    fn fill(&self, col: usize, out: &mut [f32]) {
        let weight = |weights: Option<&[f32]>, k: usize| weights.map_or(1.0, |w| w[col + k]);
        match *self {
            Coefficients::None => out.fill(0.0),
            Coefficients::Smooth {
                weights,
                eps_per_class,
            } => {
                for (k, c) in out.iter_mut().enumerate() {
                    *c = eps_per_class * weight(weights, k);
                }
            }
            Coefficients::Soft {
                q,
                start,
                weights,
                one_minus_eps,
                eps_per_class,
            } => {
                let mut buf = [0.0; TILE];
                let q = q.read(start + col, &mut buf[..out.len()]);
                for (k, c) in out.iter_mut().enumerate() {
                    *c = weight(weights, k) * (one_minus_eps * q[k] + eps_per_class);
                }
            }
        }
    }
}

/// The target side of one row.
#[derive(Clone, Copy)]
struct RowTarget<'a> {
    ignored: bool,
    /// The class target (class targets, not ignored).
    y: Option<usize>,
    /// (1 - eps) w_y, the part of c_y added from z_y.
    y_coef: f32,
    /// The row's share of the mean's denominator: w_y (1 without weights or for soft).
    weight: f32,
    coefficients: Coefficients<'a>,
}

/// One row's running state, in units of z (see kernels/xent.cu).
struct Acc {
    /// The running max (NaN ignored), s and t of the online softmax.
    m: f32,
    s: f32,
    t: f32,
    /// Second largest of the multiset (ties give top2 = top1) and the min.
    top2: f32,
    min: f32,
    /// C_f = sum c_k over z_k > -inf; D = sum c_k (m - z_k) there (+ c_k inf at -inf);
    /// the sum of every c_k.
    cf: f32,
    d: f32,
    c_all: f32,
    /// The tile where the max last rose: its first column holding the max is the argmax.
    best_tile: usize,
}

impl Acc {
    #[inline(always)]
    fn new() -> Acc {
        Acc {
            m: f32::NEG_INFINITY,
            s: 0.0,
            t: 0.0,
            top2: f32::NEG_INFINITY,
            min: f32::INFINITY,
            cf: 0.0,
            d: 0.0,
            c_all: 0.0,
            best_tile: 0,
        }
    }

    /// The shift the exponentials use: the running max, or 0 while it is -inf (every
    /// column so far -inf or NaN; -inf - -inf would make s NaN).
    #[inline(always)]
    fn shift(&self) -> f32 {
        if self.m == f32::NEG_INFINITY {
            0.0
        } else {
            self.m
        }
    }

    /// Adds tile `index`: `z` holds its `len` columns, then -inf (which add nothing but
    /// to the min, taken over the first `len`); `c` their coefficients (0 past `len`).
    #[inline(always)]
    fn add_tile(
        &mut self,
        index: usize,
        z: &[f32; TILE],
        len: usize,
        c: Option<&[f32; TILE]>,
        inv_t: f32,
    ) {
        let mut h1 = [f32::NEG_INFINITY; LANES];
        let mut h2 = [f32::NEG_INFINITY; LANES];
        let mut lo = [f32::INFINITY; LANES];
        for group in z.chunks_exact(LANES) {
            for l in 0..LANES {
                h2[l] = max(h2[l], min(h1[l], group[l]));
                h1[l] = max(h1[l], group[l]);
                lo[l] = min(lo[l], group[l]);
            }
        }
        let (mut c1, mut c2) = (h1[0], h2[0]);
        for l in 1..LANES {
            c2 = max(min(c1, h1[l]), max(c2, h2[l]));
            c1 = max(c1, h1[l]);
        }
        let tile_min = if len == TILE {
            lo.iter().copied().fold(f32::INFINITY, min)
        } else {
            z[..len].iter().copied().fold(f32::INFINITY, min)
        };
        self.top2 = max(min(self.m, c1), max(self.top2, c2));
        self.min = min(self.min, tile_min);
        if c1 > self.m {
            self.raise(c1, inv_t, c.is_some());
            self.best_tile = index;
        }
        let shift = self.shift();
        let (mut s, mut t) = ([0.0; LANES], [0.0; LANES]);
        for group in z.chunks_exact(LANES) {
            for l in 0..LANES {
                let dz = group[l] - shift;
                let e = exp(dz * inv_t);
                s[l] += e;
                // -f32::MAX keeps 0 * -inf out of t at a -inf column (e = 0 there).
                t[l] = e.mul_add(max(dz, -f32::MAX), t[l]);
            }
        }
        self.s += lane_sum(&s);
        self.t += lane_sum(&t);
        if let Some(c) = c {
            self.add_coefficients(z, c, shift);
        }
    }

    /// Raises the running max to `m_new` > m, rescaling s, t and D once.
    #[inline(always)]
    fn raise(&mut self, m_new: f32, inv_t: f32, coefficients: bool) {
        if self.m != f32::NEG_INFINITY {
            let dm = self.m - m_new;
            let r = exp(dm * inv_t);
            self.t = r * self.s.mul_add(dm, self.t);
            self.s *= r;
            if coefficients {
                self.d = self.cf.mul_add(-dm, self.d);
            }
        }
        self.m = m_new;
    }

    #[inline(always)]
    fn add_coefficients(&mut self, z: &[f32; TILE], c: &[f32; TILE], shift: f32) {
        let (mut cf, mut d, mut all) = ([0.0; LANES], [0.0; LANES], [0.0; LANES]);
        for (zg, cg) in z.chunks_exact(LANES).zip(c.chunks_exact(LANES)) {
            for l in 0..LANES {
                let finite = zg[l] != f32::NEG_INFINITY;
                cf[l] += if finite { cg[l] } else { 0.0 };
                // p_k = 0: -log p_k = +inf where c_k != 0 (0 * inf is taken as 0).
                d[l] = if finite {
                    cg[l].mul_add(shift - zg[l], d[l])
                } else if cg[l] != 0.0 {
                    d[l] + f32::INFINITY
                } else {
                    d[l]
                };
                all[l] += cg[l];
            }
        }
        self.cf += lane_sum(&cf);
        self.d += lane_sum(&d);
        self.c_all += lane_sum(&all);
    }
}

/// The per-row outputs (B of them: the only per-row storage besides the outputs).
#[derive(Clone, Copy, Default)]
struct RowOut {
    loss: f32,
    lse: f32,
    entropy: f32,
    max: f32,
    min: f32,
    top2_gap: f32,
    delta: f32,
    argmax: i64,
    weight: f32,
}

/// What the gradient pass of a row needs from its forward pass.
struct GradRow {
    m: f32,
    inv_s: f32,
    /// sum c + 2 z_loss lse: the coefficient of p_k.
    coef: f32,
}

/// A validated xent problem with its inputs in host memory.
struct Problem<'a> {
    spec: &'a XentSpec,
    logits: Floats<'a>,
    labels: Option<&'a [i64]>,
    soft: Option<Floats<'a>>,
    weights: Option<&'a [f32]>,
    temperature: f32,
    inv_t: f32,
    one_minus_eps: f32,
    eps_per_class: f32,
    z_loss: f32,
    /// scale / T of the gradient (the reduction's scale is 1 / the mean's denominator).
    factor: f32,
}

impl<'a> Problem<'a> {
    #[inline(always)]
    fn target(&self, row: usize) -> RowTarget<'a> {
        let (classes, weights) = (self.spec.classes, self.weights);
        if let Some(labels) = self.labels {
            let label = labels[row];
            if label == self.spec.options.ignore_index {
                return RowTarget {
                    ignored: true,
                    y: None,
                    y_coef: 0.0,
                    weight: 0.0,
                    coefficients: Coefficients::None,
                };
            }
            // In [0, V): check_targets ran before any row.
            let y = label as usize;
            let weight = weights.map_or(1.0, |w| w[y]);
            return RowTarget {
                ignored: false,
                y: Some(y),
                y_coef: self.one_minus_eps * weight,
                weight,
                coefficients: if self.eps_per_class == 0.0 {
                    Coefficients::None
                } else {
                    Coefficients::Smooth {
                        weights,
                        eps_per_class: self.eps_per_class,
                    }
                },
            };
        }
        RowTarget {
            ignored: false,
            y: None,
            y_coef: 0.0,
            weight: 1.0,
            coefficients: match self.soft {
                Some(q) => Coefficients::Soft {
                    q,
                    start: row * classes,
                    weights,
                    one_minus_eps: self.one_minus_eps,
                    eps_per_class: self.eps_per_class,
                },
                None => Coefficients::None,
            },
        }
    }

    /// Tile `index` of the row starting at element `start`: the logits in place when the
    /// tile is whole and f32, else decoded into `z` with -inf past the row's end; and the
    /// coefficients, when the row has any, into `c`. Returns the tile and its column count.
    #[inline(always)]
    fn load_tile<'t>(
        &'t self,
        start: usize,
        index: usize,
        target: &RowTarget<'_>,
        z: &'t mut [f32; TILE],
        c: &mut [f32; TILE],
    ) -> (&'t [f32; TILE], usize) {
        let col = index * TILE;
        let len = TILE.min(self.spec.classes - col);
        if target.coefficients.any() {
            target.coefficients.fill(col, &mut c[..len]);
            c[len..].fill(0.0);
        }
        let range = start + col..start + col + len;
        match self.logits {
            Floats::F32(values) => {
                if let Ok(tile) = <&[f32; TILE]>::try_from(&values[range.clone()]) {
                    return (tile, len);
                }
                z[..len].copy_from_slice(&values[range]);
            }
            other => {
                other.read(range.start, &mut z[..len]);
            }
        }
        z[len..].fill(f32::NEG_INFINITY);
        (z, len)
    }

    /// The forward pass of one row: its outputs and what its gradient needs.
    #[inline(always)]
    fn forward(&self, row: usize, target: &RowTarget<'_>) -> (RowOut, GradRow) {
        let start = row * self.spec.row_stride;
        let (mut z, mut c) = ([0.0; TILE], [0.0; TILE]);
        let mut acc = Acc::new();
        let coefficients = target.coefficients.any();
        for index in 0..self.spec.classes.div_ceil(TILE) {
            let (tile, len) = self.load_tile(start, index, target, &mut z, &mut c);
            acc.add_tile(index, tile, len, coefficients.then_some(&c), self.inv_t);
        }
        let t_ = self.temperature;
        let (m, s) = (acc.m, acc.s);
        let bad = s.is_nan() || m == f32::INFINITY;
        let log_s = s.ln();
        let mut lse = m / t_ + log_s;
        let mut coef = if target.ignored {
            0.0
        } else {
            acc.c_all + target.y_coef
        };
        if self.z_loss != 0.0 {
            coef += 2.0 * self.z_loss * if bad { f32::NAN } else { lse };
        }
        let grad = GradRow {
            m: if bad { f32::NAN } else { m },
            inv_s: 1.0 / s,
            coef,
        };
        let mut entropy = log_s - (acc.t / t_) / s;
        let mut mx = m / t_;
        let mut mn = acc.min / t_;
        let mut gap = if self.spec.classes == 1 {
            0.0
        } else {
            (m - acc.top2) / t_
        };
        let mut spread = (m - acc.min) / t_;
        if bad {
            (lse, entropy, mx, mn, gap, spread) =
                (f32::NAN, f32::NAN, f32::NAN, f32::NAN, f32::NAN, f32::NAN);
        }
        let loss = if target.ignored {
            0.0
        } else if bad || m == f32::NEG_INFINITY {
            f32::NAN
        } else {
            let mut loss = if coefficients {
                acc.cf * log_s + acc.d / t_
            } else {
                0.0
            };
            if let Some(y) = target.y.filter(|_| target.y_coef != 0.0) {
                let mut buf = [0.0];
                let z_y = self.logits.read(start + y, &mut buf)[0];
                loss += target.y_coef * (log_s + (m - z_y) / t_);
            }
            if self.z_loss != 0.0 {
                loss += self.z_loss * lse * lse;
            }
            loss
        };
        let argmax = if s.is_nan() {
            self.first_nan(start)
                .unwrap_or_else(|| self.first_of(start, acc.best_tile, m))
        } else {
            self.first_of(start, acc.best_tile, m)
        };
        let out = RowOut {
            loss,
            lse,
            entropy,
            max: mx,
            min: mn,
            top2_gap: gap,
            delta: match self.spec.options.radius.gap {
                Gap::Top2 => gap,
                Gap::MaxMin => spread,
            },
            argmax: argmax as i64,
            weight: target.weight,
        };
        (out, grad)
    }

    /// The first column of tile `index` holding `value` (the tile where the max rose
    /// holds it; an all -inf row gives column 0).
    fn first_of(&self, start: usize, index: usize, value: f32) -> usize {
        let col = index * TILE;
        let len = TILE.min(self.spec.classes - col);
        let mut buf = [0.0; TILE];
        let z = self.logits.read(start + col, &mut buf[..len]);
        col + z.iter().position(|&x| x == value).unwrap_or(0)
    }

    /// The first NaN column of the row (NaN is the largest value to torch.argmax).
    fn first_nan(&self, start: usize) -> Option<usize> {
        let mut buf = [0.0; TILE];
        (0..self.spec.classes).step_by(TILE).find_map(|col| {
            let len = TILE.min(self.spec.classes - col);
            let z = self.logits.read(start + col, &mut buf[..len]);
            z.iter().position(|x| x.is_nan()).map(|k| col + k)
        })
    }

    /// The gradient row g_k = ((sum c + 2 z lse) p_k - c_k) scale / T, p_k from the row's
    /// own max and sum; an ignored row gets exact zeros, a NaN row NaN.
    #[inline(always)]
    fn grad_row(
        &self,
        row: usize,
        target: &RowTarget<'_>,
        r: &GradRow,
        out: &mut FloatsMut<'_>,
        out_start: usize,
    ) {
        let start = row * self.spec.row_stride;
        let (mut z, mut c, mut g) = ([0.0; TILE], [0.0; TILE], [0.0; TILE]);
        let coefficients = target.coefficients.any();
        for index in 0..self.spec.classes.div_ceil(TILE) {
            let col = index * TILE;
            let (tile, len) = self.load_tile(start, index, target, &mut z, &mut c);
            // Without per-column coefficients c stays 0 but at the target column.
            let y = target.y.filter(|&y| (col..col + len).contains(&y));
            if let Some(y) = y {
                c[y - col] += target.y_coef;
            }
            // A whole f32 tile is written in place; others go through `g` (rounded there).
            match out.f32_tile(out_start + col, len) {
                Some(dst) => self.grad_tile(tile, &c, r, target.ignored, dst),
                None => {
                    self.grad_tile(tile, &c, r, target.ignored, &mut g);
                    out.write(out_start + col, &g[..len]);
                }
            }
            if let (Some(y), false) = (y, coefficients) {
                c[y - col] = 0.0;
            }
        }
    }

    /// The gradient of one tile: `z` its logits, `c` their coefficients (the target's
    /// included); zeros for an ignored row.
    #[inline(always)]
    fn grad_tile(
        &self,
        z: &[f32; TILE],
        c: &[f32; TILE],
        r: &GradRow,
        ignored: bool,
        g: &mut [f32; TILE],
    ) {
        for ((zg, cg), gg) in z
            .chunks_exact(LANES)
            .zip(c.chunks_exact(LANES))
            .zip(g.chunks_exact_mut(LANES))
        {
            for l in 0..LANES {
                let p = exp((zg[l] - r.m) * self.inv_t) * r.inv_s;
                gg[l] = r.coef.mul_add(p, -cg[l]) * self.factor;
            }
        }
        if ignored {
            g.fill(0.0);
        }
    }
}

impl XentKernels for CpuBackend {
    fn xent(&self, bound: &XentCall<'_>) -> Result<XentOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let (labels, soft) = match call.targets {
            Targets::Classes(y) => {
                let labels = y.host_slice::<i64>()?;
                check_targets(labels, spec)?;
                (Some(labels), None)
            }
            Targets::Soft(q) => (None, Some(Floats::of(q)?)),
        };
        let weights = call
            .class_weights
            .map(Tensor::host_slice::<f32>)
            .transpose()?;
        let options = &spec.options;
        let denominator = match labels {
            Some(labels) => labels
                .iter()
                .filter(|&&y| y != options.ignore_index)
                .map(|&y| weights.map_or(1.0, |w| f64::from(w[y as usize])))
                .sum(),
            None => spec.batch as f64,
        };
        let scale = match options.reduction {
            Reduction::Mean => 1.0 / denominator,
            Reduction::Sum | Reduction::None => 1.0,
        };
        let problem = Problem {
            spec,
            logits: Floats::of(call.logits)?,
            labels,
            soft,
            weights,
            temperature: options.temperature as f32,
            inv_t: (1.0 / options.temperature) as f32,
            one_minus_eps: (1.0 - options.label_smoothing) as f32,
            eps_per_class: (options.label_smoothing / spec.classes as f64) as f32,
            z_loss: options.z_loss as f32,
            factor: (scale / options.temperature) as f32,
        };
        let mut grad = options
            .grad
            .then(|| Tensor::host_output(&[spec.batch, spec.classes], spec.grad_dtype))
            .transpose()?;
        let rows = run_rows(&problem, grad.as_mut())?;
        outputs(spec, &rows, grad)
    }

    fn directional(&self, bound: &DirectionalCall<'_>) -> Result<DirectionalOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let (logits, derivatives) = (Floats::of(call.logits)?, Floats::of(call.derivatives)?);
        let v = spec.classes;
        let rows = chunk_rows(v);
        let spans: Vec<(f64, f32)> = (0..spec.batch)
            .into_par_iter()
            .with_min_len(rows)
            .map(|row| {
                let delta_a = span(derivatives, row * v, v);
                let radius = if v == 2 {
                    let (mut z, mut a) = ([0.0; 2], [0.0; 2]);
                    let z = logits.read(row * 2, &mut z);
                    let a = derivatives.read(row * 2, &mut a);
                    let dz = f64::from(z[1]) - f64::from(z[0]);
                    let da = f64::from(a[1]) - f64::from(a[0]);
                    ((dz * dz + std::f64::consts::PI.powi(2)).sqrt() / da.abs()) as f32
                } else {
                    0.0
                };
                (delta_a, radius)
            })
            .collect();
        let mut max_delta = f64::NEG_INFINITY;
        for &(d, _) in &spans {
            max_delta = nan_max(max_delta, d);
        }
        // Every Delta_a = 0 gives rho_a = +inf and a step of 0, as the reference.
        let rho_a = std::f64::consts::PI / max_delta;
        let batch = [spec.batch];
        Ok(DirectionalOutput {
            delta_a: crate::cpu::f32_tensor(&batch, |i| spans[i].0 as f32)?,
            rho_a: scalar(rho_a)?,
            binary_radius: (v == 2)
                .then(|| crate::cpu::f32_tensor(&batch, |i| spans[i].1))
                .transpose()?,
            normalized_step: scalar(spec.step / rho_a)?,
        })
    }
}

/// One chunk of rows from row `first`: their outputs, and their gradient rows in place.
struct RowChunk<'p, 'o> {
    problem: &'p Problem<'p>,
    first: usize,
    out: &'o mut [RowOut],
    grad: Option<FloatsMut<'o>>,
}

impl Work for RowChunk<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn run(mut self) {
        let v = self.problem.spec.classes;
        for (i, o) in self.out.iter_mut().enumerate() {
            let row = self.first + i;
            let target = self.problem.target(row);
            let (row_out, grad_row) = self.problem.forward(row, &target);
            *o = row_out;
            if let Some(g) = self.grad.as_mut() {
                self.problem.grad_row(row, &target, &grad_row, g, i * v);
            }
        }
    }
}

/// Runs every row, in parallel chunks of rows, writing the gradient in place.
fn run_rows(problem: &Problem<'_>, grad: Option<&mut Tensor>) -> Result<Vec<RowOut>> {
    let (b, v) = (problem.spec.batch, problem.spec.classes);
    let rows = chunk_rows(v);
    let chunks = b.div_ceil(rows);
    let grad_chunks: Vec<Option<FloatsMut<'_>>> = match grad {
        Some(g) => FloatsMut::of(g)?
            .chunks(rows * v)
            .into_iter()
            .map(Some)
            .collect(),
        None => (0..chunks).map(|_| None).collect(),
    };
    let mut out = vec![RowOut::default(); b];
    out.par_chunks_mut(rows)
        .zip(grad_chunks)
        .enumerate()
        .for_each(|(chunk, (out, grad))| {
            run_best(RowChunk {
                problem,
                first: chunk * rows,
                out,
                grad,
            })
        });
    Ok(out)
}

/// The per-row tensors, the reduced loss and rho from the rows' outputs (f64 sums in row
/// order, as the GPU's f64 batch reduction).
fn outputs(spec: &XentSpec, rows: &[RowOut], grad: Option<Tensor>) -> Result<XentOutput> {
    let options = &spec.options;
    let (mut loss, mut weight, mut delta_sum, mut delta_max) = (0.0, 0.0, 0.0, f64::NEG_INFINITY);
    for r in rows {
        loss += f64::from(r.loss);
        weight += f64::from(r.weight);
        delta_sum += f64::from(r.delta);
        delta_max = nan_max(delta_max, f64::from(r.delta));
    }
    // All rows ignored: the mean is 0 / 0 = NaN, as the reference.
    let loss = match options.reduction {
        Reduction::Mean => loss / weight,
        Reduction::Sum | Reduction::None => loss,
    };
    let radius = &options.radius;
    let batch = [spec.batch];
    let per_row = |value: fn(&RowOut) -> f32| crate::cpu::f32_tensor(&batch, |i| value(&rows[i]));
    let rho = match radius.reduce {
        RhoReduce::PerSample => per_row_rho(rows, radius)?,
        RhoReduce::Mean => scalar(rho(delta_sum / spec.batch as f64, radius))?,
        RhoReduce::Max => scalar(rho(delta_max, radius))?,
    };
    let mut argmax = Tensor::host_output(&batch, DType::I64)?;
    for (a, r) in argmax.host_slice_mut::<i64>()?.iter_mut().zip(rows) {
        *a = r.argmax;
    }
    Ok(XentOutput {
        loss: scalar(loss)?,
        loss_per_row: per_row(|r| r.loss)?,
        lse: per_row(|r| r.lse)?,
        entropy: per_row(|r| r.entropy)?,
        argmax,
        max: per_row(|r| r.max)?,
        min: per_row(|r| r.min)?,
        top2_gap: per_row(|r| r.top2_gap)?,
        delta: per_row(|r| r.delta)?,
        rho,
        grad,
    })
}

fn per_row_rho(rows: &[RowOut], radius: &RadiusOptions) -> Result<Tensor> {
    crate::cpu::f32_tensor(&[rows.len()], |i| {
        rho(f64::from(rows[i].delta), radius) as f32
    })
}

/// rho = pi / (delta + eps), then inf_if_small, cap, floor, in f64; NaN stays NaN since
/// every test is a plain comparison.
fn rho(delta: f64, radius: &RadiusOptions) -> f64 {
    let mut rho = if radius.inf_if_small && delta < radius.eps {
        f64::INFINITY
    } else {
        std::f64::consts::PI / (delta + radius.eps)
    };
    if let Some(cap) = radius.cap {
        if rho > cap {
            rho = cap;
        }
    }
    if let Some(floor) = radius.floor {
        if rho < floor {
            rho = floor;
        }
    }
    rho
}

/// NaN-propagating max: a NaN on either side wins (f64::max would drop it).
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        a
    } else if b.is_nan() || b > a {
        b
    } else {
        a
    }
}

/// max - min of `len` values from `start`, in f64 from the f32 extremes (NaN when one is
/// NaN; +inf - +inf is NaN as in the reference).
fn span(values: Floats<'_>, start: usize, len: usize) -> f64 {
    let (mut hi, mut lo, mut nan) = (
        [f32::NEG_INFINITY; LANES],
        [f32::INFINITY; LANES],
        [false; LANES],
    );
    let mut buf = [0.0; TILE];
    for col in (0..len).step_by(TILE) {
        let n = TILE.min(len - col);
        let x = values.read(start + col, &mut buf[..n]);
        for (i, &v) in x.iter().enumerate() {
            let l = i % LANES;
            nan[l] |= v.is_nan();
            hi[l] = max(hi[l], v);
            lo[l] = min(lo[l], v);
        }
    }
    if nan.iter().any(|&n| n) {
        return f64::NAN;
    }
    let hi = hi.iter().copied().fold(f32::NEG_INFINITY, max);
    let lo = lo.iter().copied().fold(f32::INFINITY, min);
    f64::from(hi) - f64::from(lo)
}
