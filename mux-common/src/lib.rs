//! Types shared by user space and the eBPF programs.
//!
//! Every type here crosses the user/kernel boundary as raw bytes (map keys
//! and values), so each one is `#[repr(C)]`, holds only fixed-width integers
//! (no `bool`, no enums: the kernel can hand back any bit pattern) and has
//! every byte covered by a named field. The last point matters for keys: the
//! kernel compares hash-map keys byte by byte, so an implicit padding hole
//! holding garbage would make two equal-looking keys differ. The
//! `const` assertions at the bottom pin the sizes so a layout change shows up
//! as a compile error on both sides.
#![cfg_attr(not(test), no_std)]

/// Address family of an [`Endpoint`] (`AF_INET`, the kernel's value).
pub const FAMILY_INET: u32 = 2;
/// Address family of an [`Endpoint`] (`AF_INET6`, the kernel's value).
pub const FAMILY_INET6: u32 = 10;

/// Most connections mux splices in the kernel at once: the size of
/// [`MAP_PENDING`] and [`MAP_FLOWS`], and half that of [`MAP_SOCKS`] (which
/// holds two sockets per connection).
pub const MAX_CONNECTIONS: u32 = 65536;

/// Name of the `HashMap<u64, Pending>` in which user space publishes mux's
/// outgoing socket, by socket cookie, before it connects to a backend.
pub const MAP_PENDING: &str = "MUX_PENDING";
/// Name of the `HashMap<Flow, Capture>` the sock_ops program fills when one
/// of the pending sockets connects: the 4-tuple the other programs see.
pub const MAP_FLOWS: &str = "MUX_FLOWS";

/// Name of the `HashMap<u64, Client>` in which user space publishes, by
/// socket cookie, the client sockets of connections on the kernel path.
pub const MAP_CLIENTS: &str = "MUX_CLIENTS";
/// Name of the `HashMap<ListenKey, u32>` of mux's listening ports: the
/// sock_ops program asks for ACK callbacks on the sockets they accept, so
/// that [`Client::acked`] stays current.
pub const MAP_LISTEN: &str = "MUX_LISTEN";
/// Entries of [`MAP_LISTEN`].
pub const MAP_LISTEN_SIZE: u32 = 256;

/// Bytes the backend may have outstanding in the client socket (written to
/// it, not yet acknowledged by the client) while its sends go straight to
/// the client in the kernel. Past it, its sends take the normal path
/// through mux (which blocks and wakes it like any TCP peer) until mux has
/// delivered them and the client has caught up.
///
/// Why a bound at all: a redirected send that finds the client socket full
/// fails with EAGAIN for a non-blocking backend, and nothing ever wakes an
/// edge-triggered poller (tokio, nginx, Go) again, since its own socket
/// never filled. Keeping the client's queue under this bound, with its
/// send buffer fixed at [`CLIENT_SNDBUF`], means a redirected send always
/// finds room.
pub const REDIRECT_WINDOW: u64 = 4 << 20;
/// `SO_SNDBUF` mux sets on client sockets on the kernel path (the kernel
/// doubles it): twice [`REDIRECT_WINDOW`] of buffer memory, leaving room
/// for per-segment overhead. Set with `SO_SNDBUFFORCE`, past
/// `net.core.wmem_max`.
pub const CLIENT_SNDBUF: u32 = 4 << 20;
/// A send at least this large, the backend's first since sock_ops captured
/// its socket, opens the kernel path at once, without waiting for mux to
/// see bulk (see [`Client::open`]): with nothing gone the normal way, no
/// byte can be overtaken. A backend that writes in bulk from its first byte
/// (a file, a model's weights, iperf3) then never has mux relay any of it,
/// and mux need not catch up with it before the kernel takes over, which
/// a backend that never pauses can put off for good.
pub const OPEN_SEND: u64 = 64 << 10;
/// A backend's send this large or larger counts as bulk for `auto`: a
/// connection whose backend sent more than half its bytes in smaller
/// pieces by its first bulk delivery is spliced. Each redirected send goes
/// out to the client as a segment of its own, while splice moves whatever
/// piled up behind mux in one: before this rule, iperf3 downloads in 8 KiB
/// writes ran at 6.4 Gbit/s on the kernel path against 8.4 spliced, in
/// 2 KiB ones at 3.2 against 3.6; in 16 KiB ones the kernel path led (12.7
/// against 11.6).
pub const BULK_SEND: u64 = 16 << 10;
/// `TCP_NOTSENT_LOWAT` that sock_ops sets on each captured backend socket:
/// during a spill, the backend then blocks with at most this much waiting
/// unsent behind mux, instead of a send buffer of megabytes, so mux catches
/// up and the kernel takes the connection back sooner. Not 1: a socket polls
/// writable only while twice its unsent bytes are under the mark, and a
/// backend with Nagle on (the default) or `TCP_CORK` keeps a partial segment
/// unsent until an ACK comes; a mark of 1 then let it write one small piece
/// per delayed ACK (iperf3 with 2 KiB writes ran at 10-15 Mbit/s instead of
/// 4-5 Gbit/s in a third of the runs). Twice the largest segment on loopback
/// (64 KiB) stays well under this.
pub const BACKEND_NOTSENT_LOWAT: u32 = 256 << 10;

/// Name of the `SockHash<u64>` holding the backends' accepted sockets
/// (inserted by the sock_ops program under [`Pending::backend_key`]), to
/// which the sk_msg program is attached: it runs on their sends.
pub const MAP_SOCKS: &str = "MUX_SOCKS";
/// Entries of [`MAP_SOCKS`]: one socket per connection.
pub const MAP_SOCKS_SIZE: u32 = MAX_CONNECTIONS;
/// Name of the `SockHash<u64>` holding mux's client sockets (inserted by
/// user space under [`Pending::client_key`]): where sk_msg redirects. A map
/// of its own, with no program attached, because a socket in a map with an
/// sk_msg program has every send copied through that program: mux's own
/// splice(2) into the client socket (bytes that spill) would lose its
/// zero-copy and ran slower than the splice path.
pub const MAP_CLIENT_SOCK: &str = "MUX_CLIENT_SOCK";
/// Entries of [`MAP_CLIENT_SOCK`]: one socket per connection.
pub const MAP_CLIENT_SOCK_SIZE: u32 = MAX_CONNECTIONS;
/// Value size of [`MAP_SOCKS`]: 8, not the 4 of aya's `SockHash`, because
/// only then does a lookup from user space answer (with the socket's
/// cookie); with 4 the kernel returns ENOSPC for every key, present or not.
/// Updates from user space then take the socket's fd as a `u64`.
pub const MAP_SOCKS_VALUE_SIZE: u32 = 8;

/// Name of the `PerCpuArray<u64>` of counters the programs bump (indices are
/// the `STAT_*` constants). Per-CPU so that the programs need no atomics.
pub const MAP_STATS: &str = "MUX_STATS";
/// sock_ops saw a backend socket whose peer was published and inserted it.
pub const STAT_CAPTURED: u32 = 0;
/// sock_ops saw a published peer but `bpf_sock_hash_update` failed (map
/// full, or a socket the kernel refuses): that connection stays in user space.
pub const STAT_INSERT_FAILED: u32 = 1;
/// sk_msg redirected a backend's send to its client socket.
pub const STAT_REDIRECTED: u32 = 2;
/// sk_msg found the connection but its client socket was gone from
/// [`MAP_SOCKS`] (the client closed): the send took the normal path.
pub const STAT_REDIRECT_FAILED: u32 = 3;
/// sock_ops saw a pending socket connect but could not record its flow
/// ([`MAP_FLOWS`] full): that connection stays in user space.
pub const STAT_FLOW_FAILED: u32 = 4;
/// sk_msg sent a backend's bytes the normal way because the client had
/// [`REDIRECT_WINDOW`] outstanding (or mux had not yet delivered earlier
/// ones).
pub const STAT_SPILLED: u32 = 5;
/// sock_ops turned off the ACK callbacks of a client socket that is not, or
/// no longer, published: once per such socket.
pub const STAT_ACKS_UNWATCHED: u32 = 6;
/// Entries of [`MAP_STATS`].
pub const MAP_STATS_SIZE: u32 = 7;

/// Name of the `HashMap<u32, u32>` of ports mux takes over (host order ->
/// 1): connections to them from other hosts go to mux's listener.
pub const MAP_TAKEOVER: &str = "MUX_TAKEOVER";
/// Entries of [`MAP_TAKEOVER`].
pub const MAP_TAKEOVER_SIZE: u32 = 64;
/// Name of the `SockMap` holding mux's listeners for taken-over ports.
pub const MAP_LISTENERS: &str = "MUX_LISTENERS";
/// [`MAP_LISTENERS`] index of the IPv4 listener.
pub const LISTENER_V4: u32 = 0;
/// [`MAP_LISTENERS`] index of the IPv6 listener.
pub const LISTENER_V6: u32 = 1;
/// Name of the sk_lookup program.
pub const PROG_SK_LOOKUP: &str = "mux_sk_lookup";

/// Name of the sock_ops program (the Rust function name in mux-ebpf; it must
/// differ from its ELF section, `sockops`, or the object fails to link).
pub const PROG_SOCK_OPS: &str = "mux_sock_ops";
/// Name of the sk_msg program's global holding the byte offset of
/// `write_seq` in this kernel's `struct tcp_sock` (from its BTF), set by
/// user space at load time; 0 (unknown) keeps every connection off the
/// kernel path once it has sent anything the normal way.
pub const GLOBAL_TCP_WRITE_SEQ: &str = "MUX_TCP_WRITE_SEQ";
/// Name of the sk_msg program, attached to [`MAP_SOCKS`].
pub const PROG_SK_MSG: &str = "mux_sk_msg";

/// A TCP connection as seen from mux's outgoing socket: the key of
/// [`MAP_FLOWS`]. The backend's socket sees the same connection with local
/// and remote swapped; the programs swap them back before a lookup.
///
/// Canonical form, which every side must produce:
/// - An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack
///   listener reports for an IPv4 peer) counts as IPv4: mux's own socket for
///   the same connection may well be IPv4.
/// - IPv4: `family` is [`FAMILY_INET`], word 0 of each address holds it in
///   network byte order (its four octets in memory order), words 1-3 are 0.
/// - IPv6: `family` is [`FAMILY_INET6`], the sixteen octets in memory order,
///   i.e. the four words exactly as the kernel's `*_ip6` fields give them.
/// - Ports in host byte order, in the low 16 bits.
///
/// 56 bytes, alignment 8, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flow {
    /// The network namespace cookie, so that a connection in another
    /// namespace with the same addresses and ports (a container's own
    /// loopback) never matches.
    pub netns_cookie: u64,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u32,
    /// mux's port (the source port of its connection to the backend).
    pub local_port: u32,
    /// The backend's port.
    pub remote_port: u32,
    /// Explicit padding so that every byte of the key is a field; must be 0.
    pub _pad: u32,
    /// mux's address.
    pub local_addr: [u32; 4],
    /// The backend's address.
    pub remote_addr: [u32; 4],
}

/// What user space publishes for one outgoing socket before it connects:
/// the value of [`MAP_PENDING`], keyed by the socket's cookie. The sock_ops
/// program fills in `flow` and sets `connected` when the socket connects, so
/// that user space can find (and delete) the [`MAP_FLOWS`] entry even if the
/// connection failed half-way.
///
/// 88 bytes, alignment 8, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pending {
    /// [`MAP_SOCKS`] key for the backend's socket.
    pub backend_key: u64,
    /// [`MAP_SOCKS`] key for mux's client socket.
    pub client_key: u64,
    /// The client socket's cookie: its [`MAP_CLIENTS`] key.
    pub client_cookie: u64,
    /// Written by sock_ops when the socket connects.
    pub flow: Flow,
    /// 1 once `flow` is valid and in [`MAP_FLOWS`].
    pub connected: u32,
    /// Explicit padding; must be 0.
    pub _pad: u32,
}

/// One connection on the kernel path: the value of [`MAP_FLOWS`]. Written
/// by the kernel programs in place (sk_msg under the backend socket's lock,
/// so its updates never race each other); user space reads it at the
/// connection's first bulk delivery (`auto`), at its checks, and when it
/// ends.
///
/// 64 bytes, alignment 8, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capture {
    /// Key under which the sock_ops program inserts the backend's accepted
    /// socket (the server, e.g. sshd, that accepted mux's connection).
    pub backend_key: u64,
    /// Key under which user space inserted mux's accepted client socket; the
    /// sk_msg program redirects the backend's sends to its egress.
    pub client_key: u64,
    /// The client socket's [`MAP_CLIENTS`] key.
    pub client_cookie: u64,
    /// Bytes the sk_msg program moved from the backend to the client.
    pub down_bytes: u64,
    /// The backend socket's sequence number when sock_ops captured it
    /// (nothing sent yet). Its `write_seq` minus this is how many bytes took
    /// the normal path (through mux) since: the kernel path resumes only
    /// once mux has delivered all of them ([`Client::delivered`]), so that
    /// no redirected byte overtakes them. Counting them in sk_msg is not
    /// exact: a normal send that fails half-way leaves its verdict cached,
    /// and the backend's next send takes it without running the program.
    pub write_seq_base: u32,
    /// Set to 1 by the sock_ops program once the backend's socket is in
    /// [`MAP_SOCKS`]; 0 means the kernel never took this connection over.
    pub captured: u32,
    /// 1 while the backend's sends take the normal path (see
    /// [`REDIRECT_WINDOW`]).
    pub spilling: u32,
    /// Set to 1 by the sk_msg program when the backend's first send was
    /// [`OPEN_SEND`] or more: the kernel path is open whatever
    /// [`Client::open`] says.
    pub opened: u32,
    /// Bytes of every send of the backend that the sk_msg program saw.
    pub sent_bytes: u64,
    /// Of those, the bytes of sends of [`BULK_SEND`] or more.
    pub bulk_send_bytes: u64,
}

/// A client socket on the kernel path: the value of [`MAP_CLIENTS`], by
/// socket cookie.
///
/// User space replaces the whole entry at each update, and the kernel may
/// hand the old entry's memory to another entry of the map at once, while a
/// program still reads it; `cookie` is how the programs tell that they read
/// their own connection's entry.
///
/// 32 bytes, alignment 8, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Client {
    /// Bytes the client acknowledged, as of the last ACK the kernel timed
    /// (written by the sock_ops program; never ahead of the truth).
    pub acked: u64,
    /// Bytes mux itself wrote to the client (what the backend sent the
    /// normal way), written by user space.
    pub delivered: u64,
    /// The client socket's cookie: this entry's own key.
    pub cookie: u64,
    /// 0 until user space first reports `delivered`, which it does once the
    /// backend sends in bulk. Until then every send takes the normal path
    /// through mux (unless the backend's first send was bulk in itself, see
    /// [`OPEN_SEND`]): requests and answers of a few hundred bytes had a worse
    /// round-trip tail through the kernel than through mux when many
    /// connections share few CPUs (see the README), and gain nothing from
    /// skipping a copy.
    pub open: u32,
    /// Explicit padding; must be 0.
    pub _pad: u32,
}

/// Key of [`MAP_LISTEN`]: a listening port in a network namespace.
///
/// 16 bytes, alignment 8, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenKey {
    pub netns_cookie: u64,
    /// Host byte order.
    pub port: u32,
    /// Explicit padding; must be 0.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<Flow>() == 56);
const _: () = assert!(core::mem::align_of::<Flow>() == 8);
const _: () = assert!(core::mem::size_of::<Pending>() == 88);
const _: () = assert!(core::mem::size_of::<Capture>() == 64);
const _: () = assert!(core::mem::size_of::<Client>() == 32);
const _: () = assert!(core::mem::size_of::<ListenKey>() == 16);
const _: () = assert!(core::mem::align_of::<Capture>() == 8);

#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, SocketAddr};

    use super::{Capture, Client, FAMILY_INET, FAMILY_INET6, Flow, ListenKey, Pending};

    // SAFETY: all are #[repr(C)], made only of integers, with no padding
    // (checked by the size assertions above), so every byte pattern is valid.
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for Pending {}
    unsafe impl aya::Pod for Capture {}
    unsafe impl aya::Pod for Client {}
    unsafe impl aya::Pod for ListenKey {}

    /// An address in canonical form: (family, words); see [`Flow`].
    fn canonical(ip: IpAddr) -> (u32, [u32; 4]) {
        match ip.to_canonical() {
            IpAddr::V4(v4) => (FAMILY_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                (FAMILY_INET6, [word(0), word(4), word(8), word(12)])
            }
        }
    }

    impl Flow {
        /// The canonical flow of a connection from mux's `local` address to
        /// the backend's `remote` one, in the namespace `netns_cookie`.
        pub fn new(netns_cookie: u64, local: SocketAddr, remote: SocketAddr) -> Self {
            let (family, local_addr) = canonical(local.ip());
            let (_, remote_addr) = canonical(remote.ip());
            Self {
                netns_cookie,
                family,
                local_port: u32::from(local.port()),
                remote_port: u32::from(remote.port()),
                _pad: 0,
                local_addr,
                remote_addr,
            }
        }
    }

    impl Pending {
        /// A pending socket whose connection will use these keys, for the
        /// client socket whose cookie is `client_cookie`.
        pub const fn new(backend_key: u64, client_key: u64, client_cookie: u64) -> Self {
            Self {
                backend_key,
                client_key,
                client_cookie,
                flow: Flow {
                    netns_cookie: 0,
                    family: 0,
                    local_port: 0,
                    remote_port: 0,
                    _pad: 0,
                    local_addr: [0; 4],
                    remote_addr: [0; 4],
                },
                connected: 0,
                _pad: 0,
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use core::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

        use super::*;

        #[test]
        fn ipv4_is_network_order_in_first_word() {
            let local = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 1), 40000));
            let remote = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), 22));
            let f = Flow::new(7, local, remote);
            assert_eq!(f.family, FAMILY_INET);
            assert_eq!(f.local_addr, [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0]);
            assert_eq!(f.remote_addr, [u32::from_ne_bytes([127, 0, 0, 2]), 0, 0, 0]);
            assert_eq!((f.local_port, f.remote_port), (40000, 22));
            assert_eq!(f.netns_cookie, 7);
        }

        #[test]
        fn v4_mapped_becomes_ipv4() {
            let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
            let m = Flow::new(
                1,
                SocketAddr::V6(SocketAddrV6::new(mapped, 80, 0, 0)),
                SocketAddr::V6(SocketAddrV6::new(mapped, 22, 0, 0)),
            );
            let v4 = Flow::new(
                1,
                SocketAddr::from((Ipv4Addr::LOCALHOST, 80)),
                SocketAddr::from((Ipv4Addr::LOCALHOST, 22)),
            );
            assert_eq!(m, v4);
        }

        #[test]
        fn ipv6_words_in_memory_order() {
            let lo = SocketAddr::from((Ipv6Addr::LOCALHOST, 443));
            let f = Flow::new(1, lo, lo);
            assert_eq!(f.family, FAMILY_INET6);
            assert_eq!(f.local_addr, [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
        }
    }
}
