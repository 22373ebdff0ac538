//! The soak test's clients: each loops until told to stop, every round a new connection of
//! a randomly chosen kind, and checks every byte that comes back. A completed exchange that
//! returns wrong, short or no bytes is a failure; an abort (the client's own doing) is not.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::backends::{BANNER, find, header};
use super::rng::Rng;

/// How long one step (a read, a write, a whole echo) may stall before it counts as failed:
/// far above loopback latency even on a busy 2-core machine, so only a stuck relay hits it.
const OP_TIMEOUT: Duration = Duration::from_secs(15);
/// One connection from connect to close, at most.
const CONN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long mux may take to close a connection it cannot route.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest echo payload of one exchange, and of one HTTP body.
const MAX_ECHO: usize = 256 * 1024;
const MAX_HALF_CLOSE: usize = 1024 * 1024;
const MAX_HTTP_BODY: usize = 1024 * 1024;
/// What SSH-like clients send first.
const CLIENT_BANNER: &[u8] = b"SSH-2.0-soak-client\r\n";
/// Bytes no built-in probe takes; the config's regex route `^\x00` sends them to the echo
/// backend, as a catch-all would.
pub const ANY_PREFIX: &[u8] = b"\0SOAK-ANY\n";
/// The server name in the TLS clients' ClientHello; the TLS route requires it.
pub const SNI: &str = "soak.mux.test";
/// Failures kept word for word for the report; the rest are only counted.
const KEEP_FAILURES: usize = 20;
/// The path prefix of the config's per-request HTTP route (`--http-paths`).
pub const API_PREFIX: &str = "/api";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Banner, echo exchanges of random sizes, close.
    Ssh,
    /// Bytes only the catch-all (regex) route takes, then the same.
    Any,
    /// A ClientHello with SNI, its echo, then echo exchanges.
    Tls,
    /// Keep-alive HTTP/1.1 requests with random body sizes.
    Http,
    /// Bytes no route takes: mux must close.
    Garbage,
    /// Nothing sent: after the classify timeout, the ssh route's banner must come.
    Silent,
    /// Gone mid-way: a reset or close before, during or after classification.
    Abort,
    /// Data, then a half-close: every byte must still come back, then the end of stream.
    HalfClose,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Ssh,
        Kind::Any,
        Kind::Tls,
        Kind::Http,
        Kind::Garbage,
        Kind::Silent,
        Kind::Abort,
        Kind::HalfClose,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Ssh => "ssh",
            Kind::Any => "any",
            Kind::Tls => "tls",
            Kind::Http => "http",
            Kind::Garbage => "garbage",
            Kind::Silent => "silent",
            Kind::Abort => "abort",
            Kind::HalfClose => "half-close",
        }
    }

    /// Relative frequency.
    fn weight(self) -> u64 {
        match self {
            Kind::Ssh => 18,
            Kind::Any => 10,
            Kind::Tls => 15,
            Kind::Http => 22,
            Kind::Garbage => 8,
            Kind::Silent => 5,
            Kind::Abort => 14,
            Kind::HalfClose => 8,
        }
    }

    fn pick(rng: &mut Rng) -> Kind {
        let total: u64 = Kind::ALL.iter().map(|k| k.weight()).sum();
        let mut x = rng.below(total);
        for k in Kind::ALL {
            if x < k.weight() {
                return k;
            }
            x -= k.weight();
        }
        Kind::Ssh
    }
}

#[derive(Default)]
pub struct KindStats {
    /// Connections started.
    pub conns: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Echo exchanges or HTTP requests checked.
    pub exchanges: AtomicU64,
    /// Failed, but the client itself sent its first bytes only after the classify timeout
    /// (this process starved of CPU): then mux rightly took it for a silent client.
    pub late: AtomicU64,
}

#[derive(Default)]
pub struct Stats {
    pub kinds: [KindStats; Kind::ALL.len()],
    /// Bytes received and checked.
    pub checked_bytes: AtomicU64,
    /// Connections that got bytes from a backend: mux routed them, whatever came after.
    pub routed: AtomicU64,
    /// The first failures, word for word.
    pub failures: Mutex<Vec<String>>,
}

impl Stats {
    pub fn of(&self, kind: Kind) -> &KindStats {
        &self.kinds[kind as usize]
    }

    pub fn total(&self, f: impl Fn(&KindStats) -> &AtomicU64) -> u64 {
        self.kinds
            .iter()
            .map(|k| f(k).load(Ordering::Relaxed))
            .sum()
    }

    fn fail(&self, kind: Kind, local: Option<SocketAddr>, why: String) {
        self.of(kind).failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < KEEP_FAILURES {
            let from = local.map_or("before connecting".into(), |a| format!("from {a}"));
            f.push(format!("{} {from}: {why}", kind.name()));
        }
    }
}

/// One client: connections one after the other until `stop`, each of a random kind.
/// With `api_route`, mux has a path route `/api/` (prefix stripped) to the HTTP backend, which
/// puts HTTP connections through its HTTP layer; half of the requests then use it.
pub async fn client(
    addr: SocketAddr,
    api_route: bool,
    seed: u64,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(seed);
    while !stop.load(Ordering::Relaxed) {
        let kind = Kind::pick(&mut rng);
        let conn_seed = rng.next_u64();
        stats.of(kind).conns.fetch_add(1, Ordering::Relaxed);
        let mut c = Conn {
            addr,
            rng: Rng::new(conn_seed),
            stats: &stats,
            kind,
            started: Instant::now(),
            local: None,
            late: false,
            routed: false,
            api_route,
        };
        // Boxed: the futures of all kinds together are large, and tasks start on a thread's stack.
        let result = tokio::time::timeout(CONN_TIMEOUT, Box::pin(c.run())).await;
        if c.routed {
            stats.routed.fetch_add(1, Ordering::Relaxed);
        }
        let why = match result {
            Ok(Ok(())) => {
                stats.of(kind).ok.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("not done after {}s", CONN_TIMEOUT.as_secs()),
        };
        if c.late {
            stats.of(kind).late.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.fail(kind, c.local, why);
        }
    }
}

struct Conn<'a> {
    addr: SocketAddr,
    rng: Rng,
    stats: &'a Stats,
    kind: Kind,
    /// Just before connecting: mux's classify timer starts later.
    started: Instant,
    /// The client's address, which mux's log lines name.
    local: Option<SocketAddr>,
    /// The first bytes went out only after the classify timeout.
    late: bool,
    /// Bytes came back from a backend.
    routed: bool,
    /// mux routes `/api/*` to the HTTP backend, without the prefix.
    api_route: bool,
}

/// Bounds one step.
async fn step<T>(what: &str, f: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => bail!("{what}: stalled for {}s", OP_TIMEOUT.as_secs()),
    }
}

impl Conn<'_> {
    async fn run(&mut self) -> Result<()> {
        match self.kind {
            Kind::Ssh => self.echo_session(CLIENT_BANNER.to_vec(), true).await,
            Kind::Any => self.echo_session(ANY_PREFIX.to_vec(), true).await,
            Kind::Tls => {
                let hello = client_hello(&mut self.rng, SNI);
                self.echo_session(hello, false).await
            }
            Kind::Http => self.http().await,
            Kind::Garbage => self.garbage().await,
            Kind::Silent => self.silent().await,
            Kind::Abort => self.abort().await,
            Kind::HalfClose => self.half_close().await,
        }
    }

    async fn connect(&mut self) -> Result<(OwnedReadHalf, OwnedWriteHalf)> {
        self.started = Instant::now();
        let s = step("connecting to mux", async {
            Ok(TcpStream::connect(self.addr).await?)
        })
        .await?;
        self.local = s.local_addr().ok();
        s.set_nodelay(true)?;
        Ok(s.into_split())
    }

    /// Notes whether the first bytes, just sent, went out after the classify timeout. Timed
    /// from before the connect, which is before mux's timer starts: a shorter time means the
    /// bytes were there in time, however late this task ran.
    fn first_sent(&mut self) {
        self.sent_at(self.started.elapsed());
    }

    fn sent_at(&mut self, after: Duration) {
        if after >= super::CLASSIFY_TIMEOUT {
            self.late = true;
        }
    }

    fn checked(&mut self, n: usize) {
        if n > 0 {
            self.routed = true;
        }
        self.stats
            .checked_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// What to put before a request's path: `/api` (which mux strips) half of the time
    /// when it has that route. The backend answers 404 to paths that start with it.
    fn prefix(&mut self) -> &'static str {
        if self.api_route && self.rng.percent(50) {
            API_PREFIX
        } else {
            ""
        }
    }

    fn exchanged(&self) {
        self.stats
            .of(self.kind)
            .exchanges
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Reads exactly `want.len()` bytes and compares them.
    async fn expect(&mut self, r: &mut OwnedReadHalf, want: &[u8], what: &str) -> Result<()> {
        step(what, read_check(r, want)).await?;
        self.checked(want.len());
        Ok(())
    }

    /// Sends `first` (the bytes that classify), checks what comes back (with the SSH
    /// backend's banner ahead if `banner`), then echo exchanges, then a close.
    async fn echo_session(&mut self, first: Vec<u8>, banner: bool) -> Result<()> {
        let (mut r, mut w) = self.connect().await?;
        step("sending the first bytes", async {
            Ok(w.write_all(&first).await?)
        })
        .await?;
        self.first_sent();
        if banner {
            self.expect(&mut r, BANNER, "reading the backend's banner")
                .await?;
        }
        self.expect(&mut r, &first, "reading the echo of the first bytes")
            .await?;
        for _ in 0..self.rng.range(1, 6) {
            let size = self.rng.size(MAX_ECHO);
            self.echo(&mut r, &mut w, size).await?;
        }
        self.close(r, w).await
    }

    /// Writes `size` random bytes while reading them back.
    async fn echo(
        &mut self,
        r: &mut OwnedReadHalf,
        w: &mut OwnedWriteHalf,
        size: usize,
    ) -> Result<()> {
        let payload = self.rng.bytes(size);
        let what = format!("echo of {size} bytes");
        step(&what, async {
            let write = async { Ok(w.write_all(&payload).await?) };
            tokio::try_join!(write, read_check(r, &payload))?;
            Ok(())
        })
        .await?;
        self.checked(size);
        self.exchanged();
        Ok(())
    }

    /// Ends a connection the way a client would: a half-close answered by the backend's
    /// own end of stream, or just closing.
    async fn close(&mut self, r: OwnedReadHalf, mut w: OwnedWriteHalf) -> Result<()> {
        if self.rng.percent(50) {
            step("half-closing", async { Ok(w.shutdown().await?) }).await?;
            expect_eof(r).await
        } else {
            drop((r, w));
            Ok(())
        }
    }

    async fn http(&mut self) -> Result<()> {
        let (r, w) = self.connect().await?;
        let mut h = Http {
            r,
            w,
            buf: Vec::new(),
        };
        let n = self.rng.range(1, 8);
        for i in 0..n {
            let close = i + 1 == n && self.rng.percent(30);
            self.request(&mut h, close, i == 0).await?;
            if close {
                return expect_eof(h.r).await;
            }
        }
        if h.buf.is_empty() {
            self.close(h.r, h.w).await
        } else {
            bail!("{} bytes after the last response", h.buf.len())
        }
    }

    /// One request, its response read and checked.
    async fn request(&mut self, h: &mut Http, close: bool, first: bool) -> Result<()> {
        let connection = if close { "Connection: close\r\n" } else { "" };
        let size = if self.rng.percent(10) {
            0
        } else {
            self.rng.size(MAX_HTTP_BODY)
        };
        let p = self.prefix();
        let (request, body, expected) = if self.rng.percent(60) {
            let seed = self.rng.next_u64();
            (
                format!(
                    "GET {p}/bytes/{size}/{seed} HTTP/1.1\r\nHost: {SNI}\r\nUser-Agent: soak\r\n{connection}\r\n"
                ),
                Vec::new(),
                Rng::new(seed).bytes(size),
            )
        } else {
            let body = self.rng.bytes(size);
            (
                format!(
                    "POST {p}/echo HTTP/1.1\r\nHost: {SNI}\r\nContent-Length: {size}\r\n{connection}\r\n"
                ),
                body.clone(),
                body,
            )
        };
        let line = request.lines().next().unwrap_or("").to_string();
        step(&format!("sending `{line}`"), async {
            h.w.write_all(request.as_bytes()).await?;
            h.w.write_all(&body).await?;
            Ok(())
        })
        .await?;
        if first {
            self.first_sent();
        }
        step(&format!("the response to `{line}`"), h.response(&expected)).await?;
        self.checked(expected.len());
        self.exchanged();
        Ok(())
    }

    async fn garbage(&mut self) -> Result<()> {
        let len = self.rng.range(1, 2048) as usize;
        let mut bytes = self.rng.bytes(len);
        // A first byte with the high bit set starts no SSH banner, TLS record, HTTP method,
        // nor the catch-all's NUL.
        bytes[0] |= 0x80;
        let (r, mut w) = self.connect().await?;
        // mux may close (and reset, with bytes unread) before all is written: fine.
        let _ = w.write_all(&bytes).await;
        self.first_sent();
        expect_closed(r).await?;
        drop(w);
        Ok(())
    }

    async fn silent(&mut self) -> Result<()> {
        // Timed from before the connect: mux's timer starts later, so however late this task
        // runs, a shorter wait here means mux did not wait its classify timeout.
        let start = Instant::now();
        let (mut r, mut w) = self.connect().await?;
        self.expect(
            &mut r,
            BANNER,
            "waiting for the ssh route's banner after the classify timeout",
        )
        .await?;
        let waited = start.elapsed();
        if waited < super::CLASSIFY_TIMEOUT {
            bail!(
                "the banner came after {} ms, before the classify timeout of {} ms",
                waited.as_millis(),
                super::CLASSIFY_TIMEOUT.as_millis()
            );
        }
        step("sending a banner", async {
            Ok(w.write_all(CLIENT_BANNER).await?)
        })
        .await?;
        self.expect(&mut r, CLIENT_BANNER, "reading the echo of the banner")
            .await?;
        for _ in 0..self.rng.range(0, 2) {
            let size = self.rng.size(MAX_ECHO);
            self.echo(&mut r, &mut w, size).await?;
        }
        self.close(r, w).await
    }

    async fn abort(&mut self) -> Result<()> {
        let reset = self.rng.percent(70);
        match self.rng.below(6) {
            // Gone before sending anything: at once, or while mux waits to classify.
            0 => {
                let (r, w) = self.connect().await?;
                let wait = self
                    .rng
                    .below(super::CLASSIFY_TIMEOUT.as_millis() as u64 * 3 / 4);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                gone(r, w, reset)
            }
            // Gone in the middle of a banner, while the probe waits for more.
            1 => {
                let (r, mut w) = self.connect().await?;
                let _ = w
                    .write_all(&CLIENT_BANNER[..self.rng.range(1, 3) as usize])
                    .await;
                tokio::time::sleep(Duration::from_millis(self.rng.below(50))).await;
                gone(r, w, reset)
            }
            // Gone in the middle of a ClientHello.
            2 => {
                let hello = client_hello(&mut self.rng, SNI);
                let (r, mut w) = self.connect().await?;
                let cut = self.rng.range(1, hello.len() as u64 - 1) as usize;
                let _ = w.write_all(&hello[..cut]).await;
                tokio::time::sleep(Duration::from_millis(self.rng.below(50))).await;
                gone(r, w, reset)
            }
            // Gone in the middle of a large echo, with bytes in flight both ways.
            3 | 4 => {
                let (mut r, mut w) = self.connect().await?;
                step("sending a banner", async {
                    Ok(w.write_all(CLIENT_BANNER).await?)
                })
                .await?;
                self.first_sent();
                self.expect(&mut r, BANNER, "reading the backend's banner")
                    .await?;
                self.expect(&mut r, CLIENT_BANNER, "reading the echo of the banner")
                    .await?;
                let size = self.rng.range(256 * 1024, 2 * 1024 * 1024) as usize;
                let payload = self.rng.bytes(size);
                let cut = self.rng.below(size as u64) as usize;
                {
                    let read = step(
                        "reading the echo before leaving",
                        read_check(&mut r, &payload[..cut]),
                    );
                    let write = async {
                        let _ = w.write_all(&payload).await;
                        std::future::pending::<()>().await
                    };
                    tokio::select! {
                        res = read => res?,
                        () = write => unreachable!(),
                    }
                }
                self.checked(cut);
                gone(r, w, reset)
            }
            // Gone in the middle of a large HTTP response.
            _ => {
                let (r, w) = self.connect().await?;
                let mut h = Http {
                    r,
                    w,
                    buf: Vec::new(),
                };
                let size = self.rng.range(1024 * 1024, 8 * 1024 * 1024) as usize;
                let seed = self.rng.next_u64();
                let p = self.prefix();
                let request =
                    format!("GET {p}/bytes/{size}/{seed} HTTP/1.1\r\nHost: {SNI}\r\n\r\n");
                step("sending a request", async {
                    Ok(h.w.write_all(request.as_bytes()).await?)
                })
                .await?;
                self.first_sent();
                let cut = self.rng.below(size as u64) as usize;
                // Only what is read: the same seed's stream, cut short.
                let expected = Rng::new(seed).bytes(cut);
                step("reading part of a response", async {
                    let len = h.head().await?;
                    if len != size {
                        bail!("Content-Length {len}, asked for {size}");
                    }
                    h.body(&expected).await
                })
                .await?;
                self.checked(cut);
                gone(h.r, h.w, reset)
            }
        }
    }

    async fn half_close(&mut self) -> Result<()> {
        let (mut r, mut w) = self.connect().await?;
        if self.rng.percent(25) {
            // An HTTP request and at once the end of the client's stream: the response must
            // still come, then the end of the backend's.
            let size = self.rng.size(MAX_HTTP_BODY);
            let seed = self.rng.next_u64();
            let p = self.prefix();
            let request = format!("GET {p}/bytes/{size}/{seed} HTTP/1.1\r\nHost: {SNI}\r\n\r\n");
            step("sending a request and half-closing", async {
                w.write_all(request.as_bytes()).await?;
                Ok(w.shutdown().await?)
            })
            .await?;
            self.first_sent();
            let mut h = Http {
                r,
                w,
                buf: Vec::new(),
            };
            step(
                "the response after a half-close",
                h.response(&Rng::new(seed).bytes(size)),
            )
            .await?;
            self.checked(size);
            self.exchanged();
            if !h.buf.is_empty() {
                bail!("{} bytes after the response", h.buf.len());
            }
            return expect_eof(h.r).await;
        }
        let (first, banner) = if self.rng.percent(50) {
            (CLIENT_BANNER.to_vec(), true)
        } else {
            (client_hello(&mut self.rng, SNI), false)
        };
        let size = self.rng.size(MAX_HALF_CLOSE);
        let mut sent = first.clone();
        sent.extend(self.rng.bytes(size));
        let mut want = if banner { BANNER.to_vec() } else { Vec::new() };
        want.extend_from_slice(&sent);
        let started = self.started;
        let first_at = Mutex::new(None);
        let result = step(
            &format!("{} bytes sent then a half-close, echoed", sent.len()),
            async {
                let write = async {
                    w.write_all(&sent[..first.len()]).await?;
                    *first_at.lock().unwrap() = Some(started.elapsed());
                    w.write_all(&sent[first.len()..]).await?;
                    w.shutdown().await?;
                    Ok(())
                };
                tokio::try_join!(write, read_check(&mut r, &want))?;
                Ok(())
            },
        )
        .await;
        if let Some(at) = *first_at.lock().unwrap() {
            self.sent_at(at);
        }
        result?;
        self.checked(want.len());
        self.exchanged();
        expect_eof(r).await
    }
}

/// Leaves: a reset (SO_LINGER 0) or a plain close.
fn gone(r: OwnedReadHalf, w: OwnedWriteHalf, reset: bool) -> Result<()> {
    let s = r.reunite(w).context("reuniting the halves")?;
    if reset {
        s.set_zero_linger()?;
    }
    drop(s);
    Ok(())
}

/// Reads `want.len()` bytes and compares them, saying where they first differ.
async fn read_check(r: &mut OwnedReadHalf, want: &[u8]) -> Result<()> {
    let mut buf = vec![0u8; want.len().min(64 * 1024)];
    let mut at = 0;
    while at < want.len() {
        let room = buf.len().min(want.len() - at);
        let n = r.read(&mut buf[..room]).await?;
        if n == 0 {
            bail!("end of stream after {at} of {} bytes", want.len());
        }
        if let Some(i) = mismatch(&buf[..n], &want[at..at + n]) {
            bail!(
                "wrong byte at offset {} of {}: got {:#04x}, expected {:#04x}",
                at + i,
                want.len(),
                buf[i],
                want[at + i]
            );
        }
        at += n;
    }
    Ok(())
}

/// Where two slices of one length first differ. Slice equality first: a memcmp, fast even
/// in the debug builds `cargo xtask` runs, where a byte loop would cost more than the relay.
fn mismatch(got: &[u8], want: &[u8]) -> Option<usize> {
    if got == want {
        return None;
    }
    got.iter().zip(want).position(|(a, b)| a != b)
}

/// The peer's end of stream, and no more bytes before it.
async fn expect_eof(mut r: OwnedReadHalf) -> Result<()> {
    let mut buf = vec![0u8; 1024];
    match tokio::time::timeout(OP_TIMEOUT, r.read(&mut buf)).await {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(n)) => bail!("{n} unexpected bytes where the end of stream should be"),
        Ok(Err(e)) => bail!("waiting for the end of stream: {e}"),
        Err(_) => bail!("no end of stream within {}s", OP_TIMEOUT.as_secs()),
    }
}

/// mux closes (end of stream or reset) without a byte.
async fn expect_closed(mut r: OwnedReadHalf) -> Result<()> {
    let mut buf = vec![0u8; 1024];
    match tokio::time::timeout(CLOSE_TIMEOUT, r.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
        Ok(Ok(n)) => bail!(
            "mux answered {n} bytes to unroutable bytes: {:?}",
            String::from_utf8_lossy(&buf[..n.min(80)])
        ),
        Err(_) => bail!(
            "mux kept a connection with unroutable bytes open for {}s",
            CLOSE_TIMEOUT.as_secs()
        ),
    }
}

/// One keep-alive HTTP/1.1 connection, client side.
struct Http {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
    /// Read and not yet used.
    buf: Vec<u8>,
}

impl Http {
    async fn fill(&mut self) -> Result<()> {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = self.r.read(&mut chunk).await?;
        if n == 0 {
            bail!("end of stream");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads a response head; its status must be 200. Gives the Content-Length.
    async fn head(&mut self) -> Result<usize> {
        let end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            if self.buf.len() > 16 * 1024 {
                bail!("no end of the response head in 16 KiB");
            }
            self.fill()
                .await
                .with_context(|| format!("after {} bytes of a response head", self.buf.len()))?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        self.buf.drain(..end + 4);
        let status = head.lines().next().unwrap_or("");
        if !status.starts_with("http/1.1 200 ") {
            bail!("status `{status}`");
        }
        header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no Content-Length in `{}`", head.replace("\r\n", " | ")))
    }

    /// Reads `want.len()` body bytes and compares them.
    async fn body(&mut self, want: &[u8]) -> Result<()> {
        let mut at = 0;
        while at < want.len() {
            if self.buf.is_empty() {
                self.fill()
                    .await
                    .with_context(|| format!("after {at} of {} body bytes", want.len()))?;
            }
            let n = self.buf.len().min(want.len() - at);
            if let Some(i) = mismatch(&self.buf[..n], &want[at..at + n]) {
                bail!("wrong body byte at offset {} of {}", at + i, want.len());
            }
            self.buf.drain(..n);
            at += n;
        }
        Ok(())
    }

    async fn response(&mut self, want: &[u8]) -> Result<()> {
        let len = self.head().await?;
        if len != want.len() {
            bail!("Content-Length {len}, expected {}", want.len());
        }
        self.body(want).await
    }
}

/// A TLS 1.3-style ClientHello record naming `sni`: what mux's TLS probe reads (record and
/// handshake headers, SNI, ALPN), with a random `random` and session id.
pub fn client_hello(rng: &mut Rng, sni: &str) -> Vec<u8> {
    fn u16be(v: usize) -> [u8; 2] {
        (v as u16).to_be_bytes()
    }
    fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut e = kind.to_be_bytes().to_vec();
        e.extend(u16be(data.len()));
        e.extend_from_slice(data);
        e
    }
    let mut extensions = Vec::new();
    // server_name: a list of one host_name.
    let mut name = vec![0u8];
    name.extend(u16be(sni.len()));
    name.extend_from_slice(sni.as_bytes());
    let mut list = u16be(name.len()).to_vec();
    list.extend(name);
    extensions.extend(ext(0x0000, &list));
    // supported_groups: x25519, secp256r1.
    extensions.extend(ext(0x000a, &[0, 4, 0, 0x1d, 0, 0x17]));
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256.
    extensions.extend(ext(0x000d, &[0, 4, 4, 3, 8, 4]));
    // ALPN: h2, http/1.1.
    let protocols: &[&[u8]] = &[b"h2", b"http/1.1"];
    let mut alpn = Vec::new();
    for p in protocols {
        alpn.push(p.len() as u8);
        alpn.extend_from_slice(p);
    }
    let mut alpn_list = u16be(alpn.len()).to_vec();
    alpn_list.extend(alpn);
    extensions.extend(ext(0x0010, &alpn_list));
    // supported_versions: TLS 1.3, 1.2.
    extensions.extend(ext(0x002b, &[4, 3, 4, 3, 3]));
    // key_share: x25519 with a random key.
    let mut share = vec![0, 36, 0, 0x1d, 0, 32];
    share.extend(rng.bytes(32));
    extensions.extend(ext(0x0033, &share));

    let mut body = vec![3, 3];
    body.extend(rng.bytes(32));
    body.push(32);
    body.extend(rng.bytes(32));
    // Cipher suites: TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, ECDHE-RSA-AES128-GCM.
    body.extend([0, 6, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]);
    // Compression: null only.
    body.extend([1, 0]);
    body.extend(u16be(extensions.len()));
    body.extend(extensions);

    let mut handshake = vec![1];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend(u16be(handshake.len()));
    record.extend(handshake);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hello_lengths_add_up() {
        let h = client_hello(&mut Rng::new(3), SNI);
        assert_eq!(h[0], 0x16);
        let record_len = u16::from_be_bytes([h[3], h[4]]) as usize;
        assert_eq!(record_len, h.len() - 5);
        assert_eq!(h[5], 1, "a ClientHello");
        let hs_len = u32::from_be_bytes([0, h[6], h[7], h[8]]) as usize;
        assert_eq!(hs_len, h.len() - 9);
        assert!(find(&h, SNI.as_bytes()).is_some());
    }

    #[test]
    fn every_kind_gets_picked() {
        let mut rng = Rng::new(9);
        let mut seen = [0u32; Kind::ALL.len()];
        for _ in 0..10_000 {
            seen[Kind::pick(&mut rng) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 100), "{seen:?}");
    }
}
