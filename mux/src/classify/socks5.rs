//! SOCKS5: the client's greeting (RFC 1928 §3) is the version byte 5, a method
//! count, then that many authentication method numbers.
//!
//! Four bytes of framing is little to go on, so every method must be one a
//! client would offer: IANA-assigned 0x00..=0x09 or private-use 0x80..=0xFE
//! (never 0xFF, "no acceptable methods", which only servers send), each at
//! most once. sslh accepts 0..=9 only, with at most 10 methods; the
//! private-use range is kept for clients with custom authentication.

use super::{Cursor, Probe, Stop};

const VERSION: u8 = 5;

fn plausible(method: u8) -> bool {
    matches!(method, 0x00..=0x09 | 0x80..=0xFE)
}

/// How many distinct plausible methods there are: a longer list must repeat
/// one, so its count byte alone rules it out.
const MAX_METHODS: u8 = 10 + 127;

pub fn probe(buf: &[u8]) -> Probe<()> {
    greeting(&mut Cursor::open(buf)).into()
}

fn greeting(c: &mut Cursor) -> Result<(), Stop> {
    if c.u8()? != VERSION {
        return Err(Stop::Bad);
    }
    let count = c.u8()?;
    if count == 0 || count > MAX_METHODS {
        return Err(Stop::Bad);
    }
    let mut seen = [false; 256];
    for _ in 0..count {
        let method = c.u8()?;
        let seen = &mut seen[usize::from(method)];
        if !plausible(method) || *seen {
            return Err(Stop::Bad);
        }
        *seen = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::testutil::assert_byte_by_byte;

    #[test]
    fn real_greetings_byte_by_byte() {
        for greeting in [
            // curl --socks5: no authentication.
            &[5, 1, 0][..],
            // curl with credentials: none or username/password.
            &[5, 2, 0, 2],
            // Firefox and ssh -D both offer only "no authentication".
            &[5, 1, 0],
            // A client offering GSSAPI too, plus a private method.
            &[5, 4, 0, 1, 2, 0x80],
        ] {
            assert_byte_by_byte(probe, greeting, Probe::Match(()));
        }
    }

    #[test]
    fn the_request_that_follows_does_not_matter() {
        assert_eq!(probe(&[5, 1, 0, 5, 1, 0, 3]), Probe::Match(()));
    }

    #[test]
    fn rejects_as_early_as_possible() {
        assert_eq!(probe(&[4]), Probe::NoMatch, "SOCKS4");
        assert_eq!(probe(&[5, 0]), Probe::NoMatch, "no methods");
        assert_eq!(
            probe(&[5, MAX_METHODS + 1]),
            Probe::NoMatch,
            "count forces a repeat"
        );
        assert_eq!(probe(&[5, 3, 0, 0x0a]), Probe::NoMatch, "unassigned method");
        assert_eq!(
            probe(&[5, 3, 0, 0xff]),
            Probe::NoMatch,
            "0xff is the server's refusal"
        );
        assert_eq!(probe(&[5, 3, 0, 2, 0]), Probe::NoMatch, "repeated method");
    }

    #[test]
    fn longest_plausible_greeting_matches() {
        let mut greeting = vec![5, MAX_METHODS];
        greeting.extend((0..=9).chain(0x80..=0xfe));
        assert_byte_by_byte(probe, &greeting, Probe::Match(()));
    }
}
