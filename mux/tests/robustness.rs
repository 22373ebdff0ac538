//! Bad input and dead backends: each gets a clear log line (and a 502 where
//! HTTP allows), and the daemon keeps serving everyone else.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A port nothing listens on (bound, then released).
fn dead_port() -> std::net::SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

async fn still_serves(mux: &Mux) {
    let out = exchange(
        mux.addr,
        b"GET /alive HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        false,
    )
    .await
    .unwrap();
    assert!(
        String::from_utf8_lossy(&out).ends_with("web /alive\n"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_is_refused_with_a_log_line_and_others_go_on() {
    let web = http_backend("web").await;
    let ssh = banner_backend("SSH-2.0-x").await;
    let mut mux =
        Mux::with_config(&config("", &[("ssh", "ssh", ssh), ("web", "http", web)])).unwrap();
    // A client holding a connection open through the whole test must not be
    // disturbed by the others' failures.
    let mut long = TcpStream::connect(mux.addr).await.unwrap();
    long.write_all(b"SSH-2.0-long-lived\r\n").await.unwrap();
    // The banner, then the echo of the hello.
    let mut greeting = [0u8; 30];
    long.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"SSH-2.0-x\nSSH-2.0-long-lived\r\n");

    let out = exchange(mux.addr, b"\x00\x01\x02garbage\xff\r\n", false)
        .await
        .unwrap();
    assert!(out.is_empty(), "garbage got an answer: {out:?}");
    let line = mux
        .wait_log_async("no route matches", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(line.contains("\\x00\\x01\\x02garbage"), "{line}");
    still_serves(&mux).await;

    long.write_all(b"still here").await.unwrap();
    let mut echo = [0u8; 10];
    long.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"still here");
    assert!(mux.alive());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_client_hello_is_dropped_cleanly() {
    let web = http_backend("web").await;
    let tls = echo_backend().await;
    let mut mux = Mux::with_config(&config(
        "classify_timeout = \"500ms\"",
        &[("tls", "tls", tls), ("web", "http", web)],
    ))
    .unwrap();
    // Half a record header's worth of ClientHello, then the client closes...
    let hello_start = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let out = exchange(mux.addr, &hello_start, true).await.unwrap();
    assert!(out.is_empty());
    mux.wait_log_async(
        "client stopped sending before a decision",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    // ...or stays open and silent past the classify timeout.
    let mut s = TcpStream::connect(mux.addr).await.unwrap();
    s.write_all(&hello_start).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    still_serves(&mux).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_backend_gives_http_a_502_and_ssh_a_close() {
    let dead = dead_port();
    let web = http_backend("web").await;
    let mut mux = Mux::with_config(&format!(
        "listen = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"gone-web\"\nprotocol = \"http\"\nhost = \"gone.example\"\nbackend = \"{dead}\"\n\
         [[route]]\nname = \"web\"\nprotocol = \"http\"\nbackend = \"{web}\"\n\
         [[route]]\nname = \"gone-ssh\"\nprotocol = \"ssh\"\nbackend = \"{dead}\"\n"
    ))
    .unwrap();
    let out = exchange(
        mux.addr,
        b"GET /x HTTP/1.1\r\nHost: gone.example\r\n\r\n",
        false,
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text}");
    assert!(
        text.ends_with(&format!(
            "mux: route gone-web: backend {dead} is unavailable (connection refused)\n"
        )),
        "{text}"
    );
    let line = mux
        .wait_log_async("route `gone-web`", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(line.contains(&format!("backend {dead} failed")), "{line}");

    let out = exchange(mux.addr, b"SSH-2.0-OpenSSH_9.2\r\n", false)
        .await
        .unwrap();
    assert!(out.is_empty());
    mux.wait_log_async("route `gone-ssh`", Duration::from_secs(5))
        .await
        .unwrap();
    still_serves(&mux).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_vanish_at_every_stage_leave_no_trace() {
    let web = http_backend("web").await;
    let sink = backend(|mut s| async move {
        let mut buf = [0u8; 65536];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let mux = Mux::with_config(&config(
        "classify_timeout = \"200ms\"",
        &[("ssh", "ssh", sink), ("web", "http", web)],
    ))
    .unwrap();
    for i in 0..200u32 {
        let mut s = TcpStream::connect(mux.addr).await.unwrap();
        match i % 4 {
            0 => {}
            1 => s.write_all(b"GET /partial HTTP/1.1\r\nHo").await.unwrap(),
            2 => s.write_all(b"SSH-2.0-x\r\n").await.unwrap(),
            _ => {
                s.write_all(b"SSH-2.0-x\r\n").await.unwrap();
                s.write_all(&vec![7u8; 200_000]).await.unwrap();
            }
        }
        // Reset instead of FIN: the rudest way to leave.
        let _ = s.set_zero_linger();
        drop(s);
    }
    still_serves(&mux).await;
}
