//! Listening sockets and the accept loop: binds every `listen` address, then
//! hands each accepted client to its own task.

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
    listeners: Vec<TcpListener>,
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
        let mut listeners = Vec::new();
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
                let listener = listen(a).map_err(|source| BindError::Bind { addr: a, source })?;
                if let DataPath::Kernel(kernel) = &shared.datapath {
                    kernel
                        .listen(&listener)
                        .map_err(|source| BindError::Kernel { addr: a, source })?;
                }
                listeners.push(listener);
            }
        }
        Ok(Server {
            listeners,
            shared: Arc::new(shared),
        })
    }

    /// The listening sockets, for taking ports over to them.
    pub fn listeners(&self) -> &[TcpListener] {
        &self.listeners
    }

    /// The bound addresses (with the real port when the config asked for 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Accepts until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let mut tasks = tokio::task::JoinSet::new();
        for listener in self.listeners {
            tasks.spawn(accept_loop(listener, self.shared.clone()));
        }
        shutdown.await;
        tasks.abort_all();
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SockProtocol::TCP),
    )?;
    // A restarted mux must not wait out TIME_WAIT on its own port.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // So that 0.0.0.0:P and [::]:P can both be listed, as with nginx.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
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
