//! The one table of which backend has a kernel for which op. The backends' traits answer
//! `Error::Unsupported` for everything else; the tests, `losskern check` and the CLI read
//! this table, so an op that a backend lists here and then refuses is a failure, not a skip.

use crate::device::Backend;

/// Every op of the crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Xent,
    XentDirectional,
    EnsembleForward,
    EnsembleLandscape,
    EnergyScore,
    EnergyDistance,
    BnStats,
    BnMerge,
    BnRunning,
}

impl Op {
    /// Every op, in the order of the families.
    pub const ALL: [Op; 9] = [
        Op::Xent,
        Op::XentDirectional,
        Op::EnsembleForward,
        Op::EnsembleLandscape,
        Op::EnergyScore,
        Op::EnergyDistance,
        Op::BnStats,
        Op::BnMerge,
        Op::BnRunning,
    ];

    /// The op's path under `losskern::ops`, as errors and reports name it.
    pub fn name(self) -> &'static str {
        match self {
            Op::Xent => "xent",
            Op::XentDirectional => "xent::directional",
            Op::EnsembleForward => "ensemble::forward",
            Op::EnsembleLandscape => "ensemble::landscape",
            Op::EnergyScore => "energy::energy_score",
            Op::EnergyDistance => "energy::energy_distance",
            Op::BnStats => "bnstats::bn_stats",
            Op::BnMerge => "bnstats::merge",
            Op::BnRunning => "bnstats::RunningStats::update",
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Backend {
    /// Whether this backend has a kernel for `op`. The CPU and CUDA run every op.
    pub fn supports(self, op: Op) -> bool {
        match self {
            Backend::Cpu | Backend::Cuda => true,
            Backend::Wgpu => matches!(
                op,
                Op::Xent
                    | Op::XentDirectional
                    | Op::EnsembleForward
                    | Op::EnsembleLandscape
                    | Op::EnergyScore
                    | Op::EnergyDistance
                    | Op::BnStats
                    | Op::BnMerge
                    | Op::BnRunning
            ),
        }
    }
}
