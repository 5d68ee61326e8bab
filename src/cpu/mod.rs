//! CPU backend: runs every op through the f64 reference.

pub mod xent;
