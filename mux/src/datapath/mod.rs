//! The seam between a classified pair of sockets and what moves their bytes.
//!
//! Every data path keeps the same contract: bytes flow both ways until each
//! side has sent its FIN; a FIN read from one side becomes a shutdown of the
//! other side's write half (half-close), and an error on either side ends the
//! whole pair. Backpressure comes from never reading more than the other side
//! has taken.

mod adaptive;
mod copy;
mod ebpf;
mod splice;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};

use self::adaptive::{Adaptive, Bulk};
pub use self::ebpf::{Kernel, Lease, Tracking, Watch};
use crate::config::{DataPathKind, Keepalive};
use crate::ebpf::EbpfError;
use crate::route::Backend;

/// `IP_BIND_ADDRESS_NO_PORT` (IPv4 and IPv6 sockets alike): a bind to an
/// address leaves the port to `connect`, which picks one free for the
/// 4-tuple rather than for the address alone.
pub(crate) fn bind_address_no_port(socket: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and an int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets TCP keepalive on a socket. On a listening one, the sockets it
/// accepts inherit it (and its timers), so it costs nothing per connection.
pub(crate) fn keep_alive(socket: impl std::os::fd::AsFd, keepalive: Keepalive) -> io::Result<()> {
    let socket = socket2::SockRef::from(&socket);
    match keepalive {
        Keepalive::Off => socket.set_keepalive(false),
        Keepalive::System => socket.set_keepalive(true),
        Keepalive::Idle(idle) => socket.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(idle.min(Keepalive::MAX_INTERVAL)),
        ),
    }
}

/// How mux opens a connection to a backend.
#[derive(Debug, Clone, Copy)]
pub struct Dial {
    /// For the whole attempt, every address of a name included.
    pub limit: Duration,
    /// The client's address, for a transparent route.
    pub source: Option<SocketAddr>,
    /// For a backend off loopback: one on another host can vanish without
    /// a FIN or a reset, and the client's own keepalive probes reach mux,
    /// which answers them, not the backend. A loopback backend that dies
    /// is reset by the kernel, so it costs those connections nothing.
    pub keepalive: Keepalive,
}

impl Dial {
    /// A socket to connect to `addr`, and whether it is bound to the
    /// client's address.
    pub fn socket(&self, addr: SocketAddr) -> io::Result<(TcpSocket, bool)> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if self.keepalive != Keepalive::Off && !addr.ip().is_loopback() {
            keep_alive(&socket, self.keepalive)?;
        }
        let bound = crate::transparent::bind_client(&socket, addr, self.source)?;
        Ok((socket, bound))
    }

    /// A plain connection to `addr`.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        self.socket(addr)?.0.connect(addr).await
    }

    /// Resolves `backend` now (names may move) and returns what `dial`
    /// makes of the first of its addresses that answers, within `limit`.
    /// With a `source`, addresses of its family go first: only they can be
    /// reached from it.
    pub async fn first_answer<T, F, Fut>(&self, backend: &Backend, mut dial: F) -> io::Result<T>
    where
        F: FnMut(SocketAddr) -> Fut,
        Fut: Future<Output = io::Result<T>>,
    {
        let attempt = async {
            let mut last_error = None;
            let mut found = tokio::net::lookup_host(backend.as_str()).await?;
            // Reordered (so collected) for a transparent route only.
            let ordered = self.source.map(crate::transparent::unmapped).map(|source| {
                let mut addrs: Vec<SocketAddr> = found.by_ref().collect();
                addrs.sort_by_key(|a| a.is_ipv4() != source.is_ipv4());
                addrs
            });
            for addr in ordered.into_iter().flatten().chain(found) {
                match dial(addr).await {
                    Ok(t) => return Ok(t),
                    Err(e) => last_error = Some(e),
                }
            }
            Err(last_error.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "name resolved to no address")
            }))
        };
        match tokio::time::timeout(self.limit, attempt).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.limit),
            )),
        }
    }
}

/// What a relay moved before it ended, and why it ended early if it did.
#[derive(Debug, Default)]
pub struct Relayed {
    /// Client to backend.
    pub up: u64,
    /// Backend to client.
    pub down: u64,
    /// On the kernel path: how many of the `down` bytes took the normal
    /// path through mux to keep the client's queue bounded.
    pub spilled: Option<u64>,
    pub error: Option<io::Error>,
}

impl Relayed {
    /// The end of a connection's log line: what spilled off the kernel
    /// path, and the error that ended it, if any.
    pub fn outcome(&self) -> String {
        let mut s = String::new();
        if let Some(n) = self.spilled {
            s.push_str(&format!(" spilled={n}"));
        }
        if let Some(e) = &self.error {
            s.push_str(&format!(" ended by: {e}"));
        }
        s
    }
}

/// How a connection's bytes move once it is classified.
#[derive(Debug, Clone)]
pub enum DataPath {
    Splice,
    Copy,
    /// The kernel moves a local backend's sends to the client; everything
    /// else (the upload direction, remote backends) is spliced.
    Kernel(Arc<Kernel>),
}

/// A connected backend, and the kernel's part in it if it has one.
pub struct Connected {
    pub stream: TcpStream,
    tracking: Option<Tracking>,
}

impl DataPath {
    /// As metrics label it.
    pub fn name(&self) -> &'static str {
        match self {
            DataPath::Splice => "splice",
            DataPath::Copy => "copy",
            DataPath::Kernel(_) => "ebpf",
        }
    }

    /// The path for a configured kind, and why, for the start-up log.
    /// `max_kernel_bulk`: `auto`'s limit on connections sending in bulk on
    /// the kernel path at once, if configured.
    pub fn select(
        kind: DataPathKind,
        max_kernel_bulk: Option<usize>,
    ) -> Result<(DataPath, String), DataPathError> {
        let bulk_limit = max_kernel_bulk.unwrap_or_else(ebpf::default_bulk_limit);
        match kind {
            // The kernel path wherever it loads, with the back-off that
            // keeps short connections as fast as on splice(2).
            DataPathKind::Auto => Ok(match Kernel::load(true, bulk_limit) {
                Ok(kernel) => (
                    DataPath::Kernel(Arc::new(kernel)),
                    format!(
                        "auto: kernel path for backends on this host that send in bulk, {bulk_limit} at a time, splice(2) for the rest"
                    ),
                ),
                Err(e) => (
                    DataPath::Splice,
                    format!("auto: splice(2) through a pipe; the kernel path cannot start: {e:#}"),
                ),
            }),
            DataPathKind::Ebpf => {
                let kernel = Kernel::load(false, bulk_limit).map_err(DataPathError::Ebpf)?;
                Ok((
                    DataPath::Kernel(Arc::new(kernel)),
                    "ebpf: kernel path, as configured".into(),
                ))
            }
            DataPathKind::Splice => Ok((
                DataPath::Splice,
                "splice(2) through a pipe, as configured".into(),
            )),
            DataPathKind::Copy => Ok((DataPath::Copy, "read/write copy, as configured".into())),
        }
    }

    /// Resolves the backend now (names may move) and connects to the first
    /// address that answers, as `dial` says, the way this path needs.
    pub async fn connect(
        &self,
        client: &TcpStream,
        backend: &Backend,
        dial: &Dial,
    ) -> io::Result<Connected> {
        dial.first_answer(backend, |addr| async move {
            let (stream, tracking) = match self {
                DataPath::Kernel(kernel) => kernel.dial(client, addr, dial).await?,
                DataPath::Splice | DataPath::Copy => (dial.connect(addr).await?, None),
            };
            Ok(Connected { stream, tracking })
        })
        .await
    }

    /// Sends the backend `header` (not the client's: a PROXY protocol
    /// header) and `prefix` (what the client sent before the relay began) in
    /// one write, then relays. `up` counts the prefix; a failed first write
    /// ends the pair with data path "none".
    pub async fn relay_after(
        &self,
        client: &TcpStream,
        mut backend: Connected,
        header: &[u8],
        prefix: &[u8],
    ) -> (Relayed, &'static str) {
        let first = if header.is_empty() {
            std::borrow::Cow::Borrowed(prefix)
        } else {
            std::borrow::Cow::Owned([header, prefix].concat())
        };
        if let Err(e) = backend.stream.write_all(&first).await {
            let failed = Relayed {
                error: Some(e),
                ..Relayed::default()
            };
            return (failed, "none");
        }
        let (mut relayed, datapath) = self.relay(client, backend).await;
        relayed.up += prefix.len() as u64;
        (relayed, datapath)
    }

    /// Moves bytes between `client` and the backend until both directions
    /// are done or one fails. Returns what was moved either way, and the
    /// name of the path that moved it.
    pub async fn relay(&self, client: &TcpStream, backend: Connected) -> (Relayed, &'static str) {
        let mut r = Relayed::default();
        let name = match self {
            DataPath::Copy => {
                r.error = pair::<copy::Buffer>(client, &backend.stream, &mut r, false, |_, _| {})
                    .await
                    .err();
                "copy"
            }
            DataPath::Splice | DataPath::Kernel(_) => {
                // On the kernel path the backend-to-client pump carries what
                // the kernel let through the normal way (a backend the
                // kernel did not take, or sends past the client's bound),
                // and the backend's FIN. Once the backend sends in bulk,
                // each delivery is reported back: the first report lets
                // the kernel take over, later ones let it resume after a
                // spill. A connection that keeps exchanging small messages
                // leaves the kernel path instead (see `Lease::drained`).
                let report = |total: u64, bulk: bool| match &backend.tracking {
                    Some(Tracking::Lease(lease)) => lease.drained(total, bulk),
                    Some(Tracking::Watch(watch)) if bulk => watch.sends_in_bulk(),
                    _ => {}
                };
                // The kernel moves a published backend's bytes into the
                // client socket itself, which changes how its hang-up must
                // be watched (see `pair`).
                let kernel = matches!(backend.tracking, Some(Tracking::Lease(_)));
                r.error = pair::<splice::Pipe>(client, &backend.stream, &mut r, kernel, report)
                    .await
                    .err();
                "splice"
            }
        };
        let lease = match backend.tracking {
            Some(Tracking::Lease(lease)) => Some(lease),
            _ => None,
        };
        match lease.map(Lease::finish) {
            Some(w) if w.captured => {
                log::debug!("kernel path: {w:?}");
                // Everything mux itself moved down went its way rather than
                // the kernel's: before bulk, or past the client's bound.
                r.spilled = Some(r.down);
                r.down += w.down_bytes;
                (r, "ebpf")
            }
            _ => (r, name),
        }
    }
}

/// Pumps both ways, each direction taking a bulk stage `B` (a pipe, a
/// buffer) once its bytes come in bulk; `delivered` hears the running total
/// given to the client, and whether it came in bulk.
///
/// Once one side has sent its FIN, mux no longer reads it, and writes to it
/// only what the other side still sends: a side that then goes away (a
/// reset, a host gone) would go unnoticed for as long as the other side
/// stays quiet, and the pair, the other side's connection with it, would
/// stay open. So each side is watched for its hang-up from its FIN on, and
/// the pair ends (HAProxy ends a session at such an error too). On the
/// kernel path (`kernel`) this is not only about idle peers: the kernel
/// moves the backend's sends into the client socket where mux cannot see
/// them fail, and a non-blocking backend whose send failed there waits for
/// good (seen in the soak: pairs left open after every client was gone,
/// each backend stuck in a send).
async fn pair<B: Bulk>(
    client: &TcpStream,
    backend: &TcpStream,
    r: &mut Relayed,
    kernel: bool,
    delivered: impl FnMut(u64, bool),
) -> io::Result<()> {
    let up = pump(client, backend, Adaptive::<B>::new(), &mut r.up, |_, _| {});
    let down = pump(
        backend,
        client,
        Adaptive::<B>::new(),
        &mut r.down,
        delivered,
    );
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            // The pumps first: a pump that ends its direction shuts the
            // other side's write half, which with that side's own FIN makes
            // its socket hang up too, and that is no reset.
            biased;
            res = &mut up, if !up_done => {
                res?;
                up_done = true;
            }
            res = &mut down, if !down_done => {
                res?;
                down_done = true;
            }
            () = client_gone(client, kernel), if up_done => {
                // A reset, not a FIN, for the backend: its client is gone,
                // and on the kernel path a backend waiting to send (its
                // sends went through the kernel) wakes at a reset, not at a
                // close after our FIN.
                let _ = backend.set_zero_linger();
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the client went away after its end of stream, before the backend's",
                ));
            }
            () = failed(backend), if down_done => {
                // A plain close for the client, not a reset: the backend's
                // last bytes may still wait in its socket, and a reset would
                // throw them away. Whatever it sends from now on is answered
                // with a reset by its kernel.
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the backend went away after its end of stream, before the client's",
                ));
            }
        }
    }
    Ok(())
}

/// Resolves once the client, past its FIN, has gone away. See [`failed`];
/// on the kernel path that is not enough: a redirected send of the backend
/// that finds the client socket reset takes its error (the kernel reports a
/// socket's error to the first call that meets it), and epoll then reports
/// the hang-up alone. So there the hang-up is watched, through a
/// registration of its own on a duplicate descriptor, so that the pump
/// still writing to the client keeps its readiness (waiting for the
/// hang-up on the shared one would mean waiting for writability).
async fn client_gone(client: &TcpStream, kernel: bool) {
    if kernel {
        hung_up(client).await
    } else {
        failed(client).await
    }
}

/// Resolves once `stream` has an error pending (a reset). No system call:
/// it waits on the stream's own registration for the error readiness epoll
/// always reports, which no pump clears. Only mux itself uses this socket,
/// and a write of its own that took the error first fails the pair anyway.
async fn failed(stream: &TcpStream) {
    if let Err(e) = stream.ready(Interest::ERROR).await {
        log::debug!("watching a half-closed peer for a reset: {e}");
        std::future::pending::<()>().await;
    }
}

/// Resolves once `stream` has hung up: reset, or closed both ways (epoll's
/// `EPOLLHUP`). Never resolves if its registration cannot be made (out of
/// descriptors, say): the pair then ends as it would without the watch.
async fn hung_up(stream: &TcpStream) {
    use std::os::fd::AsFd as _;
    let watch = stream.as_fd().try_clone_to_owned().and_then(|fd| {
        // Registered for errors only (tokio adds read interest, which epoll
        // needs): nothing ever makes it writable, so waiting for
        // writability waits for the hang-up alone, which epoll reports
        // whatever was asked.
        // SAFETY: an `OwnedFd` stays open, and is the same descriptor, for
        // as long as the `AsyncFd` that owns it.
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, Interest::ERROR) }
            .map_err(io::Error::from)
    });
    let watch = match watch {
        Ok(watch) => watch,
        Err(e) => {
            log::debug!("cannot watch a half-closed client for a reset: {e}");
            return std::future::pending().await;
        }
    };
    loop {
        match watch.ready(Interest::WRITABLE).await {
            Ok(guard) if guard.ready().is_write_closed() => return,
            Ok(mut guard) => guard.clear_ready(),
            Err(e) => {
                log::debug!("watching a half-closed client for a reset: {e}");
                return std::future::pending().await;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    #[error("datapath = \"ebpf\" but the kernel path cannot start")]
    Ebpf(#[source] EbpfError),
}

/// One way of holding bytes between reading them from one socket and writing
/// them to the other. Both calls are non-blocking and return `WouldBlock`
/// when the socket is not ready.
trait Stage {
    /// Takes up to a stage's worth of bytes from `src`; 0 means EOF.
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize>;
    /// Gives up to `pending` held bytes to `dst`; returns how many it took.
    fn drain(&mut self, dst: &TcpStream, pending: usize) -> io::Result<usize>;
    /// Whether bytes have come in bulk on this direction (they stay so).
    fn bulk(&self) -> bool;
}

/// Moves bytes one way until EOF, then shuts down `dst`'s write half.
/// Never holds more than one stage's worth: a slow reader stalls the writer.
/// `moved` counts the bytes given to `dst`; `on_drained` hears that total,
/// and whether bytes have come in bulk, each time the stage is empty and
/// `src` has nothing more to read, at `src`'s end, and otherwise once every
/// [`REPORT_EVERY`] bytes.
///
/// Not after every stage: on the kernel path each report costs two bpf
/// calls, and the kernel can take a connection back only once mux has
/// relayed every byte the backend wrote, which it cannot have while `src`
/// still holds some. A backend that outruns its client on busy cores keeps
/// `src` full, and reporting after every stage cost it 2% of the machine's
/// CPU for nothing.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    mut stage: impl Stage,
    moved: &mut u64,
    mut on_drained: impl FnMut(u64, bool),
) -> io::Result<()> {
    // The total last reported: bytes moved since are unreported.
    let mut reported = 0u64;
    loop {
        // Tried at once: with nothing to read, the report goes out before
        // the wait.
        let n = match src.try_io(Interest::READABLE, || stage.fill(src)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if *moved != reported {
                    on_drained(*moved, stage.bulk());
                    reported = *moved;
                }
                ready(src, Interest::READABLE, || stage.fill(src)).await?
            }
            other => other?,
        };
        if n == 0 {
            // A backend that sent in bulk and closed at once must still
            // count as one that sends in bulk (`auto` learns from it).
            if *moved != reported {
                on_drained(*moved, stage.bulk());
            }
            return shutdown_write(dst);
        }
        let mut pending = n;
        while pending > 0 {
            let w = ready(dst, Interest::WRITABLE, || stage.drain(dst, pending)).await?;
            pending -= w;
            *moved += w as u64;
        }
        // Also while mux never catches up, so that `auto` can tell a
        // connection the kernel no longer takes.
        if *moved - reported >= REPORT_EVERY {
            on_drained(*moved, stage.bulk());
            reported = *moved;
        }
    }
}

/// Bytes after which `pump` reports a delivery even though mux has not
/// caught up with its source.
const REPORT_EVERY: u64 = 16 << 20;

/// Retries `op` each time `stream` is ready for `interest`, until it does
/// not return `WouldBlock`.
async fn ready<T>(
    stream: &TcpStream,
    interest: Interest,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    loop {
        stream.ready(interest).await?;
        match stream.try_io(interest, &mut op) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Sends our FIN to `stream` while still reading what it sends.
pub fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match rustix::net::shutdown(stream, rustix::net::Shutdown::Write) {
        // The peer already went away entirely: nothing left to tell it.
        Err(rustix::io::Errno::NOTCONN) => Ok(()),
        other => other.map_err(io::Error::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's pair over loopback: (the end mux reads, the peer).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (listener.accept().await.unwrap().0, peer)
    }

    /// A backend that sends in bulk and closes at once: its last delivery
    /// is reported even though `src` never ran dry before its end.
    #[tokio::test]
    async fn the_last_delivery_is_reported_at_the_end() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (src, mut backend) = pair().await;
        let (dst, mut client) = pair().await;
        backend.write_all(&[7u8; 20 * 1024]).await.unwrap();
        backend.shutdown().await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got.len()
        });
        let mut moved = 0;
        let mut reports = Vec::new();
        let stage = Adaptive::<splice::Pipe>::new();
        pump(&src, &dst, stage, &mut moved, |total, bulk| {
            reports.push((total, bulk))
        })
        .await
        .unwrap();
        assert_eq!(reader.await.unwrap(), 20 * 1024);
        assert_eq!(reports.last(), Some(&(20 * 1024, true)), "{reports:?}");
    }

    #[test]
    fn keepalive_goes_on_backend_sockets_off_loopback_only() {
        let dial = |keepalive| Dial {
            limit: Duration::from_secs(1),
            source: None,
            keepalive,
        };
        let on = |d: Dial, addr: &str| {
            let (socket, bound) = d.socket(addr.parse().unwrap()).unwrap();
            assert!(!bound);
            socket2::SockRef::from(&socket).keepalive().unwrap()
        };
        let idle = Keepalive::Idle(Duration::from_secs(30));
        assert!(on(dial(idle), "192.0.2.1:22"));
        assert!(on(dial(Keepalive::System), "[2001:db8::1]:22"));
        assert!(!on(dial(Keepalive::Off), "192.0.2.1:22"));
        assert!(!on(dial(idle), "127.0.0.1:22"));
        assert!(!on(dial(idle), "[::1]:22"));
        let (socket, _) = dial(idle).socket("192.0.2.1:22".parse().unwrap()).unwrap();
        let socket = socket2::SockRef::from(&socket);
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(30)
        );
    }
}
