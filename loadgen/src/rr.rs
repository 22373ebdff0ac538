//! Request-response latency: each connection sends SIZE bytes and waits for the echo server
//! to return them, back to back, until the duration is up.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::OP_TIMEOUT;

#[derive(clap::Args)]
pub struct Args {
    /// The echo server, or a proxy in front of it
    #[arg(long, value_parser = crate::loopback)]
    target: SocketAddr,
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Seconds of measured round trips (after one unmeasured warm-up round trip each)
    #[arg(long, default_value = "2", value_parser = crate::parse_secs)]
    duration: Duration,
    /// Bytes per message
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Round trips per connection at most, whatever the duration
    #[arg(long, default_value_t = 10_000_000)]
    max_round_trips: usize,
}

#[derive(Serialize)]
pub struct Report {
    connections: usize,
    round_trips: usize,
    seconds: f64,
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

pub async fn run(args: Args) -> Result<Report> {
    if args.connections == 0 || args.size == 0 {
        bail!("--connections and --size must be at least 1");
    }
    // Every message is distinct from the first bytes of a known protocol only by accident;
    // a catch-all route takes it, which is what this workload is configured with.
    let msg: Vec<u8> = (0..args.size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut streams = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let mut s = crate::connect(args.target).await?;
        // Warm-up: the proxy classifies and connects its backend on the first bytes; that
        // is the connection-rate workload's business, not this one's.
        round_trip(&mut s, &msg, &mut vec![0; args.size])
            .await
            .context("warm-up round trip")?;
        streams.push(s);
    }
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in streams {
        let msg = msg.clone();
        let max = args.max_round_trips;
        tasks.spawn(async move {
            let mut buf = vec![0; msg.len()];
            let mut lat = Vec::with_capacity(64 * 1024);
            while lat.len() < max && Instant::now() < deadline {
                let t0 = Instant::now();
                round_trip(&mut s, &msg, &mut buf).await?;
                lat.push(t0.elapsed().as_nanos() as u64);
            }
            anyhow::Ok(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    let seconds = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let us = |q: f64| percentile(&all, q) as f64 / 1000.0;
    Ok(Report {
        connections: args.connections,
        round_trips: all.len(),
        seconds,
        per_sec: all.len() as f64 / seconds,
        p50_us: us(0.50),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: us(1.0),
    })
}

async fn round_trip(s: &mut TcpStream, msg: &[u8], buf: &mut [u8]) -> Result<()> {
    tokio::time::timeout(OP_TIMEOUT, async {
        s.write_all(msg).await?;
        s.read_exact(buf).await?;
        anyhow::Ok(())
    })
    .await
    .context("round trip timed out")??;
    // A proxy that mangled or reordered bytes would otherwise look merely fast.
    if buf != msg {
        bail!("the echo differs from what was sent");
    }
    Ok(())
}

/// The nearest-rank percentile of sorted `v` (0 for no samples).
fn percentile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&v, 1.0), 1000);
        assert_eq!(percentile(&[7], 0.999), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
