//! The canonical `Flow` of a socket, as sock_ops and sk_msg see it.
//!
//! Every program looks connections up by the same key user space would
//! build with `mux_common::Flow::new`: mux's end first, the backend's end
//! second. A program running on the backend's socket sees the two ends the
//! other way round and asks for them to be swapped.

use mux_common::{FAMILY_INET, FAMILY_INET6, Flow};

/// The raw fields both `bpf_sock_ops` and `sk_msg_md` carry.
pub struct SockFields {
    pub family: u32,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    /// Words read one at a time (see [`read_words`]).
    pub local_ip6: [u32; 4],
    pub remote_ip6: [u32; 4],
    /// Host order, as both contexts give it.
    pub local_port: u32,
    /// Network order in a u32, as both contexts give it.
    pub remote_port: u32,
    pub netns_cookie: u64,
}

/// Which end of the connection the socket is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// mux's outgoing socket: local is mux, remote is the backend.
    Mux,
    /// The backend's accepted socket: local is the backend, remote is mux.
    Backend,
}

/// `None` for a family other than IPv4/IPv6.
#[inline(always)]
pub fn flow(f: &SockFields, side: Side) -> Option<Flow> {
    let (family, local_addr, remote_addr) = if f.family == FAMILY_INET {
        (FAMILY_INET, [f.local_ip4, 0, 0, 0], [f.remote_ip4, 0, 0, 0])
    } else if f.family == FAMILY_INET6 {
        // A dual-stack (IPv6) socket reports IPv4 ends as ::ffff:a.b.c.d;
        // canonicalise them to IPv4 as user space does. Both ends of one
        // connection share the family, so checking one end is enough.
        if is_v4_mapped(&f.local_ip6) {
            (
                FAMILY_INET,
                [f.local_ip6[3], 0, 0, 0],
                [f.remote_ip6[3], 0, 0, 0],
            )
        } else {
            (FAMILY_INET6, f.local_ip6, f.remote_ip6)
        }
    } else {
        return None;
    };
    // The remote port sits in the high half of the u32 on little-endian.
    let local_port = f.local_port;
    let remote_port = u32::from_be(f.remote_port);
    Some(match side {
        Side::Mux => Flow {
            netns_cookie: f.netns_cookie,
            family,
            local_port,
            remote_port,
            _pad: 0,
            local_addr,
            remote_addr,
        },
        Side::Backend => Flow {
            netns_cookie: f.netns_cookie,
            family,
            local_port: remote_port,
            remote_port: local_port,
            _pad: 0,
            local_addr: remote_addr,
            remote_addr: local_addr,
        },
    })
}

#[inline(always)]
fn is_v4_mapped(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0xffff_u32.to_be()
}

/// Reads four consecutive u32 context words without letting LLVM merge
/// them into 8-byte loads, which the verifier rejects for these fields.
///
/// # Safety
/// `first` must point at four readable u32 fields of the program's context.
#[inline(always)]
pub unsafe fn read_words(first: *const u32) -> [u32; 4] {
    // SAFETY: the caller guarantees the four words are readable.
    unsafe {
        [
            core::ptr::read_volatile(first),
            core::ptr::read_volatile(first.add(1)),
            core::ptr::read_volatile(first.add(2)),
            core::ptr::read_volatile(first.add(3)),
        ]
    }
}
