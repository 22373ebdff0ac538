//! Taking over a public port (say 22) without locking anyone out: new
//! connections to it from other hosts reach mux while the port's own server
//! (sshd) keeps listening, and gets them back the moment mux is gone.

mod iptables;

use std::net::SocketAddr;

use std::net::TcpListener;

use crate::ebpf::{EbpfError, PortTakeover};
pub use iptables::{Guard, cleanup, guard};

/// How to take the ports over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// sk_lookup where the kernel allows it, else iptables.
    Auto,
    /// An sk_lookup program held only by the mux process: nothing is left
    /// behind by a crash.
    SkLookup,
    /// A NAT REDIRECT rule (iptables or nft), held by a root guard process
    /// that removes it when mux exits; `mux takeover --cleanup` removes one
    /// left behind if the guard itself was killed.
    Iptables,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::SkLookup => "sk_lookup",
            Method::Iptables => "iptables",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "auto" => Method::Auto,
            "sk_lookup" => Method::SkLookup,
            "iptables" => Method::Iptables,
            _ => return None,
        })
    }
}

/// The `[takeover]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub ports: Vec<u16>,
    pub method: Method,
}

/// A takeover in force; released when dropped.
#[derive(Debug)]
pub enum Active {
    SkLookup(PortTakeover),
    Iptables(Guard),
}

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("taking over ports with sk_lookup")]
    SkLookup(#[source] EbpfError),
    #[error("taking over ports with a REDIRECT rule: {0}")]
    Iptables(String),
    #[error("no listener to take ports over to")]
    NoListener,
}

impl Active {
    /// Sets the takeover up for `listeners` (mux's bound sockets).
    pub fn start(takeover: &Takeover, listeners: &[TcpListener]) -> Result<Active, TakeoverError> {
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        if addrs.is_empty() {
            return Err(TakeoverError::NoListener);
        }
        match takeover.method {
            Method::SkLookup => PortTakeover::start(&takeover.ports, listeners)
                .map(Active::SkLookup)
                .map_err(TakeoverError::SkLookup),
            Method::Iptables => Guard::start(&takeover.ports, &addrs)
                .map(Active::Iptables)
                .map_err(TakeoverError::Iptables),
            Method::Auto => match PortTakeover::start(&takeover.ports, listeners) {
                Ok(t) => Ok(Active::SkLookup(t)),
                Err(e) => {
                    log::warn!(
                        "takeover: sk_lookup unavailable ({:#}); falling back to a REDIRECT rule",
                        anyhow::Error::from(e)
                    );
                    Guard::start(&takeover.ports, &addrs)
                        .map(Active::Iptables)
                        .map_err(TakeoverError::Iptables)
                }
            },
        }
    }

    /// For the start-up log.
    pub fn describe(&self) -> &'static str {
        match self {
            Active::SkLookup(_) => "sk_lookup (released the moment mux exits, even by SIGKILL)",
            Active::Iptables(r) => r.describe(),
        }
    }
}
