//! SSH: the client's identification line starts with `SSH-` (RFC 4253 §4.2).
//!
//! Matching on the four bytes alone, without waiting for the end of the line,
//! is deliberate: some clients send their banner and then wait for the
//! server's before saying anything else, so the rest of the line may be all
//! there is for a while, and nothing else starts with `SSH-`.

use super::{Cursor, Probe};

const MAGIC: &[u8] = b"SSH-";

pub fn probe(buf: &[u8]) -> Probe<()> {
    Cursor::open(buf).literal(MAGIC).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::testutil::assert_byte_by_byte;

    #[test]
    fn banners_match() {
        for banner in [
            &b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"[..],
            b"SSH-2.0-PuTTY_Release_0.81\r\n",
            b"SSH-1.99-Cisco-1.25\r\n",
            b"SSH-2.0-Go\r\n",
        ] {
            assert_eq!(probe(banner), Probe::Match(()));
        }
    }

    #[test]
    fn magic_byte_by_byte() {
        assert_byte_by_byte(probe, b"SSH-", Probe::Match(()));
    }

    #[test]
    fn anything_after_the_magic_still_matches() {
        assert_eq!(probe(b"SSH-\x00\xff"), Probe::Match(()));
    }

    #[test]
    fn rejects_at_first_wrong_byte() {
        assert_eq!(probe(b"X"), Probe::NoMatch);
        assert_eq!(probe(b"S"), Probe::NeedMore);
        assert_eq!(probe(b"SS"), Probe::NeedMore);
        assert_eq!(probe(b"SSh"), Probe::NoMatch);
        assert_eq!(probe(b"ssh-2.0-x\r\n"), Probe::NoMatch);
        assert_eq!(probe(b"SSH_"), Probe::NoMatch);
        assert_eq!(probe(b""), Probe::NeedMore);
    }
}
