//! HTTP/2 with prior knowledge over cleartext ("h2c"): the client opens with
//! the fixed connection preface (RFC 9113 §3.4).

use super::{Cursor, Probe};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub fn probe(buf: &[u8]) -> Probe<()> {
    Cursor::open(buf).literal(PREFACE).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::testutil::assert_byte_by_byte;

    #[test]
    fn preface_byte_by_byte() {
        assert_byte_by_byte(probe, PREFACE, Probe::Match(()));
    }

    #[test]
    fn preface_followed_by_settings_frame() {
        let mut buf = PREFACE.to_vec();
        buf.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(probe(&buf), Probe::Match(()));
    }

    #[test]
    fn near_misses_are_rejected() {
        assert_eq!(probe(b"PRI * HTTP/1.1\r\n"), Probe::NoMatch);
        assert_eq!(probe(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\n"), Probe::NoMatch);
        assert_eq!(probe(b"POST / HTTP/1.1\r\n"), Probe::NoMatch);
        assert_eq!(probe(b"PRO"), Probe::NoMatch);
        assert_eq!(probe(b"PR"), Probe::NeedMore);
    }
}
