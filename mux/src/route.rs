//! Ordered routes: the bytes a client sent so far in, the first route that matches out.

use std::fmt;

use crate::classify::{self, Found, Probe, Protocol};

/// A backend address as written (`host:port`), resolved each time it is used
/// so that a backend whose name moves is followed without a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    addr: String,
}

impl Backend {
    /// Accepts `host:port` and `[v6]:port`; the port must be 1-65535.
    pub fn parse(s: &str) -> Result<Backend, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{s}`: `{port}` is not a port number"))?;
        if port == 0 {
            return Err(format!("`{s}`: port 0 cannot be connected to"));
        }
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        let bare = bracketed.unwrap_or(host);
        if bare.is_empty() || bare.contains(char::is_whitespace) {
            return Err(format!("`{s}`: missing or invalid host"));
        }
        let v6_ok = bracketed.is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok());
        if bare.contains(':') && !v6_ok {
            return Err(format!("`{s}`: write an IPv6 address as [addr]:port"));
        }
        Ok(Backend {
            addr: s.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.addr
    }

    /// The host (without brackets) and the port.
    pub fn host_port(&self) -> (&str, u16) {
        let (host, port) = self.addr.rsplit_once(':').expect("checked by parse");
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        (host, port.parse().expect("checked by parse"))
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// A case-insensitive host-name pattern: `*` matches any run of characters
/// (dots included), `?` exactly one. `*.example.com` does not match the bare
/// `example.com`, as with wildcard certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob {
            pattern: pattern.to_ascii_lowercase(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    pub fn matches(&self, text: &str) -> bool {
        let p = self.pattern.as_bytes();
        let t = text.as_bytes();
        // Iterative wildcard match with one backtrack point: linear enough for
        // host names, and no recursion an attacker could deepen.
        let (mut pi, mut ti) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            let tc = t[ti].to_ascii_lowercase();
            match p.get(pi) {
                Some(b'*') => {
                    star = Some((pi, ti));
                    pi += 1;
                }
                Some(&pc) if pc == b'?' || pc == tc => {
                    pi += 1;
                    ti += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        pi = sp + 1;
                        ti = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }
}

/// One `[[route]]`: a protocol, optional conditions on what its probe found,
/// and where matching connections go.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub protocol: Protocol,
    /// TLS only: the ClientHello's server name must match.
    pub sni: Option<Glob>,
    /// TLS only: the client must offer one of these ALPN protocols.
    pub alpn: Vec<String>,
    /// HTTP only: the Host header (port ignored) must match.
    pub host: Option<Glob>,
    /// Regex routes: the pattern run on the first bytes.
    pub regex: Option<regex::bytes::Regex>,
    /// HTTP only: the request path must lie under this prefix (decided per
    /// request, by the HTTP layer).
    pub path_prefix: Option<String>,
    /// HTTP only: remove `path_prefix` before forwarding.
    pub strip_prefix: bool,
    pub backend: Backend,
    /// A PROXY protocol header to send the backend first.
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// Connect to the backend from the client's own address (see
    /// `transparent`).
    pub transparent: bool,
    /// At most this many of the route's connections at once.
    pub max_connections: Option<usize>,
}

impl Route {
    /// A route with no conditions beyond its protocol.
    pub fn new(name: &str, protocol: Protocol, backend: Backend) -> Route {
        Route {
            name: name.to_string(),
            protocol,
            sni: None,
            alpn: Vec::new(),
            host: None,
            regex: None,
            path_prefix: None,
            strip_prefix: false,
            backend,
            proxy_protocol: None,
            transparent: false,
            max_connections: None,
        }
    }

    /// The route's own conditions, once its protocol's probe matched.
    fn accepts(&self, found: &Found) -> bool {
        match found {
            Found::Tls(tls) => {
                let sni_ok = match &self.sni {
                    None => true,
                    Some(glob) => tls.sni.as_deref().is_some_and(|sni| glob.matches(sni)),
                };
                let alpn_ok = self.alpn.is_empty()
                    || tls.alpn.iter().any(|offered| self.alpn.contains(offered));
                sni_ok && alpn_ok
            }
            Found::Http(http) => match &self.host {
                None => true,
                Some(glob) => http
                    .host
                    .as_deref()
                    .is_some_and(|host| glob.matches(strip_port(host))),
            },
            _ => true,
        }
    }

    /// The conditions as shown by `mux check` and at start-up.
    pub fn conditions(&self) -> String {
        let mut parts = Vec::new();
        if let Some(sni) = &self.sni {
            parts.push(format!("sni={}", sni.as_str()));
        }
        if !self.alpn.is_empty() {
            parts.push(format!("alpn={}", self.alpn.join(",")));
        }
        if let Some(host) = &self.host {
            parts.push(format!("host={}", host.as_str()));
        }
        if let Some(re) = &self.regex {
            parts.push(format!("regex={}", re.as_str()));
        }
        if let Some(prefix) = &self.path_prefix {
            let strip = if self.strip_prefix { " (stripped)" } else { "" };
            parts.push(format!("path={prefix}/*{strip}"));
        }
        if let Some(n) = self.max_connections {
            parts.push(format!("max_connections={n}"));
        }
        if let Some(v) = self.proxy_protocol {
            parts.push(format!("proxy_protocol={}", v.name()));
        }
        if self.transparent {
            parts.push("transparent".into());
        }
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(" ")
        }
    }
}

/// `example.com:8080` -> `example.com`, `[::1]:80` -> `::1`.
pub(crate) fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(h, _)| h);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The router's answer for the bytes seen so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Read more bytes: an earlier route (in file order) may still match.
    NeedMore,
    /// Route index and what its probe found.
    Route(usize, Found),
    /// No route can match, whatever comes next.
    NoMatch,
}

/// Ordered routes; the first whose probe matches and whose conditions hold wins.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Router {
        Router { routes }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn route(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    /// Decides on `buf`. A later route never wins while an earlier one still
    /// needs bytes, so the order in the file is the order of precedence even
    /// for probes that decide at different lengths. `last` means no more
    /// bytes will come: nothing can then be pending.
    pub fn decide(&self, buf: &[u8], last: bool) -> Decision {
        // Several routes often share a protocol (one per SNI): probe each
        // protocol once per call.
        let mut cache: [Option<Probe<Found>>; Protocol::ALL.len()] = Default::default();
        let mut pending = false;
        for (index, route) in self.routes.iter().enumerate() {
            let verdict = match (&route.regex, route.protocol) {
                (Some(re), Protocol::Regex) => classify::probe_regex(re, buf),
                (_, protocol) => {
                    let slot = &mut cache[protocol as usize];
                    slot.get_or_insert_with(|| classify::probe(protocol, buf, last))
                        .clone()
                }
            };
            match verdict {
                Probe::NeedMore => pending = true,
                Probe::Match(found) if route.accepts(&found) => {
                    return if pending {
                        Decision::NeedMore
                    } else {
                        Decision::Route(index, found)
                    };
                }
                Probe::Match(_) | Probe::NoMatch => {}
            }
        }
        if pending {
            Decision::NeedMore
        } else {
            Decision::NoMatch
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, protocol: Protocol) -> Route {
        Route::new(name, protocol, Backend::parse("127.0.0.1:1").unwrap())
    }

    #[test]
    fn glob_matches_like_a_wildcard_certificate_but_deeper() {
        let g = Glob::new("*.Example.com");
        assert!(g.matches("a.example.com"));
        assert!(g.matches("A.B.EXAMPLE.COM"));
        assert!(!g.matches("example.com"));
        assert!(!g.matches("a.example.org"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("a?c").matches("abc"));
        assert!(!Glob::new("a?c").matches("ac"));
        assert!(Glob::new("*a*b*").matches("xxaxxbxx"));
        assert!(!Glob::new("*a*b").matches("xxaxxbxx"));
        assert!(Glob::new("exact.host").matches("EXACT.host"));
    }

    #[test]
    fn backend_parse_accepts_names_and_v6_and_rejects_nonsense() {
        assert!(Backend::parse("127.0.0.1:22").is_ok());
        assert!(Backend::parse("node2.internal:22").is_ok());
        assert!(Backend::parse("[::1]:8080").is_ok());
        assert!(Backend::parse("::1:8080").is_err());
        assert!(Backend::parse("localhost").is_err());
        assert!(Backend::parse("localhost:0").is_err());
        assert!(Backend::parse("localhost:70000").is_err());
        assert!(Backend::parse(":22").is_err());
    }

    #[test]
    fn strip_port_handles_names_and_brackets() {
        assert_eq!(strip_port("a.com:8080"), "a.com");
        assert_eq!(strip_port("a.com"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("[::1]"), "::1");
    }

    #[test]
    fn any_route_after_a_pending_probe_waits_for_it() {
        // A regex route can match on a prefix; if an earlier route is still
        // undecided, the earlier one must get its chance first.
        let mut re = route("re", Protocol::Regex);
        re.regex = Some(regex::bytes::Regex::new("^S").unwrap());
        let router = Router::new(vec![route("ssh", Protocol::Ssh), re]);
        assert_eq!(router.decide(b"SS", false), Decision::NeedMore);
        assert!(matches!(
            router.decide(b"SS", true),
            Decision::Route(1, Found::Regex)
        ));
        assert!(matches!(
            router.decide(b"SSH-2.0", false),
            Decision::Route(0, Found::Ssh)
        ));
    }

    #[test]
    fn conditions_select_among_routes_of_one_protocol() {
        use crate::classify::{HttpInfo, TlsInfo};
        let mut a = route("a", Protocol::Tls);
        a.sni = Some(Glob::new("a.example.com"));
        let mut h2 = route("h2", Protocol::Tls);
        h2.alpn = vec!["h2".into()];
        let tls = |sni: Option<&str>, alpn: &[&str]| {
            Found::Tls(TlsInfo {
                sni: sni.map(str::to_string),
                alpn: alpn.iter().map(|s| s.to_string()).collect(),
            })
        };
        assert!(a.accepts(&tls(Some("a.example.com"), &[])));
        assert!(!a.accepts(&tls(Some("b.example.com"), &[])));
        assert!(!a.accepts(&tls(None, &[])));
        assert!(h2.accepts(&tls(None, &["http/1.1", "h2"])));
        assert!(!h2.accepts(&tls(None, &["http/1.1"])));

        let mut web = route("web", Protocol::Http);
        web.host = Some(Glob::new("embed.*"));
        let http = |host: Option<&str>| {
            Found::Http(HttpInfo {
                method: "GET".into(),
                path: "/".into(),
                version: 1,
                host: host.map(str::to_string),
            })
        };
        assert!(web.accepts(&http(Some("embed.example.com:2222"))));
        assert!(!web.accepts(&http(Some("llm.example.com"))));
        assert!(!web.accepts(&http(None)));
    }

    #[test]
    fn no_route_matching_is_a_decision() {
        let router = Router::new(vec![route("ssh", Protocol::Ssh)]);
        assert_eq!(router.decide(b"\x00garbage", false), Decision::NoMatch);
        let router = Router::new(vec![
            route("ssh", Protocol::Ssh),
            route("any", Protocol::Any),
        ]);
        assert!(matches!(
            router.decide(b"\x00garbage", false),
            Decision::Route(1, Found::Any)
        ));
    }
}
