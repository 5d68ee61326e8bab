//! The two-sample energy distance of sets sharded by rows across the ranks.

use cudarc::driver::CudaSlice;

use super::{check_accepted, Communicator};
use crate::cuda::energy::{
    distance_gradient, merge_sums, pair_sums, term_offsets, EnergyDistanceBuffers,
    EnergyDistanceInputs, TileShare,
};
use crate::cuda::launch::{alloc_output, bytes, cuda_slice, Fill};
use crate::device::Tensor;
use crate::error::{Error, Result};
use crate::ops::energy::{
    validate_distance, EnergyDistance, EnergyDistanceOutput, EnergyDistanceSpec, Statistic,
};

/// The header of one rank's shards: accepted (1) or refused (0), N, M, then the words
/// every rank must agree on: d, the dtype, whether each set is weighted, the statistic
/// and beta's bits.
type Header = [u64; 9];

fn header(spec: &EnergyDistanceSpec, call: &EnergyDistance<'_>) -> Header {
    [
        1,
        spec.n() as u64,
        spec.m() as u64,
        spec.d() as u64,
        spec.dtype() as u64,
        u64::from(call.weights_x.is_some()),
        u64::from(call.weights_y.is_some()),
        u64::from(spec.statistic() == Statistic::U),
        spec.beta().to_bits(),
    ]
}

/// The distance of the union of the ranks' shards, or why they do not fit together.
fn global_spec(local: &EnergyDistanceSpec, headers: &[Header]) -> Result<EnergyDistanceSpec> {
    check_accepted(headers)?;
    let first = headers
        .first()
        .ok_or_else(|| Error::Empty("a communicator of no rank".into()))?;
    let (mut n, mut m) = (0usize, 0usize);
    for (rank, header) in headers.iter().enumerate() {
        if header[3..] != first[3..] {
            return Err(Error::Shape(format!(
                "rank {rank}'s shards differ from rank 0's in d, dtype, weights, statistic \
                 or beta"
            )));
        }
        let rows = |word: u64| usize::try_from(word).map_err(|_| Error::Shape("rows".into()));
        n = n
            .checked_add(rows(header[1])?)
            .ok_or_else(|| Error::Shape("the ranks' X rows overflow usize".into()))?;
        m = m
            .checked_add(rows(header[2])?)
            .ok_or_else(|| Error::Shape("the ranks' Y rows overflow usize".into()))?;
    }
    Ok(EnergyDistanceSpec { n, m, ..*local })
}

/// Each rank's byte count of a set: its rows (header word `word`) times `row_bytes`.
fn rank_bytes(headers: &[Header], word: usize, row_bytes: usize) -> Result<Vec<usize>> {
    headers
        .iter()
        .map(|header| bytes(header[word] as usize, row_bytes, "a rank's shard"))
        .collect()
}

/// The two-sample energy distance of X and Y sharded by rows: every rank passes its own
/// rows of X and Y (and of their weights; any number of rows, at least one of each, the
/// same d, dtype, beta, statistic and weights present on every rank) and gets the
/// distance of all ranks' rows together, the same on every rank. The shards are
/// all-gathered; each rank sums a contiguous share of the single-device pair tiles; the
/// ranks' f64 tile sums are gathered in rank order and merged as on one device, so the
/// result is the single-device one of the sets in rank order. Every rank holds the
/// whole of X and Y: sharding divides the work, not the memory. Collective: every rank
/// of `comm` must call it; shards one rank refuses fail the call on every rank.
pub fn energy_distance(
    comm: &Communicator,
    call: &EnergyDistance<'_>,
) -> Result<EnergyDistanceOutput> {
    let local = comm
        .check_device(call.x.device(), "x")
        .and_then(|()| validate_distance(call));
    let header = match &local {
        Ok(spec) => header(spec, call),
        Err(_) => [0; 9],
    };
    let headers = comm.exchange(header)?;
    let spec = global_spec(&local?, &headers)?;

    let row_bytes = bytes(spec.d(), spec.dtype().size(), "a row")?;
    let gather = |set: &CudaSlice<u8>, word: usize, row_bytes: usize, what: &str| {
        comm.gather_varying(set, &rank_bytes(&headers, word, row_bytes)?, what)
    };
    let x = gather(cuda_slice(call.x, "x")?, 1, row_bytes, "the X all-gather")?;
    let y = gather(cuda_slice(call.y, "y")?, 2, row_bytes, "the Y all-gather")?;
    let weights = |w: Option<&Tensor>, word: usize, what: &str| {
        w.map(|w| gather(cuda_slice(w, what)?, word, 4, what))
            .transpose()
    };
    let weights_x = weights(call.weights_x, 1, "weights_x")?;
    let weights_y = weights(call.weights_y, 2, "weights_y")?;
    let inputs = EnergyDistanceInputs {
        x: x.as_view(),
        y: y.as_view(),
        weights_x: weights_x.as_ref().map(CudaSlice::as_view),
        weights_y: weights_y.as_ref().map(CudaSlice::as_view),
    };

    let (stream, world) = (comm.stream(), comm.world_size());
    let share = TileShare {
        rank: comm.rank(),
        world,
    };
    let slots = share.slots(&spec);
    let per_rank: usize = slots.iter().sum();
    let mut own = alloc_output(stream, bytes(per_rank, 8, "pair slots")?, Fill::Unwritten)?;
    pair_sums(stream, &spec, &inputs, &mut own, share)?;
    let mut gathered = alloc_output(
        stream,
        bytes(per_rank * world, 8, "gathered pair slots")?,
        Fill::Unwritten,
    )?;
    let short = || Error::Shape("the pair slots are shorter than their terms".into());
    for ((own_at, gathered_at), len) in term_offsets(slots, 1)
        .into_iter()
        .zip(term_offsets(slots, world))
        .zip(slots)
    {
        let send = own
            .try_slice(8 * own_at..8 * (own_at + len))
            .ok_or_else(short)?;
        let mut recv = gathered
            .try_slice_mut(8 * gathered_at..8 * (gathered_at + world * len))
            .ok_or_else(short)?;
        comm.gather_into(&send, &mut recv, "the pair slots' all-gather")?;
    }

    let mut out = EnergyDistanceBuffers::allocate(stream, &spec, Fill::Unwritten)?;
    let gathered = gathered.as_view();
    merge_sums(stream, &spec, &inputs, Some((&gathered, world)), &mut out)?;
    // Every rank holds the whole of X and Y, so each computes the whole gradient (the
    // same launches on the same data: the same bits on every rank).
    distance_gradient(stream, &spec, &inputs, &mut out)?;
    Ok(out.into_output(&comm.backend, call))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    /// The header of f16 shards with weights_y only, U statistic, beta 1.5.
    fn rank_header(n: u64, m: u64, d: u64) -> Header {
        let beta = 1.5f64.to_bits();
        [1, n, m, d, DType::F16 as u64, 0, 1, 1, beta]
    }

    #[test]
    fn the_ranks_headers_give_the_union_or_every_rank_the_same_error() {
        let local = EnergyDistanceSpec {
            n: 3,
            m: 4,
            d: 2,
            dtype: DType::F16,
            beta: 1.5,
            statistic: Statistic::U,
            grad: false,
        };
        let headers = [
            rank_header(3, 4, 2),
            rank_header(5, 1, 2),
            rank_header(1, 9, 2),
        ];
        let spec = global_spec(&local, &headers).unwrap();
        assert_eq!((spec.n, spec.m, spec.d), (9, 14, 2));
        assert_eq!(
            (spec.dtype, spec.beta, spec.statistic),
            (DType::F16, 1.5, Statistic::U)
        );
        assert_eq!(rank_bytes(&headers, 2, 4).unwrap(), vec![16, 4, 36]);

        let mut refused = headers;
        refused[1] = [0; 9];
        assert!(matches!(
            global_spec(&local, &refused),
            Err(Error::PeerRefused { rank: 1 })
        ));
        for word in 3..9 {
            let mut differing = headers;
            differing[2][word] ^= 1;
            assert!(
                matches!(global_spec(&local, &differing), Err(Error::Shape(_))),
                "word {word}"
            );
        }
    }
}
