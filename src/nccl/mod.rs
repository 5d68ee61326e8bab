//! Multi-GPU through NCCL (feature `nccl`). A [`Communicator`] is one rank of a group of
//! CUDA devices: of the devices of one process ([`Communicator::from_devices`], one
//! context per device) or of one device per process ([`Communicator::from_rank`], with
//! a [`UniqueId`] that rank 0 makes and the caller passes to the other ranks). Every rank
//! calls the same op, in the same order, with its own share of the data:
//!
//! - [`sync_bn_stats`]: SyncBN. Each rank's Welford partials are all-gathered and merged
//!   by Chan's formula in rank order, so every rank holds the same statistics of the
//!   union of the ranks' batches; `ops::bnstats::RunningStats::update` with them then
//!   updates the running statistics identically on every rank.
//! - [`energy_distance`]: X and Y sharded by rows. The shards are all-gathered, each
//!   rank sums a contiguous share of the pair tiles, and the ranks' f64 slots are
//!   gathered in rank order and merged on every rank: the slots and their order are the
//!   single-device ones, so every rank returns the single-device distance.
//!
//! Each op first all-gathers a small header of every rank's input (its shape, or that
//! the rank refused its input) and reads it back: an input one rank refuses, or ranks
//! whose inputs disagree, make the op fail on every rank instead of hanging a
//! collective. That read-back is the op's one wait for the device.
//!
//! libnccl is dlopen()ed by name (`libnccl.so`, `libnccl.so.13`, ...: the names cudarc
//! tries, through LD_LIBRARY_PATH and the system paths) at the first communicator or
//! id; when it cannot be loaded they return `Error::NcclUnavailable`. The PyPI wheel
//! `nvidia-nccl-cu13` ships `libnccl.so.2`, a name cudarc does not try: link it as
//! `libnccl.so` in a directory on LD_LIBRARY_PATH (README, feature `nccl`). Keep NVLink
//! multicast off (`NCCL_NVLS_ENABLE=0` in the environment before the first communicator).

use std::ffi::c_char;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::{Comm, Id};

use crate::cuda::launch::{alloc_output, bytes, driver_error, Fill};
use crate::cuda::{lib_candidates, no_panic, CudaBackend};
use crate::device::Device;
use crate::error::{Error, Result};

mod bnstats;
mod energy;

pub use bnstats::sync_bn_stats;
pub use energy::energy_distance;

/// Fails with `NcclUnavailable` unless libnccl can be loaded; cudarc panics at the first
/// NCCL call otherwise.
fn require_nccl() -> Result<()> {
    // SAFETY: this only dlopen()s the libnccl candidates cudarc would load anyway (from
    // LD_LIBRARY_PATH and the system paths); loading libnccl runs no initialiser with
    // preconditions.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::NcclUnavailable(format!(
            "libnccl cannot be loaded (looked for {:?}); the PyPI wheel nvidia-nccl-cu13 \
             ships nvidia/nccl/lib/libnccl.so.2: link it as libnccl.so in a directory on \
             LD_LIBRARY_PATH",
            lib_candidates("nccl")
        )))
    }
}

/// Runs NCCL calls, turning a panic inside cudarc (a symbol missing from an old
/// libnccl) into `NcclUnavailable`.
fn nccl_call<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    no_panic(what, f).map_err(|e| match e {
        Error::CudaUnavailable(message) => Error::NcclUnavailable(message),
        other => other,
    })
}

fn nccl_error(what: &str) -> impl FnOnce(NcclError) -> Error + '_ {
    move |e| Error::Nccl(format!("{what}: {:?}", e.0))
}

/// The id that names one group of ranks across processes: rank 0 makes it
/// ([`UniqueId::new`]) and sends its bytes to the others ([`UniqueId::from_bytes`]).
#[derive(Clone, Copy, Debug)]
pub struct UniqueId(Id);

impl UniqueId {
    /// A new id; `Error::NcclUnavailable` when libnccl cannot be loaded.
    pub fn new() -> Result<UniqueId> {
        require_nccl()?;
        nccl_call("ncclGetUniqueId", || {
            Id::new()
                .map(UniqueId)
                .map_err(nccl_error("ncclGetUniqueId"))
        })
    }

    /// The id's 128 bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; 128] {
        (*self.0.internal()).map(|c| c as u8)
    }

    /// The id whose bytes rank 0 sent.
    pub fn from_bytes(bytes: [u8; 128]) -> UniqueId {
        UniqueId(Id::uninit(bytes.map(|b| b as c_char)))
    }
}

/// One rank of a group of CUDA devices; its collectives run on its device's stream (the
/// one every op of that device runs on), so they are ordered with the ops' kernels. A
/// collective holds that stream until every rank has joined it: the ops of two
/// communicators that share devices must reach every shared device in the same order
/// (one thread per device does that), or each waits on the other forever.
pub struct Communicator {
    comm: Comm,
    device: Device,
    backend: Arc<CudaBackend>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .field("device", &self.device.name())
            .finish()
    }
}

// SAFETY: an NCCL communicator is not tied to the thread that made it; NCCL only forbids
// using one communicator from several threads at once, which cannot happen because
// Communicator is not Sync (and `Comm`'s stream is an `Arc<CudaStream>`, Send itself).
// Sending it lets one thread drive each rank of `from_devices`.
unsafe impl Send for Communicator {}

fn cuda_backend(device: &Device) -> Result<Arc<CudaBackend>> {
    match device {
        Device::Cuda(backend) => Ok(backend.clone()),
        other => Err(Error::DeviceMismatch(format!(
            "a communicator needs a CUDA device, got {}",
            other.name()
        ))),
    }
}

impl Communicator {
    /// One communicator per device, rank k on `devices[k]`, all in this process
    /// (ncclCommInitAll). Drive each rank from its own thread (a `Communicator` is Send):
    /// one thread running the collectives of several ranks in turn would wait forever
    /// on the first. `Error::NcclUnavailable` when libnccl cannot be loaded.
    pub fn from_devices(devices: &[Device]) -> Result<Vec<Communicator>> {
        require_nccl()?;
        if devices.is_empty() {
            return Err(Error::Empty(
                "a communicator needs at least one device".into(),
            ));
        }
        let backends = devices
            .iter()
            .map(cuda_backend)
            .collect::<Result<Vec<_>>>()?;
        let mut ordinals: Vec<usize> = backends
            .iter()
            .map(|b| b.stream().context().ordinal())
            .collect();
        ordinals.sort_unstable();
        ordinals.dedup();
        if ordinals.len() != devices.len() {
            return Err(Error::DeviceMismatch(
                "a communicator takes each CUDA device once".into(),
            ));
        }
        let streams = backends.iter().map(|b| b.stream().clone()).collect();
        let comms = nccl_call("ncclCommInitAll", || {
            Comm::from_devices(streams).map_err(nccl_error("ncclCommInitAll"))
        })?;
        Ok(comms
            .into_iter()
            .zip(devices)
            .zip(backends)
            .map(|((comm, device), backend)| Communicator {
                comm,
                device: device.clone(),
                backend,
            })
            .collect())
    }

    /// Rank `rank` of `world_size` on `device`, one of a group that `id` names
    /// (ncclCommInitRank): returns once every rank has joined.
    /// `Error::NcclUnavailable` when libnccl cannot be loaded.
    pub fn from_rank(
        device: &Device,
        rank: usize,
        world_size: usize,
        id: &UniqueId,
    ) -> Result<Communicator> {
        require_nccl()?;
        if i32::try_from(world_size).is_err() || rank >= world_size {
            return Err(Error::Option(format!(
                "rank {rank} of world size {world_size}: the rank must be below the world \
                 size, which must fit in i32"
            )));
        }
        let backend = cuda_backend(device)?;
        let stream = backend.stream().clone();
        // NCCL makes the communicator on the calling thread's current device.
        stream
            .context()
            .bind_to_thread()
            .map_err(driver_error("cuCtxSetCurrent"))?;
        let comm = nccl_call("ncclCommInitRank", || {
            Comm::from_rank(stream, rank, world_size, id.0).map_err(nccl_error("ncclCommInitRank"))
        })?;
        Ok(Communicator {
            comm,
            device: device.clone(),
            backend,
        })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The rank's device: an op's tensors must live there.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.backend.stream()
    }

    /// `DeviceMismatch` unless `device` is the rank's own.
    fn check_device(&self, device: &Device, what: &str) -> Result<()> {
        if *device == self.device {
            Ok(())
        } else {
            Err(Error::DeviceMismatch(format!(
                "{what} lives on {}, the rank on {}",
                device.name(),
                self.device.name()
            )))
        }
    }

    /// All-gathers `send` (the same length on every rank) into `recv`, rank after rank.
    fn gather_into(
        &self,
        send: &CudaView<'_, u8>,
        recv: &mut CudaViewMut<'_, u8>,
        what: &str,
    ) -> Result<()> {
        let need = bytes(send.len(), self.world_size(), what)?;
        if recv.len() < need {
            return Err(Error::Shape(format!(
                "{what}: the gather buffer holds {} bytes, {need} are needed",
                recv.len()
            )));
        }
        self.stream()
            .context()
            .bind_to_thread()
            .map_err(driver_error("cuCtxSetCurrent"))?;
        nccl_call(what, || {
            self.comm
                .all_gather(send, recv)
                .map(drop)
                .map_err(nccl_error(what))
        })
    }

    /// All-gathers `send` (the same length on every rank) into a new buffer.
    fn all_gather(&self, send: &CudaView<'_, u8>, what: &str) -> Result<CudaSlice<u8>> {
        let len = bytes(send.len(), self.world_size(), what)?;
        let mut recv = alloc_output(self.stream(), len, Fill::Unwritten)?;
        self.gather_into(send, &mut recv.as_view_mut(), what)?;
        Ok(recv)
    }

    /// Every rank's header, in rank order, on the host: waits for the device.
    fn exchange<const N: usize>(&self, header: [u64; N]) -> Result<Vec<[u64; N]>> {
        let stream = self.stream();
        let send = stream
            .clone_htod(bytemuck::cast_slice::<u64, u8>(&header))
            .map_err(driver_error("cuMemcpyHtoD"))?;
        let gathered = self.all_gather(&send.as_view(), "the header all-gather")?;
        let gathered = stream
            .clone_dtoh(&gathered)
            .map_err(driver_error("cuMemcpyDtoH"))?;
        Ok(bytemuck::pod_collect_to_vec(&gathered))
    }

    /// Each rank's `lens[rank]` bytes at the start of its `local`, side by side in rank
    /// order in one buffer of sum(lens) bytes (`lens` as exchanged: the same on every
    /// rank). Ranks may hold different lengths, so each sends its bytes padded to the
    /// longest and the gathered rows are packed after.
    fn gather_varying(
        &self,
        local: &CudaSlice<u8>,
        lens: &[usize],
        what: &str,
    ) -> Result<CudaSlice<u8>> {
        let stream = self.stream();
        let copy = |src: &CudaView<'_, u8>, dst: &mut CudaViewMut<'_, u8>| {
            stream
                .memcpy_dtod(src, dst)
                .map_err(driver_error("cuMemcpyDtoDAsync"))
        };
        let short = || Error::Shape(format!("{what}: a buffer is shorter than its rank's bytes"));
        let widest = lens.iter().copied().max().unwrap_or(0);
        let own = lens.get(self.rank()).copied().ok_or_else(short)?;
        let mut padded = alloc_output(stream, widest, Fill::Unwritten)?;
        copy(
            &local.try_slice(..own).ok_or_else(short)?,
            &mut padded.try_slice_mut(..own).ok_or_else(short)?,
        )?;
        let gathered = self.all_gather(&padded.as_view(), what)?;
        let mut packed = alloc_output(stream, lens.iter().sum(), Fill::Unwritten)?;
        let mut at = 0;
        for (rank, &len) in lens.iter().enumerate() {
            let start = rank * widest;
            copy(
                &gathered.try_slice(start..start + len).ok_or_else(short)?,
                &mut packed.try_slice_mut(at..at + len).ok_or_else(short)?,
            )?;
            at += len;
        }
        Ok(packed)
    }
}

/// Whether every rank accepted its input: header word 0 is 1 where it did. The first
/// rank that refused gives `PeerRefused` on the others; its own call returns its error.
fn check_accepted<const N: usize>(headers: &[[u64; N]]) -> Result<()> {
    match headers.iter().position(|header| header.first() != Some(&1)) {
        Some(rank) => Err(Error::PeerRefused { rank }),
        None => Ok(()),
    }
}
