//! Protocol probes: the bytes a client sent so far in, a verdict out. Pure: no I/O.

mod h2c;
mod http;
mod openvpn;
mod socks5;
mod ssh;
mod tls;

pub use http::HttpInfo;
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
