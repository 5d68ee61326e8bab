//! Multi-GPU through NCCL (feature `nccl`): SyncBN statistics and the sharded energy
//! distance with one rank on the one device present (the code path, and the same bits as
//! the plain op), across every CUDA device where there are several (the tests named
//! `needs_2_gpus_*` print that they did not run otherwise), and the typed error without
//! libnccl. Without a CUDA device the GPU tests are skipped as `backends::all` skips;
//! without libnccl too, unless LOSSKERN_REQUIRE_NCCL=1 turns that skip into a failure.

use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use losskern::check::bnstats::{cases, BnStatsCase};
use losskern::check::energy::EnergyDistanceCase;
use losskern::check::{self, Case, Outcome, Output, Rng};
use losskern::nccl::{self, Communicator, UniqueId};
use losskern::ops::bnstats::{self, BnMerge, BnStats, BnStatsOutput, RunningStats};
use losskern::ops::energy::{self, EnergyDistance, EnergyDistanceOutput};
use losskern::{Backend, DType, Device, Error, Tensor};

use crate::backends;

/// The harness's bnstats eps (its tolerances of invstd assume it).
const EPS: f64 = 1e-5;

/// Held by every test that makes a communicator: all ranks on one device share its one
/// stream, so two tests' collectives over the same devices, queued in different orders
/// on two devices, would wait on each other forever.
fn one_test_at_a_time() -> MutexGuard<'static, ()> {
    static NCCL_TESTS: Mutex<()> = Mutex::new(());
    // A test that failed holding it leaves nothing half-done that the next one reads.
    NCCL_TESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// CUDA device 0 and every further CUDA device; none where CUDA is absent (skipped with
/// the reason `backends::all` prints, or a failure under LOSSKERN_REQUIRE_CUDA=1).
fn cuda_devices() -> Vec<Device> {
    let Some(first) = backends::gpus()
        .into_iter()
        .find(|d| d.backend() == Backend::Cuda)
    else {
        return Vec::new();
    };
    let mut devices = vec![first];
    devices.extend((1..).map_while(|ordinal| Device::cuda(ordinal).ok()));
    devices
}

/// One communicator per device, or None with a printed reason when libnccl cannot be
/// loaded (a failure under LOSSKERN_REQUIRE_NCCL=1).
fn communicators(devices: &[Device]) -> Option<Vec<Communicator>> {
    match Communicator::from_devices(devices) {
        Ok(comms) => Some(comms),
        Err(Error::NcclUnavailable(e))
            if std::env::var("LOSSKERN_REQUIRE_NCCL").is_ok_and(|v| v == "1") =>
        {
            panic!("LOSSKERN_REQUIRE_NCCL=1 but NCCL is unavailable: {e}")
        }
        Err(Error::NcclUnavailable(e)) => {
            eprintln!("skipping the NCCL tests: {e}");
            None
        }
        Err(e) => panic!("communicator over {} device(s): {e}", devices.len()),
    }
}

/// The CUDA devices when there are at least two, else None after printing that `test`
/// did not run.
fn several_devices(test: &str) -> Option<Vec<Device>> {
    let devices = cuda_devices();
    if devices.len() >= 2 {
        Some(devices)
    } else {
        eprintln!(
            "{test} DID NOT RUN: it needs >= 2 CUDA devices, {} present",
            devices.len()
        );
        None
    }
}

/// Runs `op` on every rank, each in its own thread (one thread driving several ranks
/// would wait forever in the first rank's collective), and returns the ranks' results
/// in rank order.
fn on_every_rank<I: Send, T: Send>(
    comms: Vec<Communicator>,
    inputs: Vec<I>,
    op: impl Fn(&Communicator, I) -> T + Sync,
) -> Vec<T> {
    let op = &op;
    std::thread::scope(|scope| {
        let ranks: Vec<_> = comms
            .into_iter()
            .zip(inputs)
            .map(|(comm, input)| scope.spawn(move || op(&comm, input)))
            .collect();
        ranks
            .into_iter()
            .map(|rank| rank.join().expect("a rank panicked"))
            .collect()
    })
}

/// The f32 bits of every element of each tensor, in order.
fn bits(tensors: &[&Tensor]) -> Vec<Vec<u32>> {
    tensors
        .iter()
        .map(|t| {
            t.to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect()
}

fn stats_tensors(out: &BnStatsOutput) -> [&Tensor; 5] {
    [
        &out.mean,
        &out.var_biased,
        &out.var_unbiased,
        &out.m2,
        &out.invstd,
    ]
}

/// The statistics as the harness names them, for `check::verdict`.
fn stats_outputs(out: &BnStatsOutput) -> Vec<Output> {
    let names = ["mean", "var_biased", "var_unbiased", "m2", "invstd"];
    let mut outputs: Vec<Output> = names
        .iter()
        .zip(stats_tensors(out))
        .map(|(&name, t)| Output {
            name,
            values: t.to_f64_vec().unwrap(),
        })
        .collect();
    outputs.push(Output {
        name: "count",
        values: vec![out.count as f64],
    });
    outputs
}

/// The harness's bnstats cases that `world` ranks can split along N, as merges of
/// `world` parts (at least 2: one rank's SyncBN is a merge of one partial, and the
/// harness's merge tolerance counts the partials' extra rounding).
fn sync_cases(world: usize) -> Vec<BnStatsCase> {
    cases()
        .into_iter()
        .filter(|case| case.n >= world)
        .map(|case| BnStatsCase {
            parts: world.max(2),
            normalize: false,
            ..case
        })
        .collect()
}

/// Case's x cut along N at the harness's points (k N / parts) into `devices.len()`
/// batches, batch k on devices[k].
fn split_batch(case: &BnStatsCase, devices: &[Device]) -> Vec<Tensor> {
    let (x, _, _) = case.draw().unwrap();
    let values = x.to_f64_vec().unwrap();
    let per_n = values.len() / case.n;
    let parts = devices.len();
    devices
        .iter()
        .enumerate()
        .map(|(k, device)| {
            let (start, end) = (k * case.n / parts, (k + 1) * case.n / parts);
            let mut shape = case.shape();
            shape[0] = end - start;
            let part = &values[start * per_n..end * per_n];
            Tensor::from_f64(device, part, &shape, case.dtype).unwrap()
        })
        .collect()
}

fn stats_call<'a>(x: &'a Tensor, case: &BnStatsCase) -> BnStats<'a> {
    BnStats {
        x,
        layout: case.layout,
        eps: EPS,
        normalize: None,
    }
}

/// SyncBN's statistics and the running statistics after one step with them.
fn sync_step(comm: &Communicator, x: &Tensor, case: &BnStatsCase) -> (BnStatsOutput, [Tensor; 2]) {
    let stats = nccl::sync_bn_stats(comm, &stats_call(x, case)).unwrap();
    let mut running = RunningStats::new(comm.device(), case.c).unwrap();
    running.update(&stats, Some(0.1)).unwrap();
    (stats, [running.mean, running.var])
}

/// Passes `check::verdict` for `case`, and fails it once the first mean moves by four
/// times its allowed error, so the comparison can catch a wrong statistic.
fn assert_matches_reference(case: &BnStatsCase, out: &BnStatsOutput, rank: usize) {
    let case = Case::BnStats(case.clone());
    let mut outputs = stats_outputs(out);
    let report = check::verdict(&case, Backend::Cuda, &outputs);
    assert_eq!(report.outcome, Outcome::Pass, "rank {rank}: {case:?}");
    let expected = check::expected(&case).unwrap();
    let allowed = expected.iter().find(|e| e.name == "mean").unwrap().allowed[0];
    outputs[0].values[0] += 4.0 * allowed + 4.0 * f64::from(f32::EPSILON);
    let mutated = check::verdict(&case, Backend::Cuda, &outputs);
    assert!(matches!(mutated.outcome, Outcome::Fail(_)), "{case:?}");
}

/// CUDA device 0 and a communicator of it alone, or None (skipped as above).
fn one_rank() -> Option<(Device, Communicator)> {
    let device = cuda_devices().into_iter().next()?;
    let comm = communicators(std::slice::from_ref(&device))?.pop()?;
    Some((device, comm))
}

#[test]
fn world_size_1_sync_bn_is_the_plain_merge_and_matches_the_reference() {
    let _serial = one_test_at_a_time();
    let Some((device, comm)) = one_rank() else {
        return;
    };
    for case in sync_cases(1) {
        let x = split_batch(&case, std::slice::from_ref(&device)).remove(0);
        let (synced, running) = sync_step(&comm, &x, &case);
        let local = bnstats::bn_stats(&stats_call(&x, &case)).unwrap();
        let plain = bnstats::merge(&BnMerge {
            parts: &[local.partial()],
            eps: EPS,
        })
        .unwrap();
        assert_eq!(synced.count, plain.count, "{case:?}");
        assert_eq!(
            bits(&stats_tensors(&synced)),
            bits(&stats_tensors(&plain)),
            "{case:?}"
        );
        let mut plain_running = RunningStats::new(&device, case.c).unwrap();
        plain_running.update(&plain, Some(0.1)).unwrap();
        assert_eq!(
            bits(&[&running[0], &running[1]]),
            bits(&[&plain_running.mean, &plain_running.var]),
            "{case:?}"
        );
        assert_matches_reference(&case, &synced, 0);
    }
}

#[test]
fn world_size_1_refused_input_fails_the_call_and_leaves_the_communicator_usable() {
    let _serial = one_test_at_a_time();
    let Some((device, comm)) = one_rank() else {
        return;
    };
    let case = &sync_cases(1)[0];
    let x = split_batch(case, std::slice::from_ref(&device)).remove(0);
    let normalised = BnStats {
        normalize: Some(Default::default()),
        ..stats_call(&x, case)
    };
    let refused = nccl::sync_bn_stats(&comm, &normalised);
    assert!(matches!(refused, Err(Error::Option(_))), "{refused:?}");
    let on_cpu = x.to_device(&Device::Cpu).unwrap();
    let refused = nccl::sync_bn_stats(&comm, &stats_call(&on_cpu, case));
    assert!(
        matches!(refused, Err(Error::DeviceMismatch(_))),
        "{refused:?}"
    );
    let (synced, _) = sync_step(&comm, &x, case);
    assert_matches_reference(case, &synced, 0);
}

#[test]
fn needs_2_gpus_sync_bn_across_devices_is_the_statistics_of_the_concatenated_batch() {
    let _serial = one_test_at_a_time();
    let Some(devices) = several_devices("needs_2_gpus_sync_bn_across_devices") else {
        return;
    };
    let world = devices.len();
    for case in sync_cases(world) {
        let Some(comms) = communicators(&devices) else {
            return;
        };
        let batches = split_batch(&case, &devices);
        // The same partials merged by one device: what every rank must hold, bit for bit.
        let on_first: Vec<Tensor> = batches
            .iter()
            .map(|b| b.to_device(&devices[0]).unwrap())
            .collect();
        let locals: Vec<BnStatsOutput> = on_first
            .iter()
            .map(|b| bnstats::bn_stats(&stats_call(b, &case)).unwrap())
            .collect();
        let parts: Vec<_> = locals.iter().map(BnStatsOutput::partial).collect();
        let plain = bnstats::merge(&BnMerge {
            parts: &parts,
            eps: EPS,
        })
        .unwrap();
        let results = on_every_rank(comms, batches, |comm, x| {
            let (stats, running) = sync_step(comm, &x, &case);
            (
                bits(&stats_tensors(&stats)),
                stats,
                bits(&[&running[0], &running[1]]),
            )
        });
        for (rank, (stats_bits, stats, running_bits)) in results.iter().enumerate() {
            assert_matches_reference(&case, stats, rank);
            assert_eq!(stats.count, plain.count, "rank {rank}: {case:?}");
            assert_eq!(
                *stats_bits,
                bits(&stats_tensors(&plain)),
                "rank {rank}: {case:?}"
            );
            assert_eq!(*running_bits, results[0].2, "rank {rank}: {case:?}");
        }
    }

    // A batch that the last rank refuses fails the call on every rank, none hangs.
    let case = &sync_cases(world)[0];
    let Some(comms) = communicators(&devices) else {
        return;
    };
    let last = world - 1;
    let results = on_every_rank(comms, split_batch(case, &devices), |comm, x| {
        let normalize = (comm.rank() == last).then(Default::default);
        let call = BnStats {
            normalize,
            ..stats_call(&x, case)
        };
        nccl::sync_bn_stats(comm, &call).err()
    });
    for (rank, error) in results.iter().enumerate() {
        match error {
            Some(Error::Option(_)) if rank == last => {}
            Some(Error::PeerRefused { rank: r }) if rank != last && *r == last => {}
            other => panic!("rank {rank}: {other:?}"),
        }
    }
}

/// The harness's energy-distance problems (sizes, dtype, weights, beta, statistic:
/// several row tiles and column chunks per term, so the ranks' tile shares differ) that
/// `world` ranks can shard: X rows split evenly, Y rows at quadratic cuts.
fn distance_cases(world: usize) -> Vec<EnergyDistanceCase> {
    check::energy::distance_cases()
        .into_iter()
        .filter(|case| case.n >= world && case.m >= world * world)
        .collect()
}

/// Fresh random rows of X and Y (values and positive weights) for `case`'s sizes and
/// scales, on the host.
struct Sets {
    x: Vec<f64>,
    y: Vec<f64>,
    wx: Vec<f64>,
    wy: Vec<f64>,
}

fn draw_sets(case: &EnergyDistanceCase) -> Sets {
    let mut rng = Rng::new(case.seed);
    let values = |rng: &mut Rng, len: usize, shift: f64, spread: f64| -> Vec<f64> {
        let scale = spread * case.scale;
        let offset = case.offset + shift * case.scale;
        rng.normals(len, scale).iter().map(|v| v + offset).collect()
    };
    Sets {
        x: values(&mut rng, case.n * case.d, 0.0, 1.0),
        y: values(&mut rng, case.m * case.d, 0.5, 1.5),
        wx: (0..case.n).map(|_| 0.1 + rng.uniform()).collect(),
        wy: (0..case.m).map(|_| 0.1 + rng.uniform()).collect(),
    }
}

/// Rows [start, end) of X (`x_rows`) and of Y (`y_rows`) with their weights, on `device`.
struct Shard {
    x: Tensor,
    y: Tensor,
    wx: Option<Tensor>,
    wy: Option<Tensor>,
}

fn shard(
    p: &EnergyDistanceCase,
    sets: &Sets,
    device: &Device,
    x_rows: (usize, usize),
    y_rows: (usize, usize),
) -> Shard {
    let rows = |values: &[f64], (start, end): (usize, usize), width: usize, dtype: DType| {
        let part = &values[start * width..end * width];
        let shape = if width == 1 {
            vec![end - start]
        } else {
            vec![end - start, width]
        };
        Tensor::from_f64(device, part, &shape, dtype).unwrap()
    };
    let weights = |w: &[f64], range| p.weighted.then(|| rows(w, range, 1, DType::F32));
    Shard {
        x: rows(&sets.x, x_rows, p.d, p.dtype),
        y: rows(&sets.y, y_rows, p.d, p.dtype),
        wx: weights(&sets.wx, x_rows),
        wy: weights(&sets.wy, y_rows),
    }
}

fn distance_call<'a>(p: &EnergyDistanceCase, s: &'a Shard) -> EnergyDistance<'a> {
    EnergyDistance {
        x: &s.x,
        y: &s.y,
        weights_x: s.wx.as_ref(),
        weights_y: s.wy.as_ref(),
        beta: p.beta,
        statistic: p.statistic,
        grad: false,
    }
}

fn distance_bits(out: &EnergyDistanceOutput) -> Vec<Vec<u32>> {
    bits(&[&out.distance, &out.cross, &out.within_x, &out.within_y])
}

/// The plain op's bits for the whole sets on `device`; a mutation of one of them by one
/// ulp is told apart, so comparing bits can fail.
fn plain_distance_bits(p: &EnergyDistanceCase, sets: &Sets, device: &Device) -> Vec<Vec<u32>> {
    let whole = shard(p, sets, device, (0, p.n), (0, p.m));
    let plain = distance_bits(&energy::energy_distance(&distance_call(p, &whole)).unwrap());
    let mut mutated = plain.clone();
    mutated[0][0] ^= 1;
    assert_ne!(mutated, plain);
    plain
}

#[test]
fn world_size_1_sharded_energy_distance_is_the_plain_op() {
    let _serial = one_test_at_a_time();
    let Some(device) = cuda_devices().into_iter().next() else {
        return;
    };
    // The process path: an id whose bytes travel to the (here: no) other ranks.
    let id = match UniqueId::new() {
        Ok(id) => UniqueId::from_bytes(id.to_bytes()),
        Err(Error::NcclUnavailable(_)) => {
            // Skipped, or failed under LOSSKERN_REQUIRE_NCCL=1, as the other tests.
            communicators(std::slice::from_ref(&device));
            return;
        }
        Err(e) => panic!("ncclGetUniqueId: {e}"),
    };
    let comm = Communicator::from_rank(&device, 0, 1, &id).unwrap();
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    for p in &distance_cases(1) {
        let sets = draw_sets(p);
        let plain = plain_distance_bits(p, &sets, &device);
        let whole = shard(p, &sets, &device, (0, p.n), (0, p.m));
        let sharded = nccl::energy_distance(&comm, &distance_call(p, &whole)).unwrap();
        assert_eq!(distance_bits(&sharded), plain, "{p:?}");
    }
}

#[test]
fn needs_2_gpus_sharded_energy_distance_across_devices_is_the_one_device_result() {
    let _serial = one_test_at_a_time();
    let Some(devices) = several_devices("needs_2_gpus_sharded_energy_distance") else {
        return;
    };
    let world = devices.len();
    for p in &distance_cases(world) {
        let Some(comms) = communicators(&devices) else {
            return;
        };
        let sets = draw_sets(p);
        let plain = plain_distance_bits(p, &sets, &devices[0]);
        // Uneven shards: rank r holds rows [r N / world, (r + 1) N / world) of X and
        // [r^2 M / world^2, (r + 1)^2 M / world^2) of Y (at least one row: M >= world^2),
        // so the ranks hold different row counts of Y.
        let x_rows = |r: usize| (r * p.n / world, (r + 1) * p.n / world);
        let y_cut = |r: usize| r * r * p.m / (world * world);
        let shards: Vec<Shard> = devices
            .iter()
            .enumerate()
            .map(|(r, device)| shard(p, &sets, device, x_rows(r), (y_cut(r), y_cut(r + 1))))
            .collect();
        let results = on_every_rank(comms, shards, |comm, s| {
            distance_bits(&nccl::energy_distance(comm, &distance_call(p, &s)).unwrap())
        });
        for (rank, got) in results.iter().enumerate() {
            assert_eq!(*got, plain, "rank {rank}: {p:?}");
        }
    }
}

/// Whether directory `dir` holds a libnccl.
fn holds_nccl(dir: &str) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libnccl"))
    })
}

/// Whether the dynamic loader finds a libnccl without LD_LIBRARY_PATH: in its cache or
/// in a system library directory.
fn libnccl_in_system_paths() -> bool {
    let cached = Command::new("ldconfig")
        .arg("-p")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("libnccl"));
    let system_dirs = [
        "/lib",
        "/lib64",
        "/usr/lib",
        "/usr/lib64",
        "/usr/local/lib",
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
    ];
    cached || system_dirs.iter().any(|dir| holds_nccl(dir))
}

#[test]
fn without_libnccl_every_constructor_is_a_typed_error() {
    if libnccl_in_system_paths() {
        eprintln!(
            "without_libnccl_every_constructor_is_a_typed_error DID NOT RUN: a libnccl in \
             the system library paths cannot be hidden"
        );
        return;
    }
    let library_path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let without_nccl: Vec<&str> = library_path
        .split(':')
        .filter(|dir| !holds_nccl(dir))
        .collect();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "multi::constructors_without_libnccl",
            "--ignored",
            "--nocapture",
        ])
        .env("LD_LIBRARY_PATH", without_nccl.join(":"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr),
    );
    assert!(child.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{stdout}\n{stderr}");
}

#[test]
#[ignore = "run by without_libnccl_every_constructor_is_a_typed_error, in a process whose LD_LIBRARY_PATH lacks libnccl"]
fn constructors_without_libnccl() {
    fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, Error>) {
        match result {
            Err(Error::NcclUnavailable(message)) => {
                assert!(message.contains("libnccl.so"), "{message}")
            }
            other => panic!("not NcclUnavailable: {other:?}"),
        }
    }
    assert_unavailable(Communicator::from_devices(&[]));
    assert_unavailable(UniqueId::new());
    let id = UniqueId::from_bytes([7; 128]);
    assert_unavailable(Communicator::from_rank(&Device::Cpu, 0, 1, &id));
}
