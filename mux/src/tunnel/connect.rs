//! `mux connect BOX:PORT TARGET`: opens a tunnel to a target through mux's
//! shared port and joins it to standard input and output, for ssh's
//! ProxyCommand.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::agent::{SessionError, read_head};

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {server}: {source}")]
    Dial {
        server: String,
        source: std::io::Error,
    },
    #[error("{server} did not answer within {DIAL_TIMEOUT:?}")]
    Timeout { server: String },
    #[error("{server}: {source}")]
    Answer {
        server: String,
        source: SessionError,
    },
    #[error("{server} refused {target}: {status}")]
    Refused {
        server: String,
        target: String,
        status: String,
    },
    #[error("tunnel: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the tunnel until both directions are done.
pub async fn run(server: &str, target: &str, token: Option<&str>) -> Result<(), ConnectError> {
    let mut stream = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(server)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(ConnectError::Dial {
                server: server.to_string(),
                source,
            });
        }
        Err(_) => {
            return Err(ConnectError::Timeout {
                server: server.to_string(),
            });
        }
    };
    let _ = stream.set_nodelay(true);
    let authorization = match token {
        Some(t) => format!("Proxy-Authorization: Bearer {t}\r\n"),
        None => String::new(),
    };
    let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{authorization}\r\n");
    stream.write_all(head.as_bytes()).await?;
    let answer = tokio::time::timeout(DIAL_TIMEOUT, read_head(&mut stream)).await;
    let (status, early) = match answer {
        Ok(Ok(a)) => a,
        Ok(Err(source)) => {
            return Err(ConnectError::Answer {
                server: server.to_string(),
                source,
            });
        }
        Err(_) => {
            return Err(ConnectError::Timeout {
                server: server.to_string(),
            });
        }
    };
    if status.code != 200 {
        return Err(ConnectError::Refused {
            server: server.to_string(),
            target: target.to_string(),
            status: status.describe(),
        });
    }
    let (mut from_box, mut to_box) = stream.into_split();
    let mut stdout = tokio::io::stdout();
    let down = async {
        stdout.write_all(&early).await?;
        tokio::io::copy(&mut from_box, &mut stdout).await?;
        stdout.flush().await
    };
    let up = async {
        let mut stdin = tokio::io::stdin();
        tokio::io::copy(&mut stdin, &mut to_box).await?;
        to_box.shutdown().await
    };
    let (down, up) = tokio::join!(down, up);
    down?;
    up?;
    Ok(())
}
