//! Named targets behind the shared port (frp's job): clients open a tunnel
//! with HTTP CONNECT, and hosts the box cannot dial are served by agents
//! that dialled in. Only configured targets are reachable: mux is never an
//! open proxy.

pub mod access;
pub mod agent;
pub mod connect;
mod registry;
pub mod request;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use self::access::{Reach, Refusal, Targets};
pub use self::registry::Registry;
use self::request::{AGENT_PROTOCOL, AgentHello, Request};
use crate::connection::{Shared, respond};
use crate::http::rewind::Rewind;
use crate::metrics::{self, ConnectionLabels, kind};

/// How often each end of an agent connection pings the other, and how long
/// it waits for the answer before calling the connection dead: a box or an
/// agent that vanished without a FIN (power loss, a dropped route) is
/// noticed within about half a minute.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);
/// HTTP/2 flow-control windows for agent streams: large enough that one
/// stream is not held to a few round trips' worth of 64 KiB.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;

const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// The targets and the agents serving some of them now.
pub struct Tunnel {
    pub targets: Targets,
    /// Kept across reloads: agents stay connected while routes change.
    agents: Arc<Registry>,
}

impl Tunnel {
    pub fn new(targets: Targets, agents: Arc<Registry>) -> Tunnel {
        Tunnel { targets, agents }
    }

    pub fn agents(&self) -> Arc<Registry> {
        self.agents.clone()
    }

    /// Serves a client's CONNECT to its end; `prefix` holds everything the
    /// client sent so far, the request head first.
    pub async fn connect(
        &self,
        shared: &Shared,
        mut client: TcpStream,
        peer: SocketAddr,
        prefix: Vec<u8>,
        request: Request,
    ) {
        let started = Instant::now();
        let authority = printable(&request.authority);
        let target = match self
            .targets
            .authorize(&request.authority, request.token.as_deref())
        {
            Ok(t) => t,
            Err(refusal) => {
                metrics::get().error(kind::DENIED);
                log::warn!("{peer} CONNECT {authority}: refused: {refusal}");
                refuse(&mut client, &refusal, true).await;
                return;
            }
        };
        let early = &prefix[request.head_len..];
        let m = metrics::get();
        let route = format!("target:{}", target.name);
        let datapath = match target.reach {
            Reach::Address(_) => shared.datapath.name(),
            Reach::Agent => "agent",
        };
        let _active = m.routed(ConnectionLabels {
            route: route.clone(),
            protocol: "connect".into(),
            datapath: datapath.into(),
        });
        match &target.reach {
            Reach::Address(backend) => {
                let connected = match shared
                    .datapath
                    .connect(&client, backend, &shared.config.dial(None))
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        m.error(kind::BACKEND);
                        log::warn!(
                            "{peer} CONNECT {authority}: target `{}` at {backend} failed: {e}",
                            target.name
                        );
                        let body = format!(
                            "mux: target {} is unavailable ({})\n",
                            target.name,
                            e.kind()
                        );
                        respond(&mut client, "502 Bad Gateway", "", &body).await;
                        return;
                    }
                };
                let _ = connected.stream.set_nodelay(true);
                if let Err(e) = client.write_all(ESTABLISHED).await {
                    log::info!(
                        "{peer} CONNECT {authority}: client left before the tunnel opened: {e}"
                    );
                    return;
                }
                let (relayed, datapath) = shared
                    .datapath
                    .relay_after(&client, connected, &[], early)
                    .await;
                m.moved(&route, relayed.up, relayed.down);
                log::info!(
                    "{peer} connect target={} backend={backend} up={} down={} {:.3}s datapath={datapath}{}",
                    target.name,
                    relayed.up,
                    relayed.down,
                    started.elapsed().as_secs_f64(),
                    relayed.outcome(),
                );
            }
            Reach::Agent => {
                let upgraded = match self
                    .agents
                    .open(&target.name, shared.config.connect_timeout)
                    .await
                {
                    Ok(u) => u,
                    Err(e) => {
                        m.error(kind::BACKEND);
                        log::warn!("{peer} CONNECT {authority}: {e}");
                        let body = format!("mux: target {} is unavailable: {e}\n", target.name);
                        respond(&mut client, "502 Bad Gateway", "", &body).await;
                        return;
                    }
                };
                let mut stream = TokioIo::new(upgraded);
                let opened = async {
                    client.write_all(ESTABLISHED).await?;
                    stream.write_all(early).await
                };
                if let Err(e) = opened.await {
                    log::info!("{peer} CONNECT {authority}: tunnel closed as it opened: {e}");
                    return;
                }
                // Counted on the client's side, so that a tunnel that ends
                // in an error still reports what it moved.
                let mut counted = Counted::new(&mut client);
                let moved = tokio::io::copy_bidirectional(&mut counted, &mut stream).await;
                let (up, down) = (counted.read, counted.written);
                m.moved(&route, up + early.len() as u64, down);
                let ended = match moved {
                    Ok(_) => String::new(),
                    Err(e) => format!(" ended by: {e}"),
                };
                log::info!(
                    "{peer} connect target={} backend=agent up={} down={down} {:.3}s datapath=agent{ended}",
                    target.name,
                    up + early.len() as u64,
                    started.elapsed().as_secs_f64(),
                );
            }
        }
    }

    /// Serves an agent's connection for as long as it lasts: its targets
    /// are reachable through it until it ends.
    pub async fn agent(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        prefix: Vec<u8>,
        hello: AgentHello,
    ) {
        let granted = match self
            .targets
            .authorize_agent(&hello.names, hello.token.as_deref())
        {
            Ok(g) => g,
            Err(refusal) => {
                metrics::get().error(kind::DENIED);
                log::warn!(
                    "{peer} agent offering {}: refused: {refusal}",
                    printable(&hello.names.join(", "))
                );
                refuse(&mut client, &refusal, false).await;
                return;
            }
        };
        let names: Vec<String> = granted.iter().map(|t| t.name.clone()).collect();
        let switching = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {AGENT_PROTOCOL}\r\n\r\n"
        );
        if let Err(e) = client.write_all(switching.as_bytes()).await {
            log::info!("{peer} agent left before it was registered: {e}");
            return;
        }
        let io = TokioIo::new(Rewind::new(prefix[hello.head_len..].to_vec(), client));
        // The box asks and the agent answers, so the box is the HTTP/2
        // client on a connection the agent opened.
        let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(HEARTBEAT)
            .keep_alive_timeout(HEARTBEAT_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(io)
            .await;
        let (sender, connection) = match handshake {
            Ok(h) => h,
            Err(e) => {
                log::warn!("{peer} agent: HTTP/2 handshake failed: {e}");
                return;
            }
        };
        let _active = metrics::get().routed(ConnectionLabels {
            route: format!("agent:{}", names.join(",")),
            protocol: "agent".into(),
            datapath: "http2".into(),
        });
        let id = self.agents.register(&names, sender);
        let names_text = names.join(", ");
        log::info!("{peer} agent registered target {names_text}");
        let ended = match connection.await {
            Ok(()) => "closed".to_string(),
            Err(e) => e.to_string(),
        };
        self.agents.deregister(&names, id);
        log::info!("{peer} agent for target {names_text} disconnected: {ended}");
    }
}

/// Answers a refused CONNECT (407 when a token would open it) or agent
/// (401), then closes.
async fn refuse(client: &mut TcpStream, refusal: &Refusal, proxy: bool) {
    let body = format!("mux: {refusal}\n");
    match refusal {
        Refusal::BadToken { .. } if proxy => {
            respond(
                client,
                "407 Proxy Authentication Required",
                "Proxy-Authenticate: Bearer realm=\"mux\"\r\n",
                &body,
            )
            .await
        }
        Refusal::BadToken { .. } => {
            respond(
                client,
                "401 Unauthorized",
                "WWW-Authenticate: Bearer realm=\"mux\"\r\n",
                &body,
            )
            .await
        }
        Refusal::Unknown(_) | Refusal::NotAgentTarget(_) => {
            respond(client, "403 Forbidden", "", &body).await
        }
    }
}

/// A stream that counts the bytes read from and written to it.
struct Counted<'a, S> {
    inner: &'a mut S,
    read: u64,
    written: u64,
}

impl<'a, S> Counted<'a, S> {
    fn new(inner: &'a mut S) -> Self {
        Counted {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut *self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// A client-chosen string made safe and short for a log line.
fn printable(s: &str) -> String {
    s.chars().take(100).flat_map(char::escape_default).collect()
}
