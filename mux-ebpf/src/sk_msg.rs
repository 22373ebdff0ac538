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
//! delivered every spilled byte (so none is overtaken: the backend socket's
//! own `write_seq` says how many there were) and the client has caught up.
//! Before the backend sends in bulk, every send takes the normal path (see
//! `mux_common::Client::open`), unless its very first send is bulk in
//! itself (`mux_common::OPEN_SEND`).
//!
//! It also counts the backend's bytes by send size, which `auto` judges
//! the connection by (`mux_common::BULK_SEND`).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{sk_action::SK_PASS, sk_msg_md},
    helpers::{
        bpf_get_netns_cookie, bpf_msg_redirect_hash, bpf_probe_read_kernel, bpf_skc_to_tcp_sock,
    },
    macros::sk_msg,
    programs::SkMsgContext,
};
use mux_common::{
    BULK_SEND, Client, OPEN_SEND, REDIRECT_WINDOW, STAT_REDIRECT_FAILED, STAT_REDIRECTED,
    STAT_SPILLED,
};

use crate::{
    flow::{Side, SockFields, flow, read_words},
    maps::{MUX_CLIENT_SOCK, MUX_CLIENTS, MUX_FLOWS, bump},
};

/// The byte offset of `write_seq` in this kernel's `struct tcp_sock`, set by
/// user space before loading (`mux_common::GLOBAL_TCP_WRITE_SEQ`).
#[unsafe(no_mangle)]
static MUX_TCP_WRITE_SEQ: u32 = 0;

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
        // What `auto` judges the backend's send sizes by (see `BULK_SEND`).
        (*capture).sent_bytes += size;
        if size >= BULK_SEND {
            (*capture).bulk_send_bytes += size;
        }
        // A client entry gone means the connection is ending: nothing more
        // to redirect.
        let Some(client) = MUX_CLIENTS.get_ptr(&(*capture).client_cookie) else {
            spill();
            return;
        };
        let client = read_client(client);
        if client.cookie != (*capture).client_cookie {
            // The entry was replaced while we read it, and its memory went
            // to another connection's: its figures are not ours.
            spill();
            return;
        }
        if client.open == 0 && (*capture).opened == 0 {
            // `spilling` is 0 only until a send first took the normal path:
            // past that, no send can open the path here, and the socket's
            // sequence is not read again for each bulk send until mux
            // opens it.
            if size >= OPEN_SEND
                && (*capture).spilling == 0
                && normal_path_bytes(md, (*capture).write_seq_base) == Some(0)
            {
                // Bulk from the first byte: nothing went through mux, so
                // nothing can be overtaken; the room rule below applies
                // from here on.
                (*capture).opened = 1;
                (*capture).spilling = 0;
            } else {
                // Not sending in bulk yet (see `Client::open`): mux relays.
                // Once opened, the resume rule below makes the kernel wait
                // until mux delivered all of these.
                (*capture).spilling = 1;
                spill();
                return;
            }
        }
        let written = (*capture).down_bytes + client.delivered;
        let outstanding = written.saturating_sub(client.acked);
        let room = outstanding + size <= REDIRECT_WINDOW;
        if (*capture).spilling != 0 {
            // Resume only once mux delivered every byte that went its way
            // (compared modulo 2^32, like sequence numbers: the two never
            // differ by more than what the sockets can hold).
            let normal = normal_path_bytes(md, (*capture).write_seq_base);
            if normal != Some(client.delivered as u32) || !room {
                spill();
                return;
            }
            (*capture).spilling = 0;
        } else if !room {
            (*capture).spilling = 1;
            spill();
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

/// A copy of a `MUX_CLIENTS` entry, its cookie read last: if the cookie is
/// still the connection's, so were the figures read before it.
///
/// # Safety
/// `client` must be a valid map value pointer for this run.
#[inline(always)]
unsafe fn read_client(client: *const Client) -> Client {
    // SAFETY: as the caller guarantees; volatile keeps the order of the
    // loads.
    unsafe {
        let acked = core::ptr::read_volatile(&raw const (*client).acked);
        let delivered = core::ptr::read_volatile(&raw const (*client).delivered);
        let open = core::ptr::read_volatile(&raw const (*client).open);
        let cookie = core::ptr::read_volatile(&raw const (*client).cookie);
        Client {
            acked,
            delivered,
            cookie,
            open,
            _pad: 0,
        }
    }
}

/// How many bytes the backend socket has sent the normal way since sock_ops
/// captured it, modulo 2^32: its `write_seq` (every byte it queued itself)
/// less the value then. `None` if that cannot be read.
///
/// # Safety
/// `md` must be this run's context.
#[inline(always)]
unsafe fn normal_path_bytes(md: *mut sk_msg_md, base: u32) -> Option<u32> {
    // SAFETY: a plain read of a global, set by the loader before loading;
    // volatile so that the compiler does not fold in the 0 it starts as.
    let offset = unsafe { core::ptr::read_volatile(&raw const MUX_TCP_WRITE_SEQ) };
    if offset == 0 {
        return None;
    }
    // SAFETY: `md` is the context; its `sk` is the sending (backend) socket,
    // which the helper turns into a `tcp_sock` pointer or null.
    let tp = unsafe { bpf_skc_to_tcp_sock((*md).__bindgen_anon_3.sk.cast()) };
    if tp.is_null() {
        return None;
    }
    // SAFETY: the offset comes from this kernel's BTF for `struct tcp_sock`,
    // and the helper reads kernel memory safely whatever the address.
    let seq = unsafe {
        bpf_probe_read_kernel(tp.cast::<u8>().wrapping_add(offset as usize).cast::<u32>())
    };
    seq.ok().map(|seq| seq.wrapping_sub(base))
}

/// Lets the send take the normal path and counts it.
#[inline(always)]
fn spill() {
    bump(STAT_SPILLED);
}
