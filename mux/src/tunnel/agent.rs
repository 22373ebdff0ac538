//! `mux agent`: runs on an inner host the box cannot dial, dials out to the
//! box's shared port, and serves the box's CONNECTs for the targets it
//! exposes over that one HTTP/2 connection, reconnecting when it drops.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::request::{AGENT_PATH, AGENT_PROTOCOL, EXPOSE_HEADER};
use super::{CONNECTION_WINDOW, HEARTBEAT, HEARTBEAT_TIMEOUT, STREAM_WINDOW};
use crate::http::rewind::Rewind;
use crate::route::Backend;

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);
const MAX_HEAD: usize = 16 * 1024;

/// What an agent serves, and where it dials.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The box's shared port, `host:port`.
    pub server: String,
    pub token: Option<String>,
    /// Target name (lowercase) to the local address it stands for.
    pub expose: Vec<(String, Backend)>,
}

/// Why one session with the box ended or never began.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot reach the box: {0}")]
    Dial(std::io::Error),
    #[error("the box did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the box refused: {0}")]
    Refused(String),
    #[error("the box answered something that is not HTTP: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("connection lost: {0}")]
    Lost(hyper::Error),
}

/// Parses `NAME=HOST:PORT`, as given to `--expose`.
pub fn parse_expose(s: &str) -> Result<(String, Backend), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=HOST:PORT"))?;
    let name = name.trim();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "`{name}` is not a target name (letters, digits, `-`, `_`, `.`)"
        ));
    }
    Ok((name.to_ascii_lowercase(), Backend::parse(addr.trim())?))
}

/// Keeps a session with the box up, forever: every state change is logged,
/// and failures are retried with a doubling delay (1 s to 30 s) that starts
/// over once a session got registered.
pub async fn run(settings: Settings) {
    let expose: Arc<HashMap<String, Backend>> = Arc::new(settings.expose.iter().cloned().collect());
    let names: Vec<&str> = settings.expose.iter().map(|(n, _)| n.as_str()).collect();
    let names = names.join(", ");
    let mut delay = FIRST_RETRY;
    loop {
        log::info!("agent: connecting to {}", settings.server);
        let started = Instant::now();
        let mut registered = false;
        let result = session(&settings, &names, &expose, &mut registered).await;
        let error = match result {
            Ok(()) => "the box closed the connection".to_string(),
            Err(e) => e.to_string(),
        };
        if registered {
            delay = FIRST_RETRY;
            log::warn!(
                "agent: lost {} after {:.0?}: {error}",
                settings.server,
                started.elapsed()
            );
        } else {
            log::warn!("agent: {}: {error}", settings.server);
        }
        log::info!("agent: retrying in {delay:?}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(LAST_RETRY);
    }
}

async fn session(
    settings: &Settings,
    names: &str,
    expose: &Arc<HashMap<String, Backend>>,
    registered: &mut bool,
) -> Result<(), SessionError> {
    let mut stream =
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&settings.server)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SessionError::Dial(e)),
            Err(_) => return Err(SessionError::Timeout(DIAL_TIMEOUT)),
        };
    let _ = stream.set_nodelay(true);
    let authorization = match &settings.token {
        Some(t) => format!("Authorization: Bearer {t}\r\n"),
        None => String::new(),
    };
    let hello = format!(
        "GET {AGENT_PATH} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {AGENT_PROTOCOL}\r\n{authorization}{EXPOSE_HEADER}: {names}\r\n\r\n",
        settings.server
    );
    stream.write_all(hello.as_bytes()).await?;
    let (status, leftover) = match tokio::time::timeout(DIAL_TIMEOUT, read_head(&mut stream)).await
    {
        Ok(r) => r?,
        Err(_) => return Err(SessionError::Timeout(DIAL_TIMEOUT)),
    };
    if status.code != 101 {
        return Err(SessionError::Refused(status.describe()));
    }
    *registered = true;
    log::info!("agent: connected to {}, exposing {names}", settings.server);
    let expose = expose.clone();
    let service = service_fn(move |request| answer(request, expose.clone()));
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(HEARTBEAT))
        .keep_alive_timeout(HEARTBEAT_TIMEOUT)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .serve_connection(TokioIo::new(Rewind::new(leftover, stream)), service)
        .await
        .map_err(SessionError::Lost)
}

/// A response's status line, and the first line of its body if it came.
pub(crate) struct Status {
    pub code: u16,
    reason: String,
    body: String,
}

impl Status {
    pub(crate) fn describe(&self) -> String {
        let mut s = format!("{} {}", self.code, self.reason);
        if !self.body.is_empty() {
            s.push_str(&format!(": {}", self.body));
        }
        s
    }
}

/// Reads a response head; returns its status and the bytes after it.
pub(crate) async fn read_head(stream: &mut TcpStream) -> Result<(Status, Vec<u8>), SessionError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(SessionError::Protocol(
                "closed before a complete response".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let rest = buf[len..].to_vec();
                let body = String::from_utf8_lossy(&rest)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect();
                let status = Status {
                    code: response.code.unwrap_or(0),
                    reason: response.reason.unwrap_or("").to_string(),
                    body,
                };
                return Ok((status, rest));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(SessionError::Protocol("response head too large".into()));
            }
            Err(e) => return Err(SessionError::Protocol(e.to_string())),
        }
    }
}

/// One CONNECT from the box: dial the exposed service, and join the two
/// once hyper hands the stream over.
async fn answer(
    mut request: Request<Incoming>,
    expose: Arc<HashMap<String, Backend>>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    if request.method() != Method::CONNECT {
        return Ok(refusal(StatusCode::METHOD_NOT_ALLOWED, "only CONNECT"));
    }
    let name = request.uri().host().unwrap_or("").to_ascii_lowercase();
    let Some(backend) = expose.get(&name).cloned() else {
        log::warn!("agent: the box asked for `{name}`, which this agent does not expose");
        return Ok(refusal(StatusCode::NOT_FOUND, "not exposed by this agent"));
    };
    let dialed = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(backend.as_str())).await;
    let mut local = match dialed {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            log::warn!("agent: {name}: {backend} failed: {e}");
            return Ok(refusal(StatusCode::BAD_GATEWAY, &format!("{backend}: {e}")));
        }
        Err(_) => {
            log::warn!("agent: {name}: {backend} did not answer within {DIAL_TIMEOUT:?}");
            return Ok(refusal(StatusCode::GATEWAY_TIMEOUT, "no answer"));
        }
    };
    let _ = local.set_nodelay(true);
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let started = Instant::now();
        match upgrade.await {
            Ok(upgraded) => {
                let mut tunnel = TokioIo::new(upgraded);
                match tokio::io::copy_bidirectional(&mut tunnel, &mut local).await {
                    Ok((up, down)) => log::info!(
                        "agent: {name} -> {backend} up={up} down={down} {:.3}s",
                        started.elapsed().as_secs_f64()
                    ),
                    Err(e) => log::info!("agent: {name} -> {backend} ended by: {e}"),
                }
            }
            Err(e) => log::warn!("agent: {name}: the stream did not open: {e}"),
        }
    });
    Ok(Response::new(Empty::new()))
}

/// A refusal the box relays to its client; the reason travels in a header
/// (CONNECT responses carry no body).
fn refusal(status: StatusCode, reason: &str) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = status;
    let clean: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect();
    if let Ok(v) = HeaderValue::from_str(&clean) {
        response.headers_mut().insert("mux-error", v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expose_takes_name_and_address() {
        let (name, backend) = parse_expose("Node3=127.0.0.1:22").unwrap();
        assert_eq!(name, "node3");
        assert_eq!(backend.as_str(), "127.0.0.1:22");
        assert!(parse_expose("node3").is_err());
        assert!(parse_expose("=127.0.0.1:22").is_err());
        assert!(parse_expose("a b=127.0.0.1:22").is_err());
        assert!(parse_expose("node3=127.0.0.1").is_err());
    }
}
