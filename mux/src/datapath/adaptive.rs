//! One direction of a relayed pair that copies small reads through a
//! per-thread buffer and takes a bulk stage of its own (a pipe for splice,
//! a buffer for copy) once bytes come in bulk, so that a connection that
//! only ever exchanges small messages holds no more than the bytes in
//! flight.

use std::cell::RefCell;
use std::io;

use tokio::net::TcpStream;

use super::Stage;

/// A read that fills this much means bytes come in bulk: the direction
/// takes its bulk stage. Less than that (a key press, a request, a banner)
/// is copied: two syscalls as with splice, minus setting up a bulk stage
/// for every connection (a pipe, or 64 KiB of memory) and a pipe's own
/// cost per call.
const SMALL_READ: usize = 16 * 1024;

thread_local! {
    /// Where a small read lands before it is copied out at its own size:
    /// one per worker thread, not one per connection.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SMALL_READ].into_boxed_slice());
}

/// What a direction moves bytes through once they come in bulk.
pub(super) trait Bulk: Sized {
    /// What it is, for the log line when it cannot be had.
    const WHAT: &'static str;
    fn open() -> io::Result<Self>;
    /// As [`Stage::fill`].
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize>;
    /// As [`Stage::drain`].
    fn drain(&mut self, dst: &TcpStream, pending: usize) -> io::Result<usize>;
}

pub(super) enum Adaptive<B> {
    /// Copying small reads; `held` is what the last read brought and the
    /// destination has not taken yet, from `start` on.
    Small {
        held: Vec<u8>,
        start: usize,
        /// The last read filled `SMALL_READ`: take the bulk stage once
        /// `held` is out.
        bulk: bool,
        /// The bulk stage could not be had: copy to the end.
        stay_small: bool,
    },
    Bulk(B),
}

impl<B: Bulk> Adaptive<B> {
    pub(super) fn new() -> Adaptive<B> {
        Adaptive::Small {
            held: Vec::new(),
            start: 0,
            bulk: false,
            stay_small: false,
        }
    }
}

impl<B: Bulk> Stage for Adaptive<B> {
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        if let Adaptive::Small {
            bulk: true,
            stay_small,
            ..
        } = self
        {
            match B::open() {
                Ok(stage) => *self = Adaptive::Bulk(stage),
                Err(e) => {
                    // Out of descriptors or memory: this pair still
                    // deserves service, copied (the read below clears
                    // `bulk` for good).
                    log::warn!("cannot set up {} ({e}); copying this direction", B::WHAT);
                    *stay_small = true;
                }
            }
        }
        match self {
            Adaptive::Bulk(stage) => stage.fill(src),
            Adaptive::Small {
                held,
                start,
                bulk,
                stay_small,
            } => SCRATCH.with_borrow_mut(|scratch| {
                let n = rustix::io::read(src, &mut scratch[..])?;
                held.clear();
                held.extend_from_slice(&scratch[..n]);
                *start = 0;
                *bulk = n == SMALL_READ && !*stay_small;
                Ok(n)
            }),
        }
    }

    fn bulk(&self) -> bool {
        matches!(self, Adaptive::Bulk(_) | Adaptive::Small { bulk: true, .. })
    }

    fn drain(&mut self, dst: &TcpStream, pending: usize) -> io::Result<usize> {
        match self {
            Adaptive::Bulk(stage) => stage.drain(dst, pending),
            Adaptive::Small { held, start, .. } => {
                let n = rustix::io::write(dst, &held[*start..*start + pending])?;
                *start += n;
                if n == pending {
                    // An idle connection keeps no buffer.
                    *held = Vec::new();
                    *start = 0;
                }
                Ok(n)
            }
        }
    }
}
