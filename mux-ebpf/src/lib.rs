//! Empty on purpose: this library target exists only so that `mux` can list
//! `mux-ebpf` as a build-dependency (cargo then rebuilds mux when the kernel
//! crate's dependencies change). The programs are in the `mux` binary target.
#![no_std]
