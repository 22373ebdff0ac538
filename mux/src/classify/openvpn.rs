//! OpenVPN over TCP: each packet is prefixed by its 16-bit length, and a
//! client opens with a P_CONTROL_HARD_RESET_CLIENT_V2 or _V3 packet.
//!
//! The bounds are those of OpenVPN's own `--port-share` check
//! (`is_openvpn_protocol` in openvpn's ps.c, and the same in OpenVPN 3), so
//! that whatever an OpenVPN server accepts when sharing its port, this does
//! too and nothing wider:
//! - the opcode byte is the whole byte `opcode << 3` with key id 0, since a
//!   new session always starts on key 0;
//! - a V2 reset is 14 bytes at least (opcode, session id, empty ack array,
//!   packet id) and at most 255 (an HMAC, replay id and the early
//!   negotiation TLV fit easily);
//! - a V3 reset carries the tls-crypt-v2 wrapped client key, 290 bytes at
//!   least and capped at 1024 by OpenVPN, hence 336..=1278 with the framing.
//!
//! sslh instead waits for a whole packet of the announced length, which
//! depends on how the client's writes were split; three bytes suffice here.

use std::ops::RangeInclusive;

use super::{Cursor, Probe, Stop};

const OPCODE_SHIFT: u8 = 3;
const HARD_RESET_CLIENT_V2: u8 = 7 << OPCODE_SHIFT;
const HARD_RESET_CLIENT_V3: u8 = 10 << OPCODE_SHIFT;

const V2_LEN: RangeInclusive<u16> = 14..=255;
const V3_LEN: RangeInclusive<u16> = 336..=1278;

pub fn probe(buf: &[u8]) -> Probe<()> {
    hard_reset(&mut Cursor::open(buf)).into()
}

fn hard_reset(c: &mut Cursor) -> Result<(), Stop> {
    // Settled on the high byte alone when it is too big for either range.
    let high = c.u8()?;
    if u16::from(high) > V2_LEN.end().max(V3_LEN.end()) >> 8 {
        return Err(Stop::Bad);
    }
    let len = u16::from_be_bytes([high, c.u8()?]);
    if !V2_LEN.contains(&len) && !V3_LEN.contains(&len) {
        return Err(Stop::Bad);
    }
    let range = match c.u8()? {
        HARD_RESET_CLIENT_V2 => V2_LEN,
        HARD_RESET_CLIENT_V3 => V3_LEN,
        _ => return Err(Stop::Bad),
    };
    if range.contains(&len) {
        Ok(())
    } else {
        Err(Stop::Bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::testutil::{OPENVPN_RESET, assert_byte_by_byte};

    #[test]
    fn v2_reset_byte_by_byte() {
        // Only the first three bytes are looked at.
        assert_byte_by_byte(probe, &OPENVPN_RESET[..3], Probe::Match(()));
        assert_eq!(probe(OPENVPN_RESET), Probe::Match(()));
    }

    #[test]
    fn minimal_v2_reset() {
        let mut reset = vec![0, 14, HARD_RESET_CLIENT_V2];
        reset.extend([0x5a; 8]); // session id
        reset.push(0); // no acks
        reset.extend([0; 4]); // packet id
        assert_eq!(probe(&reset), Probe::Match(()));
    }

    #[test]
    fn v3_reset() {
        assert_byte_by_byte(probe, &[0x01, 0x80, HARD_RESET_CLIENT_V3], Probe::Match(()));
        assert_eq!(probe(&[0x04, 0xfe, HARD_RESET_CLIENT_V3]), Probe::Match(()));
    }

    #[test]
    fn lengths_outside_the_opcode_range() {
        assert_eq!(probe(&[0, 13, HARD_RESET_CLIENT_V2]), Probe::NoMatch);
        assert_eq!(probe(&[0x01, 0x80, HARD_RESET_CLIENT_V2]), Probe::NoMatch);
        assert_eq!(probe(&[0, 200, HARD_RESET_CLIENT_V3]), Probe::NoMatch);
        assert_eq!(probe(&[0x04, 0xff, HARD_RESET_CLIENT_V3]), Probe::NoMatch);
    }

    #[test]
    fn rejects_as_early_as_possible() {
        assert_eq!(
            probe(&[5]),
            Probe::NoMatch,
            "no valid length starts with 0x05"
        );
        assert_eq!(probe(&[0, 13]), Probe::NoMatch, "too short for any reset");
        assert_eq!(
            probe(&[0x01, 0x00]),
            Probe::NoMatch,
            "between the two ranges"
        );
        assert_eq!(probe(&[0, 14]), Probe::NeedMore);
        assert_eq!(probe(&[0, 14, 0x39]), Probe::NoMatch, "key id 1");
        assert_eq!(
            probe(&[0, 14, 0x08]),
            Probe::NoMatch,
            "V1 reset, gone since 2.5"
        );
        assert_eq!(probe(&[0, 14, 0x20]), Probe::NoMatch, "P_CONTROL_V1");
    }
}
