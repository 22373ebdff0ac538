//! splice(2) through a pipe: bytes go socket -> pipe -> socket without being
//! copied into user space; user space only drives readiness.

use std::io;
use std::os::fd::OwnedFd;

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::net::TcpStream;

use super::Stage;

/// Bigger than the 64 KiB default so one wake-up moves more, small enough that
/// a thousand idle pairs pin little memory (pipe pages are only allocated
/// while bytes sit in them).
const PIPE_SIZE: usize = 256 * 1024;

/// A pipe per direction.
pub(super) struct Pipes {
    up: Pipe,
    down: Pipe,
}

pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipes {
    pub(super) fn new() -> io::Result<Pipes> {
        Ok(Pipes {
            up: Pipe::new()?,
            down: Pipe::new()?,
        })
    }

    pub(super) fn halves(&mut self) -> (&mut Pipe, &mut Pipe) {
        (&mut self.up, &mut self.down)
    }
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
}

impl Stage for &mut Pipe {
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        Ok(splice(src, None, &self.write, None, self.capacity, flags)?)
    }

    fn drain(&mut self, dst: &TcpStream, pending: usize) -> io::Result<usize> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        Ok(splice(&self.read, None, dst, None, pending, flags)?)
    }
}
