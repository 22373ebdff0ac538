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
/// [`MAP_CAPTURE`] and of [`MAP_SOCKS`] (which holds two sockets per
/// connection, hence twice as many entries).
pub const MAX_CONNECTIONS: u32 = 65536;

/// Name of the `HashMap<Endpoint, Capture>` in which user space publishes
/// mux's outgoing socket before it connects to a backend.
pub const MAP_CAPTURE: &str = "MUX_CAPTURE";
/// Entries of [`MAP_CAPTURE`].
pub const MAP_CAPTURE_SIZE: u32 = MAX_CONNECTIONS;

/// Name of the `SockHash<u64>` holding the sockets whose bytes the kernel
/// moves: the backend's accepted socket (inserted by the sock_ops program)
/// and mux's client socket (inserted by user space), each under the key user
/// space chose in [`Capture`].
pub const MAP_SOCKS: &str = "MUX_SOCKS";
/// Entries of [`MAP_SOCKS`]: two sockets per connection.
pub const MAP_SOCKS_SIZE: u32 = 2 * MAX_CONNECTIONS;
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
/// Entries of [`MAP_STATS`].
pub const MAP_STATS_SIZE: u32 = 2;

/// Name of the sock_ops program (the Rust function name in mux-ebpf; it must
/// differ from its ELF section, `sockops`, or the object fails to link).
pub const PROG_SOCK_OPS: &str = "mux_sock_ops";

/// One end of a TCP connection as the kernel sees it, used as the key of
/// [`MAP_CAPTURE`]: the *local* end of mux's outgoing socket, which is the
/// *remote* end of the backend's accepted socket.
///
/// Canonical form, which both sides must produce (see
/// `mux_common::Endpoint::new` under the `user` feature and mux-ebpf's
/// sock_ops program):
/// - IPv4 (including an IPv4-mapped IPv6 address such as `::ffff:127.0.0.1`,
///   which a dual-stack listener reports for an IPv4 peer): `family` is
///   [`FAMILY_INET`], `addr[0]` holds the address in network byte order (its
///   four octets in memory order), `addr[1..4]` are zero.
/// - IPv6: `family` is [`FAMILY_INET6`], `addr` holds the sixteen octets in
///   memory order, i.e. the four words exactly as sock_ops' `remote_ip6`
///   gives them.
/// - `port` is in host byte order, in the low 16 bits.
///
/// 32 bytes, alignment 8, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The network namespace cookie of the socket (`SO_NETNS_COOKIE` in user
    /// space, `bpf_get_netns_cookie` in the kernel), so that a socket in
    /// another namespace that happens to use the same address and port (a
    /// container's own loopback) never matches.
    pub netns_cookie: u64,
    /// The address, see the type's documentation for the canonical form.
    pub addr: [u32; 4],
    /// The TCP port, host byte order.
    pub port: u32,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u32,
}

/// What to do with a captured connection: the value of [`MAP_CAPTURE`].
///
/// The two keys are ids user space assigns per connection; they are the
/// [`MAP_SOCKS`] keys of the connection's two sockets. Distinct connections
/// must use distinct keys, and 0 is as good a key as any other (the map does
/// not treat it specially).
///
/// 24 bytes, alignment 8, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capture {
    /// Key under which the sock_ops program inserts the backend's accepted
    /// socket (the server, e.g. sshd, that accepted mux's connection).
    pub backend_key: u64,
    /// Key under which user space inserts mux's accepted client socket. The
    /// sock_ops program does not read it; the sk_msg program (next step)
    /// redirects the backend's sends to this socket's egress.
    pub client_key: u64,
    /// `CAPTURE_*` bits; no bit is defined yet, so this is 0 today. Reserved
    /// for the redirect programs (e.g. which directions to splice).
    pub flags: u32,
    /// Explicit padding so that every byte of the value is a field; must be 0.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<Endpoint>() == 32);
const _: () = assert!(core::mem::align_of::<Endpoint>() == 8);
const _: () = assert!(core::mem::size_of::<Capture>() == 24);
const _: () = assert!(core::mem::align_of::<Capture>() == 8);

#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, SocketAddr};

    use super::{Capture, Endpoint, FAMILY_INET, FAMILY_INET6};

    // SAFETY: both are #[repr(C)], made only of integers, with no padding
    // (checked by the size assertions above), so every byte pattern is valid.
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for Capture {}

    impl Endpoint {
        /// The canonical endpoint for `addr` in the network namespace whose
        /// cookie is `netns_cookie`. An IPv4-mapped IPv6 address becomes
        /// IPv4, as the sock_ops program does, because the two ends of one
        /// connection may disagree on the family (a dual-stack backend sees
        /// `::ffff:a.b.c.d` where mux's IPv4 socket sees `a.b.c.d`).
        pub fn new(netns_cookie: u64, addr: SocketAddr) -> Self {
            let ip = match addr.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 @ IpAddr::V4(_) => v4,
            };
            let (family, addr_words) = match ip {
                IpAddr::V4(v4) => (FAMILY_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
                IpAddr::V6(v6) => {
                    let o = v6.octets();
                    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    (FAMILY_INET6, [word(0), word(4), word(8), word(12)])
                }
            };
            Self {
                netns_cookie,
                addr: addr_words,
                port: u32::from(addr.port()),
                family,
            }
        }
    }

    impl Capture {
        /// A capture with both keys and no flags.
        pub const fn new(backend_key: u64, client_key: u64) -> Self {
            Self {
                backend_key,
                client_key,
                flags: 0,
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
            let e = Endpoint::new(7, SocketAddr::from((Ipv4Addr::new(127, 0, 0, 1), 2222)));
            assert_eq!(e.family, FAMILY_INET);
            assert_eq!(e.addr, [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0]);
            assert_eq!(e.port, 2222);
            assert_eq!(e.netns_cookie, 7);
        }

        #[test]
        fn v4_mapped_becomes_ipv4() {
            let mapped = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped();
            let m = Endpoint::new(1, SocketAddr::V6(SocketAddrV6::new(mapped, 80, 0, 0)));
            let v4 = Endpoint::new(1, SocketAddr::from((Ipv4Addr::LOCALHOST, 80)));
            assert_eq!(m, v4);
        }

        #[test]
        fn ipv6_words_in_memory_order() {
            let e = Endpoint::new(1, SocketAddr::from((Ipv6Addr::LOCALHOST, 443)));
            assert_eq!(e.family, FAMILY_INET6);
            assert_eq!(e.addr, [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
        }
    }
}
