//! mux: many services through one TCP port. The library behind the `mux` binary.

pub mod classify;
pub mod ebpf;
