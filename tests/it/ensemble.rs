//! ensemble on every backend: proptest against the reference over models, batch, widths,
//! depth, dtypes, input sharing and both landscape perturbations, then the metamorphic
//! properties, determinism and data errors. Outputs are poisoned (`backends::all`), so a
//! passing case also shows that every output element was written.

use losskern::check::ensemble::EnsembleCase;
use losskern::check::{self, Case, Rng};
use losskern::ops::ensemble::{self, Ensemble, EnsembleOutput, Landscape, Perturbation, Precision};
use losskern::support::Op;
use losskern::{DType, Device, Error, Tensor};
use proptest::prelude::*;

use crate::backends::{self, assert_matches_reference};

/// Widths from the awkward set (1, 3, 17, 129), one to three layers.
fn widths() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop::sample::select(vec![1usize, 3, 17, 129]), 2..=4)
}

fn case() -> impl Strategy<Value = EnsembleCase> {
    (
        widths(),
        1usize..=4,
        prop::sample::select(vec![1usize, 5, 33, 70]),
        prop::sample::select(vec![DType::F32, DType::F16, DType::BF16]),
        any::<bool>(),
        prop::option::of(1usize..=3),
        prop::sample::select(vec![Perturbation::Rounded, Perturbation::Split]),
        prop::sample::select(vec![Precision::Exact, Precision::TensorCore]),
        any::<u64>(),
    )
        .prop_map(
            |(widths, models, batch, dtype, shared, directions, perturbation, precision, seed)| {
                EnsembleCase {
                    widths,
                    models,
                    batch,
                    dtype,
                    // A landscape scan shares one input across its models.
                    shared_input: shared || directions.is_some(),
                    directions,
                    perturbation,
                    precision,
                    seed,
                }
            },
        )
        .prop_filter("reference cost", |c| {
            let macs: usize = c.widths.windows(2).map(|w| w[0] * w[1]).sum();
            c.models * c.batch * macs <= 1 << 20
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: backends::proptest_cases(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn ensemble_matches_the_reference_on_every_backend(case in case()) {
        for device in backends::all() {
            assert_matches_reference(&Case::Ensemble(case.clone()), &device);
        }
    }
}

/// Random layers [lead.., out, in] and [lead.., out] on the CPU, as f64 values.
struct Layers {
    widths: Vec<usize>,
    lead: usize,
    weights: Vec<Vec<f64>>,
    biases: Vec<Vec<f64>>,
}

impl Layers {
    fn draw(rng: &mut Rng, widths: &[usize], lead: usize) -> Layers {
        let pairs = widths.windows(2);
        Layers {
            widths: widths.to_vec(),
            lead,
            weights: pairs
                .clone()
                .map(|w| rng.normals(lead * w[0] * w[1], 1.0 / (w[0] as f64).sqrt()))
                .collect(),
            biases: pairs.map(|w| rng.normals(lead * w[1], 0.1)).collect(),
        }
    }

    /// Model `e`'s parameters alone, as a stack of one.
    fn model(&self, e: usize) -> Layers {
        let pick = |values: &[Vec<f64>]| -> Vec<Vec<f64>> {
            values
                .iter()
                .map(|v| {
                    let per = v.len() / self.lead;
                    v[e * per..(e + 1) * per].to_vec()
                })
                .collect()
        };
        Layers {
            widths: self.widths.clone(),
            lead: 1,
            weights: pick(&self.weights),
            biases: pick(&self.biases),
        }
    }

    /// The models in the order `order` names them.
    fn permuted(&self, order: &[usize]) -> Layers {
        let stack = |values: &[Vec<f64>]| -> Vec<Vec<f64>> {
            values
                .iter()
                .map(|v| {
                    let per = v.len() / self.lead;
                    order
                        .iter()
                        .flat_map(|&e| v[e * per..(e + 1) * per].to_vec())
                        .collect()
                })
                .collect()
        };
        Layers {
            widths: self.widths.clone(),
            lead: order.len(),
            weights: stack(&self.weights),
            biases: stack(&self.biases),
        }
    }

    /// The layers on `device` in `dtype`; `stacked` keeps the leading dimension.
    fn upload(&self, device: &Device, dtype: DType, stacked: bool) -> (Vec<Tensor>, Vec<Tensor>) {
        let lead: Vec<usize> = if stacked { vec![self.lead] } else { vec![] };
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for (l, w) in self.widths.windows(2).enumerate() {
            let w_shape = [lead.clone(), vec![w[1], w[0]]].concat();
            let b_shape = [lead.clone(), vec![w[1]]].concat();
            weights.push(Tensor::from_f64(device, &self.weights[l], &w_shape, dtype).unwrap());
            biases.push(Tensor::from_f64(device, &self.biases[l], &b_shape, dtype).unwrap());
        }
        (weights, biases)
    }
}

/// loss, accuracy and logits as f64.
fn values(out: &EnsembleOutput) -> [Vec<f64>; 3] {
    let logits = out.logits.as_ref().expect("logits were asked for");
    [&out.loss, &out.accuracy, logits].map(|t| t.to_f64_vec().unwrap())
}

/// Runs a stack of models; None where the backend has no kernel for the op.
fn forward(device: &Device, layers: &Layers, x: &Tensor, labels: &Tensor) -> Option<[Vec<f64>; 3]> {
    let (w, b) = layers.upload(device, x.dtype(), true);
    let result = ensemble::forward(&Ensemble {
        weights: &w.iter().collect::<Vec<_>>(),
        biases: &b.iter().collect::<Vec<_>>(),
        input: x,
        labels,
        logits: true,
        precision: Precision::Exact,
    });
    match result {
        Ok(out) => Some(values(&out)),
        Err(Error::Unsupported { .. }) if !device.backend().supports(Op::EnsembleForward) => None,
        Err(e) => panic!("ensemble::forward on {}: {e}", device.name()),
    }
}

/// A landscape scan of `center` along `directions` at (k_e, t_e); None where unsupported.
fn landscape(
    device: &Device,
    center: &Layers,
    directions: &Layers,
    scan: (&[i64], &[f64], Perturbation),
    x: &Tensor,
    labels: &Tensor,
) -> Option<[Vec<f64>; 3]> {
    let (direction_of, distance, perturbation) = scan;
    let (cw, cb) = center.upload(device, x.dtype(), false);
    let (dw, db) = directions.upload(device, x.dtype(), true);
    let k = Tensor::from_slice(device, direction_of, &[direction_of.len()]).unwrap();
    let t = Tensor::from_f64(device, distance, &[distance.len()], DType::F32).unwrap();
    let result = ensemble::landscape(&Landscape {
        center_weights: &cw.iter().collect::<Vec<_>>(),
        center_biases: &cb.iter().collect::<Vec<_>>(),
        direction_weights: &dw.iter().collect::<Vec<_>>(),
        direction_biases: &db.iter().collect::<Vec<_>>(),
        direction_of: &k,
        distance: &t,
        input: x,
        labels,
        logits: true,
        precision: Precision::Exact,
        perturbation,
    });
    match result {
        Ok(out) => Some(values(&out)),
        Err(Error::Unsupported { .. }) if !device.backend().supports(Op::EnsembleLandscape) => None,
        Err(e) => panic!("ensemble::landscape on {}: {e}", device.name()),
    }
}

/// X [B, d0] in `dtype` and labels [B] in [0, C) on `device`.
fn batch(
    device: &Device,
    rng: &mut Rng,
    widths: &[usize],
    b: usize,
    dtype: DType,
) -> (Tensor, Tensor) {
    let x = Tensor::from_f64(
        device,
        &rng.normals(b * widths[0], 1.0),
        &[b, widths[0]],
        dtype,
    )
    .unwrap();
    let classes = widths[widths.len() - 1];
    let labels: Vec<i64> = (0..b).map(|_| rng.below(classes) as i64).collect();
    (x, Tensor::from_slice(device, &labels, &[b]).unwrap())
}

const WIDTHS: [usize; 4] = [19, 33, 17, 7];

#[test]
fn a_model_run_alone_gives_the_same_bits() {
    let mut rng = Rng::new(81);
    let layers = Layers::draw(&mut rng, &WIDTHS, 5);
    for device in backends::all() {
        let (x, y) = batch(&device, &mut Rng::new(82), &WIDTHS, 77, DType::BF16);
        let Some(together) = forward(&device, &layers, &x, &y) else {
            continue;
        };
        let (b, classes) = (77, WIDTHS[3]);
        for e in 0..5 {
            let alone = forward(&device, &layers.model(e), &x, &y).unwrap();
            assert_eq!(alone[0][0].to_bits(), together[0][e].to_bits(), "loss {e}");
            assert_eq!(
                alone[1][0].to_bits(),
                together[1][e].to_bits(),
                "accuracy {e}"
            );
            let block = &together[2][e * b * classes..(e + 1) * b * classes];
            assert!(
                alone[2]
                    .iter()
                    .zip(block)
                    .all(|(a, t)| a.to_bits() == t.to_bits()),
                "logits of model {e} on {}",
                device.name()
            );
        }
    }
}

#[test]
fn permuting_the_models_permutes_the_outputs() {
    let mut rng = Rng::new(83);
    let layers = Layers::draw(&mut rng, &WIDTHS, 6);
    let order = [4usize, 0, 5, 2, 1, 3];
    let permuted = layers.permuted(&order);
    for device in backends::all() {
        let (x, y) = batch(&device, &mut Rng::new(84), &WIDTHS, 40, DType::F32);
        let Some(plain) = forward(&device, &layers, &x, &y) else {
            continue;
        };
        let shuffled = forward(&device, &permuted, &x, &y).unwrap();
        let per_model = [1, 1, 40 * WIDTHS[3]];
        for (output, per) in per_model.iter().enumerate() {
            for (slot, &e) in order.iter().enumerate() {
                let a = &plain[output][e * per..(e + 1) * per];
                let b = &shuffled[output][slot * per..(slot + 1) * per];
                assert!(
                    a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "output {output}, model {e} at {slot} on {}",
                    device.name()
                );
            }
        }
    }
}

#[test]
fn a_landscape_at_t_zero_is_the_centres_forward() {
    let mut rng = Rng::new(85);
    let center = Layers::draw(&mut rng, &WIDTHS, 1);
    let directions = Layers::draw(&mut rng, &WIDTHS, 3);
    let k = [2i64, 0, 1, 2];
    let t = [0.0; 4];
    for device in backends::all() {
        let (x, y) = batch(&device, &mut Rng::new(86), &WIDTHS, 45, DType::F16);
        let Some(alone) = forward(&device, &center, &x, &y) else {
            continue;
        };
        for perturbation in [Perturbation::Rounded, Perturbation::Split] {
            let Some(scan) = landscape(
                &device,
                &center,
                &directions,
                (&k, &t, perturbation),
                &x,
                &y,
            ) else {
                continue;
            };
            let per_model = [1, 1, 45 * WIDTHS[3]];
            for (output, per) in per_model.iter().enumerate() {
                for e in 0..k.len() {
                    // == rather than bits: t d = 0 may turn a -0 logit into +0.
                    assert_eq!(
                        &scan[output][e * per..(e + 1) * per],
                        &alone[output][..],
                        "{perturbation:?} output {output} model {e} on {}",
                        device.name()
                    );
                }
            }
        }
    }
}

/// Split at moderate t forms exact parameters where Rounded rounds them twice (2u of
/// |c| + t |d|): the two differ by at most the f32 bound of both, which is what each case's
/// allowance (the Split one including its 2u L P term) says.
#[test]
fn split_agrees_with_rounded_at_moderate_distances() {
    let case = |perturbation| EnsembleCase {
        widths: vec![29, 64, 33, 10],
        models: 6,
        batch: 50,
        dtype: DType::F32,
        shared_input: true,
        directions: Some(3),
        perturbation,
        precision: Precision::Exact,
        seed: 87,
    };
    let (split, rounded) = (
        Case::Ensemble(case(Perturbation::Split)),
        Case::Ensemble(case(Perturbation::Rounded)),
    );
    let allowed_split = check::expected(&split).unwrap();
    let allowed_rounded = check::expected(&rounded).unwrap();
    for device in backends::all() {
        let (Ok(a), Ok(b)) = (
            check::outputs(&split, &device),
            check::outputs(&rounded, &device),
        ) else {
            assert!(!device.backend().supports(Op::EnsembleLandscape));
            continue;
        };
        for name in ["loss", "logits"] {
            let get = |outputs: &[check::Output]| {
                outputs
                    .iter()
                    .find(|o| o.name == name)
                    .unwrap()
                    .values
                    .clone()
            };
            let allow = |expected: &[check::Expected]| {
                expected
                    .iter()
                    .find(|e| e.name == name)
                    .unwrap()
                    .allowed
                    .clone()
            };
            let (sa, ra) = (allow(&allowed_split), allow(&allowed_rounded));
            for (i, (s, r)) in get(&a).iter().zip(get(&b)).enumerate() {
                assert!(
                    (s - r).abs() <= sa[i] + ra[i],
                    "{name}[{i}] on {}: split {s} rounded {r} (allowed {})",
                    device.name(),
                    sa[i] + ra[i]
                );
            }
        }
    }
}

/// Many (tile, model) items with a width over what the GPU kernels keep on chip: the
/// scratch-backed dispatches cap their grid (wgpu at 1024 workgroups of 16-row tiles, here
/// 1125 items for each mode) and stride over the work, and every item must still be done
/// once, by a workgroup whose scratch no other one shares.
#[test]
fn a_wide_ensemble_over_many_tiles_matches_the_reference() {
    let case = |models, directions, perturbation| EnsembleCase {
        widths: vec![5, 129, 4],
        models,
        batch: 6000,
        dtype: DType::F32,
        shared_input: true,
        directions,
        perturbation,
        precision: Precision::Exact,
        seed: 95,
    };
    let cases = [
        case(3, None, Perturbation::Split),
        case(3, Some(2), Perturbation::Rounded),
        case(5, Some(3), Perturbation::Split),
    ];
    for device in backends::all() {
        for case in &cases {
            assert_matches_reference(&Case::Ensemble(case.clone()), &device);
        }
    }
}

#[test]
fn two_runs_are_bitwise_equal_and_independent_of_the_thread_count() {
    let mut rng = Rng::new(90);
    let layers = Layers::draw(&mut rng, &WIDTHS, 3);
    for device in backends::all() {
        let (x, y) = batch(&device, &mut Rng::new(91), &WIDTHS, 200, DType::F32);
        let Some(first) = forward(&device, &layers, &x, &y) else {
            continue;
        };
        let second = forward(&device, &layers, &x, &y).unwrap();
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| forward(&device, &layers, &x, &y).unwrap());
        let bits = |v: &[Vec<f64>; 3]| -> Vec<Vec<u64>> {
            v.iter()
                .map(|o| o.iter().map(|x| x.to_bits()).collect())
                .collect()
        };
        assert_eq!(bits(&first), bits(&second), "{}", device.name());
        assert_eq!(bits(&first), bits(&one_thread), "{}", device.name());
    }
}

#[test]
fn the_logits_are_returned_only_when_asked() {
    let mut rng = Rng::new(92);
    let layers = Layers::draw(&mut rng, &WIDTHS, 2);
    for device in backends::all() {
        let (x, y) = batch(&device, &mut Rng::new(93), &WIDTHS, 9, DType::F32);
        let (w, b) = layers.upload(&device, DType::F32, true);
        let out = ensemble::forward(&Ensemble {
            weights: &w.iter().collect::<Vec<_>>(),
            biases: &b.iter().collect::<Vec<_>>(),
            input: &x,
            labels: &y,
            logits: false,
            precision: Precision::Exact,
        });
        match out {
            Ok(out) => assert!(out.logits.is_none(), "{}", device.name()),
            Err(Error::Unsupported { .. }) if !device.backend().supports(Op::EnsembleForward) => {}
            Err(e) => panic!("{}: {e}", device.name()),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda_raw {
    use cudarc::driver::CudaView;
    use losskern::cuda::ensemble::{ensemble_raw, EnsembleBuffers, EnsembleInputs};
    use losskern::ops::ensemble::{self, Ensemble, Precision};
    use losskern::{DType, Device, Error, Tensor};

    use super::{batch, Layers, WIDTHS};
    use crate::backends;
    use losskern::check::Rng;

    /// The zero-copy entry gives the Tensor entry's bits, and refuses a short buffer.
    #[test]
    fn raw_cuda_ensemble_matches_the_tensor_entry_and_refuses_short_buffers() {
        let Some(device) = backends::gpus()
            .into_iter()
            .find(|d| matches!(d, Device::Cuda(_)))
        else {
            eprintln!("skipping the raw CUDA ensemble test: no CUDA device");
            return;
        };
        let Device::Cuda(backend) = &device else {
            return;
        };
        let stream = backend.stream();
        let layers = Layers::draw(&mut Rng::new(94), &WIDTHS, 4);
        let (x, y) = batch(&device, &mut Rng::new(95), &WIDTHS, 70, DType::BF16);
        let (w, b) = layers.upload(&device, DType::BF16, true);
        let (w, b): (Vec<&Tensor>, Vec<&Tensor>) = (w.iter().collect(), b.iter().collect());
        let call = Ensemble {
            weights: &w,
            biases: &b,
            input: &x,
            labels: &y,
            logits: true,
            precision: Precision::Exact,
        };
        let tensor_loss = ensemble::forward(&call).unwrap().loss.to_f64_vec().unwrap();
        let spec = ensemble::validate(&call).unwrap();
        fn view(t: &Tensor) -> CudaView<'_, u8> {
            t.cuda_slice().unwrap().as_view()
        }
        let inputs = |weights: Vec<_>| EnsembleInputs {
            x: view(&x),
            weights,
            biases: b.iter().map(|t| view(t)).collect(),
            labels: view(&y),
            scan: None,
        };
        let mut out = EnsembleBuffers::new(stream, &spec).unwrap();
        ensemble_raw(
            stream,
            &spec,
            &inputs(w.iter().map(|t| view(t)).collect()),
            &mut out,
        )
        .unwrap();
        let bytes = stream.clone_dtoh(&out.loss).unwrap();
        let raw_loss: Vec<f64> = bytemuck::pod_collect_to_vec(&bytes[..8 * 4]);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&raw_loss), bits(&tensor_loss));

        let full = view(w[0]);
        let short = full.slice(..full.len() - 2);
        let weights = std::iter::once(short)
            .chain(w[1..].iter().map(|t| view(t)))
            .collect();
        let e = ensemble_raw(stream, &spec, &inputs(weights), &mut out).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "a short weight buffer: {e}");
    }
}
