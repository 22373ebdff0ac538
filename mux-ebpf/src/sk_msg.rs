//! `mux_sk_msg`: the backend's sends go straight to the client socket.
//!
//! Attached to `MUX_SOCKS`, so it runs whenever a backend sends on a socket
//! sock_ops put there. Its flow is in `MUX_FLOWS`; the send is then
//! redirected to the egress of the client socket under `client_key` in
//! `MUX_CLIENT_SOCK`. The bytes never reach mux's outgoing socket, skip one
//! TCP hop over loopback and never enter user space.
//!
//! Backpressure: a redirected send that finds the client socket full fails
//! with EAGAIN for a non-blocking backend, and an edge-triggered poller is
//! then never woken again (its own socket never filled). So the backend
//! may only have `REDIRECT_WINDOW` outstanding in the client socket; past
//! that its sends take the normal path to mux, which stalls and wakes it
//! like any TCP peer ("spilling"). Redirecting resumes once mux has
//! delivered every spilled byte (so none is overtaken) and the client has
//! caught up.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{sk_action::SK_PASS, sk_msg_md},
    helpers::{bpf_get_netns_cookie, bpf_msg_redirect_hash},
    macros::sk_msg,
    programs::SkMsgContext,
};
use mux_common::{REDIRECT_WINDOW, STAT_REDIRECT_FAILED, STAT_REDIRECTED, STAT_SPILLED};

use crate::{
    flow::{Side, SockFields, flow, read_words},
    maps::{MUX_CLIENT_SOCK, MUX_CLIENTS, MUX_FLOWS, bump},
};

#[sk_msg]
pub fn mux_sk_msg(ctx: SkMsgContext) -> u32 {
    redirect(&ctx);
    // SK_PASS either applies the redirect set above or, when none was set,
    // lets the send take its normal path. Never SK_DROP: a send refused
    // here would fail with EACCES in a backend that did nothing wrong.
    SK_PASS
}

#[inline(always)]
fn redirect(ctx: &SkMsgContext) {
    let md: *mut sk_msg_md = ctx.msg;
    // SAFETY: `md` is this run's context; fields are read by raw address.
    let fields = unsafe {
        SockFields {
            family: (*md).family,
            local_ip4: (*md).local_ip4,
            remote_ip4: (*md).remote_ip4,
            local_ip6: read_words((&raw const (*md).local_ip6).cast()),
            remote_ip6: read_words((&raw const (*md).remote_ip6).cast()),
            local_port: (*md).local_port,
            remote_port: (*md).remote_port,
            netns_cookie: bpf_get_netns_cookie(ctx.as_ptr()),
        }
    };
    let Some(flow) = flow(&fields, Side::Backend) else {
        return;
    };
    let Some(capture) = MUX_FLOWS.get_ptr_mut(&flow) else {
        return;
    };
    // SAFETY: a successful lookup's pointer stays valid for this run, and
    // the fields below are only written here, under the sending (backend)
    // socket's lock, so no two runs race.
    unsafe {
        let size = u64::from(ctx.size());
        // A client entry gone means the connection is ending: nothing more
        // to redirect.
        let Some(client) = MUX_CLIENTS.get(&(*capture).client_cookie) else {
            spill(capture, size);
            return;
        };
        let written = (*capture).down_bytes + client.delivered;
        let outstanding = written.saturating_sub(client.acked);
        let room = outstanding + size <= REDIRECT_WINDOW;
        if (*capture).spilling != 0 {
            // Resume only once mux delivered every byte that went its way.
            if client.delivered < (*capture).passed_bytes || !room {
                spill(capture, size);
                return;
            }
            (*capture).spilling = 0;
        } else if !room {
            (*capture).spilling = 1;
            spill(capture, size);
            return;
        }
        let mut client_key: u64 = (*capture).client_key;
        // flags 0: to the client socket's egress.
        let verdict = bpf_msg_redirect_hash(
            md,
            MUX_CLIENT_SOCK.as_ptr(),
            (&raw mut client_key).cast(),
            0,
        );
        if verdict as u32 == SK_PASS {
            (*capture).down_bytes += size;
            bump(STAT_REDIRECTED);
        } else {
            bump(STAT_REDIRECT_FAILED);
        }
    }
}

/// Lets the send take the normal path and counts it.
///
/// # Safety
/// `capture` must be a valid map value pointer for this run.
#[inline(always)]
unsafe fn spill(capture: *mut mux_common::Capture, size: u64) {
    // SAFETY: as the caller guarantees.
    unsafe { (*capture).passed_bytes += size };
    bump(STAT_SPILLED);
}
