//! `mux_sock_ops`: puts the backend's end of mux's connection in `MUX_SOCKS`.
//!
//! Attached to the cgroup v2 root, this runs for every TCP socket event on
//! the machine, so it must be cheap and must leave everything that is not
//! mux's alone. On `BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB` (a server — sshd, a
//! web server — just completed the handshake of a connection it will
//! accept) it builds the peer's endpoint and looks it up in `MUX_CAPTURE`.
//! Only a peer that user space published (mux's own outgoing socket) is a
//! hit; the socket is then inserted into `MUX_SOCKS` under
//! `Capture::backend_key`. Doing this here, instead of from user space,
//! is the point: the backend's socket belongs to another process, so mux
//! has no file descriptor for it.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB},
    helpers::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use mux_common::{Endpoint, FAMILY_INET, FAMILY_INET6, STAT_CAPTURED, STAT_INSERT_FAILED};

use crate::maps::{MUX_CAPTURE, MUX_SOCKS, bump};

/// The function name is the program name user space loads; it must not be
/// `sockops`, the section the macro puts it in, or linking fails.
#[sock_ops]
pub fn mux_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        on_passive_established(&ctx);
    }
    // sock_ops programs return 1 ("ok"); the value does not affect the socket
    // for this callback.
    1
}

#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let Some(peer) = peer(ctx) else {
        return;
    };
    // SAFETY: the value is copied out at once; user space only ever replaces
    // whole entries for endpoints that are not connected yet, so no torn
    // read can concern the connection being established here.
    let Some(capture) = (unsafe { MUX_CAPTURE.get(peer) }) else {
        return;
    };
    let key: u64 = capture.backend_key;
    match MUX_SOCKS.update(key, ctx.ops, u64::from(BPF_ANY)) {
        Ok(()) => bump(STAT_CAPTURED),
        Err(_) => bump(STAT_INSERT_FAILED),
    }
}

/// The canonical `Endpoint` of the socket's peer (see mux-common), or `None`
/// for a family other than IPv4/IPv6.
#[inline(always)]
fn peer(ctx: &SockOpsContext) -> Option<Endpoint> {
    let family = ctx.family();
    let mut addr = [0u32; 4];
    let family = if family == FAMILY_INET {
        addr[0] = ctx.remote_ip4();
        FAMILY_INET
    } else if family == FAMILY_INET6 {
        let ip6 = remote_ip6(ctx);
        // A dual-stack (IPv6) listener reports an IPv4 peer as
        // ::ffff:a.b.c.d; canonicalise it to IPv4 as user space does, since
        // mux's own socket for the same connection may well be IPv4.
        if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0xffff_u32.to_be() {
            addr[0] = ip6[3];
            FAMILY_INET
        } else {
            addr = ip6;
            FAMILY_INET6
        }
    } else {
        return None;
    };
    Some(Endpoint {
        // SAFETY: the helper accepts the sock_ops context pointer.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        // The kernel gives remote_port in network order in a u32 (the port
        // sits in the high half on little-endian), unlike local_port.
        port: u32::from_be(ctx.remote_port()),
        family,
    })
}

/// `remote_ip6` read one 32-bit word at a time: the verifier only accepts
/// 4-byte loads from these context fields, and a plain array copy may be
/// merged by LLVM into 8-byte loads.
#[inline(always)]
fn remote_ip6(ctx: &SockOpsContext) -> [u32; 4] {
    // SAFETY: `ctx.ops` is the valid context pointer for this run; raw
    // field addresses avoid creating references to kernel-rewritten memory.
    unsafe {
        let words = &raw const (*ctx.ops).remote_ip6;
        let first = words.cast::<u32>();
        [
            core::ptr::read_volatile(first),
            core::ptr::read_volatile(first.add(1)),
            core::ptr::read_volatile(first.add(2)),
            core::ptr::read_volatile(first.add(3)),
        ]
    }
}
