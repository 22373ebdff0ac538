//! mux out of file descriptors: the accept loop backs off (and says so, not
//! in a flood) instead of spinning or dying, and serves again once clients
//! leave.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENTS: usize = 1000;
/// mux raises its soft limit to the hard one at start: both are set.
const FD_LIMIT: &str = "--nofile=256:256";

/// One client through mux to the echo backend: its banner comes back.
async fn echoed(addr: std::net::SocketAddr, limit: Duration) -> Result<()> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let hello = b"SSH-2.0-fresh\r\nand some more";
        s.write_all(hello).await?;
        let mut back = vec![0u8; hello.len()];
        s.read_exact(&mut back).await?;
        ensure!(back == hello, "got {:?}", String::from_utf8_lossy(&back));
        Ok(())
    };
    tokio::time::timeout(limit, exchange).await?
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_fd_limit_mux_backs_off_and_serves_again() {
    if !can_run("prlimit", have_tool("prlimit")) {
        return;
    }
    // The test holds the thousand clients and the backend's ends of what
    // mux relays.
    let ours = mux::privileges::raise_fd_limit().unwrap();
    assert!(
        ours >= 2 * CLIENTS as u64 + 256,
        "fd limit {ours} too low for the test itself"
    );
    let backend = echo_backend().await;
    let mut mux = Mux::with_config_under(
        &["prlimit", FD_LIMIT, "--"],
        &config("datapath = \"splice\"", &[("ssh", "ssh", backend)]),
    )
    .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", mux.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["256", "256"],
        "{open_files}"
    );

    let opened = Instant::now();
    let (leave, told) = tokio::sync::watch::channel(false);
    let (connected_tx, mut connected) = tokio::sync::mpsc::unbounded_channel();
    let served = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let (addr, mut told, connected, served) =
            (mux.addr, told.clone(), connected_tx.clone(), served.clone());
        clients.spawn(async move {
            // The kernel completes the handshake from its backlog whether
            // or not mux can accept.
            let mut s = TcpStream::connect(addr).await?;
            let hello = format!("SSH-2.0-client-{i}\r\n");
            s.write_all(hello.as_bytes()).await?;
            let _ = connected.send(());
            let mut echo = vec![0u8; hello.len()];
            tokio::select! {
                r = s.read_exact(&mut echo) => {
                    if r.is_ok() && echo == hello.as_bytes() {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ = told.wait_for(|go| *go) => {}
            }
            // Served, refused or still waiting: it holds on until told.
            let _ = told.wait_for(|go| *go).await;
            anyhow::Ok(())
        });
    }
    drop(connected_tx);
    tokio::time::timeout(Duration::from_secs(30), async {
        for _ in 0..CLIENTS {
            connected.recv().await.expect("a client failed to connect");
        }
    })
    .await
    .expect("the clients did not all connect within 30 s");
    mux.wait_log_async("pausing accepts briefly", Duration::from_secs(20))
        .await
        .unwrap();
    // Stay at the limit a few seconds: a mux retrying without pause would
    // log (or spin) many times a second meanwhile.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        mux.alive(),
        "mux died at the fd limit; log:\n{}",
        mux.logs().join("\n")
    );
    let at_limit = opened.elapsed();
    let pauses = mux
        .logs()
        .iter()
        .filter(|l| l.contains("pausing accepts briefly"))
        .count();
    let served = served.load(Ordering::Relaxed);
    assert!(
        served > 0,
        "mux served none of the clients while at its limit"
    );
    assert!(
        served < CLIENTS,
        "all {served} clients were served: no limit was reached"
    );

    leave.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(r) = clients.join_next().await {
            r.unwrap().unwrap();
        }
    })
    .await
    .expect("the clients did not leave within 10 s");

    // mux still has the leftover backlog to go through; a fresh client is
    // served once it has.
    let left = Instant::now();
    loop {
        match echoed(mux.addr, Duration::from_secs(3)).await {
            Ok(()) => break,
            Err(e) if left.elapsed() < Duration::from_secs(10) => {
                eprintln!("fresh client not served yet ({e:#}); again");
            }
            Err(e) => panic!(
                "no fresh client served within 10 s of the others leaving: {e:#}; log tail:\n{}",
                mux.logs()[mux.logs().len().saturating_sub(40)..].join("\n")
            ),
        }
    }
    eprintln!(
        "{served} of {CLIENTS} served at the limit, {pauses} pause lines in {at_limit:?}, fresh client served {:?} after the others left",
        left.elapsed()
    );
    assert!(mux.alive());
    let logs = mux.logs();
    assert!(
        !logs.iter().any(|l| l.contains("panicked")),
        "{}",
        logs.join("\n")
    );
    // Checked last, so that a flood of these lines does not hide whether
    // mux serves again.
    assert!(
        pauses as u64 <= at_limit.as_secs() + 1,
        "{pauses} `pausing accepts` lines in {at_limit:?} ({} CPUs); mux logged them:\n{}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        mux.logs()
            .iter()
            .filter(|l| l.contains("pausing accepts"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        mux.stop().unwrap().success(),
        "mux did not exit cleanly on SIGTERM"
    );
}

/// The descriptor table is grown once at start, while mux has one thread:
/// grown later, each doubling would stall every worker for an RCU grace
/// period (see `privileges::presize_fd_table`).
#[tokio::test(flavor = "multi_thread")]
async fn the_descriptor_table_is_sized_at_start() {
    if !can_run("prlimit", have_tool("prlimit")) {
        return;
    }
    let backend = echo_backend().await;
    let mut mux = Mux::with_config_under(
        &["prlimit", "--nofile=4096:4096", "--"],
        &config("datapath = \"splice\"", &[("ssh", "ssh", backend)]),
    )
    .unwrap();
    // Serving proves that start-up is over.
    echoed(mux.addr, Duration::from_secs(5)).await.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", mux.pid())).unwrap();
    let size: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no FDSize in {status}"));
    // A process starts with 64 entries, and one connection needs few.
    assert!(
        size >= 4096,
        "FDSize {size}, expected the whole limit (4096)"
    );
    assert!(mux.stop().unwrap().success());
}
