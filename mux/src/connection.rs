//! One client connection: read its first bytes (bounded in time and size),
//! pick a route, connect the backend, hand the prefix over, relay the rest.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout_at;

use crate::classify::{Found, MAX_CLASSIFY_BYTES, Protocol, has_request_line};
use crate::config::Config;
use crate::datapath::DataPath;
use crate::http::{HttpLayer, HttpSettings};
use crate::limits::{Admission, Exceeded, RouteSlot};
use crate::metrics::{self, ConnectionLabels, kind};
use crate::route::{Decision, Route};
use crate::tunnel::Tunnel;
use crate::tunnel::request::{self, Parsed};

/// What every connection task shares.
pub struct Shared {
    pub config: Config,
    pub datapath: DataPath,
    /// Set when HTTP connections are routed per request.
    pub http: Option<Arc<HttpLayer>>,
    /// Set when targets are configured: CONNECT and agents are served.
    pub tunnel: Option<Tunnel>,
}

impl Shared {
    /// Everything a server needs, the HTTP layer built when the routes ask
    /// for it.
    pub fn new(config: Config, datapath: DataPath) -> Shared {
        Shared::build(config, datapath, Arc::default())
    }

    /// The same process's state under a new configuration: the data path
    /// (with its loaded programs) and the connected agents carry over.
    pub fn reloaded(&self, config: Config) -> Shared {
        let agents = match &self.tunnel {
            Some(t) => t.agents(),
            None => Arc::default(),
        };
        Shared::build(config, self.datapath.clone(), agents)
    }

    fn build(config: Config, datapath: DataPath, agents: Arc<crate::tunnel::Registry>) -> Shared {
        let http = config.routes_per_request().then(|| {
            Arc::new(HttpLayer::new(
                config.http_routes(),
                HttpSettings {
                    dial: config.dial(None),
                    response_timeout: config.response_timeout,
                    forwarded_headers: config.forwarded_headers,
                },
            ))
        });
        let tunnel =
            (!config.targets.is_empty()).then(|| Tunnel::new(config.targets.clone(), agents));
        Shared {
            config,
            datapath,
            http,
            tunnel,
        }
    }
}

/// How classification ended.
enum Classified {
    Route {
        index: usize,
        found: Option<Found>,
    },
    /// The client closed before sending a byte.
    Gone,
    /// Silent past the timeout, and no `on_timeout` route.
    Silent,
    /// Bytes that no route accepts.
    NoMatch {
        why: &'static str,
    },
    /// A CONNECT or an agent's hello, when targets are configured.
    Tunnel(Parsed),
}

/// Serves one accepted client to the end, logging one line about it.
pub async fn serve(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let admission = Admission::new(peer.ip());
    let m = metrics::get();
    let mut prefix = vec![0u8; MAX_CLASSIFY_BYTES];
    let classified = classify(&shared, &mut client, &mut prefix).await;
    let (prefix, classified) = match classified {
        Ok((len, c)) => {
            // The prefix lives as long as the connection: keep its bytes,
            // not the 16 KiB read buffer (an idle relayed connection held
            // 20.9 KiB of RSS in a process that had served others, 6.0 with
            // the buffer shrunk).
            prefix.truncate(len);
            prefix.shrink_to_fit();
            (prefix, c)
        }
        Err(e) => {
            log::warn!("{peer}: read error before classification: {e}");
            return;
        }
    };
    let (index, found) = match classified {
        Classified::Route { index, found } => (index, found),
        Classified::Gone => {
            log::debug!("{peer}: closed without sending anything");
            return;
        }
        Classified::Silent => {
            m.error(kind::TIMEOUT);
            log::info!(
                "{peer}: sent nothing for {:?} and no on_timeout route is set; closing",
                shared.config.classify_timeout
            );
            return;
        }
        Classified::NoMatch { why } => {
            m.error(kind::BAD_INPUT);
            log::warn!(
                "{peer}: no route matches the first {} bytes ({why}): {}; closing",
                prefix.len(),
                preview(&prefix)
            );
            // An HTTP client whose request broke down after its request line
            // hears why, where an HTTP route could have taken it.
            let http_routes = shared
                .config
                .router
                .routes()
                .iter()
                .any(|r| r.protocol == Protocol::Http);
            if http_routes && has_request_line(&prefix) {
                respond(
                    &mut client,
                    "400 Bad Request",
                    "",
                    "mux: malformed HTTP request\n",
                )
                .await;
            }
            return;
        }
        Classified::Tunnel(parsed) => {
            let Some(tunnel) = &shared.tunnel else { return };
            if !matches!(parsed, Parsed::Malformed(_)) {
                m.classified(started.elapsed());
                if let Err(exceeded) = admission.check(&shared.config.limits) {
                    refuse_for_limit(&mut client, peer, &exceeded, true).await;
                    return;
                }
            }
            // Boxed here and for the HTTP layer below: a task is as large as
            // its future's largest state, so inline these made every relayed
            // connection's task larger (a future of 3,648 bytes, 2,880 with
            // them boxed).
            match parsed {
                Parsed::Connect(r) => {
                    Box::pin(tunnel.connect(&shared, client, peer, prefix, r)).await
                }
                Parsed::Agent(hello) => {
                    // An agent's connection lasts as long as mux does: it
                    // is not a client connection for limits, nor one that
                    // a graceful stop waits for (its tunnels are).
                    drop(admission);
                    Box::pin(tunnel.agent(client, peer, prefix, hello)).await
                }
                Parsed::Malformed(why) => {
                    m.error(kind::BAD_INPUT);
                    log::warn!("{peer}: malformed tunnel request: {why}; closing");
                    respond(
                        &mut client,
                        "400 Bad Request",
                        "",
                        "mux: malformed request\n",
                    )
                    .await;
                }
                Parsed::NotOurs | Parsed::Incomplete => {}
            }
            return;
        }
    };
    m.classified(started.elapsed());
    let route = shared.config.router.route(index);
    let protocol = match &found {
        Some(f) => describe(f),
        None => "silent".to_string(),
    };
    let speaks_http = matches!(found, Some(Found::Http(_)));
    if let Err(exceeded) = admission.check(&shared.config.limits) {
        refuse_for_limit(&mut client, peer, &exceeded, speaks_http).await;
        return;
    }
    if let (Some(http), Some(found @ (Found::Http(_) | Found::H2c))) = (&shared.http, &found) {
        let h2c = matches!(found, Found::H2c);
        let _active = m.routed(ConnectionLabels {
            route: "(per request)".into(),
            protocol: if h2c { "h2c" } else { "http" }.into(),
            datapath: "http".into(),
        });
        let ended = match Box::pin(http.clone().serve(client, prefix, peer, h2c)).await {
            Ok(()) => String::new(),
            Err(e) => format!(" ended by: {e}"),
        };
        log::info!(
            "{peer} http connection {:.3}s datapath=http{ended}",
            started.elapsed().as_secs_f64()
        );
        return;
    }

    let _slot = match RouteSlot::take(&route.name, route.max_connections) {
        Ok(slot) => slot,
        Err(exceeded) => {
            refuse_for_limit(&mut client, peer, &exceeded, speaks_http).await;
            return;
        }
    };
    let _active = m.routed(ConnectionLabels {
        route: route.name.clone(),
        protocol: found
            .as_ref()
            .map_or(route.protocol, Found::protocol)
            .name()
            .into(),
        datapath: shared.datapath.name().into(),
    });
    let backend = match shared
        .datapath
        .connect(
            &client,
            &route.backend,
            &shared.config.dial(route.transparent.then_some(peer)),
        )
        .await
    {
        Ok(b) => b,
        Err(e) => {
            m.error(kind::BACKEND);
            log::warn!(
                "{peer} {protocol}: route `{}`: backend {} failed: {e}; closing",
                route.name,
                route.backend
            );
            if matches!(found, Some(Found::Http(_))) {
                bad_gateway(&mut client, route, &e).await;
            }
            return;
        }
    };
    // Interactive protocols (SSH keystrokes, token streams) must not wait for
    // Nagle; bulk transfers are unaffected since they fill segments anyway.
    // The client's socket has it from the listener (see `server::listen_on`).
    let _ = backend.stream.set_nodelay(true);

    let header = match route.proxy_protocol.map(|v| (v, client.local_addr())) {
        Some((version, Ok(local))) => crate::proxy_protocol::header(version, peer, local),
        _ => Vec::new(),
    };
    let (relayed, datapath) = shared
        .datapath
        .relay_after(&client, backend, &header, &prefix)
        .await;
    m.moved(&route.name, relayed.up, relayed.down);
    log::info!(
        "{peer} {protocol} route={} backend={} up={} down={} {:.3}s datapath={datapath}{}",
        route.name,
        route.backend,
        relayed.up,
        relayed.down,
        started.elapsed().as_secs_f64(),
        relayed.outcome(),
    );
}

/// Reads until the router decides, the client goes quiet past the timeout,
/// closes, or fills the prefix buffer. Returns how many bytes were read.
async fn classify(
    shared: &Shared,
    client: &mut TcpStream,
    buf: &mut [u8],
) -> io::Result<(usize, Classified)> {
    let config = &shared.config;
    let deadline = tokio::time::Instant::now() + config.classify_timeout;
    let mut len = 0;
    loop {
        let read = timeout_at(deadline, client.read(&mut buf[len..])).await;
        let last = match read {
            Err(_elapsed) if len == 0 => {
                return Ok((
                    0,
                    match config.on_timeout {
                        Some(index) => Classified::Route { index, found: None },
                        None => Classified::Silent,
                    },
                ));
            }
            Err(_elapsed) => true,
            Ok(Ok(0)) if len == 0 => return Ok((0, Classified::Gone)),
            Ok(Ok(0)) => true,
            Ok(Ok(n)) => {
                len += n;
                len == buf.len()
            }
            Ok(Err(e)) => return Err(e),
        };
        if shared.tunnel.is_some() {
            match request::parse(&buf[..len]) {
                Parsed::NotOurs => {}
                Parsed::Incomplete if !last => continue,
                Parsed::Incomplete => {
                    let why = if len == buf.len() {
                        "request head too large"
                    } else {
                        "request head cut short"
                    };
                    return Ok((len, Classified::Tunnel(Parsed::Malformed(why.into()))));
                }
                parsed => return Ok((len, Classified::Tunnel(parsed))),
            }
        }
        match config.router.decide(&buf[..len], last) {
            Decision::NeedMore => continue,
            Decision::Route(index, found) => {
                return Ok((
                    len,
                    Classified::Route {
                        index,
                        found: Some(found),
                    },
                ));
            }
            Decision::NoMatch => {
                let why = if !last {
                    "no probe fits"
                } else if len == buf.len() {
                    "prefix limit reached"
                } else {
                    "client stopped sending before a decision"
                };
                return Ok((len, Classified::NoMatch { why }));
            }
        }
    }
}

/// Refuses a connection over a limit: an HTTP client hears 503 and why,
/// others are closed. Logged at most once a second, with how many were
/// refused since, so that a flood does not flood the log too.
pub(crate) async fn refuse_for_limit(
    client: &mut TcpStream,
    peer: SocketAddr,
    exceeded: &Exceeded,
    speaks_http: bool,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOG: AtomicU64 = AtomicU64::new(0);
    static SINCE: AtomicU64 = AtomicU64::new(0);
    metrics::get().error(kind::LIMIT);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let refused = SINCE.fetch_add(1, Ordering::Relaxed) + 1;
    if LAST_LOG.swap(now, Ordering::Relaxed) != now {
        SINCE.store(0, Ordering::Relaxed);
        log::warn!("{peer}: refused: {exceeded} ({refused} refused in the last second)");
    }
    if speaks_http {
        let body = format!("mux: too many connections: {exceeded}\n");
        respond(
            client,
            "503 Service Unavailable",
            "Retry-After: 1\r\n",
            &body,
        )
        .await;
    }
}

/// An HTTP client gets told why, in one line, instead of a bare close.
async fn bad_gateway(client: &mut TcpStream, route: &Route, error: &io::Error) {
    let body = format!(
        "mux: route {}: backend {} is unavailable ({})\n",
        route.name,
        route.backend,
        error.kind()
    );
    respond(client, "502 Bad Gateway", "", &body).await;
}

/// Answers an HTTP client whose request mux cannot serve, then closes.
/// `headers` are extra header lines, each ending in CRLF.
pub(crate) async fn respond(client: &mut TcpStream, status: &str, headers: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(response.as_bytes()).await;
    let _ = client.shutdown().await;
    // Let the response reach the client before the socket closes: closing
    // with unread request bytes would send a reset that can overtake it.
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The protocol and what was found, for the connection's log line.
fn describe(found: &Found) -> String {
    match found {
        Found::Tls(tls) => {
            let mut s = String::from("tls");
            if let Some(sni) = &tls.sni {
                s.push_str(&format!(" sni={sni}"));
            }
            if !tls.alpn.is_empty() {
                s.push_str(&format!(" alpn={}", tls.alpn.join(",")));
            }
            s
        }
        Found::Http(http) => format!(
            "http {} {} host={}",
            http.method,
            truncate(&http.path, 80),
            http.host.as_deref().unwrap_or("-")
        ),
        Found::Ssh => Protocol::Ssh.name().into(),
        Found::H2c => Protocol::H2c.name().into(),
        Found::Socks5 => Protocol::Socks5.name().into(),
        Found::Openvpn => Protocol::Openvpn.name().into(),
        Found::Regex => Protocol::Regex.name().into(),
        Found::Any => Protocol::Any.name().into(),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The first bytes of an unmatched prefix, printable and bounded, for the log.
fn preview(bytes: &[u8]) -> String {
    let shown: String = bytes
        .iter()
        .take(32)
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if bytes.len() > 32 {
        format!("\"{shown}\"...")
    } else {
        format!("\"{shown}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_escapes_and_bounds() {
        assert_eq!(preview(b"ab\x00\n"), "\"ab\\x00\\n\"");
        assert!(preview(&[b'x'; 100]).ends_with("\"..."));
    }
}
