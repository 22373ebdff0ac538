//! The kernel data path: for a backend on this host, the backend's sends go
//! straight to the client socket (sock_ops + sk_msg, see `crate::ebpf`), so
//! the download direction skips one TCP hop and user space entirely; the
//! upload direction stays on splice(2), the fastest bounded path measured
//! for it (see the README).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpSocket, TcpStream};

use crate::ebpf::{self, CLIENT_SNDBUF, EbpfError, KernelPrograms, Pending, Withdrawn};

/// The loaded programs and what every connection needs from them.
pub struct Kernel {
    programs: KernelPrograms,
    /// Source of per-connection socket keys (two per connection: the
    /// client's in `MUX_CLIENT_SOCK`, the backend's in `MUX_SOCKS`).
    next_id: AtomicU64,
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
}

impl Kernel {
    /// Loads and attaches the programs (root, or CAP_BPF + CAP_NET_ADMIN).
    pub fn load() -> Result<Kernel, EbpfError> {
        Ok(Kernel {
            programs: KernelPrograms::load()?,
            next_id: AtomicU64::new(0),
        })
    }

    pub fn programs(&self) -> &KernelPrograms {
        &self.programs
    }

    /// Connects to `addr` for `client`. When `addr` is an address of this
    /// host, the connection is published first so that the kernel moves the
    /// backend's bytes; otherwise (another host, or publishing refused) it
    /// is a plain connection and the caller splices it.
    pub async fn dial(
        self: &Arc<Self>,
        client: &TcpStream,
        addr: SocketAddr,
    ) -> io::Result<(TcpStream, Option<Lease>)> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if addr.ip().is_unspecified() || !bind_if_local(&socket, addr)? {
            return Ok((socket.connect(addr).await?, None));
        }
        let lease = match self.publish(client, &socket) {
            Ok(lease) => Some(lease),
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
    ) -> Result<Lease, EbpfError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (client_key, backend_key) = (2 * id, 2 * id + 1);
        let cookie = ebpf::socket_cookie(outgoing)?;
        let client_cookie = ebpf::socket_cookie(client)?;
        // A fixed send buffer, large against REDIRECT_WINDOW, is what lets a
        // redirected send always find room (see mux_common::CLIENT_SNDBUF).
        rustix::net::sockopt::set_socket_send_buffer_size(client, CLIENT_SNDBUF as usize).map_err(
            |e| EbpfError::Socket {
                what: "setsockopt(SO_SNDBUF)",
                source: e.into(),
            },
        )?;
        self.programs.insert_client_socket(client_key, client)?;
        // From here on the lease owns the entries, including on error.
        let lease = Lease {
            kernel: self.clone(),
            cookie,
            client_cookie,
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

/// Binds `socket` to `addr`'s IP when it is one of this host's, deferring
/// the port to `connect` (`IP_BIND_ADDRESS_NO_PORT`) so that ports are
/// shared by 4-tuple as for any outgoing connection. Returns whether the
/// address is local.
fn bind_if_local(socket: &TcpSocket, addr: SocketAddr) -> io::Result<bool> {
    set_bind_address_no_port(socket)?;
    match socket.bind(SocketAddr::new(addr.ip(), 0)) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `IP_BIND_ADDRESS_NO_PORT` (IPv4 and IPv6 sockets alike).
fn set_bind_address_no_port(socket: &TcpSocket) -> io::Result<()> {
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

impl Lease {
    /// Tells the kernel how many bytes mux itself has written to the client
    /// in all (the backend's sends that went the normal way), so that it
    /// can resume redirecting once they are all out.
    pub fn delivered(&self, total: u64) {
        if let Err(e) = self.kernel.programs.delivered(self.client_cookie, total) {
            log::debug!("kernel path: updating delivered bytes: {e:#}");
        }
    }

    /// Ends the publication now and says what the kernel did.
    pub fn finish(self) -> Withdrawn {
        self.withdraw().unwrap_or_default()
    }

    fn withdraw(&self) -> Option<Withdrawn> {
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
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Idempotent: after `finish` the entry is gone and this finds nothing.
        let _ = self.withdraw();
    }
}
