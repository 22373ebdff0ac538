//! Listening sockets and the accept loops: binds every `listen` address, then
//! hands each accepted client to its own task.
//!
//! One worker per CPU, each a single-threaded runtime with its own sockets
//! on the listen addresses (SO_REUSEPORT): the kernel spreads connections
//! across the workers, and a connection's tasks (its relay, its HTTP
//! exchanges and their backend connections) never hop threads. On this
//! 2-core machine that served 25% more HTTP requests per second than one
//! work-stealing runtime, which woke threads for every request.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio::net::TcpListener;

use crate::connection::{self, Shared};
use crate::datapath::DataPath;

/// Listeners bound and ready; nothing accepted yet. Splitting bind from serve
/// lets the caller drop privileges in between, as sslh does.
pub struct Server {
    /// `workers[w][i]`: worker `w`'s socket on the `i`-th listen address.
    workers: Vec<Vec<std::net::TcpListener>>,
    shared: Arc<Shared>,
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

impl Server {
    pub async fn bind(shared: Shared) -> Result<Server, BindError> {
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut workers: Vec<Vec<std::net::TcpListener>> = (0..count).map(|_| Vec::new()).collect();
        for addr in &shared.config.listen {
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
            for a in resolved {
                let bind_error = |source| BindError::Bind { addr: a, source };
                let first = listen(a).map_err(bind_error)?;
                // Port 0 asked for any port: the other workers take the same.
                let a = SocketAddr::new(a.ip(), first.local_addr().map_err(bind_error)?.port());
                if let DataPath::Kernel(kernel) = &shared.datapath {
                    kernel
                        .listen(&first)
                        .map_err(|source| BindError::Kernel { addr: a, source })?;
                }
                workers[0].push(first);
                for worker in &mut workers[1..] {
                    worker.push(listen(a).map_err(|source| BindError::Bind { addr: a, source })?);
                }
            }
        }
        Ok(Server {
            workers,
            shared: Arc::new(shared),
        })
    }

    /// One socket per listen address (the first worker's), for taking ports
    /// over to them; the kernel spreads what they get across the workers.
    pub fn listeners(&self) -> &[std::net::TcpListener] {
        &self.workers[0]
    }

    /// The bound addresses (with the real port when the config asked for 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners()
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Accepts until `shutdown` completes: the first worker on the calling
    /// runtime, the others on threads of their own.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut workers = self.workers.into_iter();
        let here = workers.next().unwrap_or_default();
        let mut threads = Vec::new();
        for (n, listeners) in workers.enumerate() {
            let (shared, stopped) = (self.shared.clone(), stopped.clone());
            let thread = std::thread::Builder::new()
                .name(format!("mux-worker-{}", n + 1))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime.block_on(worker(listeners, shared, stopped)),
                        Err(e) => log::error!("worker {}: cannot start a runtime: {e}", n + 1),
                    }
                });
            match thread {
                Ok(t) => threads.push(t),
                // Its sockets close with `listeners`: the kernel then spreads
                // connections over the remaining workers.
                Err(e) => log::error!("cannot start worker thread {}: {e}", n + 1),
            }
        }
        tokio::select! {
            () = worker(here, self.shared.clone(), stopped) => {}
            () = shutdown => {}
        }
        let _ = stop.send(true);
        // Each worker drops its runtime, and with it its connections.
        let _ =
            tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join())))
                .await;
    }
}

/// One worker: accepts on its sockets until told to stop.
async fn worker(
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        match TcpListener::from_std(listener) {
            Ok(listener) => {
                loops.spawn(accept_loop(listener, shared.clone()));
            }
            Err(e) => log::error!("cannot watch a listening socket: {e}"),
        }
    }
    let _ = stopped.wait_for(|stop| *stop).await;
    loops.abort_all();
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
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
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut throttle = LogThrottle::new(Duration::from_secs(1));
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(connection::serve(shared.clone(), client, peer));
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // The client stays in the backlog; retrying at once would spin.
                if throttle.ready() {
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

/// Lets a repeated condition be logged at most once per period.
struct LogThrottle {
    period: Duration,
    last: Option<Instant>,
}

impl LogThrottle {
    fn new(period: Duration) -> LogThrottle {
        LogThrottle { period, last: None }
    }

    fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.period)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}
