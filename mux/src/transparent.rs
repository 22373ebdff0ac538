//! Transparent routes (sslh's `--transparent`): a backend on this host sees
//! each client's own address, so sshd logs, penalises and limits clients one
//! by one instead of all of them as 127.0.0.1.
//!
//! mux binds its connection to the backend to the client's address
//! (`IP_TRANSPARENT`). The backend's answers then go to that address, which
//! is not this host's: one policy-routing rule per backend port sends them
//! back into the host over `lo`, where they reach mux's socket. The rule
//! only matches what a loopback address sends from that port to an address
//! that is not loopback, which has no route otherwise (the kernel refuses a
//! loopback source on any other device), so it changes nothing else on the
//! machine, and it is left in place when mux exits.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;

use tokio::net::TcpSocket;

use crate::datapath::bind_address_no_port;
use crate::route::Backend;

/// The routing table (and the rules' priority) mux's rules point to.
pub const TABLE: u32 = 28021;

#[derive(Debug, thiserror::Error)]
pub enum TransparentError {
    #[error(
        "cannot bind a client's address (IP_TRANSPARENT needs root, CAP_NET_RAW or CAP_NET_ADMIN)"
    )]
    Capability(#[source] io::Error),
    #[error("`ip {args}` failed: {why}")]
    Ip { args: String, why: String },
}

/// An address family, as the rules are per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1",
        }
    }

    fn everything(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// The families and port a transparent route's backend is reached on; only
/// loopback backends qualify, since only their answers come back through
/// `lo` (see the module's comment).
pub fn loopback_backend(backend: &Backend) -> Result<(Vec<Family>, u16), String> {
    let (host, port) = backend.host_port();
    let families = match host {
        "localhost" => vec![Family::V4, Family::V6],
        _ => match host.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) if ip.is_loopback() => vec![Family::V4],
            Ok(IpAddr::V6(ip)) if ip.is_loopback() => vec![Family::V6],
            _ => {
                return Err(format!(
                    "transparent needs a backend on this host's loopback (127.0.0.1, [::1] or localhost), not `{backend}`: only there do its answers to a client's address come back to mux"
                ));
            }
        },
    };
    Ok((families, port))
}

/// `addr` with an IPv4 address mapped into IPv6 written as IPv4 (a client of
/// a `[::]` listener).
pub(crate) fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn set_transparent(socket: &impl AsFd, v6: bool) -> io::Result<()> {
    let socket = socket2::SockRef::from(socket);
    if v6 {
        socket.set_ip_transparent_v6(true)
    } else {
        socket.set_ip_transparent_v4(true)
    }
}

/// Binds `socket`, about to connect to `backend`, to `client`'s address
/// (its port too, as sslh does, unless another connection holds it) when
/// given and of the backend's family. Returns whether it did.
pub fn bind_client(
    socket: &TcpSocket,
    backend: SocketAddr,
    client: Option<SocketAddr>,
) -> io::Result<bool> {
    let Some(client) = client.map(unmapped) else {
        return Ok(false);
    };
    if client.is_ipv4() != backend.is_ipv4() {
        log::info!(
            "transparent: {client} and backend {backend} differ in address family; the backend sees mux's address"
        );
        return Ok(false);
    }
    set_transparent(socket, backend.is_ipv6())?;
    match socket.bind(client) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            // The kernel then picks a port free for the 4-tuple at connect.
            bind_address_no_port(socket)?;
            socket.bind(SocketAddr::new(client.ip(), 0))?;
        }
        other => other?,
    }
    Ok(true)
}

/// Whether this process may bind a client's address, tried on a socket of
/// its own.
pub fn probe() -> Result<(), TransparentError> {
    TcpSocket::new_v4()
        .and_then(|socket| set_transparent(&socket, false))
        .map_err(TransparentError::Capability)
}

/// Makes sure the backends' answers to clients come back into the host:
/// for each (family, port), a rule sending what loopback sends from that
/// port to table `TABLE`, whose one route delivers everything locally.
/// Adds what is missing (which needs CAP_NET_ADMIN) and returns a line
/// saying what it did, for the log.
pub fn route_answers(ports: &BTreeSet<(Family, u16)>) -> Result<String, TransparentError> {
    let table = TABLE.to_string();
    let mut families: Vec<Family> = ports.iter().map(|(f, _)| *f).collect();
    families.dedup();
    let mut rules = Vec::new();
    for &family in &families {
        let route = [
            family.flag(),
            "route",
            "replace",
            "local",
            family.everything(),
            "dev",
            "lo",
            "table",
            &table,
        ];
        if let Err(e) = ip(&route) {
            // Without CAP_NET_ADMIN (a reload after --user) the route may
            // still be there from the start.
            let shown = ip(&[family.flag(), "route", "show", "table", &table]).unwrap_or_default();
            if !shown.lines().any(|l| l.starts_with("local default dev lo")) {
                return Err(e);
            }
        }
        rules.push((family, ip(&[family.flag(), "rule", "show"])?));
    }
    let mut added = Vec::new();
    for (family, port) in ports {
        let shown = &rules.iter().find(|(f, _)| f == family).expect("listed").1;
        let sport = format!("sport {port} ");
        let there = shown.lines().any(|l| {
            l.contains(&format!("from {} ", family.loopback()))
                && l.contains(&sport)
                && l.trim_end().ends_with(&format!("lookup {TABLE}"))
        });
        if there {
            continue;
        }
        let port = port.to_string();
        ip(&[
            family.flag(),
            "rule",
            "add",
            "pref",
            &table,
            "from",
            family.loopback(),
            "iif",
            "lo",
            "ipproto",
            "tcp",
            "sport",
            &port,
            "lookup",
            &table,
        ])?;
        added.push(format!("{} port {port}", family.loopback()));
    }
    let ports: Vec<String> = ports
        .iter()
        .map(|(f, p)| format!("{}:{p}", f.loopback()))
        .collect();
    Ok(format!(
        "transparent: answers from {} to clients come back over lo (ip rule pref {TABLE}, table {TABLE}){}",
        ports.join(", "),
        if added.is_empty() {
            String::new()
        } else {
            format!("; added for {}", added.join(", "))
        }
    ))
}

/// Runs `ip ARGS`; its standard output, or why it failed.
fn ip(args: &[&str]) -> Result<String, TransparentError> {
    let fail = |why: String| TransparentError::Ip {
        args: args.join(" "),
        why,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn families(s: &str) -> Result<(Vec<Family>, u16), String> {
        loopback_backend(&Backend::parse(s).unwrap())
    }

    #[test]
    fn only_loopback_backends_can_be_transparent() {
        assert_eq!(families("127.0.0.1:22"), Ok((vec![Family::V4], 22)));
        assert_eq!(families("127.1.2.3:80"), Ok((vec![Family::V4], 80)));
        assert_eq!(families("[::1]:8080"), Ok((vec![Family::V6], 8080)));
        assert_eq!(
            families("localhost:30000"),
            Ok((vec![Family::V4, Family::V6], 30000))
        );
        for other in [
            "10.0.0.5:22",
            "[2001:db8::1]:22",
            "inner.example:22",
            "0.0.0.0:22",
        ] {
            let e = families(other).unwrap_err();
            assert!(e.contains("loopback") && e.contains(other), "{e}");
        }
    }

    #[test]
    fn a_mapped_client_binds_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:4242".parse().unwrap();
        assert_eq!(unmapped(mapped), "192.0.2.7:4242".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::7]:4242".parse().unwrap();
        assert_eq!(unmapped(v6), v6);
    }

    #[test]
    fn without_a_client_of_its_family_the_socket_is_left_unbound() {
        let backend: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        assert!(!bind_client(&socket, backend, None).unwrap());
        let v6_client = Some("[2001:db8::7]:4242".parse().unwrap());
        assert!(
            !bind_client(&socket, backend, v6_client).unwrap(),
            "an IPv6 client cannot be an IPv4 source"
        );
        assert_eq!(
            socket.local_addr().unwrap(),
            "0.0.0.0:0".parse::<SocketAddr>().unwrap()
        );
    }
}
