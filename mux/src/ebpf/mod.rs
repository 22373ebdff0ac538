//! mux's kernel side, seen from user space: load and attach the eBPF
//! programs built from mux-ebpf, and publish connections to their maps.
//!
//! The flow for one spliced connection: mux binds its outgoing socket to a
//! concrete local address and port, publishes that endpoint with
//! [`KernelPrograms::capture`], then connects to the backend. When the
//! backend accepts, the kernel's sock_ops program recognises mux's endpoint
//! as the peer and puts the backend's socket into `MUX_SOCKS` under
//! `Capture::backend_key`, something user space cannot do itself (that
//! socket belongs to another process). Everything else on the machine is
//! left alone: only published endpoints match.

mod cgroup;
mod loader;
mod maps;
mod sys;

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _},
    path::PathBuf,
};

pub use cgroup::{cgroup2_mount, cgroup2_mount_in};
pub use loader::KernelPrograms;
pub use maps::Stats;
pub use mux_common::{Capture, Endpoint};

/// Everything that can go wrong between mux and its kernel programs.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The binary was built with `AYA_BUILD_SKIP=1`, so it embeds an empty
    /// object (the fuzz build does this to avoid needing the bpf toolchain).
    #[error("eBPF object not built: AYA_BUILD_SKIP was set")]
    NotBuilt,
    /// The kernel lacks something mux needs, or we lack the privilege to
    /// ask (probing needs CAP_BPF or root too).
    #[error("kernel support missing: {0}")]
    Unsupported(String),
    /// `/proc/mounts` lists no cgroup2 file system to attach to.
    #[error("no cgroup v2 file system is mounted (none in /proc/mounts)")]
    NoCgroup2,
    /// Reading `/proc/mounts` or opening the cgroup directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// aya could not parse or load the object (maps included).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// The object lacks a program or map mux expects: mux and mux-ebpf
    /// disagree, which only a build mix-up can cause.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    /// Loading (verifier) or attaching a program failed.
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// A socket query (address, namespace cookie) failed.
    #[error("socket {what}: {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Checks, without loading anything, that this kernel offers what the
/// programs need: sock_ops programs, hash and sockhash maps, and a cgroup v2
/// mount to attach to. Fails with [`EbpfError::NotBuilt`] first if the
/// object is empty, since nothing else matters then.
pub fn probe_support() -> Result<(), EbpfError> {
    use aya::{
        maps::MapType,
        programs::ProgramType,
        sys::{is_map_supported, is_program_supported},
    };

    if loader::OBJECT.is_empty() {
        return Err(EbpfError::NotBuilt);
    }
    // The probes load tiny programs / create tiny maps, so an unprivileged
    // caller gets an error here rather than `false`: report both the same way.
    let program = |ty: ProgramType| match is_program_supported(ty) {
        Ok(true) => Ok(()),
        Ok(false) => Err(EbpfError::Unsupported(format!("program type {ty:?}"))),
        Err(err) => Err(EbpfError::Unsupported(format!(
            "probing program type {ty:?}: {err}"
        ))),
    };
    let map = |ty: MapType| match is_map_supported(ty) {
        Ok(true) => Ok(()),
        Ok(false) => Err(EbpfError::Unsupported(format!("map type {ty:?}"))),
        Err(err) => Err(EbpfError::Unsupported(format!(
            "probing map type {ty:?}: {err}"
        ))),
    };
    program(ProgramType::SockOps)?;
    map(MapType::Hash)?;
    map(MapType::SockHash)?;
    map(MapType::PerCpuArray)?;
    cgroup2_mount().map(drop)
}

/// `SO_NETNS_COOKIE` from `<asm-generic/socket.h>` (Linux 5.14+); the libc
/// crate does not export it on every target. mips, sparc, parisc and alpha
/// number it differently, and mux does not target them.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The network-namespace cookie of `socket`'s namespace (see
/// [`Endpoint::netns_cookie`]).
pub fn netns_cookie(socket: impl AsFd) -> Result<u64, EbpfError> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd for the call's duration; the buffer is a u64 and
    // `len` says so, which is what the kernel writes for this option.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(EbpfError::Socket {
            what: "getsockopt(SO_NETNS_COOKIE)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(cookie)
}

/// The [`Endpoint`] to publish for mux's outgoing `socket`: its bound local
/// address and port plus its namespace cookie.
///
/// Call it after binding and before connecting, and bind to a concrete
/// address (the one the backend will see, e.g. 127.0.0.1 for a loopback
/// backend): the sock_ops program fires during the handshake, inside
/// `connect`, and matches the exact address, never a wildcard (a wildcard
/// would also match unrelated peers using the same port). Leave
/// `SO_REUSEADDR`/`SO_REUSEPORT` off that socket, so that no other socket
/// can bind the same address and port and pass for mux's.
pub fn endpoint_of(socket: impl AsFd) -> Result<Endpoint, EbpfError> {
    let fd = socket.as_fd();
    let local = rustix::net::getsockname(fd).map_err(|err| EbpfError::Socket {
        what: "getsockname",
        source: err.into(),
    })?;
    let local = std::net::SocketAddr::try_from(local).map_err(|err| EbpfError::Socket {
        what: "getsockname (not an IP socket)",
        source: err.into(),
    })?;
    if local.ip().is_unspecified() || local.port() == 0 {
        return Err(EbpfError::Socket {
            what: "endpoint_of",
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("socket is bound to {local}: bind it to a concrete address and port"),
            ),
        });
    }
    Ok(Endpoint::new(netns_cookie(fd)?, local))
}
