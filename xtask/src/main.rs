//! `cargo xtask`: the one entry point to build, run, test and benchmark mux on a fresh machine. Each
//! command first installs what it needs (and only checks, quickly, when all is there).

mod bench;
mod run;
mod setup;
mod soak;
mod test;
mod util;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build everything (eBPF objects included) and run the mux daemon
    ///
    /// With no arguments mux runs its embedded default config, e.g.
    /// `cargo xtask run -- --listen 127.0.0.1:2222 --ssh 127.0.0.1:22`.
    Run {
        /// Passed to mux as they are
        #[arg(last = true, value_name = "MUX_ARGS")]
        args: Vec<String>,
    },
    /// Run the whole test suite: workspace tests, privileged tests, a soak, fuzzing
    ///
    /// Installs what is missing first (needs root for Debian packages). Every phase runs even
    /// if an earlier one fails; the exit status is non-zero if any failed.
    Test(test::Args),
    /// Benchmark mux against direct, sslh, HAProxy and Caddy on loopback
    ///
    /// Installs what is missing first (root: Debian packages, and the eBPF data path), builds
    /// release binaries, and writes bench/results/latest.{md,json} and SVG charts.
    Bench(bench::Args),
    /// Soak mux: many concurrent clients of every kind for a while, every byte checked
    ///
    /// SSH-like, TLS, HTTP keep-alive, catch-all, garbage, silent, aborted and half-closed
    /// connections against in-process backends; then mux must come back to idle: open fds,
    /// memory, eBPF map entries, and the metrics' open connections and tasks.
    Soak(soak::Args),
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Cmd::Run { args } => run::run_mux(&args).map(|()| ExitCode::SUCCESS),
        Cmd::Test(args) => test::test(&args),
        Cmd::Bench(args) => bench::bench(&args),
        Cmd::Soak(args) => soak::soak(&args),
    }
}
