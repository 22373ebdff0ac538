//! The kernel data path: for a backend on this host, once it sends in bulk,
//! the backend's sends go straight to the client socket (sock_ops + sk_msg,
//! see `crate::ebpf`), so the download direction skips one TCP hop and user
//! space entirely; the upload direction stays on splice(2), the fastest
//! bounded path measured for it (see the README).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use mux_common::BULK_SEND;

use crate::ebpf::{self, EbpfError, KernelPrograms, Pending, Withdrawn};

/// Published connections in a row that never sent in bulk after which
/// `auto` stops publishing a backend's connections: publishing and
/// withdrawing cost 8 bpf calls, which cut the rate of short connections by
/// 7-12% (see the README) and buy nothing for a connection that the kernel
/// never takes over.
const IDLE_RUN: u32 = 64;
/// Small deliveries (reads under 16 KiB) after which a connection whose
/// backend has not sent in bulk leaves the kernel path: until then each of
/// the backend's sends runs the sk_msg program, and its socket's sends go
/// through the sockmap's slower path, for nothing. That cost 5-7% of round
/// trips per second, and as much on their p99, with 64 connections.
const SMALL_DRAINS: u32 = 64;
/// Backends `auto` keeps track of; past that, new ones are always published.
const TRACKED_BACKENDS: usize = 4096;
/// How often (in bytes mux delivered) `auto` looks whether the kernel
/// still moves a connection's bytes: two bpf lookups each time.
const CHECK_EVERY: u64 = 16 << 20;
/// Bytes a connection may spill in a row, with the kernel moving none of
/// its bytes meanwhile, before it counts as stuck (see [`Lease::check`]).
/// A lone download spills hundreds of MB here before the kernel takes it
/// back, then runs well past splice: a stuck connection leaves only while
/// another one is stuck too.
const STUCK_AFTER: u64 = 64 << 20;

/// `auto`'s default for how many connections may send in bulk on the
/// kernel path at once: half the CPUs, at least one. One download on the
/// kernel path keeps two CPUs busy (the backend's sends, which carry the
/// client socket's TCP work, and the client's reads) and runs well past
/// splice (which waits on mux between the two). Past that the CPUs are the
/// limit, clients fall behind and connections spill through mux, each
/// send still taking the sockmap's path: on 2 CPUs, eight downloads at
/// once ran at 23.4 Gbit/s spliced against 18.9 through the kernel in a
/// full bench; two came out either way (see the README).
pub fn default_bulk_limit() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// How long a connection counted among those sending in bulk may go
/// without its client socket sending data before it gives up its place: a
/// download that ended on a connection kept open (HTTP keep-alive, an SSH
/// session after a copy) must not keep later ones off the kernel path.
const BULK_IDLE: Duration = Duration::from_secs(1);

/// A connection counted among those sending in bulk on the kernel path.
struct Slot {
    /// Its lease's `cookie`.
    lease: u64,
    /// Its client socket, open while the lease lives (the lease ends
    /// before the connection drops the socket, and takes its slot along).
    client_fd: RawFd,
    client_cookie: u64,
}

impl Slot {
    /// Whether the connection still sends: its client socket sent data
    /// within [`BULK_IDLE`].
    fn busy(&self) -> bool {
        // SAFETY: open for as long as the slot exists (see `client_fd`);
        // the cookie check below guards the assumption anyway.
        let fd = unsafe { BorrowedFd::borrow_raw(self.client_fd) };
        ebpf::socket_cookie(fd).ok() == Some(self.client_cookie)
            && last_data_sent(fd).is_some_and(|idle| idle < BULK_IDLE)
    }
}

/// How long ago `socket` last sent data (`TCP_INFO`'s
/// `tcpi_last_data_sent`); `None` if it cannot say.
fn last_data_sent(socket: BorrowedFd<'_>) -> Option<Duration> {
    // SAFETY: tcp_info is plain integers, valid when zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd, and a buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| Duration::from_millis(info.tcpi_last_data_sent.into()))
}

/// The loaded programs and what every connection needs from them.
pub struct Kernel {
    programs: KernelPrograms,
    /// Source of per-connection socket keys (two per connection: the
    /// client's in `MUX_CLIENT_SOCK`, the backend's in `MUX_SOCKS`).
    next_id: AtomicU64,
    /// `auto` only: what it learned of each backend, and whether the
    /// sock_ops program needs to stay attached. `None` (forced `ebpf`):
    /// every connection to a local backend is published, and the program
    /// stays attached.
    learned: Option<Mutex<Learned>>,
    /// `auto`: published connections stuck on the normal path right now.
    stuck: AtomicU32,
    /// `auto`: published connections sending in bulk right now, and how
    /// many may (see [`default_bulk_limit`]).
    slots: Mutex<Vec<Slot>>,
    bulk_limit: usize,
    /// Set when the process lost what client sockets need (see
    /// [`Kernel::after_privileges_dropped`]), or `auto` could not attach
    /// sock_ops again: nothing is published.
    off: AtomicBool,
}

/// What `auto` learned, and what depends on it.
#[derive(Default)]
struct Learned {
    backends: HashMap<SocketAddr, Habit>,
    /// Publications not withdrawn yet. While there is one, the sock_ops
    /// program stays attached: its client's ACKs bound what the kernel
    /// hands it.
    live: usize,
    /// After `--user` the program could not be attached again: it stays.
    keep_attached: bool,
}

impl Learned {
    /// Whether a later connection may be published, so that the sock_ops
    /// program must stay attached for it: while no backend is known yet,
    /// while one on this host is published, and past [`TRACKED_BACKENDS`].
    fn may_publish(&self) -> bool {
        self.backends.is_empty()
            || self.backends.len() >= TRACKED_BACKENDS
            || self.backends.values().any(|h| !h.skipping && !h.remote)
    }

    /// What is known of `backend`, made known if there is room for it
    /// (past [`TRACKED_BACKENDS`], new backends are not followed).
    fn habit(&mut self, backend: SocketAddr) -> Option<&mut Habit> {
        if self.backends.len() >= TRACKED_BACKENDS && !self.backends.contains_key(&backend) {
            return None;
        }
        Some(self.backends.entry(backend).or_default())
    }
}

/// What `auto` learned of one backend.
#[derive(Default)]
struct Habit {
    /// Published connections in a row that ended without the backend
    /// sending in bulk.
    idle_run: u32,
    /// Connections are dialed plainly (and spliced) until one of them sees
    /// the backend send in bulk.
    skipping: bool,
    /// Never published: not an address of this host (or unspecified).
    remote: bool,
}

/// What `dial` does with a connection, as far as `auto` learned.
enum Plan {
    /// A plain connection: a backend on another host.
    Plain,
    /// A plain connection that tells `auto` if the backend sends in bulk.
    Watch,
    /// Published if the backend is on this host.
    Publish,
}

/// One publication counted in [`Learned::live`]; dropping it uncounts it.
struct Hold {
    kernel: Arc<Kernel>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.kernel.release();
    }
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("programs", &self.programs)
            .finish_non_exhaustive()
    }
}

/// One connection published to the kernel. Withdrawn (every map entry
/// removed) when dropped, however the connection ended.
pub struct Lease {
    kernel: Arc<Kernel>,
    /// The outgoing socket's cookie: its `MUX_PENDING` key.
    cookie: u64,
    client_cookie: u64,
    backend: SocketAddr,
    /// mux reported a delivery, so the kernel path was opened.
    opened: AtomicBool,
    /// Small deliveries so far, while not opened.
    small: AtomicU32,
    /// Withdrawn early: the connection went on without the kernel.
    released: AtomicBool,
    /// `auto`: the client socket, for its slot in `Kernel::slots`.
    client_fd: RawFd,
    /// `auto`: given a slot in `Kernel::slots` (it may have lost it since,
    /// idle).
    admitted: AtomicBool,
    /// `auto`: whether the kernel still takes the connection's bytes.
    progress: Mutex<Progress>,
    /// `auto`: keeps the sock_ops program attached until the withdrawal.
    hold: Mutex<Option<Hold>>,
}

/// What `auto` follows of a published connection that sends in bulk.
#[derive(Default)]
struct Progress {
    /// Delivered total at which to look again.
    next_check: u64,
    /// Bytes the kernel had moved when last looked at.
    kernel_moved: u64,
    /// Delivered total when the kernel was last seen moving bytes.
    since: u64,
    /// Counted in `Kernel::stuck`.
    stuck: bool,
    /// What the kernel had done when the connection left it while stuck.
    left: Option<Withdrawn>,
}

/// A connection to a local backend that `auto` did not publish: it tells
/// `auto` when the backend sends in bulk, so that the next connections are
/// published again.
pub struct Watch {
    kernel: Arc<Kernel>,
    backend: SocketAddr,
    told: AtomicBool,
}

/// What the kernel path keeps for one dialed connection.
pub enum Tracking {
    /// Published: the kernel may take the backend's sends over.
    Lease(Lease),
    /// Not published because `auto` learned that this backend's
    /// connections do not send in bulk.
    Watch(Watch),
}

impl Kernel {
    /// Loads and attaches the programs (root, or CAP_BPF + CAP_NET_ADMIN +
    /// CAP_PERFMON).
    /// `learn`: stop publishing the connections of a backend that does
    /// not send in bulk, and splice those past `bulk_limit` that do
    /// (`auto`), rather than always publish (`ebpf`).
    pub fn load(learn: bool, bulk_limit: usize) -> Result<Kernel, EbpfError> {
        // Every client socket will need this; a process that cannot have it
        // cannot use the kernel path at all, so say so now, once.
        probe_send_buffer()?;
        Ok(Kernel {
            programs: KernelPrograms::load()?,
            next_id: AtomicU64::new(0),
            learned: learn.then(|| Mutex::new(Learned::default())),
            stuck: AtomicU32::new(0),
            slots: Mutex::new(Vec::new()),
            bulk_limit,
            off: AtomicBool::new(false),
        })
    }

    /// What `auto` learned; `None` for forced `ebpf`.
    fn learned(&self) -> Option<MutexGuard<'_, Learned>> {
        let learned = self.learned.as_ref()?;
        Some(learned.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// After `--user` dropped root: client send buffers can then be fixed
    /// only as large as `net.core.wmem_max` allows (forcing them needs
    /// `CAP_NET_ADMIN`). When that leaves the window no room, every later
    /// connection would fail to publish with its own log line. `auto`
    /// splices them all instead, saying so once; forced `ebpf` fails, as
    /// it does when the programs cannot load.
    pub fn after_privileges_dropped(&self) -> Result<(), EbpfError> {
        if let Some(mut learned) = self.learned() {
            learned.keep_attached = true;
        }
        match probe_send_buffer() {
            Err(e) if self.learned.is_some() => {
                self.off.store(true, Ordering::Relaxed);
                log::warn!(
                    "kernel path: off since dropping privileges ({e:#}); splicing every connection"
                );
                Ok(())
            }
            other => other,
        }
    }

    /// What to do with a connection to `backend`, as far as `auto` knows
    /// (whether it is on this host is found out by `dial`).
    fn plan(&self, backend: SocketAddr) -> Plan {
        let Some(learned) = self.learned() else {
            return Plan::Publish;
        };
        match learned.backends.get(&backend) {
            Some(habit) if habit.skipping => Plan::Watch,
            Some(habit) if habit.remote => Plan::Plain,
            _ => Plan::Publish,
        }
    }

    /// Counts a publication to `backend`, a backend on this host, and
    /// attaches the sock_ops program first if it is off (see
    /// [`Kernel::release`]). `Ok(None)` for forced `ebpf`, which keeps the
    /// program attached and counts nothing; `Err` if the program cannot be
    /// attached again, which turns the kernel path off.
    fn hold(self: &Arc<Self>, backend: SocketAddr) -> Result<Option<Hold>, ()> {
        let Some(mut learned) = self.learned() else {
            return Ok(None);
        };
        match self.programs.attach_sock_ops() {
            Ok(false) => {}
            Ok(true) => {
                log::info!("kernel path: sock_ops attached again for connections to {backend}")
            }
            Err(e) => {
                // Not worth a line per connection: nothing would change.
                self.off.store(true, Ordering::Relaxed);
                log::warn!(
                    "kernel path: off, sock_ops cannot be attached again ({e:#}); splicing every connection"
                );
                return Err(());
            }
        }
        // Known from now on, so that the program stays attached for it.
        learned.habit(backend);
        learned.live += 1;
        Ok(Some(Hold {
            kernel: self.clone(),
        }))
    }

    /// A publication was withdrawn (or never made).
    fn release(&self) {
        let Some(mut learned) = self.learned() else {
            return;
        };
        learned.live -= 1;
        self.settle(&mut learned);
    }

    /// When no publication is left and no later connection may be
    /// published, takes the sock_ops program off the cgroup: attached, the
    /// kernel runs it at every TCP socket event on the machine, 19 per
    /// proxied connection (4 sockets), 3.6 us of it per connection by
    /// `kernel.bpf_stats_enabled`, for every process's connections, whether
    /// mux publishes them or not.
    fn settle(&self, learned: &mut Learned) {
        if learned.live == 0
            && !learned.keep_attached
            && !learned.may_publish()
            && self.programs.detach_sock_ops()
        {
            log::info!(
                "kernel path: every backend dialed is spliced or on another host; sock_ops detached until one sends in bulk"
            );
        }
    }

    /// `backend` is not an address of this host (or is unspecified): its
    /// connections are dialed plainly from now on.
    fn remote(&self, backend: SocketAddr) {
        let Some(mut learned) = self.learned() else {
            return;
        };
        if let Some(habit) = learned.habit(backend) {
            habit.remote = true;
            self.settle(&mut learned);
        }
    }

    /// A published connection to `backend` ended; `opened` says whether
    /// the backend sent in bulk.
    fn ended(&self, backend: SocketAddr, opened: bool) {
        let Some(mut learned) = self.learned() else {
            return;
        };
        if opened {
            if let Some(habit) = learned.backends.get_mut(&backend) {
                habit.idle_run = 0;
            }
            return;
        }
        let Some(habit) = learned.habit(backend) else {
            return;
        };
        habit.idle_run += 1;
        if habit.idle_run >= IDLE_RUN && !habit.skipping {
            habit.skipping = true;
            log::info!(
                "kernel path: the last {IDLE_RUN} connections to {backend} never sent in bulk; splicing its connections until one does"
            );
        }
    }

    /// An unpublished connection saw `backend` send in bulk.
    fn sends_in_bulk(&self, backend: SocketAddr) {
        let Some(mut learned) = self.learned() else {
            return;
        };
        if let Some(habit) = learned.backends.get_mut(&backend)
            && habit.skipping
        {
            *habit = Habit::default();
            log::info!(
                "kernel path: {backend} sends in bulk; its next connections go through the kernel"
            );
        }
    }

    pub fn programs(&self) -> &KernelPrograms {
        &self.programs
    }

    /// Connects to `addr` for `client`, as `dial` says. When `addr` is an
    /// address of this host, the connection is published first so that the
    /// kernel moves the backend's bytes; otherwise (another host, or
    /// publishing refused) it is a plain connection and the caller splices
    /// it.
    pub async fn dial(
        self: &Arc<Self>,
        client: &TcpStream,
        addr: SocketAddr,
        dial: &super::Dial,
    ) -> io::Result<(TcpStream, Option<Tracking>)> {
        let (socket, from_client) = dial.socket(addr)?;
        if self.off.load(Ordering::Relaxed) {
            return Ok((socket.connect(addr).await?, None));
        }
        match self.plan(addr) {
            Plan::Plain => return Ok((socket.connect(addr).await?, None)),
            Plan::Watch => {
                let watch = Watch {
                    kernel: self.clone(),
                    backend: addr,
                    told: AtomicBool::new(false),
                };
                return Ok((socket.connect(addr).await?, Some(Tracking::Watch(watch))));
            }
            Plan::Publish => {}
        }
        // A socket bound to the client's address reaches a loopback backend
        // (nothing else can be transparent): local.
        if !from_client && (addr.ip().is_unspecified() || !bind_if_local(&socket, addr)?) {
            self.remote(addr);
            return Ok((socket.connect(addr).await?, None));
        }
        let Ok(hold) = self.hold(addr) else {
            return Ok((socket.connect(addr).await?, None));
        };
        let lease = match self.publish(client, &socket, addr, hold) {
            Ok(lease) => Some(Tracking::Lease(lease)),
            Err(e) => {
                // Expected now and then: a client that already sent its FIN
                // is past ESTABLISHED, which a sockmap refuses.
                log::info!(
                    "kernel path not used for this connection to {addr} ({e:#}); splicing it in user space"
                );
                None
            }
        };
        // On failure the lease drops here and takes its entries with it.
        let stream = socket.connect(addr).await?;
        Ok((stream, lease))
    }

    /// Puts the client socket in `MUX_CLIENT_SOCK` and the outgoing socket in
    /// `MUX_PENDING`. The client socket must be there before the backend
    /// can send: a send that found no client socket would take the normal
    /// path and could be overtaken by later, redirected ones.
    fn publish(
        self: &Arc<Self>,
        client: &TcpStream,
        outgoing: &TcpSocket,
        backend: SocketAddr,
        hold: Option<Hold>,
    ) -> Result<Lease, EbpfError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (client_key, backend_key) = (2 * id, 2 * id + 1);
        let cookie = ebpf::socket_cookie(outgoing)?;
        let client_cookie = ebpf::socket_cookie(client)?;
        ebpf::fix_send_buffer(client)?;
        self.programs.insert_client_socket(client_key, client)?;
        // From here on the lease owns the entries, including on error.
        let lease = Lease {
            kernel: self.clone(),
            cookie,
            client_cookie,
            backend,
            opened: AtomicBool::new(false),
            small: AtomicU32::new(0),
            released: AtomicBool::new(false),
            client_fd: client.as_raw_fd(),
            admitted: AtomicBool::new(false),
            progress: Mutex::new(Progress::default()),
            hold: Mutex::new(hold),
        };
        self.programs
            .publish(cookie, Pending::new(backend_key, client_key, client_cookie))?;
        Ok(lease)
    }

    /// Registers a listening port so the kernel follows what its clients
    /// acknowledge (see `KernelPrograms::listen`).
    pub fn listen(&self, listener: &std::net::TcpListener) -> Result<(), EbpfError> {
        let port = listener
            .local_addr()
            .map_err(|e| EbpfError::Socket {
                what: "getsockname",
                source: e,
            })?
            .port();
        self.programs.listen(ebpf::netns_cookie(listener)?, port)
    }
}

/// Whether this process can give a client socket the send buffer the
/// kernel path needs, tried on a socket of its own.
fn probe_send_buffer() -> Result<(), EbpfError> {
    let probe = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .map_err(|e| EbpfError::Socket {
        what: "socket()",
        source: e.into(),
    })?;
    ebpf::fix_send_buffer(&probe)
}

/// Binds `socket` to `addr`'s IP when it is one of this host's, deferring
/// the port to `connect` (`IP_BIND_ADDRESS_NO_PORT`) so that ports are
/// shared by 4-tuple as for any outgoing connection. Returns whether the
/// address is local.
fn bind_if_local(socket: &TcpSocket, addr: SocketAddr) -> io::Result<bool> {
    super::bind_address_no_port(socket)?;
    match socket.bind(SocketAddr::new(addr.ip(), 0)) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(e) => Err(e),
    }
}

impl Lease {
    /// Tells the kernel how many bytes mux itself has written to the client
    /// in all (the backend's sends that went the normal way), so that it
    /// can resume redirecting once they are all out. Returns how far the
    /// client had acknowledged, as the kernel last saw it.
    fn delivered(&self, total: u64) -> Option<u64> {
        self.opened.store(true, Ordering::Relaxed);
        self.kernel
            .programs
            .delivered(self.client_cookie, total)
            .inspect_err(|e| log::debug!("kernel path: updating delivered bytes: {e:#}"))
            .ok()
    }

    /// mux gave the client bytes of the backend's, `total` in all; `bulk`
    /// says whether they have come in bulk. The first bulk delivery opens
    /// the kernel path; before that, `SMALL_DRAINS` small ones take the
    /// connection off it for good.
    pub fn drained(&self, total: u64, bulk: bool) {
        if self.released.load(Ordering::Relaxed) {
            return;
        }
        if bulk {
            if !self.admit() {
                return;
            }
            let acked = self.delivered(total);
            if self.kernel.learned.is_some() {
                self.check(total, acked);
            }
        } else if self.small.fetch_add(1, Ordering::Relaxed) + 1 == SMALL_DRAINS {
            self.released.store(true, Ordering::Relaxed);
            self.kernel.ended(self.backend, false);
            // Every byte so far went through mux, and so will the rest: the
            // entries can go while the connection lasts.
            let _ = self.withdraw();
        }
    }

    /// `auto`, at the first bulk delivery: counts the connection among
    /// those sending in bulk on the kernel path, or takes it off the path
    /// for good when its backend sends in small pieces (see
    /// [`Lease::small_sends`]) or when as many as `Kernel::bulk_limit`
    /// already send in bulk there (see [`default_bulk_limit`]; those idle
    /// for [`BULK_IDLE`] no longer count). Whether it stays on.
    fn admit(&self) -> bool {
        if self.kernel.learned.is_none() || self.admitted.load(Ordering::Relaxed) {
            return true;
        }
        let why = match self.small_sends() {
            Some(why) => why,
            None => match self.take_slot() {
                Ok(()) => return true,
                Err(others) => format!(
                    "{others} others already send in bulk through it, as many as max_kernel_bulk allows"
                ),
            },
        };
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        self.leave(&mut p);
        log::info!(
            "kernel path: a connection to {} left it: {why}; splicing it from now on",
            self.backend
        );
        false
    }

    /// Takes one of `Kernel::slots`, after freeing those of connections
    /// that stopped sending if none is free; `Err` with how many others
    /// hold them all.
    fn take_slot(&self) -> Result<(), usize> {
        let mut slots = self.kernel.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.len() >= self.kernel.bulk_limit {
            slots.retain(Slot::busy);
        }
        if slots.len() >= self.kernel.bulk_limit {
            return Err(slots.len());
        }
        slots.push(Slot {
            lease: self.cookie,
            client_fd: self.client_fd,
            client_cookie: self.client_cookie,
        });
        self.admitted.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Why the backend's sends are too small for the kernel path, if they
    /// are: less than half of its bytes so far came in sends of
    /// [`BULK_SEND`] or more (one lookup of the sk_msg program's counts).
    fn small_sends(&self) -> Option<String> {
        let capture = match self.kernel.programs.capture(self.cookie) {
            Ok(capture) => capture?,
            Err(e) => {
                log::debug!("kernel path: reading send sizes: {e:#}");
                return None;
            }
        };
        let small = capture.sent_bytes.saturating_sub(capture.bulk_send_bytes);
        (small > capture.bulk_send_bytes).then(|| {
            format!(
                "its backend sent {small} of {} bytes in pieces under {} KiB, which splice moves faster",
                capture.sent_bytes,
                BULK_SEND >> 10
            )
        })
    }

    /// Gives up its slot in `Kernel::slots`, if it has one.
    fn uncount(&self) {
        if self.admitted.swap(false, Ordering::Relaxed) {
            let mut slots = self.kernel.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.retain(|slot| slot.lease != self.cookie);
        }
    }

    /// `auto`, after a bulk delivery: a connection the kernel has not
    /// taken back for [`STUCK_AFTER`] bytes, while another one is stuck
    /// too, leaves the kernel path. On a busy machine a backend that writes
    /// without pause seldom lets mux catch up, which is the only moment the
    /// kernel can take a connection back; until then each of its sends
    /// goes through the sockmap's slower path for nothing (eight such
    /// downloads ran 8% below splice here; withdrawn, they run as fast).
    ///
    /// A connection whose client's ACKs the kernel does not follow leaves
    /// at once (`acked` is what the kernel saw of them).
    fn check(&self, total: u64, acked: Option<u64>) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if total < p.next_check {
            return;
        }
        // The first check comes with the delivery that opened the kernel
        // path: the client may not have acknowledged anything yet.
        let first = p.next_check == 0;
        p.next_check = total + CHECK_EVERY;
        let moved = match self.kernel.programs.moved(self.cookie) {
            Ok(Some(moved)) => moved,
            Ok(None) => return,
            Err(e) => {
                log::debug!("kernel path: reading moved bytes: {e:#}");
                return;
            }
        };
        if !first && moved > 0 && acked == Some(0) {
            // The client completed its handshake while the sock_ops
            // program was off (see `Kernel::release`), so it has no ACK
            // callbacks: to the kernel it never acknowledges, and once its
            // window is full every send spills for good. mux delivered
            // `CHECK_EVERY` bytes since the kernel took some: a followed
            // client would have acknowledged by now.
            self.leave(&mut p);
            log::info!(
                "kernel path: a connection to {} left it: its client connected while the kernel path was idle, so the kernel does not see its ACKs; splicing it from now on",
                self.backend
            );
            return;
        }
        if moved > p.kernel_moved {
            p.kernel_moved = moved;
            p.since = total;
            if std::mem::take(&mut p.stuck) {
                self.kernel.stuck.fetch_sub(1, Ordering::Relaxed);
            }
            return;
        }
        if !p.stuck && total - p.since >= STUCK_AFTER {
            p.stuck = true;
            self.kernel.stuck.fetch_add(1, Ordering::Relaxed);
        }
        if p.stuck && self.kernel.stuck.load(Ordering::Relaxed) >= 2 {
            p.stuck = false;
            self.kernel.stuck.fetch_sub(1, Ordering::Relaxed);
            self.leave(&mut p);
            log::info!(
                "kernel path: a connection to {} left it after {} bytes went through mux in a row while others were stuck too; splicing it from now on",
                self.backend,
                total - p.since
            );
        }
    }

    /// Takes a connection that sends in bulk off the kernel path for the
    /// rest of its life.
    fn leave(&self, p: &mut Progress) {
        self.released.store(true, Ordering::Relaxed);
        self.uncount();
        // `finish` skips a released lease: what auto learns of the
        // backend (it sends in bulk) is said here.
        self.kernel.ended(self.backend, true);
        p.left = self.withdraw();
    }

    /// Leaves `Kernel::stuck` (and `Kernel::slots`) if counted there.
    fn unstick(&self) {
        self.uncount();
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::take(&mut p.stuck) {
            self.kernel.stuck.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Ends the publication now and says what the kernel did (nothing, for
    /// a connection that left the kernel path before bulk).
    pub fn finish(self) -> Withdrawn {
        self.unstick();
        if self.released.load(Ordering::Relaxed) {
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            return p.left.take().unwrap_or_default();
        }
        let withdrawn = self.take_entries().unwrap_or_default();
        // A backend whose first send was bulk went to the kernel at once
        // (`mux_common::OPEN_SEND`): mux saw none of it, but it did send
        // in bulk. Said before the hold goes, whose release settles what
        // `auto` keeps attached.
        let bulk = self.opened.load(Ordering::Relaxed) || withdrawn.down_bytes > 0;
        self.kernel.ended(self.backend, bulk);
        self.release_hold();
        withdrawn
    }

    fn withdraw(&self) -> Option<Withdrawn> {
        let withdrawn = self.take_entries();
        self.release_hold();
        withdrawn
    }

    /// Deletes the connection's map entries, saying what the kernel did.
    fn take_entries(&self) -> Option<Withdrawn> {
        match self.kernel.programs.withdraw(self.cookie) {
            Ok(w) => w,
            Err(e) => {
                log::error!(
                    "kernel path: cleaning up connection {:#x}: {e:#}",
                    self.cookie
                );
                None
            }
        }
    }

    /// Nothing of the connection is left in the kernel's maps: the sock_ops
    /// program may come off (see `Kernel::release`).
    fn release_hold(&self) {
        drop(self.hold.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.unstick();
        // Idempotent: after `finish` the entry is gone and this finds nothing.
        let _ = self.withdraw();
    }
}

impl Watch {
    /// The backend sends in bulk (called after each delivery from then on).
    pub fn sends_in_bulk(&self) {
        if !self.told.swap(true, Ordering::Relaxed) {
            self.kernel.sends_in_bulk(self.backend);
        }
    }
}
