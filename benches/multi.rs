//! Scaling of the NCCL ops (feature `nccl`) over world sizes 1 ..= the CUDA devices
//! present, one rank per device, each driven by its own thread: SyncBN statistics of a
//! fixed global batch and the sharded energy distance of fixed sets, split evenly across
//! the ranks (strong scaling). Per world size W it prints the time per call (the slowest
//! rank's) and the scaling efficiency t_1 / (W t_W).
//!
//! `cargo bench --features nccl --bench multi` (libnccl on LD_LIBRARY_PATH: README).

use std::sync::Barrier;
use std::time::{Duration, Instant};

use losskern::check::Rng;
use losskern::nccl::{self, Communicator};
use losskern::ops::bnstats::{BnStats, Layout};
use losskern::ops::energy::{EnergyDistance, Statistic};
use losskern::{DType, Device, Tensor};

const WARMUP: usize = 3;
const ITERS: usize = 20;

/// One op at one global size, split along its first axis across the ranks.
#[derive(Clone, Copy)]
enum Op {
    /// NCHW f32 [N, C, H, W]: N split.
    SyncBn { shape: [usize; 4] },
    /// X [N, d] and Y [M, d] f32: both split by rows.
    Energy { n: usize, m: usize, d: usize },
}

impl Op {
    fn name(self) -> String {
        match self {
            Op::SyncBn {
                shape: [n, c, h, w],
            } => format!("sync_bn_stats/f32/nchw-{n}x{c}x{h}x{w}"),
            Op::Energy { n, m, d } => format!("energy_distance/f32/N{n}-M{m}-d{d}"),
        }
    }

    /// Rank `rank` of `world`'s share of the inputs, on `device`.
    fn inputs(self, rank: usize, world: usize, device: &Device) -> Vec<Tensor> {
        let share = |rows: usize| (rank + 1) * rows / world - rank * rows / world;
        let mut rng = Rng::new(7 + rank as u64);
        let mut random = |shape: &[usize]| {
            let values = rng.normals(shape.iter().product(), 1.0);
            Tensor::from_f64(device, &values, shape, DType::F32).expect("upload")
        };
        match self {
            Op::SyncBn {
                shape: [n, c, h, w],
            } => vec![random(&[share(n), c, h, w])],
            Op::Energy { n, m, d } => vec![random(&[share(n), d]), random(&[share(m), d])],
        }
    }

    fn run(self, comm: &Communicator, inputs: &[Tensor]) {
        match self {
            Op::SyncBn { .. } => nccl::sync_bn_stats(
                comm,
                &BnStats {
                    x: &inputs[0],
                    layout: Layout::Nchw,
                    eps: 1e-5,
                    normalize: None,
                },
            )
            .map(drop),
            Op::Energy { .. } => nccl::energy_distance(
                comm,
                &EnergyDistance {
                    x: &inputs[0],
                    y: &inputs[1],
                    weights_x: None,
                    weights_y: None,
                    beta: 1.0,
                    statistic: Statistic::V,
                    grad: false,
                },
            )
            .map(drop),
        }
        .expect("the op");
    }
}

/// The time per call of `op` on `devices` (one rank each): the slowest rank's, after
/// a warm-up, from a common start.
fn time(op: Op, devices: &[Device]) -> Duration {
    let comms = Communicator::from_devices(devices).expect("communicator");
    let start = Barrier::new(devices.len());
    std::thread::scope(|scope| {
        let ranks: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let start = &start;
                scope.spawn(move || {
                    let inputs = op.inputs(comm.rank(), comm.world_size(), comm.device());
                    for _ in 0..WARMUP {
                        op.run(&comm, &inputs);
                    }
                    comm.device().synchronize().expect("synchronize");
                    start.wait();
                    let t0 = Instant::now();
                    for _ in 0..ITERS {
                        op.run(&comm, &inputs);
                    }
                    comm.device().synchronize().expect("synchronize");
                    t0.elapsed() / ITERS as u32
                })
            })
            .collect();
        ranks
            .into_iter()
            .map(|rank| rank.join().expect("a rank panicked"))
            .max()
            .unwrap_or_default()
    })
}

fn main() {
    // NVLink multicast stays off; set before any thread exists and before NCCL starts.
    std::env::set_var("NCCL_NVLS_ENABLE", "0");
    let devices: Vec<Device> = (0..).map_while(|k| Device::cuda(k).ok()).collect();
    if devices.is_empty() {
        let reason = Device::cuda(0).err().map(|e| e.to_string());
        eprintln!(
            "multi bench: no CUDA device ({})",
            reason.unwrap_or_default()
        );
        return;
    }
    println!("{} CUDA device(s): {}", devices.len(), devices[0].name());
    for op in [
        Op::SyncBn {
            shape: [256, 64, 56, 56],
        },
        Op::Energy {
            n: 32768,
            m: 32768,
            d: 64,
        },
    ] {
        let mut single = None;
        for world in 1..=devices.len() {
            let t = time(op, &devices[..world]);
            let t1 = *single.get_or_insert(t);
            let efficiency = t1.as_secs_f64() / (world as f64 * t.as_secs_f64());
            println!(
                "{} world {world}: {:.3} ms per call, speedup {:.2}, efficiency {:.0}%",
                op.name(),
                t.as_secs_f64() * 1e3,
                t1.as_secs_f64() / t.as_secs_f64(),
                100.0 * efficiency
            );
        }
    }
}
