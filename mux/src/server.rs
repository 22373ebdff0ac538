//! Listening sockets and the accept loops: binds every `listen` address, then
//! hands each accepted client to its own task.
//!
//! One worker per CPU, each a single-threaded runtime with its own sockets
//! on the listen addresses (SO_REUSEPORT): the kernel spreads connections
//! across the workers, and a connection's tasks (its relay, its HTTP
//! exchanges and their backend connections) never hop threads. On this
//! 2-core machine that served 25% more HTTP requests per second than one
//! work-stealing runtime, which woke threads for every request.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio::net::TcpListener;

use tokio::sync::mpsc;

use crate::admin::ReloadRequest;
use crate::balance::{Balance, Handoff, Slot};
use crate::config::{Config, Keepalive};
use crate::connection::{self, Shared};
use crate::datapath::{DataPath, keep_alive};
use crate::metrics::ResultLabels;
use crate::takeover::{Active, Takeover, TakeoverError};

/// The configuration in force: each accepted connection takes the snapshot
/// current when it arrives and keeps it to its end, so a reload never
/// changes a connection under way.
pub struct Live {
    shared: RwLock<Arc<Shared>>,
}

impl Live {
    pub fn new(shared: Shared) -> Live {
        Live {
            shared: RwLock::new(Arc::new(shared)),
        }
    }

    pub fn current(&self) -> Arc<Shared> {
        self.shared
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn replace(&self, shared: Arc<Shared>) {
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = shared;
    }
}

/// One listen address, bound once per worker.
struct Bound {
    /// The `listen` entry it came from: a reload keeps what its new list
    /// still names (a `:0` entry keeps the port it got) and closes the rest.
    spec: String,
    addr: SocketAddr,
    /// Worker `w`'s socket is `sockets[w]`; mux keeps these (the workers
    /// accept on duplicates) for takeovers and to close the port when a
    /// reload drops it.
    sockets: Vec<std::net::TcpListener>,
}

/// Listeners bound and ready; nothing accepted yet. Splitting bind from serve
/// lets the caller take ports over and drop privileges in between, as sslh
/// does.
pub struct Server {
    live: Arc<Live>,
    workers: usize,
    bound: Vec<Bound>,
    takeover: Option<(Takeover, Active)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("listen address {addr}: cannot resolve")]
    Resolve { addr: String, source: io::Error },
    #[error("listen address {addr}: resolves to no address")]
    Empty { addr: String },
    #[error("cannot listen on {addr}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("listening on {addr}: registering the port with the kernel path")]
    Kernel {
        addr: SocketAddr,
        source: crate::ebpf::EbpfError,
    },
}

/// What the caller drives a running server with.
pub struct Control {
    /// Completes when mux should stop (SIGTERM, SIGINT).
    pub shutdown: Pin<Box<dyn Future<Output = ()>>>,
    /// Reloads asked for (SIGHUP, `POST /reload`); each gets its answer.
    pub reloads: mpsc::Receiver<ReloadRequest>,
    /// Reads the configuration again, as at start.
    pub load: Box<dyn Fn() -> anyhow::Result<Config>>,
}

/// What a worker is told by the server.
enum Order {
    Accept(SocketAddr, std::net::TcpListener),
    Close(SocketAddr),
    StopAccepting,
}

impl Server {
    pub async fn bind(shared: Shared) -> Result<Server, BindError> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let bound = bind_all(
            &shared.config.listen,
            workers,
            &shared.datapath,
            shared.config.tcp_keepalive,
        )
        .await?;
        Ok(Server {
            live: Arc::new(Live::new(shared)),
            workers,
            bound,
            takeover: None,
        })
    }

    /// One socket per listen address (the first worker's), for taking ports
    /// over to them; the kernel spreads what they get across the workers.
    pub fn listeners(&self) -> Vec<&std::net::TcpListener> {
        self.bound.iter().map(|b| &b.sockets[0]).collect()
    }

    /// The bound addresses (with the real port when the config asked for 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound.iter().map(|b| b.addr).collect()
    }

    /// Takes the configured ports over to this server's listeners; the
    /// takeover lasts until mux stops (it is released first) or a reload
    /// changes it.
    pub fn take_over(&mut self) -> Result<Option<&'static str>, TakeoverError> {
        let Some(wanted) = self.live.current().config.takeover.clone() else {
            self.takeover = None;
            return Ok(None);
        };
        let sockets: Vec<std::net::TcpListener> = self
            .listeners()
            .iter()
            .filter_map(|l| l.try_clone().ok())
            .collect();
        let active = Active::start(&wanted, &sockets)?;
        let described = active.describe();
        // The new one is in force before the old one goes: no gap.
        self.takeover = Some((wanted, active));
        Ok(Some(described))
    }

    /// Accepts until `control.shutdown` completes, applying reloads; then
    /// releases the takeover, stops accepting and lets live connections
    /// finish for up to `drain_timeout`. The first worker runs on the
    /// calling runtime, the others on threads of their own.
    pub async fn serve(mut self, mut control: Control) {
        let (exit, exiting) = tokio::sync::watch::channel(false);
        let mut orders = Vec::new();
        let mut threads = Vec::new();
        let (balance, handoffs) = Balance::new(self.workers);
        let cpus = match crate::sched::cpus_for_workers(self.workers) {
            Ok(cpus) => cpus,
            Err(e) => {
                log::debug!("cannot read the CPUs mux may use: {e}");
                None
            }
        };
        for (w, handoffs) in handoffs.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            for b in &self.bound {
                if let Ok(dup) = b.sockets[w].try_clone() {
                    let _ = tx.send(Order::Accept(b.addr, dup));
                }
            }
            orders.push(tx);
            let (live, exiting) = (self.live.clone(), exiting.clone());
            let me = Worker {
                index: w,
                cpu: cpus.as_ref().and_then(|cpus| cpus.get(w).copied()),
                balance: balance.clone(),
                live,
            };
            if w == 0 {
                tokio::spawn(worker(me, rx, handoffs, exiting));
                crate::metrics::get().add_runtime(tokio::runtime::Handle::current());
                continue;
            }
            let thread = std::thread::Builder::new()
                .name(format!("mux-worker-{w}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .on_thread_start(crate::sched::unpin)
                        .build()
                    {
                        Ok(runtime) => {
                            crate::metrics::get().add_runtime(runtime.handle().clone());
                            runtime.block_on(worker(me, rx, handoffs, exiting))
                        }
                        Err(e) => log::error!("worker {w}: cannot start a runtime: {e}"),
                    }
                });
            match thread {
                Ok(t) => threads.push(t),
                // Its sockets close with its duplicates: the kernel then
                // spreads connections over the remaining workers.
                Err(e) => log::error!("cannot start worker thread {w}: {e}"),
            }
        }

        loop {
            tokio::select! {
                () = &mut control.shutdown => break,
                Some(request) = control.reloads.recv() => {
                    let result = match (control.load)() {
                        Ok(config) => self.reload(config, &orders).await,
                        Err(e) => Err(format!("{e:#}")),
                    };
                    let metrics = crate::metrics::get();
                    match &result {
                        Ok(done) => {
                            metrics.reloads.get_or_create(&ResultLabels { result: "ok" }).inc();
                            log::info!("reload: {done}");
                        }
                        Err(why) => {
                            metrics.reloads.get_or_create(&ResultLabels { result: "error" }).inc();
                            log::error!("reload refused, the running configuration stays: {why}");
                        }
                    }
                    let _ = request.send(result);
                }
            }
        }

        // sshd gets its port back before anything else happens.
        if let Some((_, active)) = self.takeover.take() {
            drop(active);
            log::info!("takeover released");
        }
        for tx in &orders {
            let _ = tx.send(Order::StopAccepting);
        }
        self.bound.clear();
        let limit = self.live.current().config.drain_timeout;
        let open = crate::limits::open();
        if open > 0 {
            log::info!(
                "stopped accepting; letting {open} connection(s) finish, for up to {limit:?}"
            );
            let deadline = tokio::time::Instant::now() + limit;
            while crate::limits::open() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match crate::limits::open() {
                0 => log::info!("all connections finished"),
                n => log::info!("drain_timeout reached: closing {n} connection(s)"),
            }
        }
        let _ = exit.send(true);
        // Each worker drops its runtime, and with it its connections.
        let _ =
            tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join())))
                .await;
    }

    /// Swaps in `config`: routes, targets, backends, timeouts and limits for
    /// new connections; listeners and takeover ports added or dropped.
    /// Connections under way keep the configuration they started with.
    /// On any error nothing changes.
    async fn reload(
        &mut self,
        config: Config,
        orders: &[mpsc::UnboundedSender<Order>],
    ) -> Result<String, String> {
        let old = self.live.current();
        if config.datapath != old.config.datapath {
            log::warn!(
                "reload: datapath {} -> {} takes a restart; keeping {}",
                old.config.datapath.name(),
                config.datapath.name(),
                old.config.datapath.name()
            );
        }
        if config.max_kernel_bulk != old.config.max_kernel_bulk {
            log::warn!("reload: a new max_kernel_bulk takes a restart; keeping the old one");
        }
        // Before anything changes: a transparent route that cannot work
        // (no capability left after --user, no rule and no right to add
        // one) refuses the reload.
        let transparent = config.transparent_ports();
        if !transparent.is_empty() {
            let routed = crate::transparent::probe()
                .and_then(|()| crate::transparent::route_answers(&transparent))
                .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
            if transparent != old.config.transparent_ports() {
                log::info!("reload: {routed}");
            }
        }
        let new_specs: Vec<String> = config
            .listen
            .iter()
            .filter(|spec| !self.bound.iter().any(|b| &b.spec == *spec))
            .cloned()
            .collect();
        let added = bind_all(
            &new_specs,
            self.workers,
            &old.datapath,
            config.tcp_keepalive,
        )
        .await
        .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
        let removed: Vec<SocketAddr> = self
            .bound
            .iter()
            .filter(|b| !config.listen.contains(&b.spec))
            .map(|b| b.addr)
            .collect();

        let new = Arc::new(old.reloaded(config));
        let takeover_changed =
            new.config.takeover != old.config.takeover || !added.is_empty() || !removed.is_empty();

        // Apply: new listeners first, then the configuration, then drop
        // what went away.
        let added_addrs: Vec<SocketAddr> = added.iter().map(|b| b.addr).collect();
        for b in &added {
            for (w, tx) in orders.iter().enumerate() {
                if let Ok(dup) = b.sockets[w].try_clone() {
                    let _ = tx.send(Order::Accept(b.addr, dup));
                }
            }
        }
        let keepalive = new.config.tcp_keepalive;
        let keepalive_changed = keepalive != old.config.tcp_keepalive;
        if keepalive_changed {
            // On the listening sockets, for the connections they accept
            // from now on (the ones just added have it already).
            for socket in self.bound.iter().flat_map(|b| &b.sockets) {
                if let Err(e) = keep_alive(socket, keepalive) {
                    log::warn!("reload: cannot set tcp_keepalive on a listening socket: {e}");
                }
            }
        }
        self.bound.extend(added);
        self.live.replace(new.clone());
        for addr in &removed {
            for tx in orders {
                let _ = tx.send(Order::Close(*addr));
            }
        }
        self.bound.retain(|b| !removed.contains(&b.addr));

        let mut done = format!("{} route(s)", new.config.router.routes().len());
        if !new.config.targets.is_empty() {
            done.push_str(&format!(
                ", {} target(s)",
                new.config.targets.iter().count()
            ));
        }
        for a in &added_addrs {
            done.push_str(&format!(", now listening on {a}"));
        }
        for a in &removed {
            done.push_str(&format!(", no longer listening on {a}"));
        }
        if keepalive_changed {
            done.push_str(&format!(", tcp keepalive {}", keepalive.describe()));
        }
        if takeover_changed {
            match self.take_over() {
                Ok(Some(how)) => done.push_str(&format!(", takeover via {how}")),
                Ok(None) if old.config.takeover.is_some() => done.push_str(", takeover released"),
                Ok(None) => {}
                Err(e) => {
                    // Routes are in force already; say plainly what is not.
                    let why = format!("{:#}", anyhow::Error::from(e));
                    log::error!("reload: takeover could not be set up again: {why}");
                    done.push_str(&format!(", takeover FAILED: {why}"));
                }
            }
        }
        Ok(done)
    }
}

/// Each listen entry's addresses, with the entry they came from.
async fn resolve_all(listen: &[String]) -> Result<Vec<(String, SocketAddr)>, BindError> {
    let mut all = Vec::new();
    for addr in listen {
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host(addr.as_str())
            .await
            .map_err(|source| BindError::Resolve {
                addr: addr.clone(),
                source,
            })?
            .collect();
        if resolved.is_empty() {
            return Err(BindError::Empty { addr: addr.clone() });
        }
        all.extend(resolved.into_iter().map(|a| (addr.clone(), a)));
    }
    Ok(all)
}

/// Binds every address of `listen`, once per worker.
async fn bind_all(
    listen: &[String],
    workers: usize,
    datapath: &DataPath,
    keepalive: Keepalive,
) -> Result<Vec<Bound>, BindError> {
    let mut bound = Vec::new();
    for (spec, a) in resolve_all(listen).await? {
        let bind_error = |source| BindError::Bind { addr: a, source };
        let first = listen_on(a, keepalive).map_err(bind_error)?;
        // Port 0 asked for any port: the other workers take the same.
        let a = SocketAddr::new(a.ip(), first.local_addr().map_err(bind_error)?.port());
        if let DataPath::Kernel(kernel) = datapath {
            kernel
                .listen(&first)
                .map_err(|source| BindError::Kernel { addr: a, source })?;
        }
        let mut sockets = vec![first];
        for _ in 1..workers {
            sockets.push(
                listen_on(a, keepalive).map_err(|source| BindError::Bind { addr: a, source })?,
            );
        }
        bound.push(Bound {
            spec,
            addr: a,
            sockets,
        });
    }
    Ok(bound)
}

/// What a worker serves with.
#[derive(Clone)]
struct Worker {
    index: usize,
    /// The CPU it keeps to, when there is one per worker.
    cpu: Option<usize>,
    balance: Arc<Balance>,
    live: Arc<Live>,
}

impl Worker {
    /// Serves `client` on this worker's runtime, counted against `slot`.
    fn serve(&self, client: tokio::net::TcpStream, peer: SocketAddr, slot: Slot) {
        let shared = self.live.current();
        tokio::spawn(async move {
            connection::serve(shared, client, peer).await;
            drop(slot);
        });
    }

    /// Serves an accepted client here or on a less loaded worker.
    fn place(&self, client: tokio::net::TcpStream, peer: SocketAddr) {
        let slot = self.balance.place(self.index);
        if slot.worker() == self.index {
            return self.serve(client, peer, slot);
        }
        let stream = match client.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                return log::warn!("{peer}: cannot hand the connection to another worker: {e}");
            }
        };
        if let Err(back) = self.balance.hand_off(Handoff { stream, peer, slot }) {
            self.adopt(back.stream, peer, self.balance.count(self.index));
        }
    }

    fn adopt(&self, stream: std::net::TcpStream, peer: SocketAddr, slot: Slot) {
        match tokio::net::TcpStream::from_std(stream) {
            Ok(client) => self.serve(client, peer, slot),
            Err(e) => log::warn!("{peer}: cannot watch the connection: {e}"),
        }
    }
}

/// One worker: accepts on the sockets it is given until told to stop, and
/// serves what other workers hand it; its connections run until the server
/// exits.
async fn worker(
    me: Worker,
    mut orders: mpsc::UnboundedReceiver<Order>,
    mut handoffs: mpsc::UnboundedReceiver<Handoff>,
    mut exiting: tokio::sync::watch::Receiver<bool>,
) {
    // This runs on the worker's own thread for its whole life.
    if let Err(e) = crate::sched::request_short_slice() {
        log::debug!("worker {}: cannot ask for short time slices: {e}", me.index);
    }
    if let Some(cpu) = me.cpu {
        match crate::sched::pin_to_cpu(cpu) {
            Ok(()) => log::debug!("worker {} runs on CPU {cpu}", me.index),
            Err(e) => log::debug!("worker {}: cannot keep to CPU {cpu}: {e}", me.index),
        }
    }
    let mut loops: HashMap<SocketAddr, tokio::task::AbortHandle> = HashMap::new();
    loop {
        tokio::select! {
            order = orders.recv() => match order {
                Some(Order::Accept(addr, socket)) => match TcpListener::from_std(socket) {
                    Ok(listener) => {
                        let task = tokio::spawn(accept_loop(listener, me.clone()));
                        if let Some(old) = loops.insert(addr, task.abort_handle()) {
                            old.abort();
                        }
                    }
                    Err(e) => log::error!("cannot watch the listening socket {addr}: {e}"),
                },
                Some(Order::Close(addr)) => {
                    if let Some(task) = loops.remove(&addr) {
                        task.abort();
                    }
                }
                Some(Order::StopAccepting) | None => {
                    loops.drain().for_each(|(_, task)| task.abort());
                }
            },
            Some(h) = handoffs.recv() => me.adopt(h.stream, h.peer, h.slot),
            _ = exiting.wait_for(|exit| *exit) => break,
        }
    }
}

fn listen_on(addr: SocketAddr, keepalive: Keepalive) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SockProtocol::TCP),
    )?;
    // A restarted mux must not wait out TIME_WAIT on its own port.
    socket.set_reuse_address(true)?;
    // One socket per worker on the same address (see the module comment).
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // So that 0.0.0.0:P and [::]:P can both be listed, as with nginx.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit it, which saves a setsockopt(2) per
    // connection: every client socket wants it (keystrokes and streamed
    // tokens must not wait for Nagle; bulk fills its segments anyway).
    socket.set_tcp_nodelay(true)?;
    // Accepted sockets inherit it too, with its timers.
    keep_alive(&socket, keepalive)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Out of descriptors, every worker's accept loop pauses; one line a second
/// says so for all of them.
static EXHAUSTED: LogThrottle = LogThrottle::new();

async fn accept_loop(listener: TcpListener, me: Worker) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => me.place(client, peer),
            Err(e) if is_resource_exhaustion(&e) => {
                // The client stays in the backlog; retrying at once would spin.
                if EXHAUSTED.ready() {
                    log::error!(
                        "accept on {}: {e}; pausing accepts briefly (raise the fd limit or lower the load)",
                        local(&listener)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => log::debug!("accept on {}: {e}", local(&listener)),
        }
    }
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string())
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Lets a repeated condition be logged at most once a second, from any
/// thread.
struct LogThrottle {
    /// Milliseconds since `START` at the last line, plus one (0: never).
    last: std::sync::atomic::AtomicU64,
}

static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

impl LogThrottle {
    const fn new() -> LogThrottle {
        LogThrottle {
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn ready(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = START.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < 1000 {
            return false;
        }
        // Of several threads getting here at once, one logs.
        self.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client socket accepted by a listener made with `keepalive`.
    fn accepted(keepalive: Keepalive) -> std::net::TcpStream {
        let listener = listen_on("127.0.0.1:0".parse().unwrap(), keepalive).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        loop {
            match listener.accept() {
                Ok((accepted, _)) => return accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Client sockets get `TCP_NODELAY` only from their listener: mux no
    /// longer sets it on each.
    #[test]
    fn accepted_sockets_have_nodelay() {
        assert!(accepted(Keepalive::System).nodelay().unwrap());
    }

    /// Keepalive and its timers, too, come from the listener alone.
    #[test]
    fn accepted_sockets_have_the_keepalive_asked_for() {
        let system = accepted(Keepalive::System);
        assert!(socket2::SockRef::from(&system).keepalive().unwrap());
        let idle = accepted(Keepalive::Idle(Duration::from_secs(7)));
        let idle = socket2::SockRef::from(&idle);
        assert!(idle.keepalive().unwrap());
        assert_eq!(idle.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            idle.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(7)
        );
        let long = accepted(Keepalive::Idle(Duration::from_secs(3600)));
        let long = socket2::SockRef::from(&long);
        assert_eq!(
            long.tcp_keepalive_interval().unwrap(),
            Keepalive::MAX_INTERVAL
        );
        let off = accepted(Keepalive::Off);
        assert!(!socket2::SockRef::from(&off).keepalive().unwrap());
    }
}
