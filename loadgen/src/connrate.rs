//! Connection rate: C clients each loop connect, send a protocol's first bytes, read the
//! backend's answer, close; the figure is completed connections per second.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::OP_TIMEOUT;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    /// `SSH-2.0-loadgen\r\n`, then one line back (the `banner` backend)
    Ssh,
    /// `GET / HTTP/1.0\r\n\r\n`, then a response and the server's close (the `http` backend)
    Http,
}

impl Kind {
    fn first_bytes(self) -> &'static [u8] {
        match self {
            Kind::Ssh => b"SSH-2.0-loadgen\r\n",
            Kind::Http => b"GET / HTTP/1.0\r\n\r\n",
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_parser = crate::loopback)]
    target: SocketAddr,
    #[arg(long, value_enum)]
    kind: Kind,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value = "2", value_parser = crate::parse_secs)]
    duration: Duration,
    /// Connections in all at most, whatever the duration
    #[arg(long, default_value_t = 10_000_000)]
    max_connections: u64,
}

#[derive(Serialize)]
pub struct Report {
    connections: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    per_sec: f64,
}

pub async fn run(args: Args) -> Result<Report> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let start = Instant::now();
    let deadline = start + args.duration;
    let per_client = args.max_connections.div_ceil(args.concurrency as u64);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (target, kind) = (args.target, args.kind);
        tasks.spawn(async move {
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            while ok + errors < per_client && Instant::now() < deadline {
                // At the deadline the run is over: a connection still in flight (say, a SYN
                // waiting for its retransmission after a full accept queue) counts neither way.
                let Ok(result) = tokio::time::timeout_at(deadline.into(), one(target, kind)).await
                else {
                    break;
                };
                match result {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                        // A refusing proxy fails instantly: do not turn that into a spin.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            (ok, errors, first_error)
        });
    }
    let mut report = Report {
        connections: 0,
        errors: 0,
        first_error: None,
        seconds: 0.0,
        per_sec: 0.0,
    };
    while let Some(done) = tasks.join_next().await {
        let (ok, errors, first_error) = done?;
        report.connections += ok;
        report.errors += errors;
        if report.first_error.is_none() {
            report.first_error = first_error;
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.per_sec = report.connections as f64 / report.seconds;
    Ok(report)
}

async fn one(target: SocketAddr, kind: Kind) -> Result<()> {
    let mut s = crate::connect(target).await?;
    tokio::time::timeout(OP_TIMEOUT, async {
        s.write_all(kind.first_bytes()).await?;
        let mut answer = Vec::with_capacity(256);
        let mut buf = [0u8; 1024];
        loop {
            let n = s.read(&mut buf).await?;
            answer.extend_from_slice(&buf[..n]);
            let done = match kind {
                Kind::Ssh => answer.contains(&b'\n'),
                // The backend answers HTTP/1.0 with a close: the whole response is in.
                Kind::Http => n == 0,
            };
            if done || n == 0 {
                break;
            }
        }
        let expected: &[u8] = match kind {
            Kind::Ssh => b"SSH-",
            Kind::Http => b"HTTP/1.",
        };
        if !answer.starts_with(expected) {
            bail!(
                "unexpected answer {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(64)])
            );
        }
        anyhow::Ok(())
    })
    .await
    .context("exchange timed out")?
}
