//! mux's kernel programs: one object (`mux`) holding every program and map.
//!
//! Built for `bpfel-unknown-none` by mux/build.rs through aya-build and
//! embedded in the `mux` binary; never built for the host (it has no `main`).
//! Each program lives in its own module; the maps they share are in `maps`.
#![no_std]
#![no_main]

mod flow;
mod maps;
mod sk_lookup;
mod sk_msg;
mod sock_ops;

// A BPF program cannot unwind or abort: the verifier would reject any path
// that reached this loop, so code must never be able to panic (no indexing
// with runtime values, no overflow checks — see the workspace profile).
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The kernel only lets GPL-compatible programs call GPL-only helpers; dual
// licensing keeps the crate's MIT/Apache licence for its source.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
