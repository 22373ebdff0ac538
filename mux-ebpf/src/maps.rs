//! The maps shared by mux's kernel programs and user space.
//!
//! Names and sizes come from mux-common so that user space opens the same
//! maps by the same names; a static's name is its map name. The connection
//! maps are not preallocated: an idle mux should not pin megabytes of
//! kernel memory for 65,536 connections it does not have.

use core::{cell::UnsafeCell, ffi::c_void, marker::PhantomData};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, bpf_map_def, bpf_map_type::BPF_MAP_TYPE_SOCKHASH, bpf_sock_ops},
    cty::c_long,
    helpers::bpf_sock_hash_update,
    macros::map,
    maps::{HashMap, PerCpuArray, SockMap},
};
use mux_common::{
    Capture, Client, Flow, ListenKey, MAP_CLIENT_SOCK_SIZE, MAP_LISTEN_SIZE, MAP_SOCKS_SIZE,
    MAP_SOCKS_VALUE_SIZE, MAP_STATS_SIZE, MAP_TAKEOVER_SIZE, MAX_CONNECTIONS, Pending,
};

/// mux's outgoing sockets, by socket cookie, published by user space before
/// it connects to a backend. The sock_ops program recognises them when they
/// connect and records their flow; nothing else on the machine matches.
#[map]
pub static MUX_PENDING: HashMap<u64, Pending> =
    HashMap::with_max_entries(MAX_CONNECTIONS, BPF_F_NO_PREALLOC);

/// The connections the kernel may take over, by flow (mux's end first),
/// filled by sock_ops when a pending socket connects. A lookup from the
/// backend's side is how the programs tell "the other end of mux's
/// connection" from every other socket.
#[map]
pub static MUX_FLOWS: HashMap<Flow, Capture> =
    HashMap::with_max_entries(MAX_CONNECTIONS, BPF_F_NO_PREALLOC);

/// The client sockets of connections on the kernel path, by socket cookie:
/// how far each client has acknowledged (kept by sock_ops) and how much mux
/// wrote to it itself (kept by user space), for sk_msg's bound.
#[map]
pub static MUX_CLIENTS: HashMap<u64, Client> =
    HashMap::with_max_entries(MAX_CONNECTIONS, BPF_F_NO_PREALLOC);

/// mux's listening ports: their accepted sockets get ACK callbacks so that
/// `MUX_CLIENTS` learns what each client acknowledged.
#[map]
pub static MUX_LISTEN: HashMap<ListenKey, u32> = HashMap::with_max_entries(MAP_LISTEN_SIZE, 0);

/// Ports mux takes over (host order) -> 1: new connections to them from
/// other hosts go to mux's listener instead (see `sk_lookup`).
#[map]
pub static MUX_TAKEOVER: HashMap<u32, u32> = HashMap::with_max_entries(MAP_TAKEOVER_SIZE, 0);

/// mux's listening sockets that taken-over connections go to: index
/// `LISTENER_V4` and `LISTENER_V6`.
#[map]
pub static MUX_LISTENERS: SockMap = SockMap::with_max_entries(2, 0);

/// The backends' sockets whose sends the kernel moves, under the keys chosen
/// by user space (`Pending::backend_key`); sk_msg is attached here. The
/// kernel drops a socket from this map by itself when the socket closes.
#[map]
pub static MUX_SOCKS: CookieSockHash<u64> = CookieSockHash::with_max_entries(MAP_SOCKS_SIZE);

/// mux's client sockets, under `Pending::client_key`: the targets of
/// sk_msg's redirects, in a map with no program so that mux's own sends to
/// them stay plain TCP sends (see `mux_common::MAP_CLIENT_SOCK`).
#[map]
pub static MUX_CLIENT_SOCK: CookieSockHash<u64> =
    CookieSockHash::with_max_entries(MAP_CLIENT_SOCK_SIZE);

/// Counters, indexed by `mux_common::STAT_*`. Per-CPU, so a plain add is
/// race-free without atomics.
#[map]
pub static MUX_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAP_STATS_SIZE, 0);

/// Adds one to counter `index` (a `STAT_*` constant).
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(counter) = MUX_STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup,
        // valid for this CPU for the program's run; no one else writes it.
        unsafe { *counter = (*counter).wrapping_add(1) };
    }
}

/// A `BPF_MAP_TYPE_SOCKHASH` with 8-byte values.
///
/// aya-ebpf's `SockHash` declares 4-byte values, and for those the kernel
/// refuses every lookup from user space with ENOSPC, present key or not
/// (it checks the value size before the key), so user space could not tell
/// whether a socket is in the map short of walking all keys. With 8-byte
/// values a lookup returns the socket's cookie, or ENOENT. Programs see no
/// difference: the sockhash helpers ignore the value size.
#[repr(transparent)]
pub struct CookieSockHash<K> {
    def: UnsafeCell<bpf_map_def>,
    _key: PhantomData<K>,
}

// SAFETY: the definition is only read, by the loader (which rewrites the
// map references to the created map's fd); the program never touches it.
unsafe impl<K> Sync for CookieSockHash<K> {}

impl<K> CookieSockHash<K> {
    pub const fn with_max_entries(max_entries: u32) -> Self {
        Self {
            def: UnsafeCell::new(bpf_map_def {
                type_: BPF_MAP_TYPE_SOCKHASH,
                key_size: size_of::<K>() as u32,
                value_size: MAP_SOCKS_VALUE_SIZE,
                max_entries,
                map_flags: 0,
                id: 0,
                pinning: 0,
            }),
            _key: PhantomData,
        }
    }

    /// The map pointer the sockhash helpers take (`bpf_msg_redirect_hash`,
    /// `bpf_sk_redirect_hash`, ...).
    #[inline(always)]
    pub const fn as_ptr(&self) -> *mut c_void {
        self.def.get().cast()
    }

    /// Inserts the socket of a sock_ops context under `key`
    /// (`bpf_sock_hash_update`); `Err` holds the helper's negative errno.
    #[inline(always)]
    pub fn update(&self, mut key: K, ops: *mut bpf_sock_ops, flags: u64) -> Result<(), c_long> {
        // SAFETY: `ops` is the program's context, the map pointer is this
        // map's definition (relocated by the loader), and the key lives on
        // the stack for the call, as the helper requires.
        let ret = unsafe { bpf_sock_hash_update(ops, self.as_ptr(), (&raw mut key).cast(), flags) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }
}
