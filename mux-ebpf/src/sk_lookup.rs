//! `mux_sk_lookup`: new connections to a taken-over port (say 22) from other
//! hosts go to mux's listener; everything else finds its usual socket.
//!
//! Attached to the network namespace through a link that only the mux
//! process holds: when mux exits, is killed or crashes, the link closes and
//! the next connection to port 22 reaches sshd again, which keeps listening
//! there untouched. Connections from or to loopback are never steered, so
//! mux's own connection to 127.0.0.1:22 reaches sshd, also when it comes
//! from a client's address (a `transparent` route).

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_lookup, programs::SkLookupContext};
use mux_common::{FAMILY_INET, FAMILY_INET6, LISTENER_V4, LISTENER_V6};

use crate::{
    flow::read_words,
    maps::{MUX_LISTENERS, MUX_TAKEOVER},
};

/// IPPROTO_TCP.
const TCP: u32 = 6;

#[sk_lookup]
pub fn mux_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer(&ctx);
    // SK_PASS with a socket assigned hands the connection to it; without
    // one, the normal lookup goes on. Never SK_DROP: a failure here must
    // leave the port to its own listener, not refuse the connection.
    SK_PASS
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) {
    let l = ctx.lookup;
    // SAFETY: `l` is this run's context; fields are read by raw address,
    // each with the 4-byte loads the verifier accepts.
    let (protocol, family, port, ip4, ip6) = unsafe {
        (
            (*l).protocol,
            (*l).family,
            (*l).local_port,
            [(*l).remote_ip4, (*l).local_ip4],
            [
                read_words((&raw const (*l).remote_ip6).cast()),
                read_words((&raw const (*l).local_ip6).cast()),
            ],
        )
    };
    if protocol != TCP {
        return;
    }
    // SAFETY: only the presence of the key matters.
    if unsafe { MUX_TAKEOVER.get(&port) }.is_none() {
        return;
    }
    let index = if family == FAMILY_INET {
        if is_loopback_v4(ip4[0]) || is_loopback_v4(ip4[1]) {
            return;
        }
        LISTENER_V4
    } else if family == FAMILY_INET6 {
        if is_loopback_v6(&ip6[0]) || is_loopback_v6(&ip6[1]) {
            return;
        }
        LISTENER_V6
    } else {
        return;
    };
    // No listener of that family (mux listens on IPv4 only, say): the port
    // stays with its own listener.
    let _ = MUX_LISTENERS.redirect_sk_lookup(ctx, index, 0);
}

/// 127.0.0.0/8; the address is in network order, so its first octet is the
/// lowest byte in memory.
#[inline(always)]
fn is_loopback_v4(addr: u32) -> bool {
    addr.to_ne_bytes()[0] == 127
}

/// ::1, or an IPv4 loopback address mapped into IPv6.
#[inline(always)]
fn is_loopback_v6(addr: &[u32; 4]) -> bool {
    let v4_mapped = addr[0] == 0 && addr[1] == 0 && addr[2] == 0xffff_u32.to_be();
    (addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 1_u32.to_be())
        || (v4_mapped && is_loopback_v4(addr[3]))
}
