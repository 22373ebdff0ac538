//! Raw `bpf(2)` commands: map elements through a shared reference (aya's
//! handles want `&mut self`, yet every connection task needs the maps), the
//! maps aya cannot type (`MUX_SOCKS`, `MUX_CLIENT_SOCK`: aya's `SockHash` insists on 4-byte
//! values, and with those the kernel answers no lookup, see
//! `mux_common::MAP_SOCKS_VALUE_SIZE`), attaching sk_msg to the first, and
//! attaching sock_ops through a link that mux can close and create again.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
};

// enum bpf_cmd in <linux/bpf.h>; stable ABI.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_LINK_CREATE: libc::c_long = 28;
/// enum bpf_attach_type in <linux/bpf.h>.
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_SK_MSG_VERDICT: u32 = 7;

/// The part of `union bpf_attr` the `BPF_MAP_*_ELEM` commands read: `key`,
/// `value` (or `next_key`) are user pointers. Passing exactly this size is
/// allowed; the kernel zero-fills the rest of its copy.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, map: BorrowedFd<'_>, key: u64, value: u64, flags: u64) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key,
        value,
        flags,
    };
    syscall(cmd, &mut attr)
}

/// `bpf(cmd, attr, sizeof attr)`.
fn syscall<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    call(cmd, attr).map(drop)
}

/// `bpf(cmd, attr, sizeof attr)`, and what it returned (a new descriptor
/// for the commands that create one).
fn call<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix whose size
    // is passed along; the pointers in it are valid for the call (callers
    // pass addresses of live values of the sizes the map was created with).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<A>() as libc::c_long,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Attaches an sk_msg program to a sockmap or sockhash. The attachment
/// lives as long as the map: nothing to detach by hand.
pub(super) fn attach_sk_msg(map: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct AttachAttr {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
    }
    let mut attr = AttachAttr {
        target_fd: map.as_raw_fd() as u32,
        attach_bpf_fd: program.as_raw_fd() as u32,
        attach_type: BPF_SK_MSG_VERDICT,
        attach_flags: 0,
        replace_bpf_fd: 0,
    };
    syscall(BPF_PROG_ATTACH, &mut attr)
}

/// Attaches a sock_ops program to a cgroup through a bpf_link: the returned
/// descriptor is the attachment, and closing it detaches the program. The
/// kernel takes no flags here: cgroup links always share the cgroup with
/// other programs (multi mode).
pub(super) fn attach_sock_ops(
    cgroup: BorrowedFd<'_>,
    program: BorrowedFd<'_>,
) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct LinkAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let mut attr = LinkAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_SOCK_OPS,
        flags: 0,
    };
    let fd = call(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: on success the kernel returned a new descriptor that nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The value under `key` of a map whose keys are `K` and values `V`.
pub(super) fn get<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    lookup(BPF_MAP_LOOKUP_ELEM, map, key)
}

/// The value under `key`, deleted in the same call (hash maps, Linux 5.14
/// and later): a connection's end reads and removes three entries, and one
/// syscall each instead of two shows in the connection rate.
pub(super) fn take<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    lookup(BPF_MAP_LOOKUP_AND_DELETE_ELEM, map, key)
}

/// A command that writes the value under `key` back: `None` for no such key.
fn lookup<K: aya::Pod, V: aya::Pod>(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    match bpf(
        cmd,
        map,
        std::ptr::from_ref(key) as u64,
        value.as_mut_ptr() as u64,
        0,
    ) {
        // SAFETY: the kernel filled all `size_of::<V>()` bytes (the map's
        // value size, checked at load), and any bytes are a valid Pod.
        Ok(()) => Ok(Some(unsafe { value.assume_init() })),
        Err(err) if is_enoent(&err) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Stores `value` under `key`.
pub(super) fn put<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    bpf(
        BPF_MAP_UPDATE_ELEM,
        map,
        std::ptr::from_ref(key) as u64,
        std::ptr::from_ref(value) as u64,
        flags,
    )
}

/// Deletes `key`; `false` if it was not there.
pub(super) fn remove<K: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<bool> {
    match bpf(
        BPF_MAP_DELETE_ELEM,
        map,
        std::ptr::from_ref(key) as u64,
        0,
        0,
    ) {
        Ok(()) => Ok(true),
        Err(err) if is_enoent(&err) => Ok(false),
        Err(err) => Err(err),
    }
}

fn is_enoent(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::ENOENT)
}

/// Every key of the map (one syscall per key), each once. The walk is not
/// atomic: when the key it stands on is deleted meanwhile (a socket closing)
/// the kernel restarts from the first key, hence the bound of `max_entries`
/// steps and the de-duplication.
pub(super) fn keys<K: aya::Pod + Eq + std::hash::Hash>(
    map: BorrowedFd<'_>,
    max_entries: u32,
) -> io::Result<Vec<K>> {
    let mut keys: Vec<K> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut next = std::mem::MaybeUninit::<K>::zeroed();
    for _ in 0..=max_entries {
        // A null key asks for the first one.
        let key = keys
            .last()
            .map_or(0, |last| std::ptr::from_ref(last) as u64);
        match bpf(BPF_MAP_GET_NEXT_KEY, map, key, next.as_mut_ptr() as u64, 0) {
            // SAFETY: the kernel wrote a whole key; any bytes are a valid Pod.
            Ok(()) => {
                let k = unsafe { next.assume_init() };
                if seen.insert(k) {
                    keys.push(k);
                } else {
                    // Restarted from the first key: everything after was seen.
                    break;
                }
            }
            Err(err) if is_enoent(&err) => break,
            Err(err) => return Err(err),
        }
    }
    Ok(keys)
}

/// How many keys a map of `key_size`-byte keys holds (one syscall per key;
/// the same restart caveat as [`keys`]).
pub(super) fn count_keys(
    map: BorrowedFd<'_>,
    key_size: usize,
    max_entries: u32,
) -> io::Result<usize> {
    let mut seen = std::collections::HashSet::new();
    let mut current: Option<Vec<u8>> = None;
    for _ in 0..=max_entries {
        let mut next = vec![0u8; key_size];
        let key = current.as_ref().map_or(0, |k| k.as_ptr() as u64);
        match bpf(BPF_MAP_GET_NEXT_KEY, map, key, next.as_mut_ptr() as u64, 0) {
            Ok(()) if seen.insert(next.clone()) => current = Some(next),
            Ok(()) => break,
            Err(err) if is_enoent(&err) => break,
            Err(err) => return Err(err),
        }
    }
    Ok(seen.len())
}
