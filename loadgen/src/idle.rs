//! Idle connections: opens N connections through to an echo server (each proves it is
//! relayed by echoing its first bytes), says `ready`, and holds them until stdin closes or
//! the hold time is up. The harness measures the proxy's memory meanwhile.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::OP_TIMEOUT;

/// A catch-all route takes these; being text, they show up readably in proxies' logs.
const FIRST_BYTES: &[u8] = b"idle-loadgen\r\n";
/// Connects in flight at once: enough to be quick, few enough not to overflow the smallest
/// listen backlog in the benchmark (sslh's 50), whose dropped SYNs would each cost a second.
const PARALLEL_CONNECTS: usize = 32;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_parser = crate::loopback)]
    target: SocketAddr,
    #[arg(long)]
    connections: usize,
    /// Hold at most this long, when stdin stays open
    #[arg(long, default_value = "60", value_parser = crate::parse_secs)]
    hold: Duration,
}

#[derive(Serialize)]
pub struct Report {
    connections: usize,
    open_seconds: f64,
    held_seconds: f64,
}

pub async fn run(args: Args) -> Result<Report> {
    let start = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(PARALLEL_CONNECTS));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        let (gate, target) = (Arc::clone(&gate), args.target);
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let mut s = crate::connect(target).await?;
            let mut back = [0u8; FIRST_BYTES.len()];
            tokio::time::timeout(OP_TIMEOUT, async {
                s.write_all(FIRST_BYTES).await?;
                s.read_exact(&mut back).await
            })
            .await
            .context("first bytes' echo timed out")??;
            if back != FIRST_BYTES {
                bail!("the echo differs from what was sent");
            }
            anyhow::Ok(s)
        });
    }
    let mut held = Vec::with_capacity(args.connections);
    while let Some(done) = tasks.join_next().await {
        held.push(done??);
    }
    let open_seconds = start.elapsed().as_secs_f64();
    // The harness reads this line, measures, then closes our stdin.
    println!("ready {}", held.len());
    std::io::stdout().flush()?;

    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    let held_from = Instant::now();
    let _ = tokio::time::timeout(args.hold, rx).await;
    Ok(Report {
        connections: held.len(),
        open_seconds,
        held_seconds: held_from.elapsed().as_secs_f64(),
    })
}
