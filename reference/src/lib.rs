//! The f64 CPU definition of every losskern op.
//!
//! Plain loops that anyone can check by eye: this crate *is* the specification
//! (see DESIGN.md "Semantics"). Kernels are judged against it. Inputs in f16/bf16
//! are widened exactly to f64 by the caller, so a kernel's difference from these
//! functions is only its own rounding.
//!
//! The functions assume validated input (shapes consistent, options in range):
//! `losskern::ops` validates once before anything reaches a backend or this crate.

// Index loops mirror the formulas (x[i * v + k], w[j * d_in + i]) so they can be checked
// against the math by eye; iterator chains would hide the indices.
#![allow(clippy::needless_range_loop)]

pub mod bnstats;
pub mod energy;
pub mod ensemble;
pub mod xent;
