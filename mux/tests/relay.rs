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

/// The client sends its request and shuts its write side; the backend reads
/// to EOF, only then answers (1 MiB) and closes. The client gets it all.
async fn client_half_close(datapath: &str) {
    let backend = backend(|mut s| async move {
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap();
        let answer = format!("{}:{}", request.len(), sha256(&request));
        s.write_all(answer.as_bytes()).await.unwrap();
        let mut filler = vec![0u8; 1 << 20];
        Stream::new(5).fill(&mut filler);
        s.write_all(&filler).await.unwrap();
    })
    .await;
    let mux = Mux::with_config(&config(
        &format!("datapath = \"{datapath}\""),
        &[("any", "any", backend)],
    ))
    .unwrap();
    let request = b"half-close request: the answer comes only after my FIN".repeat(1000);
    let out = exchange(mux.addr, &request, true).await.unwrap();
    let expect = format!("{}:{}", request.len(), sha256(&request));
    assert!(
        out.starts_with(expect.as_bytes()),
        "answer head: {:?}",
        String::from_utf8_lossy(&out[..out.len().min(80)])
    );
    assert_eq!(out.len(), expect.len() + (1 << 20));
}

/// The backend speaks first and shuts its write side at once; the client,
/// having seen EOF, still sends, and the backend still receives all of it.
async fn backend_half_close(datapath: &str) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            s.write_all(b"bye\n").await.unwrap();
            s.shutdown().await.unwrap();
            let _ = tx.send(read_hash(&mut s).await);
        }
    })
    .await;
    let mux = Mux::with_config(&config(
        &format!("datapath = \"{datapath}\""),
        &[("ssh", "ssh", backend)],
    ))
    .unwrap();
    let mut s = TcpStream::connect(mux.addr).await.unwrap();
    let mut payload = b"SSH-2.0-client\r\n".to_vec();
    s.write_all(&payload).await.unwrap();
    let mut greeting = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, b"bye\n");
    let mut more = vec![0u8; 4 << 20];
    Stream::new(6).fill(&mut more);
    s.write_all(&more).await.unwrap();
    s.shutdown().await.unwrap();
    payload.extend_from_slice(&more);
    let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, (payload.len() as u64, sha256(&payload)));
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_by_the_client_keeps_the_whole_answer() {
    for dp in ["splice", "copy"] {
        client_half_close(dp).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_by_the_backend_keeps_the_client_sending() {
    for dp in ["splice", "copy"] {
        backend_half_close(dp).await;
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
