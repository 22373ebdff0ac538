//! The backends the benchmark's clients talk to: echo, an SSH-like banner server, and a tiny
//! keep-alive HTTP server. Kept minimal so that they cost the same behind every proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the SSH-like backend says first, as sshd does.
pub const BANNER: &[u8] = b"SSH-2.0-loadgen-backend\r\n";
/// The largest request head the HTTP backend accepts; wrk's are far smaller.
const MAX_HEAD: usize = 16 * 1024;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free one (printed as `listening on ADDR`)
    #[arg(long, value_parser = crate::loopback)]
    listen: SocketAddr,
    /// Stop after this many seconds even if nobody stops us
    #[arg(long, default_value = "3600", value_parser = crate::parse_secs)]
    lifetime: Duration,
}

pub enum Kind {
    Echo,
    Banner,
    Http(String),
}

pub async fn serve(args: ServeArgs, kind: Kind) -> Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    // The harness waits for this line: the port is open from here on.
    println!("listening on {}", listener.local_addr()?);
    let kind = Arc::new(kind);
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let kind = Arc::clone(&kind);
                    tokio::spawn(async move {
                        // A client that resets is routine under load: nothing to report.
                        let _ = match &*kind {
                            Kind::Echo => echo(stream).await,
                            Kind::Banner => banner(stream).await,
                            Kind::Http(name) => http(stream, name).await,
                        };
                    });
                }
                // Out of descriptors: back off rather than spin on the same error.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    let _ = tokio::time::timeout(args.lifetime, accept).await;
    Ok(())
}

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

async fn banner(mut s: TcpStream) -> std::io::Result<()> {
    s.write_all(BANNER).await?;
    let mut buf = [0u8; 4096];
    while s.read(&mut buf).await? > 0 {}
    Ok(())
}

async fn http(mut s: TcpStream, name: &str) -> std::io::Result<()> {
    let body = format!("ok {name}\n");
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Answer every complete request already read (pipelining costs nothing extra here).
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body_len = header(&head, "content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() < end + 4 + body_len {
                break;
            }
            buf.drain(..end + 4 + body_len);
            let keep_alive = match header(&head, "connection") {
                Some(v) if v.contains("close") => false,
                Some(v) if v.contains("keep-alive") => true,
                _ => !head.lines().next().unwrap_or("").ends_with("http/1.0"),
            };
            let close = if keep_alive {
                ""
            } else {
                "Connection: close\r\n"
            };
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{close}\r\n{body}",
                body.len()
            );
            s.write_all(response.as_bytes()).await?;
            if !keep_alive {
                return s.shutdown().await;
            }
        }
        if buf.len() > MAX_HEAD {
            return Ok(());
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The value of header `name` in a lower-cased request head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == name).then(|| v.trim())
    })
}
