//! Loading mux's eBPF object and attaching its programs.
//!
//! Nothing is pinned: every program, map and cgroup attachment lives exactly
//! as long as the [`KernelPrograms`] value, so a crashed or stopped mux
//! leaves nothing behind in the kernel.

use std::{fs::File, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{CgroupAttachMode, SockOps},
    util::KernelVersion,
};
use mux_common::{
    Capture, Endpoint, MAP_CAPTURE, MAP_SOCKS, MAP_SOCKS_VALUE_SIZE, MAP_STATS, PROG_SOCK_OPS,
};

use super::{EbpfError, cgroup::cgroup2_mount};

/// The object built by mux/build.rs from mux-ebpf, aligned as aya requires.
/// Empty when the build ran with `AYA_BUILD_SKIP=1`.
pub(super) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mux"));

/// mux's programs, loaded and attached, with typed handles on their maps.
///
/// The sock_ops program is attached to the root of the cgroup v2 hierarchy
/// (so it sees every TCP socket, whatever cgroup its process is in) in multi
/// mode: programs other tools attached there keep running, and sub-cgroups
/// may still attach their own (see `attach_mode`).
///
/// Dropping the value detaches and unloads everything: the attachment is a
/// bpf_link (kernel 5.7+) whose only file descriptor aya owns inside
/// `Ebpf`; closing it detaches the program, and closing the program's last
/// fd unloads it. The privileged test checks that the program id and its
/// link disappear from the kernel after the drop.
///
/// Map operations take `&mut self` because aya's map handles do; they are
/// single syscalls, so callers sharing one value can put it behind a
/// `std::sync::Mutex`.
pub struct KernelPrograms {
    pub(super) capture: HashMap<MapData, Endpoint, Capture>,
    /// `MUX_SOCKS`, used through raw syscalls (see `sys`): aya's `SockHash`
    /// only accepts 4-byte values.
    pub(super) socks: MapData,
    pub(super) stats: PerCpuArray<MapData, u64>,
    program_ids: Vec<u32>,
    cgroup: PathBuf,
    // Owns the programs and their links; kept last so that it is dropped
    // after the map handles (the order does not matter to the kernel, which
    // keeps maps alive while a program uses them, but it reads naturally).
    _ebpf: Ebpf,
}

impl KernelPrograms {
    /// Loads the embedded object, verifies and attaches its programs to the
    /// cgroup v2 root found in `/proc/mounts`. Needs root (CAP_BPF plus
    /// CAP_NET_ADMIN for sock_ops and sockhash).
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
        let mut ebpf = EbpfLoader::new().load(object)?;

        let cgroup_dir = File::open(&cgroup).map_err(|source| EbpfError::Io {
            what: "opening cgroup",
            path: cgroup.clone(),
            source,
        })?;
        let program_error = |source| EbpfError::Program {
            name: PROG_SOCK_OPS,
            source,
        };
        let sock_ops: &mut SockOps = ebpf
            .program_mut(PROG_SOCK_OPS)
            .ok_or(EbpfError::Missing {
                kind: "program",
                name: PROG_SOCK_OPS,
            })?
            .try_into()
            .map_err(program_error)?;
        sock_ops.load().map_err(program_error)?;
        // The link id is not kept: the link stays owned by `sock_ops` (hence
        // by `ebpf`) and goes away with it.
        let _link = sock_ops
            .attach(&cgroup_dir, attach_mode())
            .map_err(program_error)?;
        let program_ids = vec![sock_ops.info().map_err(program_error)?.id()];

        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(EbpfError::Missing { kind: "map", name })
        };
        let map_error = |name: &'static str| move |source| EbpfError::Map { name, source };
        let capture = HashMap::try_from(take(MAP_CAPTURE)?).map_err(map_error(MAP_CAPTURE))?;
        let socks = match take(MAP_SOCKS)? {
            Map::SockHash(data) => data,
            _ => {
                return Err(EbpfError::Missing {
                    kind: "sockhash map",
                    name: MAP_SOCKS,
                });
            }
        };
        // The raw accessors read and write 8-byte values: make sure the map
        // really has them rather than let the kernel write past a buffer.
        let value_size = socks.info().map_err(map_error(MAP_SOCKS))?.value_size();
        if value_size != MAP_SOCKS_VALUE_SIZE {
            return Err(EbpfError::Map {
                name: MAP_SOCKS,
                source: aya::maps::MapError::InvalidValueSize {
                    size: MAP_SOCKS_VALUE_SIZE as usize,
                    expected: value_size as usize,
                },
            });
        }
        let stats = PerCpuArray::try_from(take(MAP_STATS)?).map_err(map_error(MAP_STATS))?;

        Ok(Self {
            capture,
            socks,
            stats,
            program_ids,
            cgroup,
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
}

/// The attach mode that shares the cgroup with other programs.
///
/// On 5.7+ aya attaches through `bpf_link_create`, and the kernel rejects
/// any flag there (EINVAL for `BPF_F_ALLOW_MULTI`): cgroup links are always
/// attached in multi mode, so `Single` (no flag) is the sharing mode. Older
/// kernels take aya's `BPF_PROG_ATTACH` path, where `AllowMultiple` is what
/// keeps other programs in place. aya decides with the same version check.
fn attach_mode() -> CgroupAttachMode {
    match KernelVersion::current() {
        Ok(version) if version >= KernelVersion::new(5, 7, 0) => CgroupAttachMode::Single,
        _ => CgroupAttachMode::AllowMultiple,
    }
}

impl std::fmt::Debug for KernelPrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPrograms")
            .field("program_ids", &self.program_ids)
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
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
