//! The relay through the real binary: integrity of large transfers, half-close
//! both ways, and many connections at once, on every user-space data path.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GIB: u64 = 1 << 30;

/// Client and backend each send 1 GiB at once; each side's sha256 must match
/// what the other sent, for the given data path.
async fn gib_each_way(datapath: &str) {
    let (backend, mut backend_got) = hashing_backend(GIB, 2).await;
    let mux = Mux::with_config(&config(
        &format!("datapath = \"{datapath}\""),
        &[("bulk", "any", backend)],
    ))
    .unwrap();
    let client = TcpStream::connect(mux.addr).await.unwrap();
    let (mut r, mut w) = client.into_split();
    let writer = tokio::spawn(async move {
        let sent = write_stream(&mut w, GIB, 1, true).await;
        w.shutdown().await.unwrap();
        sent
    });
    let (got_len, got_hash) = tokio::time::timeout(Duration::from_secs(240), read_hash(&mut r))
        .await
        .unwrap();
    assert_eq!(writer.await.unwrap(), GIB);
    let (backend_len, backend_hash) =
        tokio::time::timeout(Duration::from_secs(60), backend_got.recv())
            .await
            .unwrap()
            .unwrap();
    assert_eq!(
        (backend_len, backend_hash),
        (GIB, stream_sha256(GIB, 1)),
        "client to backend ({datapath})"
    );
    assert_eq!(
        (got_len, got_hash),
        (GIB, stream_sha256(GIB, 2)),
        "backend to client ({datapath})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_gib_each_way_keeps_its_sha256_on_splice() {
    gib_each_way("splice").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_gib_each_way_keeps_its_sha256_on_copy() {
    gib_each_way("copy").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_by_the_client_keeps_the_whole_answer() {
    for dp in ["splice", "copy"] {
        client_half_close(|routes| {
            Mux::with_config(&config(&format!("datapath = \"{dp}\""), routes)).unwrap()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_by_the_backend_keeps_the_client_sending() {
    for dp in ["splice", "copy"] {
        backend_half_close(|routes| {
            Mux::with_config(&config(&format!("datapath = \"{dp}\""), routes)).unwrap()
        })
        .await;
    }
}

/// A side that resets after its FIN, while the other side stays quiet, ends
/// the pair at once and closes the other side's connection (see
/// `reset_after_fin`), instead of leaving both open until the quiet side
/// sends or closes.
#[tokio::test(flavor = "multi_thread")]
async fn a_side_reset_after_its_fin_ends_the_pair() {
    for dp in ["splice", "copy"] {
        for leaver in [Leaver::Client, Leaver::Backend] {
            let (backend, mut rx) = handing_backend().await;
            let mut mux = Mux::with_config(&config(
                &format!("datapath = \"{dp}\""),
                &[("any", "any", backend)],
            ))
            .unwrap();
            let (client, backend) = open_pair(&mux, &mut rx).await;
            reset_after_fin(&mut mux, client, backend, leaver, dp).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_connections_all_complete() {
    mux::privileges::raise_fd_limit().unwrap();
    const N: usize = 1000;
    let backend = echo_backend().await;
    let mux = Mux::with_config(&config("", &[("ssh", "ssh", backend)])).unwrap();
    // Every client connects and is echoed before any of them closes, so the
    // thousand pairs are open in mux at the same time.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let barrier = barrier.clone();
        let addr = mux.addr;
        tasks.spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            let hello = format!("SSH-2.0-client-{i}\r\n");
            s.write_all(hello.as_bytes()).await?;
            let mut echo = vec![0u8; hello.len()];
            s.read_exact(&mut echo).await?;
            anyhow::ensure!(
                echo == hello.as_bytes(),
                "client {i} got {:?}",
                String::from_utf8_lossy(&echo)
            );
            barrier.wait().await;
            s.shutdown().await?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await?;
            anyhow::ensure!(rest.is_empty());
            Ok(())
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        let mut ok = 0;
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
            ok += 1;
        }
        ok
    })
    .await
    .unwrap();
    assert_eq!(all, N);
}

/// How many pipes process `pid` has open.
fn pipes_open(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// On the splice path a connection that only exchanges small messages holds
/// no pipe (they are copied); one that moves bulk takes its pipes and keeps
/// every byte.
#[tokio::test(flavor = "multi_thread")]
async fn splice_takes_pipes_for_bulk_only() {
    let backend = echo_backend().await;
    let mux =
        Mux::with_config(&config("datapath = \"splice\"", &[("ssh", "ssh", backend)])).unwrap();
    let baseline = pipes_open(mux.pid());
    let mut small = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(mux.addr).await.unwrap();
        let hello = format!("SSH-2.0-small-{i:02}\r\n");
        s.write_all(hello.as_bytes()).await.unwrap();
        for _ in 0..2 {
            let mut back = vec![0u8; hello.len()];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(back, hello.as_bytes());
            s.write_all(hello.as_bytes()).await.unwrap();
        }
        small.push(s);
    }
    assert_eq!(
        pipes_open(mux.pid()),
        baseline,
        "small exchanges took pipes"
    );

    // 4 MiB each way on one more connection, echoed whole.
    let bulk = TcpStream::connect(mux.addr).await.unwrap();
    let (mut r, mut w) = bulk.into_split();
    const BULK: u64 = 4 << 20;
    let writer = tokio::spawn(async move {
        w.write_all(b"SSH-2.0-bulk\r\n").await.unwrap();
        let sent = write_stream(&mut w, BULK, 3, false).await;
        (sent, w)
    });
    let mut echoed = vec![0u8; 14 + BULK as usize];
    tokio::time::timeout(Duration::from_secs(30), r.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    let (sent, _w) = writer.await.unwrap();
    assert_eq!(sent, BULK);
    assert_eq!(
        hex(&<sha2::Sha256 as sha2::Digest>::digest(&echoed)),
        prefixed_stream_sha256(b"SSH-2.0-bulk\r\n", BULK, 3),
        "the echo differs from what was sent"
    );
    assert_eq!(
        pipes_open(mux.pid()),
        baseline + 4,
        "a pipe (two ends) for each direction of the bulk connection"
    );
    drop(small);
}
