//! TLS: a ClientHello (RFC 8446 §4.1.2, same layout back to SSL 3.0), with
//! the server name and ALPN protocols a route may select on.
//!
//! The handshake message may span several records and several reads; the
//! probe reassembles what has arrived and parses it as far as it goes, so a
//! malformed hello is rejected at its first bad length rather than after the
//! whole declared size has been waited for.
//!
//! What the router gets in [`TlsInfo`]:
//! - `sni`: the first `host_name` of the server_name extension, lowercased,
//!   with one trailing dot removed. A name that is empty, longer than 255
//!   bytes, or holds anything but printable ASCII without spaces (such as a
//!   NUL, which could make two parsers disagree on where it ends) is dropped:
//!   `sni` is then `None`, as if absent, and the hello still matches. A
//!   server_name extension that is structurally broken is a `NoMatch`.
//! - `alpn`: the protocol names in the client's order, lossily decoded.
//!
//! The hello must be well formed down to the extension framing; extension
//! contents other than those two are not looked at. A second server_name or
//! ALPN extension is a `NoMatch`: servers reject such a hello, and which of
//! the two a router would pick is anyone's guess.

use std::borrow::Cow;

use super::{Cursor, MAX_CLASSIFY_BYTES, Probe, Stop};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsInfo {
    pub sni: Option<String>,
    pub alpn: Vec<String>,
}

const CONTENT_HANDSHAKE: u8 = 0x16;
const RECORD_HEADER_LEN: usize = 5;
/// RFC 8446 §5.1 caps a plaintext fragment at 2^14 bytes; a little slack
/// costs nothing, as the server enforces the real limit.
const MAX_RECORD_LEN: usize = (1 << 14) + 256;

const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_HEADER_LEN: usize = 4;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const NAME_TYPE_HOST_NAME: u8 = 0;
/// A DNS name is at most 253 bytes in text form; a longer one is not a name.
const MAX_HOST_NAME_LEN: usize = 255;

pub fn probe(buf: &[u8]) -> Probe<TlsInfo> {
    reassemble(buf).and_then(|hs| client_hello(&hs)).into()
}

/// The handshake bytes carried by the leading handshake records of `buf`,
/// up to the end of the first handshake message when that has arrived.
/// Only a bad record header is an error: missing bytes just end the data,
/// which is then parsed as far as it goes.
fn reassemble(buf: &[u8]) -> Result<Cow<'_, [u8]>, Stop> {
    let mut records = Cursor::open(buf);
    let mut hs: Cow<[u8]> = Cow::Borrowed(&[]);
    while !message_complete(&hs) {
        let fragment = match record(&mut records) {
            Ok(fragment) => fragment,
            Err(Stop::Short) => break,
            Err(Stop::Bad) => return Err(Stop::Bad),
        };
        if hs.is_empty() {
            hs = Cow::Borrowed(fragment);
        } else {
            hs.to_mut().extend_from_slice(fragment);
        }
    }
    Ok(hs)
}

/// The arrived part of the next handshake record's fragment.
fn record<'a>(records: &mut Cursor<'a>) -> Result<&'a [u8], Stop> {
    if records.u8()? != CONTENT_HANDSHAKE {
        return Err(Stop::Bad);
    }
    // legacy_record_version: 3.0 (SSL 3.0) to 3.4 (TLS 1.3's own number),
    // though clients send 3.1 or 3.3. SSLv2 hellos have already failed on
    // the content type: their first byte has the high bit set.
    if records.u8()? != 3 || records.u8()? > 4 {
        return Err(Stop::Bad);
    }
    let len = usize::from(records.u16()?);
    if len == 0 || len > MAX_RECORD_LEN {
        return Err(Stop::Bad);
    }
    let fragment = records.sub(len)?.rest();
    if fragment.is_empty() {
        // Header complete but no payload yet.
        return Err(Stop::Short);
    }
    Ok(fragment)
}

fn message_complete(hs: &[u8]) -> bool {
    let mut c = Cursor::open(hs);
    match (c.u8(), c.u24()) {
        (Ok(_), Ok(len)) => usize::try_from(len).is_ok_and(|len| c.rest().len() >= len),
        _ => false,
    }
}

fn client_hello(hs: &[u8]) -> Result<TlsInfo, Stop> {
    let mut hs = Cursor::open(hs);
    if hs.u8()? != HANDSHAKE_CLIENT_HELLO {
        return Err(Stop::Bad);
    }
    let len = usize::try_from(hs.u24()?).map_err(|_| Stop::Bad)?;
    // Even in a single record it could never arrive within the cap.
    if RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + len > MAX_CLASSIFY_BYTES {
        return Err(Stop::Bad);
    }
    let mut c = hs.sub(len)?;

    let [major, minor] = c.array()?;
    if major != 3 || minor > 4 {
        return Err(Stop::Bad);
    }
    c.skip(32)?; // random
    let session_id = c.u8()?;
    if session_id > 32 {
        return Err(Stop::Bad);
    }
    c.skip(usize::from(session_id))?;
    let cipher_suites = c.u16()?;
    if cipher_suites == 0 || !cipher_suites.is_multiple_of(2) {
        return Err(Stop::Bad);
    }
    c.skip(usize::from(cipher_suites))?;
    let compression_methods = c.u8()?;
    if compression_methods == 0 {
        return Err(Stop::Bad);
    }
    c.skip(usize::from(compression_methods))?;

    let mut info = TlsInfo::default();
    if c.is_done() {
        // A hello without extensions, as SSL 3.0 and early TLS allowed.
        return Ok(info);
    }
    let extensions_len = usize::from(c.u16()?);
    if extensions_len != c.remaining() {
        return Err(Stop::Bad);
    }
    let mut extensions = c.sub(extensions_len)?;
    let (mut seen_sni, mut seen_alpn) = (false, false);
    while !extensions.is_done() {
        let kind = extensions.u16()?;
        let mut body = extensions.sub_u16()?;
        match kind {
            EXT_SERVER_NAME => {
                if std::mem::replace(&mut seen_sni, true) {
                    return Err(Stop::Bad);
                }
                info.sni = server_name(&mut body)?;
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(Stop::Bad);
                }
                info.alpn = alpn(&mut body)?;
            }
            // Not looked into, but a hello is only whole once they are here.
            _ => {
                body.take_rest()?;
            }
        }
    }
    Ok(info)
}

/// The server_name extension (RFC 6066 §3): a non-empty list of typed names
/// that fills the extension exactly.
fn server_name(body: &mut Cursor) -> Result<Option<String>, Stop> {
    let mut list = body.sub_u16()?;
    if list.is_done() || !body.is_done() {
        return Err(Stop::Bad);
    }
    let mut found = None;
    while !list.is_done() {
        let kind = list.u8()?;
        let name = list.sub_u16()?.take_rest()?;
        if kind == NAME_TYPE_HOST_NAME && found.is_none() {
            found = Some(host_name(name));
        }
    }
    Ok(found.flatten())
}

fn host_name(name: &[u8]) -> Option<String> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > MAX_HOST_NAME_LEN || !name.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    let name = std::str::from_utf8(name).ok()?;
    Some(name.to_ascii_lowercase())
}

/// The ALPN extension (RFC 7301 §3.1): a non-empty list of non-empty names
/// that fills the extension exactly.
fn alpn(body: &mut Cursor) -> Result<Vec<String>, Stop> {
    let mut list = body.sub_u16()?;
    if list.is_done() || !body.is_done() {
        return Err(Stop::Bad);
    }
    let mut protocols = Vec::new();
    while !list.is_done() {
        let name = list.sub_u8()?.take_rest()?;
        if name.is_empty() {
            return Err(Stop::Bad);
        }
        protocols.push(String::from_utf8_lossy(name).into_owned());
    }
    Ok(protocols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::testutil::{
        CLIENT_HELLO_CURL, CLIENT_HELLO_OPENSSL, assert_byte_by_byte, hex,
    };

    /// `bytes` after its length as a big-endian integer of `width` bytes.
    fn prefixed(width: usize, bytes: &[u8]) -> Vec<u8> {
        let len = bytes.len().to_be_bytes();
        let mut out = len[len.len() - width..].to_vec();
        out.extend_from_slice(bytes);
        out
    }

    fn ext(kind: u16, body: &[u8]) -> Vec<u8> {
        [&kind.to_be_bytes()[..], &prefixed(2, body)].concat()
    }

    fn sni_ext(name: &[u8]) -> Vec<u8> {
        ext(
            EXT_SERVER_NAME,
            &prefixed(2, &[&[0][..], &prefixed(2, name)].concat()),
        )
    }

    fn alpn_ext(protocols: &[&str]) -> Vec<u8> {
        let list: Vec<u8> = protocols
            .iter()
            .flat_map(|p| prefixed(1, p.as_bytes()))
            .collect();
        ext(EXT_ALPN, &prefixed(2, &list))
    }

    /// A ClientHello body; `extensions` is the block's content, `None` for
    /// no block at all.
    fn body(session_id: &[u8], ciphers: &[u8], extensions: Option<&[u8]>) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend([0x42; 32]);
        b.extend(prefixed(1, session_id));
        b.extend(prefixed(2, ciphers));
        b.extend(prefixed(1, &[0]));
        if let Some(extensions) = extensions {
            b.extend(prefixed(2, extensions));
        }
        b
    }

    const CIPHERS: &[u8] = &[0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f];

    fn handshake(body: &[u8]) -> Vec<u8> {
        [&[HANDSHAKE_CLIENT_HELLO][..], &prefixed(3, body)].concat()
    }

    /// The handshake bytes `hs` in records, cut at the given offsets.
    fn records(hs: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&hs.len()]) {
            out.extend([CONTENT_HANDSHAKE, 3, 1]);
            out.extend(prefixed(2, &hs[start..end]));
            start = end;
        }
        out
    }

    /// The handshake message of a typical modern hello.
    fn hello_hs(sni: Option<&str>, alpn: &[&str], extra: &[Vec<u8>]) -> Vec<u8> {
        let mut extensions = Vec::new();
        // GREASE first, as Chrome does.
        extensions.extend(ext(0x0a0a, &[]));
        if let Some(sni) = sni {
            extensions.extend(sni_ext(sni.as_bytes()));
        }
        extensions.extend(ext(0x000a, &[0, 4, 0, 0x1d, 0, 0x17])); // groups
        if !alpn.is_empty() {
            extensions.extend(alpn_ext(alpn));
        }
        extensions.extend(ext(0x002b, &[2, 3, 4])); // versions
        for e in extra {
            extensions.extend(e);
        }
        handshake(&body(&[0x77; 32], CIPHERS, Some(&extensions)))
    }

    fn hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        records(&hello_hs(sni, alpn, &[]), &[])
    }

    fn info(sni: Option<&str>, alpn: &[&str]) -> Probe<TlsInfo> {
        Probe::Match(TlsInfo {
            sni: sni.map(String::from),
            alpn: alpn.iter().map(|p| p.to_string()).collect(),
        })
    }

    #[test]
    fn captured_openssl_hello() {
        let input = hex(CLIENT_HELLO_OPENSSL);
        assert_byte_by_byte(
            probe,
            &input,
            info(Some("x.example.com"), &["h2", "http/1.1"]),
        );
    }

    #[test]
    fn captured_curl_hello() {
        let input = hex(CLIENT_HELLO_CURL);
        assert_byte_by_byte(
            probe,
            &input,
            info(Some("www.example.org"), &["h2", "http/1.1"]),
        );
    }

    #[test]
    fn built_hellos() {
        let cases: [(Option<&str>, &[&str]); 4] = [
            (Some("example.com"), &["h2", "http/1.1"]),
            (Some("mail.example.net"), &[]),
            (None, &["acme-tls/1"]),
            (None, &[]),
        ];
        for (sni, alpn) in cases {
            assert_byte_by_byte(probe, &hello(sni, alpn), info(sni, alpn));
        }
    }

    #[test]
    fn hello_without_extensions() {
        let input = records(&handshake(&body(&[], CIPHERS, None)), &[]);
        assert_byte_by_byte(probe, &input, info(None, &[]));
        // An empty block is fine too.
        let input = records(&handshake(&body(&[], CIPHERS, Some(&[]))), &[]);
        assert_byte_by_byte(probe, &input, info(None, &[]));
    }

    #[test]
    fn sni_is_lowercased_and_loses_a_trailing_dot() {
        assert_eq!(
            probe(&hello(Some("WWW.Example.COM."), &[])),
            info(Some("www.example.com"), &[])
        );
    }

    #[test]
    fn sni_that_is_not_a_plain_name_counts_as_absent() {
        for name in [
            &b"caf\xc3\xa9.example"[..],
            b"good.example\0evil.example",
            b"a b",
            b"",
            b".",
        ] {
            let input = records(&hello_hs(None, &[], &[sni_ext(name)]), &[]);
            assert_eq!(probe(&input), info(None, &[]), "{name:?}");
        }
        let long = "a".repeat(MAX_HOST_NAME_LEN + 1);
        assert_eq!(probe(&hello(Some(&long), &[])), info(None, &[]));
        let longest = "a".repeat(MAX_HOST_NAME_LEN);
        assert_eq!(
            probe(&hello(Some(&longest), &[])),
            info(Some(&longest), &[])
        );
    }

    #[test]
    fn sni_skips_other_name_types() {
        let list = [
            &[7][..],
            &prefixed(2, b"opaque"),
            &[0],
            &prefixed(2, b"b.example"),
        ]
        .concat();
        let input = records(
            &hello_hs(None, &[], &[ext(EXT_SERVER_NAME, &prefixed(2, &list))]),
            &[],
        );
        assert_eq!(probe(&input), info(Some("b.example"), &[]));
    }

    #[test]
    fn split_across_two_and_three_records() {
        let hs = hello_hs(Some("split.example"), &["h2"], &[]);
        let expected = info(Some("split.example"), &["h2"]);
        assert_byte_by_byte(probe, &records(&hs, &[3]), expected.clone());
        assert_byte_by_byte(probe, &records(&hs, &[40, 90]), expected.clone());
        let third = hs.len() / 3;
        assert_byte_by_byte(probe, &records(&hs, &[third, 2 * third]), expected);
    }

    #[test]
    fn split_at_every_position() {
        let hs = hello_hs(Some("every.example"), &["h2", "http/1.1"], &[]);
        let expected = info(Some("every.example"), &["h2", "http/1.1"]);
        for cut in 1..hs.len() {
            assert_byte_by_byte(probe, &records(&hs, &[cut]), expected.clone());
        }
        let hs = &hex(CLIENT_HELLO_OPENSSL)[RECORD_HEADER_LEN..];
        let expected = info(Some("x.example.com"), &["h2", "http/1.1"]);
        for cut in 1..hs.len() {
            assert_eq!(probe(&records(hs, &[cut])), expected, "cut at {cut}");
        }
    }

    #[test]
    fn one_byte_records() {
        let hs = hello_hs(Some("tiny.example"), &["h2"], &[]);
        let cuts: Vec<usize> = (1..hs.len()).collect();
        assert_byte_by_byte(
            probe,
            &records(&hs, &cuts),
            info(Some("tiny.example"), &["h2"]),
        );
    }

    #[test]
    fn what_follows_the_hello_does_not_matter() {
        let expected = info(Some("example.com"), &["h2"]);
        // TLS 1.3 middlebox compatibility: a ChangeCipherSpec record follows.
        let mut input = hello(Some("example.com"), &["h2"]);
        input.extend([0x14, 3, 3, 0, 1, 1]);
        assert_eq!(probe(&input), expected);
        // A record longer than the hello: the rest is not the hello's business.
        let mut hs = hello_hs(Some("example.com"), &["h2"], &[]);
        let len = hs.len();
        hs.extend([0xee; 7]);
        let input = records(&hs, &[]);
        assert_eq!(probe(&input[..RECORD_HEADER_LEN + len]), expected);
        assert_eq!(probe(&input), expected);
    }

    #[test]
    fn sslv2_hello() {
        // SSLv2-compatible CLIENT-HELLO offering TLS 1.0, as old clients sent.
        let input = hex("802e0103010015000000100000390000380000350000160000130000
                         0a0700c000003300003200002f0000070500800300800000050000
                         0402008000000000000000000000000000000000");
        assert_eq!(probe(&input), Probe::NoMatch);
        assert_eq!(probe(&input[..1]), Probe::NoMatch);
    }

    #[test]
    fn record_header_checks() {
        assert_eq!(probe(&[0x17]), Probe::NoMatch, "application data");
        assert_eq!(probe(&[0x16, 2]), Probe::NoMatch, "major version 2");
        assert_eq!(probe(&[0x16, 3, 5]), Probe::NoMatch, "minor version 5");
        assert_eq!(probe(&[0x16, 3, 1, 0, 0]), Probe::NoMatch, "empty record");
        assert_eq!(
            probe(&[0x16, 3, 1, 0x41, 0x01]),
            Probe::NoMatch,
            "record too long"
        );
        assert_eq!(
            probe(&[0x16, 3, 1, 0x41, 0x00]),
            Probe::NeedMore,
            "longest record"
        );
        assert_eq!(
            probe(&[0x16, 3, 0, 0, 1]),
            Probe::NeedMore,
            "SSL 3.0 record"
        );
    }

    #[test]
    fn handshake_header_checks() {
        assert_eq!(probe(&[0x16, 3, 1, 0, 4, 2]), Probe::NoMatch, "ServerHello");
        // Declared too big to ever fit in MAX_CLASSIFY_BYTES: known on 9 bytes.
        assert_eq!(probe(&[0x16, 3, 1, 0x40, 0, 1, 0, 0x40, 0]), Probe::NoMatch);
        assert_eq!(
            probe(&[0x16, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xf7]),
            Probe::NeedMore
        );
        // Too short to hold a hello's fixed fields.
        assert_eq!(
            probe(&records(&[1, 0, 0, 10, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0], &[])),
            Probe::NoMatch
        );
        let mut hs = hello_hs(None, &[], &[]);
        hs[4] = 2; // legacy_version 2.3
        assert_eq!(probe(&records(&hs, &[])), Probe::NoMatch);
    }

    #[test]
    fn handshake_longer_than_its_records() {
        let hs = hello_hs(Some("a.example"), &[], &[]);
        let first = records(&hs[..50], &[]);
        assert_eq!(
            probe(&first),
            Probe::NeedMore,
            "the rest may come in the next record"
        );
        let mut input = first.clone();
        input.extend([0x17, 3, 3, 0, 5]);
        assert_eq!(
            probe(&input),
            Probe::NoMatch,
            "but the next record is not a handshake"
        );
        let mut input = first;
        input.extend([0x16, 3, 3, 0, 0]);
        assert_eq!(probe(&input), Probe::NoMatch, "an empty next record");
    }

    #[test]
    fn malformed_lengths() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("session id 33", handshake(&body(&[0; 33], CIPHERS, None))),
            (
                "odd cipher suites",
                handshake(&body(&[], &[0x13, 0x01, 0x13], None)),
            ),
            ("no cipher suites", handshake(&body(&[], &[], None))),
            ("no compression method", {
                // Drop the null method and zero the count before it.
                let mut b = body(&[], CIPHERS, None);
                b.pop();
                b.pop();
                b.push(0);
                handshake(&b)
            }),
            ("extensions block longer than the message", {
                let e = sni_ext(b"a.example");
                let mut b = body(&[], CIPHERS, None);
                b.extend(u16::try_from(e.len() + 1).unwrap().to_be_bytes());
                b.extend(&e);
                handshake(&b)
            }),
            ("extensions block shorter than the message", {
                let e = sni_ext(b"a.example");
                let mut b = body(&[], CIPHERS, Some(&e));
                b.push(0);
                handshake(&b)
            }),
            ("one stray byte after compression", {
                let mut b = body(&[], CIPHERS, None);
                b.push(0);
                handshake(&b)
            }),
            ("extension longer than the block", {
                let e = [&[0x00, 0x17, 0x00, 0xc8][..], &sni_ext(b"a.example")].concat();
                handshake(&body(&[], CIPHERS, Some(&e)))
            }),
            ("SNI list longer than the extension", {
                let list = [&[0][..], &prefixed(2, b"a.example")].concat();
                let mut body_ = prefixed(2, &list);
                body_[1] += 1;
                handshake(&body(&[], CIPHERS, Some(&ext(EXT_SERVER_NAME, &body_))))
            }),
            ("SNI list shorter than the extension", {
                let list = [&[0][..], &prefixed(2, b"a.example")].concat();
                let mut body_ = prefixed(2, &list);
                body_[1] -= 1;
                handshake(&body(&[], CIPHERS, Some(&ext(EXT_SERVER_NAME, &body_))))
            }),
            ("host name longer than the SNI list", {
                let mut list = [&[0][..], &prefixed(2, b"a.example")].concat();
                list[2] += 1;
                handshake(&body(
                    &[],
                    CIPHERS,
                    Some(&ext(EXT_SERVER_NAME, &prefixed(2, &list))),
                ))
            }),
            (
                "empty SNI list",
                handshake(&body(&[], CIPHERS, Some(&ext(0, &[0, 0])))),
            ),
            (
                "empty SNI extension",
                handshake(&body(&[], CIPHERS, Some(&ext(0, &[])))),
            ),
            (
                "empty ALPN list",
                handshake(&body(&[], CIPHERS, Some(&ext(EXT_ALPN, &[0, 0])))),
            ),
            ("empty ALPN name", hello_hs(None, &["h2", ""], &[])),
            ("ALPN name longer than the list", {
                handshake(&body(
                    &[],
                    CIPHERS,
                    Some(&ext(EXT_ALPN, &[0, 3, 5, b'h', b'2'])),
                ))
            }),
            (
                "two SNI extensions",
                hello_hs(Some("a.example"), &[], &[sni_ext(b"b.example")]),
            ),
            (
                "two ALPN extensions",
                hello_hs(None, &["h2"], &[alpn_ext(&["http/1.1"])]),
            ),
        ];
        for (what, hs) in cases {
            let input = records(&hs, &[]);
            assert_eq!(probe(&input), Probe::NoMatch, "{what}");
            for end in 0..input.len() {
                let verdict = probe(&input[..end]);
                assert!(
                    !matches!(verdict, Probe::Match(_)),
                    "{what}: {end}-byte prefix"
                );
            }
        }
    }

    #[test]
    fn bad_lengths_are_caught_before_the_rest_arrives() {
        // Session id length 33, with the rest of a 300-byte hello to come.
        let mut input = vec![0x16, 3, 1, 1, 48, 1, 0, 1, 44, 3, 3];
        input.extend([0; 32]);
        assert_eq!(probe(&input), Probe::NeedMore);
        input.push(33);
        assert_eq!(probe(&input), Probe::NoMatch);
        // Odd cipher suite length.
        input.pop();
        input.extend([0, 0, 3]);
        assert_eq!(probe(&input), Probe::NoMatch);
    }
}
