//! A read/write copy through a user-space buffer: the portable path. A
//! direction takes its buffer once bytes come in bulk (see `adaptive`).

use std::io;

use rustix::buffer::spare_capacity;
use tokio::net::TcpStream;

use super::adaptive::Bulk;

const BUFFER_SIZE: usize = 64 * 1024;

/// One direction's buffer for bulk. Its memory is held only while bytes
/// flow: a read that finds the source empty gives it back, so a connection
/// that went quiet after a transfer holds none (two buffers held for a
/// connection's whole life cost 133 KiB per idle connection in the bench).
/// Allocated uninitialised, a new one costs one allocation per burst, not a
/// memset of 64 KiB.
pub(super) struct Buffer {
    /// The bytes of the last read, the unsent ones from `start` on.
    bytes: Vec<u8>,
    start: usize,
}

impl Bulk for Buffer {
    const WHAT: &'static str = "a copy buffer";

    fn open() -> io::Result<Buffer> {
        Ok(Buffer {
            bytes: Vec::new(),
            start: 0,
        })
    }

    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        // `pump` fills only once every held byte is out.
        self.start = 0;
        self.bytes.clear();
        if self.bytes.capacity() == 0 {
            self.bytes.reserve_exact(BUFFER_SIZE);
        }
        rustix::io::read(src, spare_capacity(&mut self.bytes)).map_err(|e| {
            if e == rustix::io::Errno::AGAIN {
                self.bytes = Vec::new();
            }
            e.into()
        })
    }

    fn drain(&mut self, dst: &TcpStream, pending: usize) -> io::Result<usize> {
        let n = rustix::io::write(dst, &self.bytes[self.start..self.start + pending])?;
        self.start += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    /// A buffer while bytes wait to be written, none once the source is
    /// found empty, and a new one for the next burst.
    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (src, _) = listener.accept().await.unwrap();
        let mut buffer = Buffer::open().unwrap();
        assert_eq!(buffer.bytes.capacity(), 0);
        for burst in [&[7u8; 40_000][..], &[9u8; 3000][..]] {
            peer.write_all(burst).await.unwrap();
            let mut got = Vec::new();
            while got.len() < burst.len() {
                src.readable().await.unwrap();
                let read = src.try_io(tokio::io::Interest::READABLE, || buffer.fill(&src));
                if let Ok(n) = read {
                    assert!(buffer.bytes.capacity() >= BUFFER_SIZE);
                    got.extend_from_slice(&buffer.bytes[..n]);
                }
            }
            assert_eq!(&got[..], burst);
            let again = src.try_io(tokio::io::Interest::READABLE, || buffer.fill(&src));
            assert_eq!(again.unwrap_err().kind(), io::ErrorKind::WouldBlock);
            assert_eq!(
                buffer.bytes.capacity(),
                0,
                "an idle direction kept its buffer"
            );
        }
    }
}
