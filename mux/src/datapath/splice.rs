//! splice(2) through a pipe: bytes go socket -> pipe -> socket without being
//! copied into user space; user space only drives readiness. A direction
//! starts out copying small reads and takes its pipe once bytes come in
//! bulk.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::net::TcpStream;

use super::Stage;

/// Bigger than the 64 KiB default so one wake-up moves more, small enough that
/// a thousand busy pairs pin little memory (pipe pages are only allocated
/// while bytes sit in them).
const PIPE_SIZE: usize = 256 * 1024;

/// A read that fills this much means bytes come in bulk: the direction
/// moves to its pipe. Less than that (a key press, a request, a banner) is
/// copied: two syscalls as with splice, minus creating a pipe for every
/// connection and the pipe's own cost per call.
const SMALL_READ: usize = 16 * 1024;

thread_local! {
    /// Where a small read lands before it is copied out at its own size:
    /// one per worker thread, not one per connection.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SMALL_READ].into_boxed_slice());
}

/// One direction of a spliced pair.
pub(super) enum Adaptive {
    /// Copying small reads; `held` is what the last read brought and the
    /// destination has not taken yet, from `start` on.
    Small {
        held: Vec<u8>,
        start: usize,
        /// The last read filled `SMALL_READ`: take the pipe once `held`
        /// is out.
        bulk: bool,
        /// A pipe could not be made: copy to the end.
        no_pipe: bool,
    },
    Bulk(Pipe),
}

impl Adaptive {
    pub(super) fn new() -> Adaptive {
        Adaptive::Small {
            held: Vec::new(),
            start: 0,
            bulk: false,
            no_pipe: false,
        }
    }
}

impl Stage for Adaptive {
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        if let Adaptive::Small {
            bulk: true,
            no_pipe,
            ..
        } = self
        {
            match Pipe::new() {
                Ok(pipe) => *self = Adaptive::Bulk(pipe),
                Err(e) => {
                    // Out of descriptors or pipe memory: this pair still
                    // deserves service, copied (the read below clears
                    // `bulk` for good).
                    log::warn!("splice: cannot create a pipe ({e}); copying this direction");
                    *no_pipe = true;
                }
            }
        }
        match self {
            Adaptive::Bulk(pipe) => pipe.fill(src),
            Adaptive::Small {
                held,
                start,
                bulk,
                no_pipe,
            } => SCRATCH.with_borrow_mut(|scratch| {
                let n = rustix::io::read(src, &mut scratch[..])?;
                held.clear();
                held.extend_from_slice(&scratch[..n]);
                *start = 0;
                *bulk = n == SMALL_READ && !*no_pipe;
                Ok(n)
            }),
        }
    }

    fn bulk(&self) -> bool {
        matches!(self, Adaptive::Bulk(_) | Adaptive::Small { bulk: true, .. })
    }

    fn drain(&mut self, dst: &TcpStream, pending: usize) -> io::Result<usize> {
        match self {
            Adaptive::Bulk(pipe) => pipe.drain(dst, pending),
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

pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // Unprivileged users past /proc/sys/fs/pipe-user-pages-soft cannot grow
        // pipes; the default size still works, only with more wake-ups.
        let capacity = fcntl_setpipe_size(&write, PIPE_SIZE).unwrap_or(64 * 1024);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        Ok(splice(src, None, &self.write, None, self.capacity, flags)?)
    }

    fn drain(&mut self, dst: &TcpStream, pending: usize) -> io::Result<usize> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        Ok(splice(&self.read, None, dst, None, pending, flags)?)
    }
}
