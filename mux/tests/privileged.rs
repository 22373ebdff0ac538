//! Tests that need root and the running kernel: mux's eBPF programs loaded
//! and acting on real loopback connections, and the daemon on its kernel
//! data path. `cargo xtask test` runs this target alone, one test at a time
//! (they read machine-wide figures such as /proc/net/sockstat).
//!
//! Rule: with `CI=true` they must run, so not being root (or a kernel that
//! refuses the programs) is a failure, never a skip. Elsewhere a non-root
//! run skips each test with a printed reason. Every wait is bounded and all
//! traffic stays on loopback.

mod common;

mod privileged {
    mod keepalive;
    mod kernel_path;
    mod netns;
    mod programs;
    mod takeover;
    mod transparent;
    mod tunnel;
}
