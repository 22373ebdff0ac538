//! The HTTP layer: routing per request (by Host and path prefix, as Caddy's
//! `handle_path` does) for connections whose routes a first request alone
//! cannot decide. hyper does the HTTP; bodies, SSE streams and upgraded
//! connections (WebSocket) flow through as they arrive, never buffered whole.

pub(crate) mod deadline;
pub(crate) mod rewind;
pub mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use deadline::Deadlines;
use rewind::Rewind;

use crate::datapath::Dial;
pub use routes::{HttpRoute, normalize_prefix};

/// A backend's body as it streams in, or mux's own short answer.
type Body = Either<Incoming, Full<Bytes>>;

/// How long a keep-alive connection may take to send the next request's
/// headers before it is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP routes and how to reach their backends.
pub struct HttpLayer {
    routes: Vec<HttpRoute>,
    /// How to reach backends (a transparent route's adds the client).
    dial: Dial,
    response_timeout: Duration,
    forwarded_headers: bool,
    /// Some route sends a PROXY protocol header, which needs each client
    /// connection's local address (a getsockname(2) per connection).
    proxy_headers: bool,
}

/// One client connection's connections to the backends, one per route,
/// opened on first use and kept alive. An HTTP/1 client sends one request
/// at a time, so one backend connection per route is all it can use, and
/// keeping them per client spares every request a trip through a shared
/// pool.
struct Upstreams {
    /// Indexed by route; a connection in use is taken out.
    by_route: std::sync::Mutex<Vec<Option<SendRequest<Incoming>>>>,

    /// The client and the address it dialled, for PROXY protocol headers.
    client: SocketAddr,
    local: Option<SocketAddr>,
    /// The client's address as X-Forwarded-For gives it.
    client_ip: HeaderValue,
    /// Response deadlines, for an HTTP/1 client (one request at a time);
    /// HTTP/2 streams wait at once, each with a timer of its own.
    responses: Option<Deadlines>,
}

impl Upstreams {
    /// Route `index`'s idle connection, taken out while a request uses it.
    /// An HTTP/1 client has one request at a time; concurrent HTTP/2
    /// streams to one route each get a connection rather than wait their
    /// turn on one.
    fn take(&self, index: usize) -> Option<SendRequest<Incoming>> {
        let mut by_route = self.by_route.lock().unwrap_or_else(|e| e.into_inner());
        by_route.get_mut(index).and_then(Option::take)
    }

    /// Keeps `sender` for the route's next request, unless another one is
    /// kept already (this one then closes once its exchange is over).
    fn put_back(&self, index: usize, sender: SendRequest<Incoming>) {
        let mut by_route = self.by_route.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot @ None) = by_route.get_mut(index) {
            *slot = Some(sender);
        }
    }
}

/// Why a request could not be forwarded.
enum ForwardError {
    /// No connection to the backend (refused, unreachable, timed out).
    Connect(std::io::Error),
    /// The backend connection failed during the exchange.
    Exchange(hyper::Error),
}

/// Knobs of the HTTP layer, from the configuration.
pub struct HttpSettings {
    pub dial: Dial,
    /// A backend that has not sent its response headers by then gets a 504.
    pub response_timeout: Duration,
    /// Whether to set X-Forwarded-For, -Proto and -Host.
    pub forwarded_headers: bool,
}

impl HttpLayer {
    pub fn new(routes: Vec<HttpRoute>, settings: HttpSettings) -> HttpLayer {
        HttpLayer {
            proxy_headers: routes.iter().any(|r| r.proxy_protocol.is_some()),
            routes,
            dial: settings.dial,
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
        let upstreams = Arc::new(Upstreams {
            by_route: std::sync::Mutex::new((0..self.routes.len()).map(|_| None).collect()),
            client: peer,
            local: if self.proxy_headers {
                stream.local_addr().ok()
            } else {
                None
            },
            client_ip: forwarded_for(peer),
            responses: (!h2c).then(Deadlines::new),
        });
        let io = TokioIo::new(Rewind::new(prefix, stream));
        let service = hyper::service::service_fn(move |req| {
            let (layer, upstreams) = (self.clone(), upstreams.clone());
            async move { Ok::<_, Infallible>(layer.handle(req, peer, &upstreams).await) }
        });
        if h2c {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service)
                .await
        } else {
            hyper::server::conn::http1::Builder::new()
                .timer(Deadlines::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                // A client may send its request, shut its write side and
                // still expect the answer.
                .half_close(true)
                // A message's head and a short body go out in one send(2):
                // writev(2) cost the kernel more per call here, and a
                // request through the proxy is four writes. Large bodies
                // take one more copy in user space.
                .writev(false)
                .serve_connection(io, service)
                .with_upgrades()
                .await
        }
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        upstreams: &Upstreams,
    ) -> Response<Body> {
        let started = Instant::now();
        // Cheap copies (shared buffers) of what the logs and the routing
        // need, since the request itself goes on to the backend.
        let shown = Shown {
            peer,
            method: req.method().clone(),
            host: req.headers().get(header::HOST).cloned(),
            uri: req.uri().clone(),
        };
        let host = shown.host();
        let path = shown.uri.path();

        let Some(index) = routes::route_for(&self.routes, host, path) else {
            log::info!("{shown}: no route; 404");
            return text(
                StatusCode::NOT_FOUND,
                format!("mux: no route for {}{path}\n", host.unwrap_or("")),
            );
        };
        let route = &self.routes[index];
        // Origin form, as a backend expects it from a client. Most requests
        // already are, on a route that leaves the path alone: they keep
        // their target as parsed.
        let as_is = !route.strip_prefix && req.uri().authority().is_none();
        let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let rewritten: Result<Option<Uri>, _> = if as_is {
            Ok(None)
        } else {
            route.rewrite(path_and_query).parse().map(Some)
        };
        let uri = match rewritten {
            Ok(uri) => uri,
            Err(e) => {
                log::warn!(
                    "{shown}: route `{}`: cannot rewrite the target: {e}; 400",
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
        if let Some(uri) = uri {
            *req.uri_mut() = uri;
        }
        remove_hop_by_hop(req.headers_mut(), upgrade);
        if self.forwarded_headers {
            add_forwarded(
                req.headers_mut(),
                &upstreams.client_ip,
                shown.host_value().as_ref(),
            );
        }

        if !req.headers().contains_key(header::HOST) {
            // HTTP/1.1 requires one; an HTTP/1.0 client may not have sent it.
            if let Ok(v) = HeaderValue::from_str(route.backend.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        let exchange = self.forward(upstreams, index, req);
        // HTTP/2 streams wait at once: each has a timer of its own.
        let own;
        let deadlines = match &upstreams.responses {
            Some(shared) => shared,
            None => {
                own = Deadlines::new();
                &own
            }
        };
        let answer = deadlines.within(self.response_timeout, exchange).await;
        let mut res = match answer {
            None => {
                crate::metrics::get().error(crate::metrics::kind::BACKEND);
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
            Some(Err(e)) => {
                crate::metrics::get().error(crate::metrics::kind::BACKEND);
                let why = match e {
                    ForwardError::Connect(e) => e.kind().to_string(),
                    ForwardError::Exchange(e) => e.to_string(),
                };
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
            Some(Ok(res)) => res,
        };
        let status = res.status();
        match client_side {
            Some(client_side) if status == StatusCode::SWITCHING_PROTOCOLS => {
                let backend_side = hyper::upgrade::on(&mut res);
                tokio::spawn(bridge(client_side, backend_side, shown.to_string()));
            }
            _ => remove_hop_by_hop(res.headers_mut(), false),
        }
        // One line per request is for debugging: at tens of thousands of
        // requests a second, writing them costs a quarter of the throughput.
        log::debug!(
            "{shown} route={} backend={} status={} {:.3}s",
            route.name,
            route.backend,
            status.as_u16(),
            started.elapsed().as_secs_f64()
        );
        res.map(Either::Left)
    }
}

impl HttpLayer {
    /// Sends `req` to route `index`'s backend over this client's connection
    /// to it, opening (or reopening) that connection as needed.
    async fn forward(
        &self,
        upstreams: &Upstreams,
        index: usize,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let mut idle = upstreams.take(index);
        let reusable = match &mut idle {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        let mut sender = match idle {
            Some(sender) if reusable => sender,
            // Boxed: it runs once per backend connection, and its state
            // would otherwise enlarge every request's future, which hyper
            // moves into place per request.
            _ => Box::pin(self.connect(index, upstreams)).await?,
        };
        // The response future owns what it needs: the connection can be
        // put back before the backend answers.
        let response = sender.send_request(req);
        upstreams.put_back(index, sender);
        response.await.map_err(ForwardError::Exchange)
    }

    async fn connect(
        &self,
        index: usize,
        upstreams: &Upstreams,
    ) -> Result<SendRequest<Incoming>, ForwardError> {
        let route = &self.routes[index];
        let backend = &route.backend;
        let dial = Dial {
            source: route.transparent.then_some(upstreams.client),
            ..self.dial
        };
        let mut stream = dial
            .first_answer(backend, |addr| dial.connect(addr))
            .await
            .map_err(ForwardError::Connect)?;
        let _ = stream.set_nodelay(true);
        // These connections serve this one client only, so the header
        // describes every request that travels on them.
        if let (Some(version), Some(local)) = (route.proxy_protocol, upstreams.local) {
            let header = crate::proxy_protocol::header(version, upstreams.client, local);
            tokio::io::AsyncWriteExt::write_all(&mut stream, &header)
                .await
                .map_err(ForwardError::Connect)?;
        }
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            // As for the client's side (see `serve`).
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ForwardError::Exchange)?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                log::debug!("backend connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// A request as its log lines show it, formatted only when one is written.
struct Shown {
    peer: SocketAddr,
    method: hyper::Method,
    host: Option<HeaderValue>,
    uri: Uri,
}

impl Shown {
    /// The Host header, or else the authority of an absolute-form target.
    fn host(&self) -> Option<&str> {
        self.host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| self.uri.authority().map(|a| a.as_str()))
    }

    /// `host()` as a header value: the client's own when it is usable.
    fn host_value(&self) -> Option<HeaderValue> {
        match &self.host {
            Some(h) if h.to_str().is_ok() => Some(h.clone()),
            _ => self
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        }
    }
}

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}{}",
            self.peer,
            self.method,
            self.host().unwrap_or(""),
            self.uri.path()
        )
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

/// A response with a one-line plain-text body.
fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut res = Response::new(Either::Right(Full::new(Bytes::from(body))));
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
    // Most messages carry none of them: one look at each name is cheaper
    // than a dozen lookups, each hashing its name.
    if !headers.keys().any(|name| is_hop_by_hop(name, upgrade)) {
        return;
    }
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
    for name in HOP_BY_HOP {
        if name != header::CONNECTION || !upgrade {
            headers.remove(name);
        }
    }
    if !upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// Always hop-by-hop (Upgrade too, unless the request is an upgrade).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether `remove_hop_by_hop` removes headers named `name` (Connection
/// stands for those it names).
fn is_hop_by_hop(name: &HeaderName, upgrade: bool) -> bool {
    HOP_BY_HOP.contains(name) || (!upgrade && name == header::UPGRADE)
}

/// X-Forwarded-For (appended to any the client sent), -Proto and -Host.
/// How X-Forwarded-For names `peer`: its IP, an IPv4-mapped one as IPv4.
fn forwarded_for(peer: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.ip().to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// `client` is the client's address as a header value, made once per
/// connection.
fn add_forwarded(headers: &mut HeaderMap, client: &HeaderValue, host: Option<&HeaderValue>) {
    let chain = match headers.get(&X_FORWARDED_FOR) {
        Some(earlier) => {
            let mut chain = earlier.as_bytes().to_vec();
            chain.extend_from_slice(b", ");
            chain.extend_from_slice(client.as_bytes());
            HeaderValue::from_bytes(&chain).ok()
        }
        None => Some(client.clone()),
    };
    if let Some(v) = chain {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(v) = host {
        headers.insert(X_FORWARDED_HOST, v.clone());
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
        let client = forwarded_for("[::ffff:127.0.0.1]:5000".parse().unwrap());
        add_forwarded(&mut h, &client, Some(&HeaderValue::from_static("box:2222")));
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "box:2222");
    }
}
