//! SyncBN: batch-norm statistics of the union of every rank's batch.

use super::{check_accepted, Communicator};
use crate::cuda::bnstats::merge_stacked;
use crate::cuda::launch::cuda_slice;
use crate::error::{Error, Result};
use crate::ops::bnstats::{bn_stats, validate, BnMergeSpec, BnSpec, BnStats, BnStatsOutput};

/// The header of one rank's batch: accepted (1) or refused (0), its channels and count.
type Header = [u64; 3];

/// This rank's batch, checked as `ops::bnstats::bn_stats` checks it, on the rank's
/// device, without the fused normalisation (it needs the merged statistics).
fn validate_local(comm: &Communicator, call: &BnStats<'_>) -> Result<BnSpec> {
    comm.check_device(call.x.device(), "x")?;
    if call.normalize.is_some() {
        return Err(Error::Option(
            "sync_bn_stats does not normalise: apply the merged mean and invstd after it".into(),
        ));
    }
    validate(call)
}

/// The merge of the ranks' partials, or why the ranks' batches do not fit together.
fn merge_spec(headers: &[Header], eps: f64) -> Result<BnMergeSpec> {
    check_accepted(headers)?;
    let &[_, c, _] = headers
        .first()
        .ok_or_else(|| Error::Empty("a communicator of no rank".into()))?;
    let mut count = 0u64;
    for (rank, &[_, channels, rank_count]) in headers.iter().enumerate() {
        if channels != c {
            return Err(Error::Shape(format!(
                "rank {rank}'s batch has {channels} channels, rank 0's {c}"
            )));
        }
        count = count
            .checked_add(rank_count)
            .ok_or_else(|| Error::Shape("the ranks' counts overflow u64".into()))?;
    }
    Ok(BnMergeSpec {
        parts: headers.len(),
        c: usize::try_from(c).map_err(|_| Error::Shape(format!("{c} channels")))?,
        count,
        eps,
    })
}

/// SyncBN statistics: every rank passes its own batch (the same layout and channels,
/// any count) and gets the statistics of all ranks' batches together, the same on
/// every rank. Each rank's Welford partials (count, mean, M2 per channel) are
/// all-gathered and merged by Chan's formula in rank order, as `ops::bnstats::merge`
/// merges them (the output's `m2` is the union's, `y` is None: a call with `normalize`
/// is refused with `Error::Option`, since no fused normalisation with the merged
/// statistics exists yet). Collective: every rank
/// of `comm` must call it; a batch one rank refuses fails the call on every rank.
pub fn sync_bn_stats(comm: &Communicator, call: &BnStats<'_>) -> Result<BnStatsOutput> {
    // The rank's own statistics come first, so that any failure of them reaches the
    // other ranks through the header rather than leaving them in a collective.
    let local = validate_local(comm, call).and_then(|spec| Ok((spec, bn_stats(call)?)));
    let header = match &local {
        Ok((spec, _)) => [1, spec.c() as u64, (spec.n() * spec.spatial()) as u64],
        Err(_) => [0; 3],
    };
    let headers = comm.exchange(header)?;
    let (_, stats) = local?;
    let spec = merge_spec(&headers, call.eps)?;
    let counts: Vec<u64> = headers.iter().map(|&[_, _, count]| count).collect();

    let mean = cuda_slice(&stats.mean, "the rank's mean")?;
    let m2 = cuda_slice(&stats.m2, "the rank's M2")?;
    let mut means = comm.all_gather(&mean.as_view(), "the means' all-gather")?;
    let mut m2s = comm.all_gather(&m2.as_view(), "the M2s' all-gather")?;
    merge_stacked(
        comm.stream(),
        comm.device(),
        &mut means,
        &mut m2s,
        &counts,
        &spec,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_headers_give_the_merge_or_every_rank_the_same_error() {
        let headers = [[1, 5, 30], [1, 5, 2], [1, 5, 11]];
        let spec = merge_spec(&headers, 1e-3).unwrap();
        assert_eq!((spec.parts, spec.c, spec.count, spec.eps), (3, 5, 43, 1e-3));
        assert!(matches!(
            merge_spec(&[[1, 5, 30], [0, 0, 0]], 1e-3),
            Err(Error::PeerRefused { rank: 1 })
        ));
        assert!(matches!(
            merge_spec(&[[1, 5, 30], [1, 4, 30]], 1e-3),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            merge_spec(&[[1, 5, u64::MAX], [1, 5, 1]], 1e-3),
            Err(Error::Shape(_))
        ));
    }
}
