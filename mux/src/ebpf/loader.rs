//! Loading mux's eBPF object and attaching its programs.
//!
//! Nothing is pinned: every program, map and cgroup attachment lives exactly
//! as long as the [`KernelPrograms`] value, so a crashed or stopped mux
//! leaves nothing behind in the kernel.

use std::{
    fs::File,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
    sync::{Mutex, MutexGuard},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray},
    programs::{SkMsg, SockOps},
};
use mux_common::{
    Capture, Client, Flow, GLOBAL_TCP_WRITE_SEQ, ListenKey, MAP_CLIENT_SOCK, MAP_CLIENTS,
    MAP_FLOWS, MAP_LISTEN, MAP_PENDING, MAP_SOCKS, MAP_SOCKS_VALUE_SIZE, MAP_STATS, PROG_SK_MSG,
    PROG_SOCK_OPS, Pending,
};

use super::{EbpfError, btf, cgroup::cgroup2_mount, sys};

/// Where the kernel describes its own types.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The object built by mux/build.rs from mux-ebpf, aligned as aya requires.
/// Empty when the build ran with `AYA_BUILD_SKIP=1`.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mux"));

/// mux's programs, loaded and attached, with typed handles on their maps.
///
/// The sock_ops program is attached to the root of the cgroup v2 hierarchy
/// (so it sees every TCP socket, whatever cgroup its process is in) through
/// a bpf_link (kernel 5.7+). Cgroup links always attach in multi mode:
/// programs other tools attached there keep running, and sub-cgroups may
/// still attach their own.
///
/// Dropping the value detaches and unloads everything: mux owns the link's
/// only file descriptor, and closing it detaches the program; closing the
/// program's last fd unloads it. The privileged test checks that the
/// program id and its link disappear from the kernel after the drop.
///
/// The sk_msg program is attached to `MUX_SOCKS` itself; that attachment
/// lives as long as the map, so it goes away with the value too.
///
/// Map operations take `&self` (each is one syscall), so connection tasks
/// share one value behind an `Arc`.
pub struct KernelPrograms {
    /// `MUX_PENDING` (socket cookie -> `Pending`) and `MUX_FLOWS` (`Flow` ->
    /// `Capture`), used through `sys`, which needs only `&self`; their sizes
    /// are checked at load.
    pub(super) pending: MapData,
    pub(super) flows: MapData,
    /// `MUX_CLIENTS` (client socket cookie -> `Client`) and `MUX_LISTEN`
    /// (`ListenKey` -> u32), likewise.
    pub(super) clients: MapData,
    pub(super) listen: MapData,
    /// `MUX_SOCKS` (backend sockets) and `MUX_CLIENT_SOCK` (client
    /// sockets), used through raw syscalls (see `sys`): aya's `SockHash`
    /// only accepts 4-byte values.
    pub(super) socks: MapData,
    pub(super) client_socks: MapData,
    pub(super) stats: PerCpuArray<MapData, u64>,
    program_ids: Vec<u32>,
    cgroup: PathBuf,
    sock_ops: SockOpsAttachment,
    // Owns the programs (sk_msg's attachment goes with MUX_SOCKS, sock_ops'
    // link is in `sock_ops`); kept last so that it is dropped
    // after the map handles (the order does not matter to the kernel, which
    // keeps maps alive while a program uses them, but it reads naturally).
    _ebpf: Ebpf,
}

impl KernelPrograms {
    /// Loads the embedded object, verifies and attaches its programs to the
    /// cgroup v2 root found in `/proc/mounts`. Needs root (CAP_BPF plus
    /// CAP_NET_ADMIN for sock_ops and sockhash, and CAP_PERFMON for sk_msg's
    /// read of the backend's `tcp_sock`).
    pub fn load() -> Result<Self, EbpfError> {
        Self::load_object(OBJECT)
    }

    /// [`Self::load`] for a given object (separate so that the empty-object
    /// case can be tested without building one).
    fn load_object(object: &[u8]) -> Result<Self, EbpfError> {
        if object.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let cgroup = cgroup2_mount()?;
        // No RLIMIT_MEMLOCK bump: since 5.11 BPF memory is charged to the
        // memory cgroup instead, and mux needs far newer kernels anyway.
        let write_seq = tcp_write_seq_offset()?;
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_TCP_WRITE_SEQ, &write_seq, true)
            .load(object)?;

        let cgroup_dir = File::open(&cgroup).map_err(|source| EbpfError::Io {
            what: "opening cgroup",
            path: cgroup.clone(),
            source,
        })?;
        let sock_ops: &mut SockOps = program(&mut ebpf, PROG_SOCK_OPS)?;
        let program_error = |source| EbpfError::Program {
            name: PROG_SOCK_OPS,
            source,
        };
        sock_ops.load().map_err(program_error)?;
        // A descriptor of our own for the program, so that it can be
        // attached again after `detach_sock_ops` without `&mut Ebpf`.
        let sock_ops_fd = sock_ops
            .fd()
            .map_err(program_error)?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| program_error(aya::programs::ProgramError::IOError(e)))?;
        let link = sys::attach_sock_ops(cgroup_dir.as_fd(), sock_ops_fd.as_fd())
            .map_err(|e| program_error(aya::programs::ProgramError::IOError(e)))?;
        let mut program_ids = vec![sock_ops.info().map_err(program_error)?.id()];

        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(EbpfError::Missing { kind: "map", name })
        };
        let map_error = |name: &'static str| move |source| EbpfError::Map { name, source };
        let hash_map = |data: Map, name: &'static str| match data {
            Map::HashMap(data) => Ok(data),
            _ => Err(EbpfError::Missing {
                kind: "hash map",
                name,
            }),
        };
        let pending = hash_map(take(MAP_PENDING)?, MAP_PENDING)?;
        check_sizes(
            &pending,
            MAP_PENDING,
            size_of::<u64>(),
            size_of::<Pending>(),
        )?;
        let flows = hash_map(take(MAP_FLOWS)?, MAP_FLOWS)?;
        check_sizes(&flows, MAP_FLOWS, size_of::<Flow>(), size_of::<Capture>())?;
        let clients = hash_map(take(MAP_CLIENTS)?, MAP_CLIENTS)?;
        check_sizes(&clients, MAP_CLIENTS, size_of::<u64>(), size_of::<Client>())?;
        let listen = hash_map(take(MAP_LISTEN)?, MAP_LISTEN)?;
        check_sizes(
            &listen,
            MAP_LISTEN,
            size_of::<ListenKey>(),
            size_of::<u32>(),
        )?;
        let mut sock_hash = |name: &'static str| {
            let data = match take(name)? {
                Map::SockHash(data) => data,
                _ => {
                    return Err(EbpfError::Missing {
                        kind: "sockhash map",
                        name,
                    });
                }
            };
            check_sizes(&data, name, size_of::<u64>(), MAP_SOCKS_VALUE_SIZE as usize)?;
            Ok(data)
        };
        let socks = sock_hash(MAP_SOCKS)?;
        let client_socks = sock_hash(MAP_CLIENT_SOCK)?;
        let stats = PerCpuArray::try_from(take(MAP_STATS)?).map_err(map_error(MAP_STATS))?;

        let sk_msg: &mut SkMsg = program(&mut ebpf, PROG_SK_MSG)?;
        let sk_msg_error = |source| EbpfError::Program {
            name: PROG_SK_MSG,
            source,
        };
        sk_msg.load().map_err(sk_msg_error)?;
        // Through the raw syscall: aya only attaches sk_msg to a map handle
        // of its own SockHash type, which cannot hold MUX_SOCKS (see `sys`).
        let program_fd = sk_msg.fd().map_err(sk_msg_error)?;
        sys::attach_sk_msg(socks.fd().as_fd(), program_fd.as_fd()).map_err(|source| {
            EbpfError::Program {
                name: PROG_SK_MSG,
                source: aya::programs::ProgramError::IOError(source),
            }
        })?;
        program_ids.push(sk_msg.info().map_err(sk_msg_error)?.id());

        Ok(Self {
            pending,
            flows,
            clients,
            listen,
            socks,
            client_socks,
            stats,
            program_ids,
            cgroup,
            sock_ops: SockOpsAttachment {
                program: sock_ops_fd,
                cgroup: cgroup_dir,
                link: Mutex::new(Some(link)),
            },
            _ebpf: ebpf,
        })
    }

    /// Kernel ids of the loaded programs (for tests and diagnostics: e.g.
    /// `aya::programs::loaded_programs()` lists them while `self` lives).
    pub fn program_ids(&self) -> &[u32] {
        &self.program_ids
    }

    /// The cgroup v2 directory the programs are attached to.
    pub fn cgroup(&self) -> &std::path::Path {
        &self.cgroup
    }

    /// Attaches the sock_ops program again after [`Self::detach_sock_ops`];
    /// `Ok(false)` if it was attached already. Needs the privileges
    /// loading needed.
    pub fn attach_sock_ops(&self) -> Result<bool, EbpfError> {
        let mut link = self.sock_ops.link();
        if link.is_some() {
            return Ok(false);
        }
        let new = sys::attach_sock_ops(self.sock_ops.cgroup.as_fd(), self.sock_ops.program.as_fd())
            .map_err(|e| EbpfError::Program {
                name: PROG_SOCK_OPS,
                source: aya::programs::ProgramError::IOError(e),
            })?;
        *link = Some(new);
        Ok(true)
    }

    /// Takes the sock_ops program off the cgroup (the program stays
    /// loaded); `false` if it was not attached. From then on no new
    /// connection is captured, and client sockets that complete their
    /// handshake get no ACK callbacks, for good.
    pub fn detach_sock_ops(&self) -> bool {
        // Closing the link's only descriptor detaches the program.
        self.sock_ops.link().take().is_some()
    }
}

/// The sock_ops program's cgroup attachment, which `auto` drops while no
/// connection would use it: attached, the program runs at every TCP socket
/// event on the machine, 19 per proxied connection (4 sockets).
struct SockOpsAttachment {
    program: OwnedFd,
    cgroup: File,
    /// The bpf_link, when attached (a link so that closing it detaches
    /// exactly this attachment, and a crashed mux leaves none behind).
    link: Mutex<Option<OwnedFd>>,
}

impl SockOpsAttachment {
    fn link(&self) -> MutexGuard<'_, Option<OwnedFd>> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The program `name` of the object, as its type `P`.
pub(super) fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

/// The raw accessors read and write keys and values of these sizes: make
/// sure the map really has them rather than let the kernel write past a
/// buffer (only a mux/mux-ebpf build mix-up could cause a mismatch).
fn check_sizes(
    map: &MapData,
    name: &'static str,
    key: usize,
    value: usize,
) -> Result<(), EbpfError> {
    let info = map
        .info()
        .map_err(|source| EbpfError::Map { name, source })?;
    let mismatch = |size, expected| EbpfError::Map {
        name,
        source: aya::maps::MapError::InvalidValueSize { size, expected },
    };
    if info.key_size() as usize != key {
        return Err(mismatch(key, info.key_size() as usize));
    }
    if info.value_size() as usize != value {
        return Err(mismatch(value, info.value_size() as usize));
    }
    Ok(())
}

impl std::fmt::Debug for KernelPrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPrograms")
            .field("program_ids", &self.program_ids)
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

/// The offset of `write_seq` in this kernel's `struct tcp_sock`: how far the
/// backend socket has queued bytes itself, which the sk_msg program needs to
/// know before it takes a connection back (see `mux_common::Capture`).
fn tcp_write_seq_offset() -> Result<u32, EbpfError> {
    let data = std::fs::read(VMLINUX_BTF).map_err(|source| EbpfError::Io {
        what: "reading",
        path: VMLINUX_BTF.into(),
        source,
    })?;
    btf::field_offset(&data, "tcp_sock", "write_seq").map_err(|source| EbpfError::Btf {
        path: VMLINUX_BTF,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_says_it_was_not_built() {
        let err = KernelPrograms::load_object(&[]).unwrap_err();
        assert!(matches!(err, EbpfError::NotBuilt));
        assert_eq!(
            err.to_string(),
            "eBPF object not built: AYA_BUILD_SKIP was set"
        );
    }
}
