//! The PROXY protocol header (HAProxy's spec, v1 text and v2 binary) that
//! tells a backend who the client really is. Pure: addresses in, bytes out.

use std::net::{IpAddr, SocketAddr};

/// Which header a route sends its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        match s {
            "v1" => Some(Version::V1),
            "v2" => Some(Version::V2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// The v2 signature: chosen by the spec so that it cannot start any other
/// protocol's first bytes.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a connection from `client` that arrived at `local` (the
/// address the client dialled, which the spec calls the destination).
/// IPv4-mapped IPv6 addresses (a dual-stack listener) are written as IPv4.
pub fn header(version: Version, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (src, dst) = (unmap(client), unmap(local));
    match version {
        Version::V1 => v1(src, dst),
        Version::V2 => v2(src, dst),
    }
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => "TCP4",
        (IpAddr::V6(_), IpAddr::V6(_)) => "TCP6",
        // The spec's answer when the two ends do not share a family.
        _ => return b"PROXY UNKNOWN\r\n".to_vec(),
    };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    // Version 2, command PROXY.
    out.push(0x21);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            // AF_INET, STREAM; 4 + 4 + 2 + 2 bytes of addresses.
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => {
            // AF_UNSPEC: the receiver keeps the connection's own addresses.
            out.push(0x00);
            out.extend_from_slice(&0u16.to_be_bytes());
            return out;
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_is_the_spec_text() {
        assert_eq!(
            header(Version::V1, addr("192.0.2.7:51000"), addr("192.0.2.1:443")),
            b"PROXY TCP4 192.0.2.7 192.0.2.1 51000 443\r\n"
        );
        assert_eq!(
            header(
                Version::V1,
                addr("[2001:db8::7]:51000"),
                addr("[2001:db8::1]:22")
            ),
            b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 22\r\n"
        );
        assert_eq!(
            header(
                Version::V1,
                addr("[::ffff:192.0.2.7]:5"),
                addr("[::ffff:192.0.2.1]:6")
            ),
            b"PROXY TCP4 192.0.2.7 192.0.2.1 5 6\r\n"
        );
        assert_eq!(
            header(Version::V1, addr("192.0.2.7:5"), addr("[2001:db8::1]:6")),
            b"PROXY UNKNOWN\r\n"
        );
    }

    #[test]
    fn v2_is_the_spec_binary() {
        let h = header(Version::V2, addr("192.0.2.7:51000"), addr("192.0.2.1:443"));
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 7, 192, 0, 2, 1]);
        want.extend_from_slice(&51000u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(h, want);

        let h = header(
            Version::V2,
            addr("[2001:db8::7]:1"),
            addr("[2001:db8::1]:2"),
        );
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(&h[48..], &[0, 1, 0, 2]);

        let h = header(Version::V2, addr("192.0.2.7:5"), addr("[2001:db8::1]:6"));
        assert_eq!(&h[12..], &[0x21, 0x00, 0, 0]);
    }
}
