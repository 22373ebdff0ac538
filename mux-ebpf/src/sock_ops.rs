//! `mux_sock_ops`: recognises mux's connections to local backends and puts
//! the backend's end of each into `MUX_SOCKS`.
//!
//! Attached to the cgroup v2 root, this runs for every TCP socket event on
//! the machine, so it must be cheap and must leave everything that is not
//! mux's alone (and `auto` takes it off while no connection needs it).
//! Two callbacks matter:
//! - `TCP_CONNECT_CB` on mux's outgoing socket, just before its SYN leaves:
//!   if user space published the socket's cookie in `MUX_PENDING`, the now
//!   known 4-tuple goes into `MUX_FLOWS` (and back into the pending entry,
//!   so that user space can clean up whatever happens next).
//! - `PASSIVE_ESTABLISHED_CB` on the backend's side (sshd, a web server)
//!   when the handshake completes, before the backend can accept or send:
//!   if its flow is in `MUX_FLOWS`, the socket goes into `MUX_SOCKS` (and
//!   gets a `TCP_NOTSENT_LOWAT`, see `stop_when_unsent`). Doing
//!   this here is the point: that socket belongs to another process, so mux
//!   has no file descriptor for it. The same callback on a socket accepted
//!   by one of mux's listeners (`MUX_LISTEN`) asks for RTT callbacks.
//! - `RTT_CB` on those client sockets, at each timed ACK: records how far
//!   the client acknowledged, for sk_msg's bound (`REDIRECT_WINDOW`). A
//!   client socket of ours that is not published turns its callbacks off
//!   at the first one.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB,
        BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_setsockopt},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mux_common::{
    BACKEND_NOTSENT_LOWAT, Capture, ListenKey, STAT_ACKS_UNWATCHED, STAT_CAPTURED,
    STAT_FLOW_FAILED, STAT_INSERT_FAILED,
};

use crate::{
    flow::{Side, SockFields, flow, read_words},
    maps::{MUX_CLIENTS, MUX_FLOWS, MUX_LISTEN, MUX_PENDING, MUX_SOCKS, bump},
};

/// The function name is the program name user space loads; it must not be
/// `sockops`, the section the macro puts it in, or linking fails.
#[sock_ops]
pub fn mux_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx),
        BPF_SOCK_OPS_RTT_CB => on_rtt(&ctx),
        _ => {}
    }
    // sock_ops programs return 1 ("ok"); the value does not affect the socket
    // for these callbacks.
    1
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: the helper accepts the sock_ops context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(pending) = MUX_PENDING.get_ptr_mut(&cookie) else {
        return;
    };
    let Some(flow) = flow(&fields(ctx), Side::Mux) else {
        return;
    };
    // SAFETY: a successful lookup's pointer stays valid for this run; user
    // space does not touch the entry until the connection is over.
    let capture = unsafe {
        Capture {
            backend_key: (*pending).backend_key,
            client_key: (*pending).client_key,
            client_cookie: (*pending).client_cookie,
            down_bytes: 0,
            write_seq_base: 0,
            captured: 0,
            spilling: 0,
            opened: 0,
            sent_bytes: 0,
            bulk_send_bytes: 0,
        }
    };
    if MUX_FLOWS
        .insert(&flow, &capture, u64::from(BPF_ANY))
        .is_err()
    {
        bump(STAT_FLOW_FAILED);
        return;
    }
    // SAFETY: as above.
    unsafe {
        (*pending).flow = flow;
        (*pending).connected = 1;
    }
}

#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let fields = fields(ctx);
    let listen = ListenKey {
        netns_cookie: fields.netns_cookie,
        port: fields.local_port,
        _pad: 0,
    };
    // SAFETY: the value is not used, only its presence.
    if unsafe { MUX_LISTEN.get(&listen) }.is_some() {
        // A client of mux: have the kernel call back at its ACKs. Failing
        // leaves `acked` at 0, which only keeps the connection off the
        // kernel path sooner.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
        return;
    }
    let Some(flow) = flow(&fields, Side::Backend) else {
        return;
    };
    let Some(capture) = MUX_FLOWS.get_ptr_mut(&flow) else {
        return;
    };
    // SAFETY: a successful lookup's pointer stays valid for this run; user
    // space only deletes the entry after the connection ended. `snd_nxt` is
    // readable in this callback; before the backend has sent anything it
    // equals `write_seq`.
    let key: u64 = unsafe {
        (*capture).write_seq_base = (*ctx.ops).snd_nxt;
        (*capture).backend_key
    };
    match MUX_SOCKS.update(key, ctx.ops, u64::from(BPF_ANY)) {
        Ok(()) => {
            // SAFETY: as above; read by user space when the connection ends.
            unsafe { (*capture).captured = 1 };
            stop_when_unsent(ctx);
            bump(STAT_CAPTURED);
        }
        Err(_) => bump(STAT_INSERT_FAILED),
    }
}

/// `IPPROTO_TCP` and `TCP_NOTSENT_LOWAT` (linux/in.h, linux/tcp.h).
const IPPROTO_TCP: i32 = 6;
const TCP_NOTSENT_LOWAT: i32 = 25;

/// Sets `TCP_NOTSENT_LOWAT` to `BACKEND_NOTSENT_LOWAT` (256 KiB) on the
/// captured backend socket: it then takes a send (and polls writable) only
/// while less than that waits unsent. Redirected sends never wait there,
/// so the kernel path does not feel it. What it changes is a spill: the
/// backend's bytes go the normal way to mux, and once mux's receive window
/// is full the backend blocks with at most that much waiting, instead of
/// filling a send buffer of megabytes. The kernel takes the connection back
/// only at a send that finds mux caught up with every such byte (see
/// sk_msg), and a backend with megabytes queued behind mux never offers
/// that moment while it keeps writing (without the mark, iperf3 downloads
/// of 512 MB spilled 24-97% of their bytes and 3 s ones 3-60%; with it,
/// 32-61% and 2-3%, over 8 and 6 interleaved rounds; with the first-send
/// rule of sk_msg in place, 3 s ones still spilled 45-92% in 3 of 8
/// rounds without it, 2-12% with it). Why not lower: see
/// `BACKEND_NOTSENT_LOWAT`. The backend sees a standard option, handled by
/// every poller: it just wakes up later. A failure leaves the socket as it
/// was.
#[inline(always)]
fn stop_when_unsent(ctx: &SockOpsContext) {
    let mut lowat = BACKEND_NOTSENT_LOWAT as i32;
    // SAFETY: the helper takes the sock_ops context and a pointer to an
    // int of the length given.
    let _ = unsafe {
        bpf_setsockopt(
            ctx.ops.cast(),
            IPPROTO_TCP,
            TCP_NOTSENT_LOWAT,
            (&raw mut lowat).cast(),
            core::mem::size_of::<i32>() as i32,
        )
    };
}

#[inline(always)]
fn on_rtt(ctx: &SockOpsContext) {
    // SAFETY: the helper accepts the sock_ops context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(client) = MUX_CLIENTS.get_ptr_mut(&cookie) else {
        // Not published, and never will be: mux publishes a client only
        // before writing to it, so before any ACK that is timed. Or no
        // longer: a connection that left the kernel path does not come
        // back. Either way its ACKs need no program run; most of mux's
        // connections are of this kind (small messages, HTTP, remote
        // backends), and the run cost them about 0.5% of round trips.
        // Only for a client of this mux's own listeners: another mux on
        // the machine runs its programs at the same callbacks, and its
        // published clients are in its maps, not in ours.
        let listen = ListenKey {
            // SAFETY: the helper accepts the sock_ops context pointer.
            netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
            port: ctx.local_port(),
            _pad: 0,
        };
        // SAFETY: the value is not used, only its presence.
        if unsafe { MUX_LISTEN.get(&listen) }.is_some() {
            let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
            bump(STAT_ACKS_UNWATCHED);
        }
        return;
    };
    // SAFETY: the context field is readable for this callback, and the map
    // value pointer is valid for this run. A plain store: only this callback
    // writes `acked`, under the client socket's lock. The cookie check: the
    // entry's memory may have just gone to another connection (see `Client`).
    unsafe {
        if (*client).cookie == cookie {
            (*client).acked = (*ctx.ops).bytes_acked;
        }
    }
}

/// The socket's addresses and namespace.
#[inline(always)]
fn fields(ctx: &SockOpsContext) -> SockFields {
    // SAFETY: `ctx.ops` is the valid context pointer for this run; raw
    // field addresses avoid creating references to kernel-rewritten memory.
    let (local_ip6, remote_ip6) = unsafe {
        (
            read_words((&raw const (*ctx.ops).local_ip6).cast()),
            read_words((&raw const (*ctx.ops).remote_ip6).cast()),
        )
    };
    SockFields {
        family: ctx.family(),
        local_ip4: ctx.local_ip4(),
        remote_ip4: ctx.remote_ip4(),
        local_ip6,
        remote_ip6,
        local_port: ctx.local_port(),
        remote_port: ctx.remote_port(),
        // SAFETY: the helper accepts the sock_ops context pointer.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    }
}
