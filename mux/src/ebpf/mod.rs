//! mux's kernel side, seen from user space: load and attach the eBPF
//! programs built from mux-ebpf, and publish connections to their maps.
//!
//! The flow for one connection to a local backend: mux puts its client
//! socket into `MUX_CLIENT_SOCK` ([`KernelPrograms::insert_client_socket`]), publishes its
//! not yet connected outgoing socket by cookie ([`KernelPrograms::publish`]),
//! then connects. The sock_ops program records the connection's 4-tuple when
//! the SYN leaves, and when the backend's side completes the handshake it
//! puts the backend's socket into `MUX_SOCKS`, something user space cannot
//! do (that socket belongs to another process). Once mux reports that the
//! backend sends in bulk ([`KernelPrograms::delivered`]), the sk_msg program
//! hands the backend's sends to the client socket. When
//! the connection ends, [`KernelPrograms::withdraw`] reads what the kernel
//! counted and removes every trace. Everything else on the machine is left
//! alone: only published sockets match.

mod btf;
mod cgroup;
mod loader;
mod lookup;
mod maps;
mod sys;

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _},
    path::PathBuf,
};

pub use cgroup::{cgroup2_mount, cgroup2_mount_in};
pub use loader::KernelPrograms;
pub use lookup::PortTakeover;
pub use maps::Stats;
pub use maps::Withdrawn;
pub use mux_common::{
    BACKEND_NOTSENT_LOWAT, CLIENT_SNDBUF, Capture, Client, Flow, Pending, REDIRECT_WINDOW,
};

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
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// aya could not parse or load the object (maps included).
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    /// The object lacks a program or map mux expects: mux and mux-ebpf
    /// disagree, which only a build mix-up can cause.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    /// Loading (verifier) or attaching a program failed.
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// The kernel's BTF does not say where `struct tcp_sock` keeps a field
    /// the sk_msg program reads.
    #[error("reading {path}")]
    Btf {
        path: &'static str,
        #[source]
        source: btf::BtfError,
    },
    /// A socket query (address, namespace cookie) failed.
    #[error("socket {what}")]
    Socket {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A client socket did not get the send buffer the redirect window
    /// needs (see [`fix_send_buffer`]).
    #[error(
        "a client socket's send buffer is {got} bytes, the kernel path needs {want} (forcing it needs CAP_NET_ADMIN; without it, net.core.wmem_max must be at least half of that)"
    )]
    SendBuffer { got: usize, want: usize },
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
    program(ProgramType::SkMsg)?;
    map(MapType::Hash)?;
    map(MapType::SockHash)?;
    map(MapType::PerCpuArray)?;
    cgroup2_mount().map(drop)
}

/// Fixes `socket`'s send buffer at [`CLIENT_SNDBUF`] (the kernel doubles
/// it), which a redirected send relies on to find room (see
/// [`REDIRECT_WINDOW`]). `SO_SNDBUFFORCE`, because plain `SO_SNDBUF` is
/// silently capped at `net.core.wmem_max`, 208 KiB by default: under that
/// cap a redirected send finds the client socket full, and a non-blocking
/// backend stalls for good (the backpressure test hung so).
pub fn fix_send_buffer(socket: impl AsFd) -> Result<(), EbpfError> {
    use rustix::net::sockopt;
    // The forced size is granted exactly, so the usual case costs one call
    // per connection. Without CAP_NET_ADMIN it fails, and only a read-back
    // shows whether plain SO_SNDBUF was enough (a raised wmem_max).
    if sockopt::set_socket_send_buffer_size_force(&socket, CLIENT_SNDBUF as usize).is_ok() {
        return Ok(());
    }
    sockopt::set_socket_send_buffer_size(&socket, CLIENT_SNDBUF as usize).map_err(|e| {
        EbpfError::Socket {
            what: "setsockopt(SO_SNDBUF)",
            source: e.into(),
        }
    })?;
    let want = 2 * CLIENT_SNDBUF as usize;
    let got = sockopt::socket_send_buffer_size(&socket).map_err(|e| EbpfError::Socket {
        what: "getsockopt(SO_SNDBUF)",
        source: e.into(),
    })?;
    if got < want {
        return Err(EbpfError::SendBuffer { got, want });
    }
    Ok(())
}

/// `SO_NETNS_COOKIE` from `<asm-generic/socket.h>` (Linux 5.14+); the libc
/// crate does not export it on every target. mips, sparc, parisc and alpha
/// number it differently, and mux does not target them.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The network-namespace cookie of `socket`'s namespace (see
/// [`Flow::netns_cookie`]).
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

/// The kernel's cookie for `socket` (`SO_COOKIE`): a 64-bit id, unique for
/// the life of the system, that the programs read with
/// `bpf_get_socket_cookie`. Any socket has one, connected or not.
pub fn socket_cookie(socket: impl AsFd) -> Result<u64, EbpfError> {
    rustix::net::sockopt::socket_cookie(socket).map_err(|err| EbpfError::Socket {
        what: "getsockopt(SO_COOKIE)",
        source: err.into(),
    })
}

/// How many entries each of mux's maps holds in process `pid` (found
/// through its open map fds in `/proc/PID/fdinfo`), by map name. For
/// diagnostics and tests: after every connection has ended, the connection
/// maps of a running mux must be empty.
pub fn map_entries_of(pid: u32) -> Result<std::collections::BTreeMap<String, usize>, EbpfError> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let io_error = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| EbpfError::Io {
            what: "reading",
            path,
            source,
        }
    };
    let mut ids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).map_err(io_error(&dir))? {
        let path = entry.map_err(io_error(&dir))?.path();
        // A descriptor may close between listing and reading: skip it.
        let Ok(info) = std::fs::read_to_string(&path) else {
            continue;
        };
        if let Some(Ok(id)) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .map(|id| id.trim().parse::<u32>())
        {
            ids.insert(id);
        }
    }
    let mut counts = std::collections::BTreeMap::new();
    for id in ids {
        let map = aya::maps::MapData::from_id(id).map_err(|source| EbpfError::Map {
            name: "by id",
            source,
        })?;
        let info = map.info().map_err(|source| EbpfError::Map {
            name: "by id",
            source,
        })?;
        let name = info.name_as_str().unwrap_or("?").to_string();
        let count = sys::count_keys(
            map.fd().as_fd(),
            info.key_size() as usize,
            info.max_entries(),
        )
        .map_err(|err| EbpfError::Map {
            name: "by id",
            source: aya::maps::MapError::IoError(err),
        })?;
        counts.insert(name, count);
    }
    Ok(counts)
}
