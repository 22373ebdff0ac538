//! PROXY protocol towards backends: a backend that parses the header sees
//! the real client's address, and then the client's bytes unchanged.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(10);

fn route_config(protocol: &str, extra: &str, backend: SocketAddr) -> String {
    format!(
        "listen = [\"127.0.0.1:0\"]\n[[route]]\nname = \"r\"\nprotocol = \"{protocol}\"\n{extra}backend = \"{backend}\"\n"
    )
}

/// Reads a v1 header line; returns (source, destination).
async fn read_v1(s: &mut TcpStream) -> Result<(SocketAddr, SocketAddr)> {
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        ensure!(line.len() < 108, "v1 header longer than the spec allows");
        line.push(s.read_u8().await?);
    }
    let text = String::from_utf8(line)?;
    let parts: Vec<&str> = text.trim_end().split(' ').collect();
    ensure!(
        parts.len() == 6 && parts[0] == "PROXY",
        "not a v1 header: {text:?}"
    );
    ensure!(parts[1] == "TCP4", "family {}", parts[1]);
    Ok((
        format!("{}:{}", parts[2], parts[4]).parse()?,
        format!("{}:{}", parts[3], parts[5]).parse()?,
    ))
}

/// Reads a v2 header (IPv4 PROXY command only); returns (source, destination).
async fn read_v2(s: &mut TcpStream) -> Result<(SocketAddr, SocketAddr)> {
    let mut fixed = [0u8; 16];
    s.read_exact(&mut fixed).await?;
    ensure!(
        &fixed[..12] == b"\r\n\r\n\0\r\nQUIT\n",
        "no v2 signature: {fixed:?}"
    );
    ensure!(fixed[12] == 0x21, "version/command {:#x}", fixed[12]);
    if fixed[13] != 0x11 {
        bail!("family/protocol {:#x}, wanted TCP over IPv4", fixed[13]);
    }
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    ensure!(len >= 12, "address block of {len} bytes");
    let ip = |b: &[u8]| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    Ok((
        SocketAddr::new(ip(&body[0..4]).into(), port(&body[8..10])),
        SocketAddr::new(ip(&body[4..8]).into(), port(&body[10..12])),
    ))
}

async fn spliced_route_sends(version: &str) -> Result<()> {
    let (backend, mut accepted) = handing_backend().await;
    let extra = format!("proxy_protocol = \"{version}\"\n");
    let mux = Mux::with_config(&route_config("ssh", &extra, backend))?;
    let mut client = TcpStream::connect(mux.addr).await?;
    let payload = b"SSH-2.0-proxy-test\r\nand the rest";
    client.write_all(payload).await?;
    let mut server = timeout(LIMIT, accepted.recv())
        .await?
        .context("mux never connected")?;
    let (src, dst) = timeout(LIMIT, async {
        match version {
            "v1" => read_v1(&mut server).await,
            _ => read_v2(&mut server).await,
        }
    })
    .await??;
    assert_eq!(src, client.local_addr()?, "source is the client");
    assert_eq!(
        dst, mux.addr,
        "destination is the address the client dialled"
    );
    let mut got = vec![0u8; payload.len()];
    timeout(LIMIT, server.read_exact(&mut got)).await??;
    assert_eq!(
        got, payload,
        "the client's bytes follow the header unchanged"
    );
    // And the pair is relayed as usual afterwards.
    server.write_all(b"pong").await?;
    let mut pong = [0u8; 4];
    timeout(LIMIT, client.read_exact(&mut pong)).await??;
    assert_eq!(&pong, b"pong");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_header_carries_the_client_address() {
    spliced_route_sends("v1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn v2_header_carries_the_client_address() {
    spliced_route_sends("v2").await.unwrap();
}

/// Routed per request, each backend connection serves one client, so it
/// opens with that client's header, once, before its first request.
#[tokio::test(flavor = "multi_thread")]
async fn http_layer_opens_each_backend_connection_with_the_header() {
    let (backend, mut accepted) = handing_backend().await;
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\n[[route]]\nname = \"api\"\nprotocol = \"http\"\npath_prefix = \"/api/\"\nstrip_prefix = true\nproxy_protocol = \"v2\"\nbackend = \"{backend}\"\n"
    );
    let mux = Mux::with_config(&config).unwrap();
    let mut client = TcpStream::connect(mux.addr).await.unwrap();
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: box\r\n\r\n");
    client
        .write_all(request("/api/one").as_bytes())
        .await
        .unwrap();
    let mut server = timeout(LIMIT, accepted.recv()).await.unwrap().unwrap();
    let (src, dst) = timeout(LIMIT, read_v2(&mut server)).await.unwrap().unwrap();
    assert_eq!(src, client.local_addr().unwrap());
    assert_eq!(dst, mux.addr);
    for (i, path) in ["/one", "/two"].iter().enumerate() {
        if i == 1 {
            client
                .write_all(request("/api/two").as_bytes())
                .await
                .unwrap();
        }
        let head = timeout(LIMIT, read_head(&mut server))
            .await
            .unwrap()
            .unwrap();
        assert!(
            head.starts_with(&format!("GET {path} HTTP/1.1\r\n")),
            "backend saw {head:?}"
        );
        server
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
        let answer = timeout(LIMIT, read_head(&mut client))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let mut body = [0u8; 2];
        client.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"ok");
    }
}

async fn read_head(s: &mut TcpStream) -> Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await?);
    }
    Ok(String::from_utf8(head)?)
}

#[test]
fn an_unknown_version_is_a_config_error() {
    let text = route_config(
        "ssh",
        "proxy_protocol = \"v3\"\n",
        "127.0.0.1:22".parse().unwrap(),
    );
    let scratch = Scratch::new("pp-config");
    let file = scratch.write("bad.toml", &text);
    let out = std::process::Command::new(mux_bin())
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("proxy_protocol") && err.contains("v1, v2"),
        "{err}"
    );
}
