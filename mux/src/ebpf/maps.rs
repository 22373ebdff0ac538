//! Typed access to the maps the kernel programs share with user space.
//!
//! Every operation is one `bpf(2)` call through a shared reference, so the
//! connection tasks can share one [`KernelPrograms`] behind an `Arc`.

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _},
};

use aya::maps::MapError;
use mux_common::{
    Capture, Client, Flow, ListenKey, MAP_CLIENT_SOCK, MAP_CLIENT_SOCK_SIZE, MAP_CLIENTS,
    MAP_FLOWS, MAP_LISTEN, MAP_PENDING, MAP_SOCKS, MAP_SOCKS_SIZE, MAP_STATS, MAX_CONNECTIONS,
    Pending, STAT_ACKS_UNWATCHED, STAT_CAPTURED, STAT_FLOW_FAILED, STAT_INSERT_FAILED,
    STAT_REDIRECT_FAILED, STAT_REDIRECTED, STAT_SPILLED,
};

use super::{EbpfError, KernelPrograms, sys};

/// Counters the kernel programs keep, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Backend sockets the sock_ops program inserted into `MUX_SOCKS`.
    pub captured: u64,
    /// Published connections whose backend socket could not be inserted.
    pub insert_failed: u64,
    /// Published sockets that connected but whose flow could not be recorded.
    pub flow_failed: u64,
    /// Backend sends the sk_msg program redirected to a client socket.
    pub redirected: u64,
    /// Backend sends whose client socket had already left `MUX_CLIENT_SOCK`.
    pub redirect_failed: u64,
    /// Backend sends that took the normal path to keep the client's queue
    /// bounded (see `mux_common::REDIRECT_WINDOW`).
    pub spilled: u64,
    /// Client sockets whose ACK callbacks were turned off: not published,
    /// or no longer.
    pub acks_unwatched: u64,
}

/// What the kernel did for one connection, read when it is withdrawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Withdrawn {
    /// The outgoing socket connected and its flow was recorded.
    pub connected: bool,
    /// The backend's socket went into `MUX_SOCKS`: its sends were the
    /// kernel's to move.
    pub captured: bool,
    /// Bytes the kernel moved from the backend to the client.
    pub down_bytes: u64,
    /// Bytes the client had acknowledged as far as the kernel last saw.
    pub client_acked: u64,
}

/// `BPF_ANY`: create or replace.
const BPF_ANY: u64 = 0;
/// `BPF_NOEXIST`: create only.
const BPF_NOEXIST: u64 = 1;

impl KernelPrograms {
    /// Publishes mux's outgoing socket, by its cookie (see
    /// [`super::socket_cookie`]), before it connects: the backend's end of
    /// the connection will go into `MUX_SOCKS` under `pending.backend_key`,
    /// and its sends to the socket under `pending.client_key`.
    /// The client socket (cookie `pending.client_cookie`) must be in
    /// `MUX_CLIENT_SOCK` under `pending.client_key` already, and mux must not have
    /// written to it yet: the bound on what the client has outstanding
    /// counts from zero.
    pub fn publish(&self, cookie: u64, pending: Pending) -> Result<(), EbpfError> {
        sys::put(
            self.clients.fd().as_fd(),
            &pending.client_cookie,
            &Client {
                cookie: pending.client_cookie,
                ..Client::default()
            },
            BPF_NOEXIST,
        )
        .map_err(map_error(MAP_CLIENTS))?;
        sys::put(self.pending.fd().as_fd(), &cookie, &pending, BPF_NOEXIST).map_err(|e| {
            let _ = sys::remove(self.clients.fd().as_fd(), &pending.client_cookie);
            map_error(MAP_PENDING)(e)
        })
    }

    /// Tells the kernel that mux itself has now written `total` bytes to the
    /// client socket `client_cookie` (what the backend sent the normal way).
    /// The first call also opens the kernel path for the connection (see
    /// `mux_common::Client::open`). Read-modify-write: a concurrent ACK
    /// update may be lost, which only makes the kernel's estimate of the
    /// client's queue larger (safe). Returns how far the client had
    /// acknowledged, as the kernel last saw it.
    pub fn delivered(&self, client_cookie: u64, total: u64) -> Result<u64, EbpfError> {
        let clients = self.clients.fd().as_fd();
        let mut client: Client = sys::get(clients, &client_cookie)
            .map_err(map_error(MAP_CLIENTS))?
            .unwrap_or_default();
        let acked = client.acked;
        client.delivered = total;
        client.cookie = client_cookie;
        client.open = 1;
        sys::put(clients, &client_cookie, &client, BPF_ANY).map_err(map_error(MAP_CLIENTS))?;
        Ok(acked)
    }

    /// Registers one of mux's listening ports (in the namespace
    /// `netns_cookie`), so that the kernel tracks what its clients
    /// acknowledge. Call it before accepting.
    pub fn listen(&self, netns_cookie: u64, port: u16) -> Result<(), EbpfError> {
        let key = ListenKey {
            netns_cookie,
            port: u32::from(port),
            _pad: 0,
        };
        sys::put(self.listen.fd().as_fd(), &key, &1u32, BPF_ANY).map_err(map_error(MAP_LISTEN))
    }

    /// Ends a published connection: reads what the kernel did and deletes
    /// its entries (the pending socket, its flow, and both sockets' keys).
    /// `None` if `cookie` was not published. Call it when the connection is
    /// over, whether it connected or not: nothing else cleans up.
    pub fn withdraw(&self, cookie: u64) -> Result<Option<Withdrawn>, EbpfError> {
        let Some(pending) = sys::take::<u64, Pending>(self.pending.fd().as_fd(), &cookie)
            .map_err(map_error(MAP_PENDING))?
        else {
            return Ok(None);
        };
        // The pending entry is gone: a failure below leaves the rest for
        // good, so every step runs and the first error is reported.
        let mut outcome = Withdrawn::default();
        let mut first_error = None;
        let mut note = |r: Result<(), EbpfError>| {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        };
        if pending.connected != 0 {
            outcome.connected = true;
            note(
                sys::take::<Flow, Capture>(self.flows.fd().as_fd(), &pending.flow)
                    .map(|capture| {
                        if let Some(capture) = capture {
                            outcome.captured = capture.captured != 0;
                            outcome.down_bytes = capture.down_bytes;
                        }
                    })
                    .map_err(map_error(MAP_FLOWS)),
            );
        }
        note(self.remove_socket(pending.backend_key).map(drop));
        note(self.remove_client_socket(pending.client_key).map(drop));
        note(
            sys::take::<u64, Client>(self.clients.fd().as_fd(), &pending.client_cookie)
                .map(|client| {
                    if let Some(client) = client {
                        outcome.client_acked = client.acked;
                    }
                })
                .map_err(map_error(MAP_CLIENTS)),
        );
        match first_error {
            Some(e) => Err(e),
            None => Ok(Some(outcome)),
        }
    }

    /// Bytes the kernel has moved so far for the connection whose outgoing
    /// socket has `cookie`; `None` before the socket connected or after
    /// the entries went.
    pub fn moved(&self, cookie: u64) -> Result<Option<u64>, EbpfError> {
        Ok(self.capture(cookie)?.map(|c| c.down_bytes))
    }

    /// The capture of the connection whose outgoing socket has `cookie`;
    /// `None` before the socket connected or after the entries went.
    pub fn capture(&self, cookie: u64) -> Result<Option<Capture>, EbpfError> {
        let Some(pending) = self.pending(cookie)? else {
            return Ok(None);
        };
        if pending.connected == 0 {
            return Ok(None);
        }
        self.flow(&pending.flow)
    }

    /// The pending entry for `cookie` as the kernel left it, if any.
    pub fn pending(&self, cookie: u64) -> Result<Option<Pending>, EbpfError> {
        sys::get(self.pending.fd().as_fd(), &cookie).map_err(map_error(MAP_PENDING))
    }

    /// The capture recorded for `flow`, if any.
    pub fn flow(&self, flow: &Flow) -> Result<Option<Capture>, EbpfError> {
        sys::get(self.flows.fd().as_fd(), flow).map_err(map_error(MAP_FLOWS))
    }

    /// How many entries `MUX_PENDING`, `MUX_FLOWS` and `MUX_CLIENTS` hold
    /// (diagnostics and tests: it walks the maps).
    pub fn connection_entries(&self) -> Result<(usize, usize, usize), EbpfError> {
        let pending: Vec<u64> = sys::keys(self.pending.fd().as_fd(), MAX_CONNECTIONS)
            .map_err(map_error(MAP_PENDING))?;
        let flows: Vec<Flow> =
            sys::keys(self.flows.fd().as_fd(), MAX_CONNECTIONS).map_err(map_error(MAP_FLOWS))?;
        let clients: Vec<u64> = sys::keys(self.clients.fd().as_fd(), MAX_CONNECTIONS)
            .map_err(map_error(MAP_CLIENTS))?;
        Ok((pending.len(), flows.len(), clients.len()))
    }

    /// The client entry for `client_cookie`, if any.
    pub fn client(&self, client_cookie: u64) -> Result<Option<Client>, EbpfError> {
        sys::get(self.clients.fd().as_fd(), &client_cookie).map_err(map_error(MAP_CLIENTS))
    }

    /// The cookie of the socket `MUX_SOCKS` holds under `key`, if any (the
    /// kernel's `SO_COOKIE`, so user space can tell which socket it is).
    pub fn socket_cookie(&self, key: u64) -> Result<Option<u64>, EbpfError> {
        sys::get(self.socks.fd().as_fd(), &key).map_err(map_error(MAP_SOCKS))
    }

    /// Whether `MUX_SOCKS` holds a socket under `key`.
    pub fn has_socket(&self, key: u64) -> Result<bool, EbpfError> {
        self.socket_cookie(key).map(|cookie| cookie.is_some())
    }

    /// Every key in `MUX_SOCKS`, sorted (diagnostics and tests: it walks the
    /// whole map, one syscall per key).
    pub fn socket_keys(&self) -> Result<Vec<u64>, EbpfError> {
        let mut keys: Vec<u64> =
            sys::keys(self.socks.fd().as_fd(), MAP_SOCKS_SIZE).map_err(map_error(MAP_SOCKS))?;
        keys.sort_unstable();
        Ok(keys)
    }

    /// Every key in `MUX_CLIENT_SOCK`, sorted (as [`Self::socket_keys`]).
    pub fn client_socket_keys(&self) -> Result<Vec<u64>, EbpfError> {
        let mut keys: Vec<u64> = sys::keys(self.client_socks.fd().as_fd(), MAP_CLIENT_SOCK_SIZE)
            .map_err(map_error(MAP_CLIENT_SOCK))?;
        keys.sort_unstable();
        Ok(keys)
    }

    /// Puts one of mux's own sockets (the accepted client socket) into
    /// `MUX_CLIENT_SOCK` under `key`, replacing any socket there. The socket
    /// must be an established TCP socket. The kernel removes it by itself
    /// when the socket closes.
    pub fn insert_client_socket(&self, key: u64, socket: impl AsFd) -> Result<(), EbpfError> {
        let fd = socket.as_fd().as_raw_fd();
        let fd = u64::try_from(fd)
            .map_err(|_| map_error(MAP_CLIENT_SOCK)(io::Error::from_raw_os_error(libc::EBADF)))?;
        sys::put(self.client_socks.fd().as_fd(), &key, &fd, BPF_ANY)
            .map_err(map_error(MAP_CLIENT_SOCK))
    }

    /// Removes the socket under `key` from `MUX_SOCKS`, if any; returns
    /// whether one was there.
    pub fn remove_socket(&self, key: u64) -> Result<bool, EbpfError> {
        sys::remove(self.socks.fd().as_fd(), &key).map_err(map_error(MAP_SOCKS))
    }

    /// Removes the socket under `key` from `MUX_CLIENT_SOCK`, if any.
    pub fn remove_client_socket(&self, key: u64) -> Result<bool, EbpfError> {
        sys::remove(self.client_socks.fd().as_fd(), &key).map_err(map_error(MAP_CLIENT_SOCK))
    }

    /// The kernel programs' counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, EbpfError> {
        let sum = |index: u32| -> Result<u64, EbpfError> {
            let values = self.stats.get(&index, 0).map_err(|source| EbpfError::Map {
                name: MAP_STATS,
                source,
            })?;
            Ok(values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v)))
        };
        Ok(Stats {
            captured: sum(STAT_CAPTURED)?,
            insert_failed: sum(STAT_INSERT_FAILED)?,
            flow_failed: sum(STAT_FLOW_FAILED)?,
            redirected: sum(STAT_REDIRECTED)?,
            redirect_failed: sum(STAT_REDIRECT_FAILED)?,
            spilled: sum(STAT_SPILLED)?,
            acks_unwatched: sum(STAT_ACKS_UNWATCHED)?,
        })
    }
}

fn map_error(name: &'static str) -> impl Fn(io::Error) -> EbpfError {
    move |err| EbpfError::Map {
        name,
        source: MapError::IoError(err),
    }
}
