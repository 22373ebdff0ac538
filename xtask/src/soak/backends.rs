//! The soak test's backends, in-process on loopback: an SSH-like echo server (a banner on
//! accept, as sshd sends, then every byte back), a plain echo server for the TLS route, and
//! an HTTP/1.1 server whose answers the clients can check byte for byte.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::rng::Rng;

/// What the SSH-like backend says first. A client routed elsewhere never sees it, and one
/// routed here sees it before any echo: so it proves the route.
pub const BANNER: &[u8] = b"SSH-2.0-soak-backend\r\n";
/// The largest request head the HTTP backend reads.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Default)]
pub struct Accepted {
    pub ssh: AtomicU64,
    pub tls: AtomicU64,
    pub http: AtomicU64,
}

pub struct Backends {
    pub ssh: SocketAddr,
    pub tls: SocketAddr,
    pub http: SocketAddr,
    pub accepted: Arc<Accepted>,
}

#[derive(Clone, Copy)]
enum Kind {
    Ssh,
    Tls,
    Http,
}

/// Binds the three backends and serves them on the current runtime until it shuts down.
pub async fn start() -> Result<Backends> {
    let accepted = Arc::new(Accepted::default());
    let mut addrs = Vec::new();
    for kind in [Kind::Ssh, Kind::Tls, Kind::Http] {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a backend on 127.0.0.1")?;
        addrs.push(listener.local_addr()?);
        tokio::spawn(serve(listener, kind, Arc::clone(&accepted)));
    }
    Ok(Backends {
        ssh: addrs[0],
        tls: addrs[1],
        http: addrs[2],
        accepted,
    })
}

async fn serve(listener: TcpListener, kind: Kind, accepted: Arc<Accepted>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                let counter = match kind {
                    Kind::Ssh => &accepted.ssh,
                    Kind::Tls => &accepted.tls,
                    Kind::Http => &accepted.http,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    // Clients that reset mid-transfer are part of the test: nothing to report.
                    let _ = match kind {
                        Kind::Ssh => ssh(stream).await,
                        Kind::Tls => echo(stream).await,
                        Kind::Http => http(stream).await,
                    };
                });
            }
            // Out of descriptors: back off rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn ssh(mut s: TcpStream) -> std::io::Result<()> {
    s.write_all(BANNER).await?;
    echo(s).await
}

/// Every byte back; at the client's end of stream, ours (so a half-close travels back).
async fn echo(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return s.shutdown().await;
        }
        s.write_all(&buf[..n]).await?;
    }
}

/// `GET /bytes/N/SEED` answers N bytes of [`Rng::fill`] from SEED; `POST /echo` answers its
/// request body. Keep-alive unless the request says `Connection: close`.
async fn http(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let Some(end) = find(&buf, b"\r\n\r\n") else {
            if buf.len() > MAX_HEAD {
                return Ok(());
            }
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return s.shutdown().await;
            }
            buf.extend_from_slice(&chunk[..n]);
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let lower = head.to_ascii_lowercase();
        let body_len = header(&lower, "content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < end + 4 + body_len {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let request_body: Vec<u8> = buf[end + 4..end + 4 + body_len].to_vec();
        buf.drain(..end + 4 + body_len);
        let close = header(&lower, "connection").is_some_and(|v| v.contains("close"));
        let mut words = head.split(' ');
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let body = match (method, path.strip_prefix("/bytes/")) {
            ("GET", Some(rest)) => {
                let mut it = rest.split('/').map(|v| v.parse::<u64>().ok());
                match (it.next().flatten(), it.next().flatten()) {
                    (Some(n), Some(seed)) => Some(Rng::new(seed).bytes(n as usize)),
                    _ => None,
                }
            }
            ("POST", None) if path == "/echo" => Some(request_body),
            _ => None,
        };
        let (status, body) = match body {
            Some(b) => ("200 OK", b),
            None => ("404 Not Found", b"no such thing\n".to_vec()),
        };
        let connection = if close { "Connection: close\r\n" } else { "" };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n{connection}\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(&body).await?;
        if close {
            return s.shutdown().await;
        }
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The value of header `name` in a lower-cased head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == name).then(|| v.trim())
    })
}
