//! The HTTP layer: routing per request (by Host and path prefix, as Caddy's
//! `handle_path` does) for connections whose routes a first request alone
//! cannot decide. hyper does the HTTP; bodies, SSE streams and upgraded
//! connections (WebSocket) flow through as they arrive, never buffered whole.

mod rewind;
pub mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use rewind::Rewind;
pub use routes::{HttpRoute, normalize_prefix};

type Body = BoxBody<Bytes, hyper::Error>;

/// How long a keep-alive connection may take to send the next request's
/// headers before it is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP routes and a pooled client to their backends.
pub struct HttpLayer {
    routes: Vec<HttpRoute>,
    client: Client<HttpConnector, Incoming>,
    response_timeout: Duration,
    forwarded_headers: bool,
}

/// Knobs of the HTTP layer, from the configuration.
pub struct HttpSettings {
    pub connect_timeout: Duration,
    /// A backend that has not sent its response headers by then gets a 504.
    pub response_timeout: Duration,
    /// Whether to set X-Forwarded-For, -Proto and -Host.
    pub forwarded_headers: bool,
}

impl HttpLayer {
    pub fn new(routes: Vec<HttpRoute>, settings: HttpSettings) -> HttpLayer {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        HttpLayer {
            routes,
            client,
            response_timeout: settings.response_timeout,
            forwarded_headers: settings.forwarded_headers,
        }
    }

    /// Serves one client connection, whose first `prefix` bytes the
    /// classifier already read; `h2c` for the HTTP/2 prior-knowledge preface.
    pub async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        prefix: Vec<u8>,
        peer: SocketAddr,
        h2c: bool,
    ) -> hyper::Result<()> {
        let io = TokioIo::new(Rewind::new(prefix, stream));
        let service = hyper::service::service_fn(move |req| {
            let layer = self.clone();
            async move { Ok::<_, Infallible>(layer.handle(req, peer).await) }
        });
        if h2c {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service)
                .await
        } else {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                // A client may send its request, shut its write side and
                // still expect the answer.
                .half_close(true)
                .serve_connection(io, service)
                .with_upgrades()
                .await
        }
    }

    async fn handle(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let shown = format!("{peer} {method} {}{path}", host.as_deref().unwrap_or(""));

        let Some(route) = routes::route_for(&self.routes, host.as_deref(), &path) else {
            log::info!("{shown}: no route; 404");
            return text(
                StatusCode::NOT_FOUND,
                format!(
                    "mux: no route for {}{path}\n",
                    host.as_deref().unwrap_or("")
                ),
            );
        };
        let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let target = format!("http://{}{}", route.backend, route.rewrite(path_and_query));
        let uri: Uri = match target.parse() {
            Ok(uri) => uri,
            Err(e) => {
                log::warn!(
                    "{shown}: route `{}`: cannot address the backend: {e}; 400",
                    route.name
                );
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("mux: route {}: bad request target ({e})\n", route.name),
                );
            }
        };
        let upgrade = is_upgrade(req.headers());
        let client_side: Option<OnUpgrade> = upgrade.then(|| hyper::upgrade::on(&mut req));
        *req.uri_mut() = uri;
        remove_hop_by_hop(req.headers_mut(), upgrade);
        if self.forwarded_headers {
            add_forwarded(req.headers_mut(), peer, host.as_deref());
        }

        let mut res =
            match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
                Err(_elapsed) => {
                    log::warn!(
                        "{shown}: route `{}`: backend {} sent no response within {:?}; 504",
                        route.name,
                        route.backend,
                        self.response_timeout
                    );
                    return text(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "mux: route {}: backend {} did not answer within {:?}\n",
                            route.name, route.backend, self.response_timeout
                        ),
                    );
                }
                Ok(Err(e)) => {
                    let why = reason(&e);
                    log::warn!(
                        "{shown}: route `{}`: backend {} failed: {why}; 502",
                        route.name,
                        route.backend
                    );
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "mux: route {}: backend {} is unavailable ({why})\n",
                            route.name, route.backend
                        ),
                    );
                }
                Ok(Ok(res)) => res,
            };
        let status = res.status();
        match client_side {
            Some(client_side) if status == StatusCode::SWITCHING_PROTOCOLS => {
                let backend_side = hyper::upgrade::on(&mut res);
                tokio::spawn(bridge(client_side, backend_side, shown.clone()));
            }
            _ => remove_hop_by_hop(res.headers_mut(), false),
        }
        log::info!(
            "{shown} route={} backend={} status={} {:.3}s",
            route.name,
            route.backend,
            status.as_u16(),
            started.elapsed().as_secs_f64()
        );
        res.map(BodyExt::boxed)
    }
}

/// After a 101, the two upgraded connections are joined byte for byte.
async fn bridge(client: OnUpgrade, backend: OnUpgrade, shown: String) {
    match tokio::try_join!(client, backend) {
        Ok((client, backend)) => {
            let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
            match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                Ok((up, down)) => {
                    log::info!("{shown}: upgraded connection ended, up={up} down={down}")
                }
                Err(e) => log::info!("{shown}: upgraded connection ended: {e}"),
            }
        }
        Err(e) => log::warn!("{shown}: upgrade failed: {e}"),
    }
}

/// The root cause of a client error, as short as a log line wants it.
fn reason(e: &hyper_util::client::legacy::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind().to_string();
        }
        source = s.source();
    }
    e.to_string()
}

/// A response with a one-line plain-text body.
fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut res = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Headers that describe one hop, not the message (RFC 9110 7.6.1), plus
/// those the Connection header names. An upgrade keeps Connection and
/// Upgrade: they are the request.
fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| !(upgrade && t == "upgrade"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// X-Forwarded-For (appended to any the client sent), -Proto and -Host.
fn add_forwarded(headers: &mut HeaderMap, peer: SocketAddr, host: Option<&str>) {
    let client = peer.ip().to_canonical().to_string();
    let chain = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client,
    };
    if let Ok(v) = HeaderValue::from_str(&chain) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert("x-forwarded-host", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("yes"));
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn upgrades_keep_their_connection_and_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert!(h.contains_key(header::UPGRADE) && h.contains_key(header::CONNECTION));
    }

    #[test]
    fn forwarded_headers_append_the_client() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        add_forwarded(
            &mut h,
            "[::ffff:127.0.0.1]:5000".parse().unwrap(),
            Some("box:2222"),
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "box:2222");
    }
}
