//! HTTP routing per request, as Caddy's `handle_path` does it, through the
//! real binary: real curl against backends that say who they are and what
//! path they saw; streaming, upgrades, large bodies and errors.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The Caddyfile as a mux config: `/embedding-model/*` to the
/// embedding server with the prefix stripped, everything else to the LLM.
fn caddy_example(llm: SocketAddr, embed: SocketAddr, extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\n{extra}\n\
         [[route]]\nname = \"embed\"\nprotocol = \"http\"\npath_prefix = \"/embedding-model/\"\nstrip_prefix = true\nbackend = \"{embed}\"\n\
         [[route]]\nname = \"llm\"\nprotocol = \"http\"\nbackend = \"{llm}\"\n"
    )
}

fn curl(args: &[&str]) -> String {
    let (status, out, err) = run(
        Command::new("curl")
            .args(["-sS", "--max-time", "20"])
            .args(args),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(status.success(), "curl {args:?}: {err}");
    out
}

fn need_curl() -> bool {
    can_run("curl", have_tool("curl"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_caddyfile_example_routes_by_path_and_strips_the_prefix() {
    if !need_curl() {
        return;
    }
    let (llm, embed) = (http_backend("llm").await, http_backend("embed").await);
    let mut mux = Mux::with_config(&caddy_example(llm, embed, "")).unwrap();
    let base = format!("http://{}", mux.addr);
    let (a, b) = tokio::task::spawn_blocking(move || {
        (
            curl(&[&format!("{base}/v1/models")]),
            curl(&[&format!("{base}/embedding-model/v1/models?limit=5")]),
        )
    })
    .await
    .unwrap();
    assert_eq!(a, "llm /v1/models\n");
    assert_eq!(b, "embed /v1/models?limit=5\n");
    let line = mux
        .wait_log_async(
            "/embedding-model/v1/models route=embed",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(line.contains("status=200"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sslh_style_shorthand_does_the_same() {
    if !need_curl() {
        return;
    }
    let (llm, embed) = (http_backend("llm").await, http_backend("embed").await);
    let (llm, embed) = (llm.to_string(), embed.to_string());
    let route = format!("/embedding-model/={embed}");
    let mux = Mux::with_args(&[
        "--listen",
        "127.0.0.1:0",
        "--http",
        &llm,
        "--http-route",
        &route,
    ])
    .unwrap();
    let base = format!("http://{}", mux.addr);
    let out =
        tokio::task::spawn_blocking(move || curl(&[&format!("{base}/embedding-model/v1/models")]))
            .await
            .unwrap();
    assert_eq!(out, "embed /v1/models\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_keep_alive_connection_reaches_each_backend_per_request() {
    if !need_curl() {
        return;
    }
    let (llm, embed) = (http_backend("llm").await, http_backend("embed").await);
    let mut mux = Mux::with_config(&caddy_example(llm, embed, "")).unwrap();
    let base = format!("http://{}", mux.addr);
    // curl reuses one connection for several URLs on its command line; the
    // write-out shows how many connections each transfer opened.
    let out = tokio::task::spawn_blocking(move || {
        let (a, b) = (
            format!("{base}/v1/models"),
            format!("{base}/embedding-model/v1/models"),
        );
        curl(&["-w", "[%{num_connects}]\n", &a, &b, &a, &b])
    })
    .await
    .unwrap();
    assert_eq!(
        out,
        "llm /v1/models\n[1]\nembed /v1/models\n[0]\nllm /v1/models\n[0]\nembed /v1/models\n[0]\n",
        "each request reached its own backend over one connection"
    );
    mux.wait_log_async("http connection", Duration::from_secs(5))
        .await
        .unwrap();
    let connections = mux
        .logs()
        .iter()
        .filter(|l| l.contains("http connection"))
        .count();
    assert_eq!(connections, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_routing_reaches_its_backend_and_stays_spliced_without_path_routes() {
    if !need_curl() {
        return;
    }
    let (llm, embed) = (http_backend("llm").await, http_backend("embed").await);
    let config = format!(
        "listen = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"embed\"\nprotocol = \"http\"\nhost = \"embed.example.com\"\nbackend = \"{embed}\"\n\
         [[route]]\nname = \"llm\"\nprotocol = \"http\"\nbackend = \"{llm}\"\n"
    );
    let mut mux = Mux::with_config(&config).unwrap();
    let url = format!("http://{}/v1/embeddings", mux.addr);
    let out = tokio::task::spawn_blocking(move || curl(&["-H", "Host: embed.example.com", &url]))
        .await
        .unwrap();
    assert_eq!(out, "embed /v1/embeddings\n");
    // Host alone decides on the first request: the connection was routed
    // once and relayed (spliced, or on the kernel path where `auto` can load
    // it), not run through the HTTP layer.
    let line = mux
        .wait_log_async("route=embed", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        line.contains("datapath=splice") || line.contains("datapath=ebpf"),
        "{line}"
    );
    // With path routes present, Host still routes, per request.
    let mut mux = Mux::with_config(&format!(
        "{config}[[route]]\nname = \"x\"\nprotocol = \"http\"\npath_prefix = \"/x\"\nbackend = \"{llm}\"\n"
    ))
    .unwrap();
    let url = format!("http://{}/v1/embeddings", mux.addr);
    let out =
        tokio::task::spawn_blocking(move || curl(&["-H", "Host: EMBED.example.com:2222", &url]))
            .await
            .unwrap();
    assert_eq!(out, "embed /v1/embeddings\n");
    mux.wait_log_async("route=embed backend", Duration::from_secs(5))
        .await
        .unwrap();
}

/// An SSE backend sends its first event, then holds the rest until the test
/// has seen the first one arrive at the client: arrival order, not time,
/// proves nothing was buffered.
#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_arrive_as_they_are_sent() {
    if !need_curl() {
        return;
    }
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Arc::new(std::sync::Mutex::new(release_rx));
    let sse = backend(move |mut s| {
        let release_rx = release_rx.clone();
        async move {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read_exact(&mut byte).await.is_ok() {
                head.push(byte[0]);
            }
            let chunk = |event: &str| format!("{:x}\r\n{event}\r\n", event.len());
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
            let _ = s.write_all(format!("{head}{}", chunk("data: token-one\n\n")).as_bytes()).await;
            let _ = s.flush().await;
            let released = tokio::task::spawn_blocking(move || {
                release_rx.lock().unwrap().recv_timeout(Duration::from_secs(20)).is_ok()
            })
            .await
            .unwrap();
            if released {
                let _ = s.write_all(format!("{}0\r\n\r\n", chunk("data: token-two\n\n")).as_bytes()).await;
            }
        }
    })
    .await;
    let llm = http_backend("llm").await;
    let mux = Mux::with_config(&caddy_example(llm, sse, "")).unwrap();
    let url = format!("http://{}/embedding-model/v1/stream", mux.addr);
    let mut child = tokio::process::Command::new("curl")
        .args(["-sS", "-N", "--max-time", "30", &url])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
    let first = first
        .expect("the first event never arrived while the backend held the second")
        .unwrap();
    assert_eq!(first.as_deref(), Some("data: token-one"));
    release_tx.send(()).unwrap();
    let mut rest = Vec::new();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await
    {
        rest.push(line);
    }
    assert!(rest.contains(&"data: token-two".to_string()), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_passes_through() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws = backend(|s| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
            return;
        };
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                let _ = ws.send(msg).await;
            }
        }
    })
    .await;
    let llm = http_backend("llm").await;
    let mux = Mux::with_config(&caddy_example(llm, ws, "")).unwrap();
    let url = format!("ws://{}/embedding-model/socket", mux.addr);
    let (mut client, response) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 101);
    for text in ["hello", "through mux", &"x".repeat(100_000)] {
        client.send(Message::text(text)).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(10), client.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), text);
    }
}

const HUNDRED_MIB: u64 = 100 << 20;

/// A raw HTTP/1.1 backend: `POST /upload` answers the sha256 of its body;
/// `GET /download` sends 100 MiB of a known stream.
async fn bulk_backend() -> SocketAddr {
    backend(|s| async move {
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut request_line = String::new();
        if r.read_line(&mut request_line).await.is_err() {
            return;
        }
        let mut length = 0u64;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        if request_line.starts_with("POST /upload") {
            let mut hasher = Sha256::new();
            let mut left = length;
            let mut buf = vec![0u8; 256 * 1024];
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let n = r.read(&mut buf[..want]).await.unwrap();
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
            let body = format!("{}:{}", length - left, hex(&hasher.finalize()));
            let _ = w
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        } else {
            let _ = w
                .write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {HUNDRED_MIB}\r\n\r\n").as_bytes(),
                )
                .await;
            write_stream(&mut w, HUNDRED_MIB, 31, false).await;
        }
    })
    .await
}

/// Reads an HTTP/1.1 response head; returns its status line and Content-Length.
async fn read_head<R: AsyncBufReadExt + Unpin>(r: &mut R) -> (String, u64) {
    let mut status = String::new();
    r.read_line(&mut status).await.unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            return (status, length);
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_mib_each_way_keeps_its_sha256() {
    let bulk = bulk_backend().await;
    let llm = http_backend("llm").await;
    let mux = Mux::with_config(&caddy_example(llm, bulk, "")).unwrap();

    // Upload, with the body streamed in random-sized writes.
    let s = TcpStream::connect(mux.addr).await.unwrap();
    let (r, mut w) = s.into_split();
    let head = format!(
        "POST /embedding-model/upload HTTP/1.1\r\nHost: box\r\nContent-Length: {HUNDRED_MIB}\r\n\r\n"
    );
    w.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(
        write_stream(&mut w, HUNDRED_MIB, 7, true).await,
        HUNDRED_MIB
    );
    let mut r = BufReader::new(r);
    let (status, length) = tokio::time::timeout(Duration::from_secs(60), read_head(&mut r))
        .await
        .unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut body = vec![0u8; length as usize];
    r.read_exact(&mut body).await.unwrap();
    assert_eq!(
        String::from_utf8(body).unwrap(),
        format!("{HUNDRED_MIB}:{}", stream_sha256(HUNDRED_MIB, 7))
    );

    // Download.
    let mut s = TcpStream::connect(mux.addr).await.unwrap();
    s.write_all(b"GET /embedding-model/download HTTP/1.1\r\nHost: box\r\n\r\n")
        .await
        .unwrap();
    let mut r = BufReader::new(s);
    let (status, length) = tokio::time::timeout(Duration::from_secs(10), read_head(&mut r))
        .await
        .unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(length, HUNDRED_MIB);
    let (n, hash) = tokio::time::timeout(
        Duration::from_secs(60),
        read_hash(&mut (&mut r).take(length)),
    )
    .await
    .unwrap();
    assert_eq!((n, hash), (HUNDRED_MIB, stream_sha256(HUNDRED_MIB, 31)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_backend_is_a_502_and_a_silent_one_a_504() {
    if !need_curl() {
        return;
    }
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let silent = backend(|mut s| async move {
        let mut buf = [0u8; 1024];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let config = format!(
        "listen = \"127.0.0.1:0\"\nresponse_timeout = \"1s\"\n\
         [[route]]\nname = \"gone\"\nprotocol = \"http\"\npath_prefix = \"/gone\"\nbackend = \"{dead}\"\n\
         [[route]]\nname = \"mute\"\nprotocol = \"http\"\npath_prefix = \"/mute\"\nbackend = \"{silent}\"\n"
    );
    let mut mux = Mux::with_config(&config).unwrap();
    let base = format!("http://{}", mux.addr);
    let b = base.clone();
    let gone =
        tokio::task::spawn_blocking(move || curl(&["-w", "%{http_code}", &format!("{b}/gone/x")]))
            .await
            .unwrap();
    assert_eq!(
        gone,
        format!("mux: route gone: backend {dead} is unavailable (connection refused)\n502")
    );
    let b = base.clone();
    let mute =
        tokio::task::spawn_blocking(move || curl(&["-w", "%{http_code}", &format!("{b}/mute/x")]))
            .await
            .unwrap();
    assert_eq!(
        mute,
        format!("mux: route mute: backend {silent} did not answer within 1s\n504")
    );
    let nowhere = tokio::task::spawn_blocking(move || {
        curl(&["-w", "%{http_code}", &format!("{base}/elsewhere")])
    })
    .await
    .unwrap();
    assert!(nowhere.ends_with("404"), "{nowhere}");
    mux.wait_log_async("route `gone`: backend", Duration::from_secs(5))
        .await
        .unwrap();
    mux.wait_log_async("route `mute`: backend", Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_request_is_a_400_and_others_go_on() {
    let (llm, embed) = (http_backend("llm").await, http_backend("embed").await);
    let mux = Mux::with_config(&caddy_example(llm, embed, "")).unwrap();
    let out = exchange(
        mux.addr,
        b"GET /v1 HTTP/1.1\r\nHost: box\r\nthis is not a header\r\n\r\n",
        false,
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.ends_with("mux: malformed HTTP request\n"), "{text}");
    let out = exchange(
        mux.addr,
        b"GET /v1/models HTTP/1.1\r\nHost: box\r\nConnection: close\r\n\r\n",
        false,
    )
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&out).ends_with("llm /v1/models\n"));
}
