//! Raw `bpf(2)` element commands for `MUX_SOCKS`, the one map aya cannot
//! type: aya's `SockHash` insists on 4-byte values, and with those the
//! kernel answers no lookup (see `mux_common::MAP_SOCKS_VALUE_SIZE`). Keys
//! and values of that map are both `u64`, so these helpers are not generic.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

// enum bpf_cmd in <linux/bpf.h>; stable ABI.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

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
    // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix whose size
    // is passed along; the pointers in it are valid for the call (callers
    // pass addresses of live locals of the sizes the map was created with).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (&raw mut attr).cast::<libc::c_void>(),
            size_of::<ElemAttr>() as libc::c_long,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn is_enoent(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::ENOENT)
}

/// The value under `key` (for a sockhash: the socket's cookie), if any.
pub(super) fn lookup(map: BorrowedFd<'_>, key: u64) -> io::Result<Option<u64>> {
    let mut value: u64 = 0;
    match bpf(
        BPF_MAP_LOOKUP_ELEM,
        map,
        (&raw const key) as u64,
        (&raw mut value) as u64,
        0,
    ) {
        Ok(()) => Ok(Some(value)),
        Err(err) if is_enoent(&err) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Stores `value` (for a sockhash: a socket fd) under `key`.
pub(super) fn update(map: BorrowedFd<'_>, key: u64, value: u64, flags: u64) -> io::Result<()> {
    bpf(
        BPF_MAP_UPDATE_ELEM,
        map,
        (&raw const key) as u64,
        (&raw const value) as u64,
        flags,
    )
}

/// Deletes `key`; `false` if it was not there.
pub(super) fn delete(map: BorrowedFd<'_>, key: u64) -> io::Result<bool> {
    match bpf(BPF_MAP_DELETE_ELEM, map, (&raw const key) as u64, 0, 0) {
        Ok(()) => Ok(true),
        Err(err) if is_enoent(&err) => Ok(false),
        Err(err) => Err(err),
    }
}

/// Every key of the map (one syscall per key), sorted. The walk is not
/// atomic: when the key it stands on is deleted meanwhile (a socket closing)
/// the kernel restarts from the first key, hence the bound of `max_entries`
/// steps and the final de-duplication.
pub(super) fn keys(map: BorrowedFd<'_>, max_entries: u32) -> io::Result<Vec<u64>> {
    let mut keys = Vec::new();
    let mut next: u64 = 0;
    for _ in 0..=max_entries {
        // A null key asks for the first one.
        let key = match keys.last() {
            Some(last) => last as *const u64 as u64,
            None => 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, map, key, (&raw mut next) as u64, 0) {
            Ok(()) => keys.push(next),
            Err(err) if is_enoent(&err) => break,
            Err(err) => return Err(err),
        }
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(keys)
}
