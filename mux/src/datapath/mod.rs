//! The seam between a classified pair of sockets and what moves their bytes.
//!
//! Every data path keeps the same contract: bytes flow both ways until each
//! side has sent its FIN; a FIN read from one side becomes a shutdown of the
//! other side's write half (half-close), and an error on either side ends the
//! whole pair. Backpressure comes from never reading more than the other side
//! has taken.

mod copy;
mod splice;

use std::io;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::config::DataPathKind;

/// What a relay moved before it ended, and why it ended early if it did.
#[derive(Debug, Default)]
pub struct Relayed {
    /// Client to backend.
    pub up: u64,
    /// Backend to client.
    pub down: u64,
    pub error: Option<io::Error>,
}

/// The user-space data paths. The kernel path plugs in beside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    Splice,
    Copy,
}

impl DataPath {
    /// The path to use for a configured kind, and why, for the start-up log.
    pub fn select(kind: DataPathKind) -> Result<(DataPath, &'static str), DataPathError> {
        match kind {
            DataPathKind::Auto => Ok((DataPath::Splice, "auto: splice(2) through a pipe")),
            DataPathKind::Splice => {
                Ok((DataPath::Splice, "splice(2) through a pipe, as configured"))
            }
            DataPathKind::Copy => Ok((DataPath::Copy, "read/write copy, as configured")),
            DataPathKind::Ebpf => Err(DataPathError::EbpfUnavailable),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DataPath::Splice => "splice",
            DataPath::Copy => "copy",
        }
    }

    /// Moves bytes between `client` and `backend` until both directions are
    /// done or one fails. Returns what was moved either way.
    pub async fn relay(self, client: &TcpStream, backend: &TcpStream) -> Relayed {
        let mut r = Relayed::default();
        let result = match self {
            DataPath::Splice => match splice::Pipes::new() {
                Ok(mut pipes) => {
                    let (a, b) = pipes.halves();
                    tokio::try_join!(
                        pump(client, backend, a, &mut r.up),
                        pump(backend, client, b, &mut r.down)
                    )
                }
                Err(e) => {
                    // Out of fds or pipe memory: this pair still deserves
                    // service, just without the pipe.
                    log::warn!(
                        "splice: cannot create pipes ({e}); copying this connection instead"
                    );
                    copy_pair(client, backend, &mut r).await
                }
            },
            DataPath::Copy => copy_pair(client, backend, &mut r).await,
        };
        r.error = result.err();
        r
    }
}

async fn copy_pair(
    client: &TcpStream,
    backend: &TcpStream,
    r: &mut Relayed,
) -> io::Result<((), ())> {
    tokio::try_join!(
        pump(client, backend, copy::Buffer::new(), &mut r.up),
        pump(backend, client, copy::Buffer::new(), &mut r.down)
    )
}

#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    #[error(
        "datapath = \"ebpf\": the kernel data path is not part of this build yet; use auto, splice or copy"
    )]
    EbpfUnavailable,
}

/// One way of holding bytes between reading them from one socket and writing
/// them to the other. Both calls are non-blocking and return `WouldBlock`
/// when the socket is not ready.
trait Stage {
    /// Takes up to a stage's worth of bytes from `src`; 0 means EOF.
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize>;
    /// Gives up to `pending` held bytes to `dst`; returns how many it took.
    fn drain(&mut self, dst: &TcpStream, pending: usize) -> io::Result<usize>;
}

/// Moves bytes one way until EOF, then shuts down `dst`'s write half.
/// Never holds more than one stage's worth: a slow reader stalls the writer.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    mut stage: impl Stage,
    moved: &mut u64,
) -> io::Result<()> {
    loop {
        let n = ready(src, Interest::READABLE, || stage.fill(src)).await?;
        if n == 0 {
            return shutdown_write(dst);
        }
        let mut pending = n;
        while pending > 0 {
            let w = ready(dst, Interest::WRITABLE, || stage.drain(dst, pending)).await?;
            pending -= w;
            *moved += w as u64;
        }
    }
}

/// Retries `op` each time `stream` is ready for `interest`, until it does
/// not return `WouldBlock`.
async fn ready<T>(
    stream: &TcpStream,
    interest: Interest,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    loop {
        stream.ready(interest).await?;
        match stream.try_io(interest, &mut op) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Sends our FIN to `stream` while still reading what it sends.
pub fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match rustix::net::shutdown(stream, rustix::net::Shutdown::Write) {
        // The peer already went away entirely: nothing left to tell it.
        Err(rustix::io::Errno::NOTCONN) => Ok(()),
        other => other.map_err(io::Error::from),
    }
}
