//! Weft's benchmarks: shared fixtures for the criterion micro-benchmarks (`benches/lb.rs`,
//! `benches/headers.rs`) and the HTTP/1.1 load generator behind the `weft-load` binary,
//! which `load/run.sh` uses to compare Weft with nginx and HAProxy.
//!
//! See `benches/README.md` for what each benchmark answers and how to read its output.

pub mod fixtures;
pub mod load;
