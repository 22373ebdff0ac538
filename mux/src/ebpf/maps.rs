//! Typed access to the maps the kernel programs share with user space.

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _},
};

use aya::maps::MapError;
use mux_common::{
    Capture, Endpoint, MAP_CAPTURE, MAP_SOCKS, MAP_SOCKS_SIZE, MAP_STATS, STAT_CAPTURED,
    STAT_INSERT_FAILED,
};

use super::{EbpfError, KernelPrograms, sys};

/// Counters the kernel programs keep, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Backend sockets the sock_ops program inserted into `MUX_SOCKS`.
    pub captured: u64,
    /// Published peers whose backend socket could not be inserted.
    pub insert_failed: u64,
}

/// `BPF_ANY`: create or replace.
const BPF_ANY: u64 = 0;

impl KernelPrograms {
    /// Publishes mux's outgoing socket (its local `endpoint`, see
    /// [`super::endpoint_of`]) so that the backend's end of the connection is
    /// put into `MUX_SOCKS` under `capture.backend_key` when the backend
    /// accepts. Call it before `connect`. Replaces an existing entry.
    pub fn capture(&mut self, endpoint: &Endpoint, capture: Capture) -> Result<(), EbpfError> {
        self.capture
            .insert(endpoint, capture, BPF_ANY)
            .map_err(|source| EbpfError::Map {
                name: MAP_CAPTURE,
                source,
            })
    }

    /// Withdraws a published endpoint. Returns whether it was there. Call it
    /// when the connection ends (the entry must not outlive it: a later,
    /// unrelated connection could reuse the port).
    pub fn forget(&mut self, endpoint: &Endpoint) -> Result<bool, EbpfError> {
        match self.capture.remove(endpoint) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(err) if is_errno(&err, libc::ENOENT) => Ok(false),
            Err(source) => Err(EbpfError::Map {
                name: MAP_CAPTURE,
                source,
            }),
        }
    }

    /// The published capture for `endpoint`, if any.
    pub fn captured(&self, endpoint: &Endpoint) -> Result<Option<Capture>, EbpfError> {
        match self.capture.get(endpoint, 0) {
            Ok(capture) => Ok(Some(capture)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(EbpfError::Map {
                name: MAP_CAPTURE,
                source,
            }),
        }
    }

    /// The cookie of the socket `MUX_SOCKS` holds under `key`, if any (the
    /// kernel's `SO_COOKIE`, so user space can tell which socket it is).
    pub fn socket_cookie(&self, key: u64) -> Result<Option<u64>, EbpfError> {
        sys::lookup(self.socks.fd().as_fd(), key).map_err(socks_error)
    }

    /// Whether `MUX_SOCKS` holds a socket under `key`.
    pub fn has_socket(&self, key: u64) -> Result<bool, EbpfError> {
        self.socket_cookie(key).map(|cookie| cookie.is_some())
    }

    /// Every key in `MUX_SOCKS`, sorted (diagnostics and tests: it walks the
    /// whole map, one syscall per key).
    pub fn socket_keys(&self) -> Result<Vec<u64>, EbpfError> {
        sys::keys(self.socks.fd().as_fd(), MAP_SOCKS_SIZE).map_err(socks_error)
    }

    /// Puts one of mux's own sockets (the accepted client socket) into
    /// `MUX_SOCKS` under `key`, replacing any socket there. The socket must
    /// be an established TCP socket. The kernel removes it by itself when
    /// the socket closes.
    pub fn insert_socket(&mut self, key: u64, socket: impl AsFd) -> Result<(), EbpfError> {
        let fd = socket.as_fd().as_raw_fd();
        let fd = u64::try_from(fd)
            .map_err(|_| socks_error(io::Error::from_raw_os_error(libc::EBADF)))?;
        sys::update(self.socks.fd().as_fd(), key, fd, BPF_ANY).map_err(socks_error)
    }

    /// Removes the socket under `key` from `MUX_SOCKS`, if any; returns
    /// whether one was there.
    pub fn remove_socket(&mut self, key: u64) -> Result<bool, EbpfError> {
        sys::delete(self.socks.fd().as_fd(), key).map_err(socks_error)
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
        })
    }
}

fn socks_error(err: io::Error) -> EbpfError {
    EbpfError::Map {
        name: MAP_SOCKS,
        source: MapError::IoError(err),
    }
}

/// Whether `err` is a failed syscall with errno `errno`.
fn is_errno(err: &MapError, errno: i32) -> bool {
    matches!(err, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(errno))
}
