//! A read/write copy through a user-space buffer: the portable path.

use std::io;

use tokio::net::TcpStream;

use super::Stage;

const BUFFER_SIZE: usize = 64 * 1024;

pub(super) struct Buffer {
    bytes: Box<[u8]>,
    /// Where the unsent bytes start; they end at `start + pending`.
    start: usize,
    /// A read once filled the whole buffer.
    bulk: bool,
}

impl Buffer {
    pub(super) fn new() -> Buffer {
        Buffer {
            bytes: vec![0; BUFFER_SIZE].into_boxed_slice(),
            start: 0,
            bulk: false,
        }
    }
}

impl Stage for Buffer {
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        self.start = 0;
        let n = rustix::io::read(src, &mut self.bytes[..])?;
        self.bulk |= n == self.bytes.len();
        Ok(n)
    }

    fn drain(&mut self, dst: &TcpStream, pending: usize) -> io::Result<usize> {
        let n = rustix::io::write(dst, &self.bytes[self.start..self.start + pending])?;
        self.start += n;
        Ok(n)
    }

    fn bulk(&self) -> bool {
        self.bulk
    }
}
