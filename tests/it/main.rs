//! The one integration-test crate: every module runs on every present backend.

mod backends;
mod bad_input;
mod bnstats;
mod compile;
mod cpu;
mod energy;
mod ensemble;
mod families;
#[cfg(feature = "nccl")]
mod multi;
mod mutation;
mod nvrtc_cache;
mod raw_entries;
mod roundtrip;
mod targets;
mod xent;
