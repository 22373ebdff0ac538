//! `loadgen`: the traffic side of `cargo xtask bench`. Backends (`echo`, `banner`, `http`) print
//! `listening on ADDR` once ready; clients (`rr`, `connrate`, `idle`) print one JSON object.
//! Every mode stops by itself: servers after `--lifetime`, clients after their duration.

mod backends;
mod connrate;
mod idle;
mod rr;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadgen", about)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Echo server: every byte read is written back
    Echo(backends::ServeArgs),
    /// SSH-like server: sends a banner line on accept, then reads until the client closes
    Banner(backends::ServeArgs),
    /// Tiny HTTP/1.x server: keep-alive, answers every request `ok NAME`
    Http {
        #[command(flatten)]
        serve: backends::ServeArgs,
        /// Put in each response body, to tell backends apart
        #[arg(long, default_value = "backend")]
        name: String,
    },
    /// Request-response: N connections each ping-pong SIZE bytes with an echo server
    Rr(rr::Args),
    /// Connection rate: connect, send first bytes, read the answer, close; from C clients
    Connrate(connrate::Args),
    /// Opens N connections through to an echo server and holds them idle
    Idle(idle::Args),
}

/// Parses `SECONDS` or `SECONDS.FRACTION` (`0.5`), the one duration format of this tool.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    Duration::try_from_secs_f64(v).map_err(|e| format!("`{s}`: {e}"))
}

/// Where to connect: a loopback address only, so a mistyped target cannot send load elsewhere.
pub fn loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|e| format!("`{s}`: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address"));
    }
    Ok(addr)
}

fn main() -> Result<()> {
    // 10,000 idle connections need more than the usual soft limit of 1024 descriptors.
    raise_fd_limit();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        match cli.mode {
            Mode::Echo(a) => backends::serve(a, backends::Kind::Echo).await,
            Mode::Banner(a) => backends::serve(a, backends::Kind::Banner).await,
            Mode::Http { serve, name } => backends::serve(serve, backends::Kind::Http(name)).await,
            Mode::Rr(a) => print_json(&rr::run(a).await?),
            Mode::Connrate(a) => print_json(&connrate::run(a).await?),
            Mode::Idle(a) => print_json(&idle::run(a).await?),
        }
    })
}

fn print_json(report: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// How long one connect or one exchange may take before it counts as failed: far above any
/// loopback latency, so only a stuck peer hits it.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects with Nagle off (the payloads are small and latency is what is measured).
pub async fn connect(addr: SocketAddr) -> Result<tokio::net::TcpStream> {
    let stream = tokio::time::timeout(OP_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr}: timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
