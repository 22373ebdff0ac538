//! The two requests that open a tunnel on the shared port, told apart from
//! other traffic by their first bytes: a client's `CONNECT target HTTP/1.1`
//! and an agent's `GET /.well-known/mux-agent` upgrade. Pure, no I/O; the
//! head is parsed by httparse (hyper's own parser).

use std::fmt;

use base64::Engine;

/// The path an agent's upgrade request asks for.
pub const AGENT_PATH: &str = "/.well-known/mux-agent";
/// The `Upgrade` protocol name agents ask for and mux grants.
pub const AGENT_PROTOCOL: &str = "mux-agent";
/// The header in which an agent lists the targets it serves, comma-separated.
pub const EXPOSE_HEADER: &str = "mux-expose";

const CONNECT_START: &[u8] = b"CONNECT ";
const AGENT_START: &[u8] = b"GET /.well-known/mux-agent ";
const MAX_HEADERS: usize = 64;

#[derive(PartialEq, Eq)]
pub enum Parsed {
    /// Not a tunnel request: the routes decide.
    NotOurs,
    /// A tunnel request whose head is not complete yet.
    Incomplete,
    /// A tunnel request that breaks HTTP's grammar: answered with a 400.
    Malformed(String),
    Connect(Request),
    Agent(AgentHello),
}

/// A CONNECT request.
#[derive(PartialEq, Eq)]
pub struct Request {
    /// As the client wrote it: `node2:22`.
    pub authority: String,
    /// The token from `Proxy-Authorization`, if one came.
    pub token: Option<String>,
    /// Bytes of the head; what follows is the tunnel's first payload.
    pub head_len: usize,
}

/// An agent offering to serve targets.
#[derive(PartialEq, Eq)]
pub struct AgentHello {
    pub names: Vec<String>,
    /// The token from `Authorization`.
    pub token: Option<String>,
    pub head_len: usize,
}

/// Tokens are secrets: a log line or a failed assertion never shows one.
fn redacted(token: &Option<String>) -> &'static str {
    match token {
        Some(_) => "Some(<redacted>)",
        None => "None",
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("authority", &self.authority)
            .field("token", &redacted(&self.token))
            .field("head_len", &self.head_len)
            .finish()
    }
}

impl fmt::Debug for AgentHello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentHello")
            .field("names", &self.names)
            .field("token", &redacted(&self.token))
            .field("head_len", &self.head_len)
            .finish()
    }
}

impl fmt::Debug for Parsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Parsed::NotOurs => f.write_str("NotOurs"),
            Parsed::Incomplete => f.write_str("Incomplete"),
            Parsed::Malformed(why) => write!(f, "Malformed({why:?})"),
            Parsed::Connect(r) => r.fmt(f),
            Parsed::Agent(a) => a.fmt(f),
        }
    }
}

/// Looks at the bytes a client sent so far.
pub fn parse(buf: &[u8]) -> Parsed {
    let connect = starts_like(buf, CONNECT_START);
    let agent = starts_like(buf, AGENT_START);
    if !connect && !agent {
        return Parsed::NotOurs;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        Err(e) => return Parsed::Malformed(e.to_string()),
    };
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if connect {
        let authority = request.path.unwrap_or_default().to_string();
        return Parsed::Connect(Request {
            authority,
            token: header("proxy-authorization").and_then(credentials),
            head_len,
        });
    }
    let upgrade = header("upgrade").map(<[u8]>::trim_ascii);
    if !upgrade.is_some_and(|u| u.eq_ignore_ascii_case(AGENT_PROTOCOL.as_bytes())) {
        return Parsed::Malformed(format!(
            "an agent request must ask for Upgrade: {AGENT_PROTOCOL}"
        ));
    }
    let names: Vec<String> = header(EXPOSE_HEADER)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Parsed::Malformed("an agent request must name its targets in Mux-Expose".into());
    }
    Parsed::Agent(AgentHello {
        names,
        token: header("authorization").and_then(credentials),
        head_len,
    })
}

/// Whether `buf` is a prefix of `start`, or starts with it.
fn starts_like(buf: &[u8], start: &[u8]) -> bool {
    let n = buf.len().min(start.len());
    buf[..n] == start[..n]
}

/// The token in an `Authorization` or `Proxy-Authorization` value:
/// `Bearer TOKEN`, or `Basic base64(user:TOKEN)` with any user name, for
/// clients that only know Basic.
pub fn credentials(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!rest.is_empty()).then(|| rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (_user, password) = decoded.split_once(':')?;
        return Some(password.to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_is_parsed_with_its_token() {
        let head = b"CONNECT node2:22 HTTP/1.1\r\nHost: node2:22\r\nProxy-Authorization: Bearer s3cret\r\n\r\nSSH-2.0-x\r\n";
        let Parsed::Connect(r) = parse(head) else {
            panic!("{:?}", parse(head))
        };
        assert_eq!(r.authority, "node2:22");
        assert_eq!(r.token.as_deref(), Some("s3cret"));
        assert_eq!(&head[r.head_len..], b"SSH-2.0-x\r\n");
        assert!(!format!("{r:?}").contains("s3cret"));
    }

    #[test]
    fn every_prefix_of_a_connect_is_incomplete() {
        let head = b"CONNECT node2:22 HTTP/1.1\r\nHost: node2\r\n\r\n";
        for n in 0..head.len() {
            assert_eq!(parse(&head[..n]), Parsed::Incomplete, "{n} bytes");
        }
        assert!(matches!(parse(head), Parsed::Connect(_)));
    }

    #[test]
    fn other_traffic_is_not_ours() {
        for buf in [
            &b"SSH-2.0-OpenSSH\r\n"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET /.well-known/other HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01",
            b"CONNECTX",
            b"POST /",
        ] {
            assert_eq!(parse(buf), Parsed::NotOurs, "{buf:?}");
        }
    }

    #[test]
    fn broken_heads_are_malformed() {
        assert!(matches!(
            parse(b"CONNECT node2:22 HTTP/1.1\r\nBad Header\r\n\r\n"),
            Parsed::Malformed(_)
        ));
        assert!(matches!(
            parse(b"GET /.well-known/mux-agent HTTP/1.1\r\nMux-Expose: a\r\n\r\n"),
            Parsed::Malformed(_)
        ));
        assert!(matches!(
            parse(b"GET /.well-known/mux-agent HTTP/1.1\r\nUpgrade: mux-agent\r\n\r\n"),
            Parsed::Malformed(_)
        ));
    }

    #[test]
    fn agent_hello_lists_its_targets() {
        let head = b"GET /.well-known/mux-agent HTTP/1.1\r\nHost: box\r\nConnection: Upgrade\r\nUpgrade: mux-agent\r\nAuthorization: Bearer t\r\nMux-Expose: node3, node4\r\n\r\n";
        let Parsed::Agent(a) = parse(head) else {
            panic!()
        };
        assert_eq!(a.names, ["node3", "node4"]);
        assert_eq!(a.token.as_deref(), Some("t"));
        assert_eq!(a.head_len, head.len());
    }

    #[test]
    fn credentials_take_bearer_and_basic() {
        assert_eq!(credentials(b"Bearer abc").as_deref(), Some("abc"));
        assert_eq!(credentials(b"bearer  abc ").as_deref(), Some("abc"));
        // "user:pa:ss"
        assert_eq!(
            credentials(b"Basic dXNlcjpwYTpzcw==").as_deref(),
            Some("pa:ss")
        );
        assert_eq!(credentials(b"Basic !!!"), None);
        assert_eq!(credentials(b"Digest x"), None);
        assert_eq!(credentials(b"Bearer"), None);
        assert_eq!(credentials(b"\xff\xfe"), None);
    }
}
