//! Protocol probes: the bytes a client sent so far in, a verdict out. Pure: no I/O.

mod h2c;
mod http;
mod openvpn;
mod socks5;
mod ssh;
mod tls;

pub use http::{HttpInfo, has_request_line};
pub use tls::TlsInfo;

/// Cap on the bytes read before a decision is forced. Large enough for a
/// ClientHello carrying post-quantum key shares, or a request with big cookies.
pub const MAX_CLASSIFY_BYTES: usize = 16 * 1024;

/// What one probe says about the bytes seen so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe<T> {
    /// Consistent with the protocol so far, but not enough bytes to decide.
    NeedMore,
    /// It is this protocol; `T` carries what the probe found.
    Match(T),
    /// It is not this protocol, whatever bytes follow.
    NoMatch,
}

/// The protocols a route can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Ssh,
    Tls,
    Http,
    H2c,
    Socks5,
    Openvpn,
    /// Matches when the route's own regex matches the bytes so far.
    Regex,
    /// Matches anything, including nothing at all once the client is done.
    Any,
}

/// What a successful probe found, for routing conditions and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Ssh,
    Tls(TlsInfo),
    Http(HttpInfo),
    H2c,
    Socks5,
    Openvpn,
    Regex,
    Any,
}

impl Found {
    /// The protocol whose probe found this.
    pub fn protocol(&self) -> Protocol {
        match self {
            Found::Ssh => Protocol::Ssh,
            Found::Tls(_) => Protocol::Tls,
            Found::Http(_) => Protocol::Http,
            Found::H2c => Protocol::H2c,
            Found::Socks5 => Protocol::Socks5,
            Found::Openvpn => Protocol::Openvpn,
            Found::Regex => Protocol::Regex,
            Found::Any => Protocol::Any,
        }
    }
}

impl Protocol {
    pub const ALL: [Protocol; 8] = [
        Protocol::Ssh,
        Protocol::Tls,
        Protocol::Http,
        Protocol::H2c,
        Protocol::Socks5,
        Protocol::Openvpn,
        Protocol::Regex,
        Protocol::Any,
    ];

    /// The name used in configs, on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Ssh => "ssh",
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::H2c => "h2c",
            Protocol::Socks5 => "socks5",
            Protocol::Openvpn => "openvpn",
            Protocol::Regex => "regex",
            Protocol::Any => "any",
        }
    }

    /// Parses a config or command-line name; sslh's aliases are accepted.
    pub fn from_name(name: &str) -> Option<Protocol> {
        Some(match name {
            "ssh" => Protocol::Ssh,
            "tls" | "ssl" => Protocol::Tls,
            "http" => Protocol::Http,
            "h2c" => Protocol::H2c,
            "socks5" => Protocol::Socks5,
            "openvpn" => Protocol::Openvpn,
            "regex" => Protocol::Regex,
            "any" | "anyprot" => Protocol::Any,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Runs the built-in probe for `protocol` on `buf`.
///
/// `last` is true when no more bytes will come (the client closed its side,
/// the classify timeout fired, or [`MAX_CLASSIFY_BYTES`] was reached): probes
/// then decide with what they have and never answer `NeedMore`.
///
/// `Regex` has no built-in probe (the pattern belongs to a route, see
/// [`probe_regex`]) and answers `NoMatch` here.
pub fn probe(protocol: Protocol, buf: &[u8], last: bool) -> Probe<Found> {
    let verdict = match protocol {
        Protocol::Ssh => ssh::probe(buf).map(|()| Found::Ssh),
        Protocol::Tls => tls::probe(buf).map(Found::Tls),
        Protocol::Http => http::probe(buf, last).map(Found::Http),
        Protocol::H2c => h2c::probe(buf).map(|()| Found::H2c),
        Protocol::Socks5 => socks5::probe(buf).map(|()| Found::Socks5),
        Protocol::Openvpn => openvpn::probe(buf).map(|()| Found::Openvpn),
        Protocol::Regex => Probe::NoMatch,
        Protocol::Any => Probe::Match(Found::Any),
    };
    settle(verdict, last)
}

/// A user regex probe: like sslh, it matches on the bytes seen so far and
/// never waits for more. A pattern that needs more bytes than the first read
/// brought should sit after the routes that can tell more precisely.
pub fn probe_regex(re: &regex::bytes::Regex, buf: &[u8]) -> Probe<Found> {
    if re.is_match(buf) {
        Probe::Match(Found::Regex)
    } else {
        Probe::NoMatch
    }
}

/// Once no more bytes can come, "need more" means "no".
fn settle<T>(verdict: Probe<T>, last: bool) -> Probe<T> {
    match verdict {
        Probe::NeedMore if last => Probe::NoMatch,
        v => v,
    }
}

impl<T> Probe<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Probe<U> {
        match self {
            Probe::NeedMore => Probe::NeedMore,
            Probe::Match(t) => Probe::Match(f(t)),
            Probe::NoMatch => Probe::NoMatch,
        }
    }
}

/// Why a parse stopped before reaching a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Every byte so far fits the grammar; the rest has not arrived.
    Short,
    /// A byte contradicts the grammar, or a length overflows its container:
    /// no later byte can repair that.
    Bad,
}

impl<T> From<Result<T, Stop>> for Probe<T> {
    fn from(result: Result<T, Stop>) -> Self {
        match result {
            Ok(t) => Probe::Match(t),
            Err(Stop::Short) => Probe::NeedMore,
            Err(Stop::Bad) => Probe::NoMatch,
        }
    }
}

/// Reads a structure whose declared size (`limit`) may exceed the bytes that
/// have arrived (`data`). Reading past `limit` means the input is malformed;
/// reading past `data` only means it is incomplete. Keeping the two apart lets
/// a probe reject a partial input at the first bad byte yet wait on a good
/// one, and the verdict on a prefix never contradicts the verdict on the
/// whole: `Bad` depends only on bytes already seen.
#[derive(Debug, Clone)]
struct Cursor<'a> {
    /// The arrived bytes of this structure, never longer than `limit`.
    data: &'a [u8],
    limit: usize,
    /// May run past `data.len()` after [`Cursor::sub`] skips a container
    /// whose bytes have not all arrived; reads then answer `Short`.
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8], limit: usize) -> Self {
        let data = data.get(..limit).unwrap_or(data);
        Cursor {
            data,
            limit,
            pos: 0,
        }
    }

    /// A cursor over a stream with no declared end.
    fn open(data: &'a [u8]) -> Self {
        Cursor::new(data, usize::MAX)
    }

    /// The offset at which `n` more bytes would end, if it fits the limit.
    fn end_of(&self, n: usize) -> Result<usize, Stop> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.limit => Ok(end),
            _ => Err(Stop::Bad),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Stop> {
        let end = self.end_of(n)?;
        let bytes = self.data.get(self.pos..end).ok_or(Stop::Short)?;
        self.pos = end;
        Ok(bytes)
    }

    fn skip(&mut self, n: usize) -> Result<(), Stop> {
        self.take(n).map(drop)
    }

    /// All the declared bytes not read yet, once they have arrived.
    fn take_rest(&mut self) -> Result<&'a [u8], Stop> {
        self.take(self.remaining())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Stop> {
        self.take(N)?.try_into().map_err(|_| Stop::Bad)
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        self.array().map(u8::from_be_bytes)
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        self.array().map(u16::from_be_bytes)
    }

    fn u24(&mut self) -> Result<u32, Stop> {
        let [a, b, c] = self.array()?;
        Ok(u32::from_be_bytes([0, a, b, c]))
    }

    fn peek(&self) -> Result<u8, Stop> {
        self.end_of(1)?;
        self.data.get(self.pos).copied().ok_or(Stop::Short)
    }

    /// Expects `magic` next; a mismatch is caught at its first differing byte.
    fn literal(&mut self, magic: &[u8]) -> Result<(), Stop> {
        let end = self.end_of(magic.len())?;
        let have = self.rest();
        let n = have.len().min(magic.len());
        if have.get(..n) != magic.get(..n) {
            return Err(Stop::Bad);
        }
        if n < magic.len() {
            return Err(Stop::Short);
        }
        self.pos = end;
        Ok(())
    }

    /// Reads a container of `len` declared bytes as its own cursor, and moves
    /// past it whether or not its bytes have arrived. Only overflowing this
    /// cursor's limit is an error: a missing byte shows up when the returned
    /// cursor reads it.
    fn sub(&mut self, len: usize) -> Result<Cursor<'a>, Stop> {
        let end = self.end_of(len)?;
        let data = self.rest();
        self.pos = end;
        Ok(Cursor::new(data, len))
    }

    /// A container prefixed by its u8 length.
    fn sub_u8(&mut self) -> Result<Cursor<'a>, Stop> {
        let len = self.u8()?;
        self.sub(usize::from(len))
    }

    /// A container prefixed by its u16 length.
    fn sub_u16(&mut self) -> Result<Cursor<'a>, Stop> {
        let len = self.u16()?;
        self.sub(usize::from(len))
    }

    /// Reads up to (not including) the first byte for which `end` holds.
    /// Every byte before it must satisfy `ok`, and there may be at most `max`
    /// of them; both are checked byte by byte, so a bad or overlong token is
    /// rejected as soon as it shows.
    fn token(
        &mut self,
        max: usize,
        end: impl Fn(u8) -> bool,
        ok: impl Fn(u8) -> bool,
    ) -> Result<&'a [u8], Stop> {
        let have = self.rest();
        for (i, &b) in have.iter().enumerate() {
            if end(b) {
                return self.take(i);
            }
            if i >= max || !ok(b) {
                return Err(Stop::Bad);
            }
        }
        // Past the declared end, no delimiter can come.
        self.end_of(have.len().saturating_add(1))?;
        Err(Stop::Short)
    }

    /// True once every declared byte has been read.
    fn is_done(&self) -> bool {
        self.pos >= self.limit
    }

    /// Declared bytes not read yet.
    fn remaining(&self) -> usize {
        self.limit.saturating_sub(self.pos)
    }

    /// The arrived bytes not read yet.
    fn rest(&self) -> &'a [u8] {
        self.data.get(self.pos..).unwrap_or_default()
    }
}

/// Inputs and checks shared by the probes' tests.
#[cfg(test)]
mod testutil {
    use std::fmt::Debug;

    use super::{Probe, Protocol};

    /// Feeds `input` as if it arrived one byte at a time: every proper prefix
    /// must ask for more, and the whole must give `expected`.
    #[track_caller]
    pub fn assert_byte_by_byte<T: Debug + PartialEq>(
        probe: impl Fn(&[u8]) -> Probe<T>,
        input: &[u8],
        expected: Probe<T>,
    ) {
        for end in 0..input.len() {
            assert_eq!(
                probe(&input[..end]),
                Probe::NeedMore,
                "prefix of {end} bytes of {:?}",
                input.escape_ascii().to_string()
            );
        }
        assert_eq!(
            probe(input),
            expected,
            "{:?}",
            input.escape_ascii().to_string()
        );
    }

    /// Decodes hex digits, skipping whitespace.
    pub fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .map(|b| match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                _ => panic!("not a hex digit: {b:?}"),
            })
            .collect();
        assert!(digits.len().is_multiple_of(2), "odd number of hex digits");
        digits.chunks(2).map(|d| d[0] << 4 | d[1]).collect()
    }

    pub const SSH_BANNER: &[u8] = b"SSH-2.0-OpenSSH_9.2p1\r\n";

    pub const HTTP_GET: &[u8] =
        b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";

    /// curl's greeting when given credentials: "no auth" or "username/password".
    pub const SOCKS5_GREETING: &[u8] = &[5, 2, 0, 2];

    /// A P_CONTROL_HARD_RESET_CLIENT_V2 as an OpenVPN 2 client with tls-auth
    /// (HMAC-SHA1) sends it, assembled by hand: length 42, opcode 7 key 0,
    /// session id, HMAC, replay packet id and time, empty ack array, message
    /// packet id 0.
    pub const OPENVPN_RESET: &[u8] = &[
        0x00, 0x2a, 0x38, //
        0x6b, 0x1f, 0x3a, 0x91, 0x0c, 0xd4, 0x77, 0xe2, //
        0x9d, 0x04, 0x5e, 0xc1, 0x33, 0x8a, 0x12, 0xf0, 0x6e, 0x47, //
        0xb5, 0x29, 0x81, 0xdc, 0x0a, 0x63, 0xfe, 0x14, 0x58, 0xa7, //
        0x00, 0x00, 0x00, 0x01, 0x67, 0x45, 0x8b, 0x6b, //
        0x00, //
        0x00, 0x00, 0x00, 0x00,
    ];

    /// Captured from `openssl s_client -servername x.example.com -alpn
    /// h2,http/1.1` (OpenSSL 3.0.22) connecting to a local listener.
    pub const CLIENT_HELLO_OPENSSL: &str = "
        160301014c01000148030354e579d0fca5a8659d9ced8ecc8cc873d180fc
        fc8640a2b5a418c1316e8b2e4a202496a5daac980277508fd5158f79fac8
        93fd29389df70fbe63b68bf9a1cc6ab3003e130213031301c02cc030009f
        cca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039
        c009c0130033009d009c003d003c0035002f00ff010000c1000000120010
        00000d782e6578616d706c652e636f6d000b000403000102000a00160014
        001d0017001e0019001801000101010201030104002300000010000e000c
        02683208687474702f312e310016000000170000000d002a002804030503
        0603080708080809080a080b080408050806040105010601030303010302
        040205020602002b0009080304030303020301002d000201010033002600
        24001d0020bfa32458d9545445025969fb545f14ad441d4408b3451ac6eb
        180f16d435f944";

    /// Captured from `curl https://www.example.org:24444/` (curl 7.88.1,
    /// OpenSSL 3.0.22), padded to 512 bytes by the padding extension.
    pub const CLIENT_HELLO_CURL: &str = "
        1603010200010001fc030347b6dba591ebacac729fb3ef93675788455317
        084f1bb9e1da71edef296bfdb620a0f859737296df34ee5d80f56c2bd2a4
        cc5667d7c058b4d06b9038ac053776ba003e130213031301c02cc030009f
        cca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039
        c009c0130033009d009c003d003c0035002f00ff01000175000000140012
        00000f7777772e6578616d706c652e6f7267000b000403000102000a0016
        0014001d0017001e00190018010001010102010301040010000e000c0268
        3208687474702f312e31001600000017000000310000000d002a00280403
        05030603080708080809080a080b08040805080604010501060103030301
        0302040205020602002b0009080304030303020301002d00020101003300
        260024001d002080e8143a2aef34d7e2d42bc79cce7dd8c85d3208d2569f
        f69521f418b99a4245001500ae0000000000000000000000000000000000
        000000000000000000000000000000000000000000000000000000000000
        000000000000000000000000000000000000000000000000000000000000
        000000000000000000000000000000000000000000000000000000000000
        000000000000000000000000000000000000000000000000000000000000
        000000000000000000000000000000000000000000000000000000000000
        00000000000000";

    /// What real clients of each protocol send first.
    pub fn samples() -> Vec<(Protocol, Vec<u8>)> {
        vec![
            (Protocol::Ssh, SSH_BANNER.to_vec()),
            (Protocol::Ssh, b"SSH-2.0-PuTTY_Release_0.81\r\n".to_vec()),
            (Protocol::Tls, hex(CLIENT_HELLO_OPENSSL)),
            (Protocol::Tls, hex(CLIENT_HELLO_CURL)),
            (Protocol::Http, HTTP_GET.to_vec()),
            (
                Protocol::Http,
                b"CONNECT host:22 HTTP/1.1\r\nHost: host:22\r\n\r\n".to_vec(),
            ),
            (
                Protocol::Http,
                b"POST /submit HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
            ),
            (Protocol::H2c, super::h2c::PREFACE.to_vec()),
            (Protocol::Socks5, SOCKS5_GREETING.to_vec()),
            (Protocol::Socks5, vec![5, 1, 0]),
            (Protocol::Openvpn, OPENVPN_RESET.to_vec()),
        ]
    }

    /// SplitMix64: enough randomness for property tests, reproducible from
    /// its seed, and no dependency.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform enough in `0..n`; `n` must not be 0.
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        pub fn byte(&mut self) -> u8 {
            self.next_u64() as u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{Rng, samples};
    use super::*;

    /// Each built-in probe matches its own protocol's samples and rejects
    /// every other's, and never matches another's on any prefix either: the
    /// order of routes cannot change where a real client lands.
    #[test]
    fn probes_tell_protocols_apart() {
        let builtin = [
            Protocol::Ssh,
            Protocol::Tls,
            Protocol::Http,
            Protocol::H2c,
            Protocol::Socks5,
            Protocol::Openvpn,
        ];
        for (own, input) in samples() {
            for protocol in builtin {
                let verdict = probe(protocol, &input, false);
                if protocol == own {
                    assert!(
                        matches!(verdict, Probe::Match(_)),
                        "{protocol} on its own sample"
                    );
                    continue;
                }
                assert_eq!(verdict, Probe::NoMatch, "{protocol} on a {own} sample");
                for end in 0..input.len() {
                    let verdict = probe(protocol, &input[..end], false);
                    assert!(
                        !matches!(verdict, Probe::Match(_)),
                        "{protocol} on {end} bytes of a {own} sample"
                    );
                }
            }
        }
    }

    #[test]
    fn other_protocols_fail_on_few_bytes() {
        // How many bytes of the ssh banner each other probe needs to say no.
        for (protocol, needed) in [
            (Protocol::Tls, 1),
            (Protocol::Http, 5), // "SSH-2": the digit
            (Protocol::H2c, 1),
            (Protocol::Socks5, 1),
            (Protocol::Openvpn, 1),
        ] {
            let input = &testutil::SSH_BANNER[..needed];
            assert_eq!(probe(protocol, input, false), Probe::NoMatch, "{protocol}");
        }
    }

    #[test]
    fn last_turns_need_more_into_no_match() {
        assert_eq!(probe(Protocol::Ssh, b"SS", false), Probe::NeedMore);
        assert_eq!(probe(Protocol::Ssh, b"SS", true), Probe::NoMatch);
        assert_eq!(probe(Protocol::Tls, &[0x16, 3], true), Probe::NoMatch);
        assert_eq!(probe(Protocol::Any, b"", true), Probe::Match(Found::Any));
        assert_eq!(probe(Protocol::Regex, b"anything", false), Probe::NoMatch);
    }

    #[test]
    fn found_carries_what_the_probe_found() {
        let hello = testutil::hex(testutil::CLIENT_HELLO_OPENSSL);
        let Probe::Match(Found::Tls(info)) = probe(Protocol::Tls, &hello, false) else {
            panic!("not a TLS match");
        };
        assert_eq!(info.sni.as_deref(), Some("x.example.com"));
        let Probe::Match(Found::Http(info)) = probe(Protocol::Http, testutil::HTTP_GET, false)
        else {
            panic!("not an HTTP match");
        };
        assert_eq!(info.host.as_deref(), Some("example.com"));
    }

    #[test]
    fn protocol_names_round_trip() {
        for protocol in Protocol::ALL {
            assert_eq!(Protocol::from_name(protocol.name()), Some(protocol));
        }
        assert_eq!(Protocol::from_name("ssl"), Some(Protocol::Tls));
        assert_eq!(Protocol::from_name("anyprot"), Some(Protocol::Any));
        assert_eq!(Protocol::from_name("gopher"), None);
    }

    #[test]
    fn cursor_tells_short_from_bad() {
        let mut c = Cursor::new(&[0, 3, 1, 2], 5);
        let mut inner = c.sub_u16().unwrap();
        assert_eq!(inner.take(2), Ok(&[1, 2][..]));
        assert_eq!(inner.u8(), Err(Stop::Short), "declared but not arrived");
        assert_eq!(inner.u8().ok(), None);
        assert_eq!(c.u8(), Err(Stop::Bad), "past the outer limit");
        assert_eq!(Cursor::new(&[0, 9], 5).sub_u16().err(), Some(Stop::Bad));
        assert_eq!(Cursor::open(b"ab").literal(b"abc"), Err(Stop::Short));
        assert_eq!(Cursor::open(b"ax").literal(b"abc"), Err(Stop::Bad));
        assert_eq!(Cursor::new(b"ab", 2).literal(b"abc"), Err(Stop::Bad));
        fn token(input: &[u8], limit: usize) -> Result<&[u8], Stop> {
            Cursor::new(input, limit).token(3, |b| b == b' ', |b| b.is_ascii_lowercase())
        }
        assert_eq!(token(b"abc d", 9), Ok(&b"abc"[..]));
        assert_eq!(token(b"abcd", 9), Err(Stop::Bad), "too long");
        assert_eq!(token(b"aB", 9), Err(Stop::Bad), "bad byte");
        assert_eq!(token(b"ab", 9), Err(Stop::Short));
        assert_eq!(
            token(b"ab", 2),
            Err(Stop::Bad),
            "no room left for the delimiter"
        );
    }

    /// Checks what routing relies on, for one input: no panic; with `last`
    /// never `NeedMore`, and the same verdict as without whenever that one is
    /// final; and no prefix contradicts the whole (a prefix that says
    /// `NoMatch` or `Match` has already said what the whole says).
    fn assert_consistent(input: &[u8]) {
        for protocol in Protocol::ALL {
            let whole = probe(protocol, input, false);
            let closed = probe(protocol, input, true);
            assert_ne!(
                closed,
                Probe::NeedMore,
                "{protocol} with last on {input:02x?}"
            );
            if whole != Probe::NeedMore {
                assert_eq!(
                    closed, whole,
                    "{protocol} with and without last on {input:02x?}"
                );
            }
            for end in 0..input.len() {
                let part = probe(protocol, &input[..end], false);
                if part != Probe::NeedMore {
                    assert_eq!(part, whole, "{protocol}: {end}-byte prefix of {input:02x?}");
                }
            }
        }
    }

    fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
        for _ in 0..=rng.below(3) {
            let at = rng.below(input.len() + 1);
            match rng.below(6) {
                0 if at < input.len() => input[at] ^= 1 << rng.below(8),
                1 if at < input.len() => input[at] = rng.byte(),
                2 => input.insert(at, rng.byte()),
                3 if at < input.len() => drop(input.remove(at)),
                4 => input.truncate(at),
                // Lengths are where parsers break: nudge a byte by one.
                _ if at < input.len() => {
                    input[at] = input[at].wrapping_add(if rng.below(2) == 0 { 1 } else { 255 });
                }
                _ => input.push(rng.byte()),
            }
        }
    }

    #[test]
    fn random_bytes_are_handled_consistently() {
        let mut rng = Rng(0x6d75_785f_7261_6e64);
        for _ in 0..5000 {
            let len = rng.below(48);
            let input: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            assert_consistent(&input);
        }
    }

    #[test]
    fn mutated_samples_are_handled_consistently() {
        let mut rng = Rng(0x6d75_7461_7465_2121);
        let samples = samples();
        let rounds = 5000;
        let mut still_matching = 0;
        for round in 0..rounds {
            let (protocol, sample) = &samples[round % samples.len()];
            let mut input = sample.clone();
            mutate(&mut rng, &mut input);
            assert_consistent(&input);
            if matches!(probe(*protocol, &input, false), Probe::Match(_)) {
                still_matching += 1;
            }
        }
        // Mutations that keep the protocol are what reach the deep parsing
        // paths; make sure the mix has plenty of both kinds.
        eprintln!("{still_matching} of {rounds} mutated samples still match");
        assert!(
            (rounds / 5..rounds * 4 / 5).contains(&still_matching),
            "{still_matching}"
        );
    }
}
