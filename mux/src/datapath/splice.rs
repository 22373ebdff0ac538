//! splice(2) through a pipe: bytes go socket -> pipe -> socket without being
//! copied into user space; user space only drives readiness. A direction
//! takes its pipe once bytes come in bulk (see `adaptive`).

use std::io;
use std::os::fd::OwnedFd;

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::net::TcpStream;

use super::adaptive::Bulk;

/// Bigger than the 64 KiB default so one wake-up moves more, small enough that
/// a thousand busy pairs pin little memory (pipe pages are only allocated
/// while bytes sit in them).
const PIPE_SIZE: usize = 256 * 1024;

pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Bulk for Pipe {
    const WHAT: &'static str = "a pipe for splice";

    fn open() -> io::Result<Pipe> {
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
