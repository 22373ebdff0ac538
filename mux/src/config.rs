//! The configuration: TOML schema (serde, unknown keys refused) validated into a [`Config`].

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::classify::Protocol;
use crate::route::{Backend, Glob, Route, Router};
use crate::takeover::{Method, Takeover};
use crate::tunnel::access::{Reach, Target, Targets, Token};

/// The reference layout of a GPU box: `mux` with no arguments runs this.
pub const DEFAULT_CONFIG: &str = include_str!("../../examples/gpu-box.toml");
pub const DEFAULT_CONFIG_NAME: &str = "(embedded default config)";

/// How spliced bytes move once a connection is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPathKind {
    /// The fastest path this host supports.
    Auto,
    /// The kernel path (eBPF sockmap); refusing to start without it.
    Ebpf,
    /// splice(2) through a pipe: bytes stay in the kernel, user space drives.
    Splice,
    /// A read/write copy loop.
    Copy,
}

impl DataPathKind {
    pub fn parse(s: &str) -> Option<DataPathKind> {
        Some(match s {
            "auto" => DataPathKind::Auto,
            "ebpf" => DataPathKind::Ebpf,
            "splice" => DataPathKind::Splice,
            "copy" => DataPathKind::Copy,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DataPathKind::Auto => "auto",
            DataPathKind::Ebpf => "ebpf",
            DataPathKind::Splice => "splice",
            DataPathKind::Copy => "copy",
        }
    }
}

/// A validated configuration, ready to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `host:port` strings, resolved when binding.
    pub listen: Vec<String>,
    pub datapath: DataPathKind,
    pub classify_timeout: Duration,
    /// Route index for clients that send nothing within `classify_timeout`.
    pub on_timeout: Option<usize>,
    pub connect_timeout: Duration,
    pub router: Router,
    /// Ports taken over from their own servers, if any.
    pub takeover: Option<Takeover>,
    /// HTTP layer: a backend with no response headers by then gets a 504.
    pub response_timeout: Duration,
    /// HTTP layer: set X-Forwarded-For, -Proto and -Host.
    pub forwarded_headers: bool,
    /// Hosts reachable through CONNECT (directly or via agents).
    pub targets: Targets,
    /// Where `/metrics` and `/reload` are served, if anywhere.
    pub admin: Option<String>,
    /// On SIGTERM, how long live connections may go on before they are closed.
    pub drain_timeout: Duration,
    pub limits: crate::limits::Limits,
    /// `auto`: connections that may send in bulk on the kernel path at
    /// once; `None`: as many as half the CPUs (see `datapath::Kernel`).
    pub max_kernel_bulk: Option<usize>,
    /// TCP keepalive on client connections.
    pub tcp_keepalive: Keepalive,
}

/// TCP keepalive on client connections (`tcp_keepalive`). Without it a
/// client whose host vanished (a laptop closed, a NAT that forgot the
/// connection) would hold its connection, and its backend's, for good:
/// sshd's own `TCPKeepAlive` only reaches mux, which always answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keepalive {
    Off,
    /// With the kernel's timers (`net.ipv4.tcp_keepalive_time`, 2 h, then
    /// `tcp_keepalive_probes` probes `tcp_keepalive_intvl` apart).
    System,
    /// Probes after this long silent, then every as long (at most
    /// [`Keepalive::MAX_INTERVAL`]), the kernel's count of them.
    Idle(Duration),
}

impl Keepalive {
    /// The kernel's default interval between probes: a long idle time
    /// does not stretch it.
    pub const MAX_INTERVAL: Duration = Duration::from_secs(75);
    /// The kernel's limit on `TCP_KEEPIDLE` (`MAX_TCP_KEEPIDLE`).
    const MAX_IDLE: Duration = Duration::from_secs(32767);

    /// As `mux check` and the start-up log say it.
    pub fn describe(self) -> String {
        match self {
            Keepalive::Off => "off".into(),
            Keepalive::System => "on, kernel timers".into(),
            Keepalive::Idle(d) => format!("after {d:?} silent"),
        }
    }
}

impl Config {
    /// Whether HTTP connections need routing per request: some HTTP route
    /// depends on the path, which changes from request to request on one
    /// keep-alive connection. Otherwise a connection is routed once, on its
    /// first request, and spliced like any other.
    pub fn routes_per_request(&self) -> bool {
        self.router.routes().iter().any(|r| r.path_prefix.is_some())
    }

    /// How to connect to backends, from `source` for a transparent route.
    pub fn dial(&self, source: Option<SocketAddr>) -> crate::datapath::Dial {
        crate::datapath::Dial {
            limit: self.connect_timeout,
            source,
            keepalive: self.tcp_keepalive,
        }
    }

    /// The loopback ports (per family) of transparent routes' backends,
    /// whose answers must come back to mux (see `transparent`).
    pub fn transparent_ports(&self) -> BTreeSet<(crate::transparent::Family, u16)> {
        let mut ports = BTreeSet::new();
        for route in self.router.routes().iter().filter(|r| r.transparent) {
            // Checked when the route was made.
            if let Ok((families, port)) = crate::transparent::loopback_backend(&route.backend) {
                ports.extend(families.into_iter().map(|f| (f, port)));
            }
        }
        ports
    }

    /// The HTTP routes, in file order, for the HTTP layer.
    pub fn http_routes(&self) -> Vec<crate::http::HttpRoute> {
        self.router
            .routes()
            .iter()
            .filter(|r| matches!(r.protocol, Protocol::Http | Protocol::H2c))
            .map(|r| crate::http::HttpRoute {
                name: r.name.clone(),
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                strip_prefix: r.strip_prefix,
                backend: r.backend.clone(),
                proxy_protocol: r.proxy_protocol,
                transparent: r.transparent,
            })
            .collect()
    }
}

impl Config {
    /// The routing table as printed at start-up and by `mux check`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let routes = self.router.routes();
        let w_name = routes
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(0)
            .max(5);
        let w_proto = 8;
        let w_cond = routes
            .iter()
            .map(|r| r.conditions().len())
            .max()
            .unwrap_or(0)
            .max(10);
        out.push_str(&format!(
            "{:<3} {:<w_name$} {:<w_proto$} {:<w_cond$} backend\n",
            "#", "route", "protocol", "conditions"
        ));
        for (i, r) in routes.iter().enumerate() {
            out.push_str(&format!(
                "{:<3} {:<w_name$} {:<w_proto$} {:<w_cond$} {}\n",
                i + 1,
                r.name,
                r.protocol.name(),
                r.conditions(),
                r.backend
            ));
        }
        let timeout_route = self
            .on_timeout
            .map_or("close the connection", |i| &routes[i].name);
        out.push_str(&format!(
            "silent for {:?}: {timeout_route}",
            self.classify_timeout
        ));
        if !routes.iter().any(|r| r.protocol == Protocol::Any) {
            out.push_str("; matching no route: close the connection");
        }
        out.push('\n');
        out.push_str(&format!(
            "listen: {}; datapath: {}; tcp keepalive: {}\n",
            self.listen.join(", "),
            self.datapath.name(),
            self.tcp_keepalive.describe()
        ));
        if self.routes_per_request() {
            out.push_str("http: routed per request (path prefixes); other connections spliced\n");
        }
        if let Some(admin) = &self.admin {
            out.push_str(&format!("admin: http://{admin}/metrics\n"));
        }
        for target in self.targets.iter() {
            out.push_str(&format!("target: {}\n", target.describe()));
        }
        if let Some(t) = &self.takeover {
            let ports: Vec<String> = t.ports.iter().map(u16::to_string).collect();
            out.push_str(&format!(
                "takeover: ports {} (method {})\n",
                ports.join(", "),
                t.method.name()
            ));
        }
        out
    }
}

/// What went wrong, with enough to find it: file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {file}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// toml's message already shows the line, column and offending key.
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}:{line}: `{key}`: {message}")]
    Invalid {
        file: String,
        line: usize,
        key: String,
        message: String,
    },
    /// A problem with the configuration as a whole (no line to point at).
    #[error("{file}: {message}")]
    Whole { file: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Config::parse(&text, &file)
    }

    /// Parses and validates `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Validator { text, file }.config(raw)
    }
}

/// Durations as `"2s"`, `"500ms"`, `"1.5s"`, `"1m"`, or a bare number of seconds.
#[derive(Debug, Clone, Copy)]
struct DurationValue(Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match DurationOrSwitch::deserialize(d)? {
            DurationOrSwitch::Duration(d) => Ok(DurationValue(d)),
            DurationOrSwitch::Switch(_) => Err(serde::de::Error::custom(
                "expected a duration such as \"2s\", \"500ms\" or a number of seconds, not true or false",
            )),
        }
    }
}

/// A duration as [`DurationValue`] reads it, or `true` / `false` for keys
/// that can be switched on or off as well (`tcp_keepalive`).
#[derive(Debug, Clone, Copy)]
enum DurationOrSwitch {
    Duration(Duration),
    Switch(bool),
}

impl<'de> Deserialize<'de> for DurationOrSwitch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DurationOrSwitch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"2s\", \"500ms\" or a number of seconds")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<DurationOrSwitch, E> {
                Ok(DurationOrSwitch::Switch(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DurationOrSwitch, E> {
                u64::try_from(v)
                    .map(|s| DurationOrSwitch::Duration(Duration::from_secs(s)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<DurationOrSwitch, E> {
                Duration::try_from_secs_f64(v)
                    .map(DurationOrSwitch::Duration)
                    .map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationOrSwitch, E> {
                parse_duration(v)
                    .map(DurationOrSwitch::Duration)
                    .map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"2s"`, `"500ms"`, `"1.5s"`, `"2m"`, `"1h"` or `"3"` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (write e.g. \"2s\" or \"500ms\")"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{s}`: {e}"))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<OneOrMany>>,
    datapath: Option<Spanned<String>>,
    classify_timeout: Option<Spanned<DurationValue>>,
    on_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<DurationValue>>,
    response_timeout: Option<Spanned<DurationValue>>,
    forwarded_headers: Option<bool>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    takeover: Option<Spanned<RawTakeover>>,
    admin: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<DurationValue>>,
    max_connections: Option<Spanned<i64>>,
    max_connections_per_source: Option<Spanned<i64>>,
    max_kernel_bulk: Option<Spanned<i64>>,
    tcp_keepalive: Option<Spanned<DurationOrSwitch>>,
    /// The token for targets that set none of their own.
    token: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    #[serde(default)]
    target: Vec<Spanned<RawTarget>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Spanned<String>,
    /// None: an agent serves it.
    address: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTakeover {
    ports: Spanned<Vec<Spanned<i64>>>,
    method: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<Spanned<String>>,
    protocol: Spanned<String>,
    sni: Option<Spanned<String>>,
    alpn: Option<Spanned<OneOrMany>>,
    host: Option<Spanned<String>>,
    regex: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    strip_prefix: Option<Spanned<bool>>,
    backend: Spanned<String>,
    proxy_protocol: Option<Spanned<String>>,
    transparent: Option<Spanned<bool>>,
    max_connections: Option<Spanned<i64>>,
}

/// Turns spans into the line numbers that errors cite.
struct Validator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Validator<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn invalid(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: self.line(span),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn whole(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Whole {
            file: self.file.to_string(),
            message: message.into(),
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let listen =
            match raw.listen {
                None => return Err(self.whole(
                    "`listen` is missing: say where to accept, e.g. listen = [\"0.0.0.0:2222\"]",
                )),
                Some(l) => {
                    let span = l.span();
                    let addrs = l.into_inner().into_vec();
                    if addrs.is_empty() {
                        return Err(self.invalid(span, "listen", "needs at least one address"));
                    }
                    for a in &addrs {
                        check_listen(a).map_err(|m| self.invalid(span.clone(), "listen", m))?;
                    }
                    addrs
                }
            };

        let datapath = self
            .one_of(
                raw.datapath,
                "datapath",
                DataPathKind::parse,
                "auto, ebpf, splice, copy",
            )?
            .unwrap_or(DataPathKind::Auto);

        let classify_timeout = self.timeout(
            raw.classify_timeout,
            "classify_timeout",
            Duration::from_secs(2),
        )?;
        let connect_timeout = self.timeout(
            raw.connect_timeout,
            "connect_timeout",
            Duration::from_secs(10),
        )?;
        // Long enough for a model server to start answering a big prompt;
        // token streams then flow with no limit.
        let response_timeout = self.timeout(
            raw.response_timeout,
            "response_timeout",
            Duration::from_secs(120),
        )?;

        if raw.route.is_empty() {
            return Err(self.whole("no [[route]]: add at least one, e.g. protocol = \"ssh\", backend = \"127.0.0.1:22\""));
        }
        let mut routes: Vec<Route> = Vec::with_capacity(raw.route.len());
        for raw_route in raw.route {
            let span = raw_route.span();
            let route = self.route(raw_route.into_inner())?;
            if routes.iter().any(|r| r.name == route.name) {
                return Err(self.invalid(
                    span,
                    "name",
                    format!(
                        "two routes are named `{}`: give each route its own `name`",
                        route.name
                    ),
                ));
            }
            routes.push(route);
        }

        let on_timeout = match raw.on_timeout {
            Some(name) => {
                let found = routes.iter().position(|r| r.name == *name.get_ref());
                Some(found.ok_or_else(|| {
                    let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
                    self.invalid(
                        name.span(),
                        "on_timeout",
                        format!(
                            "no route named `{}` (routes: {})",
                            name.get_ref(),
                            names.join(", ")
                        ),
                    )
                })?)
            }
            // As sslh: silent clients are most likely SSH clients waiting for
            // the server's banner.
            None => routes.iter().position(|r| r.protocol == Protocol::Ssh),
        };

        let takeover = raw
            .takeover
            .map(|t| self.takeover(t.into_inner(), &listen))
            .transpose()?;
        let admin = match raw.admin {
            None => None,
            Some(a) => {
                check_listen(a.get_ref()).map_err(|m| self.invalid(a.span(), "admin", m))?;
                Some(a.into_inner())
            }
        };
        // Long enough for an scp or a model answer to finish; systemd's
        // default stop timeout (90 s) is longer still.
        let drain_timeout =
            self.timeout(raw.drain_timeout, "drain_timeout", Duration::from_secs(30))?;
        let limits = crate::limits::Limits {
            max_connections: self.count(raw.max_connections, "max_connections")?,
            max_per_source: self
                .count(raw.max_connections_per_source, "max_connections_per_source")?,
        };
        let max_kernel_bulk = self.count(raw.max_kernel_bulk, "max_kernel_bulk")?;
        let tcp_keepalive = self.keepalive(raw.tcp_keepalive)?;
        let global_token = self.token(raw.token, raw.token_file)?;
        let targets = self.targets(raw.target, global_token)?;

        Ok(Config {
            listen,
            datapath,
            classify_timeout,
            on_timeout,
            connect_timeout,
            router: Router::new(routes),
            takeover,
            response_timeout,
            forwarded_headers: raw.forwarded_headers.unwrap_or(true),
            targets,
            admin,
            drain_timeout,
            limits,
            max_kernel_bulk,
            tcp_keepalive,
        })
    }

    /// On unless `false`; a duration sets the idle time, in whole seconds
    /// as the kernel counts it.
    fn keepalive(
        &self,
        value: Option<Spanned<DurationOrSwitch>>,
    ) -> Result<Keepalive, ConfigError> {
        let Some(v) = value else {
            return Ok(Keepalive::System);
        };
        let span = v.span();
        Ok(match v.into_inner() {
            DurationOrSwitch::Switch(true) => Keepalive::System,
            DurationOrSwitch::Switch(false) => Keepalive::Off,
            DurationOrSwitch::Duration(d) => {
                if d < Duration::from_secs(1) || d > Keepalive::MAX_IDLE || d.subsec_nanos() != 0 {
                    return Err(self.invalid(
                        span,
                        "tcp_keepalive",
                        format!(
                            "{d:?} is not a whole number of seconds from 1s to {:?} (or write true or false)",
                            Keepalive::MAX_IDLE
                        ),
                    ));
                }
                Keepalive::Idle(d)
            }
        })
    }

    /// A keyword among `names`, as `parse` reads them.
    fn one_of<T>(
        &self,
        value: Option<Spanned<String>>,
        key: &str,
        parse: impl Fn(&str) -> Option<T>,
        names: &str,
    ) -> Result<Option<T>, ConfigError> {
        let Some(v) = value else { return Ok(None) };
        parse(v.get_ref()).map(Some).ok_or_else(|| {
            self.invalid(
                v.span(),
                key,
                format!("`{}` is not one of {names}", v.get_ref()),
            )
        })
    }

    /// A connection limit: a positive count.
    fn count(&self, value: Option<Spanned<i64>>, key: &str) -> Result<Option<usize>, ConfigError> {
        let Some(v) = value else { return Ok(None) };
        match usize::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(self.invalid(
                v.span(),
                key,
                format!("{} is not a positive number of connections", v.get_ref()),
            )),
        }
    }

    /// A token given inline or in a file (first line, trimmed, as secrets
    /// files usually end in a newline).
    fn token(
        &self,
        inline: Option<Spanned<String>>,
        file: Option<Spanned<String>>,
    ) -> Result<Option<Token>, ConfigError> {
        let secret = match (inline, file) {
            (Some(_), Some(f)) => {
                return Err(self.invalid(
                    f.span(),
                    "token_file",
                    "give `token` or `token_file`, not both",
                ));
            }
            (Some(t), None) => Some((t.span(), "token", t.into_inner())),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f.get_ref()).map_err(|e| {
                    self.invalid(
                        f.span(),
                        "token_file",
                        format!("cannot read {}: {e}", f.get_ref()),
                    )
                })?;
                let first = text.lines().next().unwrap_or("").trim().to_string();
                Some((f.span(), "token_file", first))
            }
            (None, None) => None,
        };
        match secret {
            Some((span, key, s)) if s.trim().is_empty() || s.chars().any(char::is_control) => {
                Err(self.invalid(
                    span,
                    key,
                    "a token must be a non-empty line of visible characters",
                ))
            }
            Some((_, _, s)) => Ok(Some(Token::new(s.trim()))),
            None => Ok(None),
        }
    }

    fn targets(
        &self,
        raw: Vec<Spanned<RawTarget>>,
        global_token: Option<Token>,
    ) -> Result<Targets, ConfigError> {
        let mut targets: Vec<Target> = Vec::with_capacity(raw.len());
        for raw_target in raw {
            let raw_target = raw_target.into_inner();
            let name_span = raw_target.name.span();
            let name = raw_target.name.into_inner();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(self.invalid(
                    name_span,
                    "name",
                    format!("`{name}` is not a target name (letters, digits, `-`, `_`, `.`)"),
                ));
            }
            if targets.iter().any(|t| t.name.eq_ignore_ascii_case(&name)) {
                return Err(self.invalid(
                    name_span,
                    "name",
                    format!("two targets are named `{name}`"),
                ));
            }
            let reach = match raw_target.address {
                Some(a) => Reach::Address(
                    Backend::parse(a.get_ref())
                        .map_err(|m| self.invalid(a.span(), "address", m))?,
                ),
                None => Reach::Agent,
            };
            let token = self
                .token(raw_target.token, raw_target.token_file)?
                .or_else(|| global_token.clone());
            if matches!(reach, Reach::Agent) && token.is_none() {
                return Err(self.invalid(
                    name_span,
                    "name",
                    format!(
                        "target `{name}` has no `address`, so an agent serves it, and agents must \
                         prove who they are: set its `token` (or a global `token`)"
                    ),
                ));
            }
            targets.push(Target { name, reach, token });
        }
        Ok(Targets::new(targets))
    }

    fn takeover(&self, raw: RawTakeover, listen: &[String]) -> Result<Takeover, ConfigError> {
        if raw.ports.get_ref().is_empty() {
            return Err(self.invalid(
                raw.ports.span(),
                "ports",
                "needs at least one port, e.g. ports = [22]",
            ));
        }
        let mut ports = Vec::new();
        for p in raw.ports.into_inner() {
            let port = u16::try_from(*p.get_ref())
                .ok()
                .filter(|&port| port != 0)
                .ok_or_else(|| {
                    self.invalid(
                        p.span(),
                        "ports",
                        format!("{} is not a port number", p.get_ref()),
                    )
                })?;
            check_takeover_port(port, listen).map_err(|m| self.invalid(p.span(), "ports", m))?;
            ports.push(port);
        }
        let method = self
            .one_of(
                raw.method,
                "method",
                Method::parse,
                "auto, sk_lookup, iptables",
            )?
            .unwrap_or(Method::Auto);
        Ok(Takeover { ports, method })
    }

    fn timeout(
        &self,
        value: Option<Spanned<DurationValue>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = value else { return Ok(default) };
        let d = v.get_ref().0;
        if d.is_zero() || d > Duration::from_secs(3600) {
            return Err(self.invalid(
                v.span(),
                key,
                format!("{d:?} is out of range (more than 0, at most 1h)"),
            ));
        }
        Ok(d)
    }

    fn route(&self, raw: RawRoute) -> Result<Route, ConfigError> {
        let protocol = Protocol::from_name(raw.protocol.get_ref()).ok_or_else(|| {
            let names: Vec<&str> = Protocol::ALL.iter().map(|p| p.name()).collect();
            self.invalid(
                raw.protocol.span(),
                "protocol",
                format!(
                    "unknown protocol `{}` (one of {})",
                    raw.protocol.get_ref(),
                    names.join(", ")
                ),
            )
        })?;
        let name = match raw.name {
            Some(n) if n.get_ref().trim().is_empty() => {
                return Err(self.invalid(n.span(), "name", "must not be empty"));
            }
            Some(n) => n.into_inner(),
            None => protocol.name().to_string(),
        };
        let only_for =
            |span: Option<Range<usize>>, key: &str, allowed: Protocol| -> Result<(), ConfigError> {
                match span {
                    Some(span) if protocol != allowed => Err(self.invalid(
                        span,
                        key,
                        format!(
                            "only applies to protocol = \"{}\" (this route is {})",
                            allowed.name(),
                            protocol.name()
                        ),
                    )),
                    _ => Ok(()),
                }
            };
        only_for(raw.sni.as_ref().map(Spanned::span), "sni", Protocol::Tls)?;
        only_for(raw.alpn.as_ref().map(Spanned::span), "alpn", Protocol::Tls)?;
        only_for(raw.host.as_ref().map(Spanned::span), "host", Protocol::Http)?;
        only_for(
            raw.regex.as_ref().map(Spanned::span),
            "regex",
            Protocol::Regex,
        )?;
        for (span, key) in [
            (raw.path_prefix.as_ref().map(Spanned::span), "path_prefix"),
            (raw.strip_prefix.as_ref().map(Spanned::span), "strip_prefix"),
        ] {
            if let Some(span) = span.filter(|_| !matches!(protocol, Protocol::Http | Protocol::H2c))
            {
                return Err(self.invalid(
                    span,
                    key,
                    format!(
                        "only applies to HTTP routes (this route is {})",
                        protocol.name()
                    ),
                ));
            }
        }
        let path_prefix = match &raw.path_prefix {
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(self.invalid(
                    p.span(),
                    "path_prefix",
                    format!("`{}` must start with /", p.get_ref()),
                ));
            }
            Some(p) => Some(crate::http::normalize_prefix(p.get_ref())),
            None => None,
        };
        if let (Some(strip), None) = (&raw.strip_prefix, &path_prefix) {
            return Err(self.invalid(strip.span(), "strip_prefix", "needs a path_prefix to strip"));
        }

        let regex = match raw.regex {
            Some(re) => Some(
                regex::bytes::Regex::new(re.get_ref())
                    .map_err(|e| self.invalid(re.span(), "regex", format!("{e}")))?,
            ),
            None if protocol == Protocol::Regex => {
                return Err(self.invalid(
                    raw.protocol.span(),
                    "regex",
                    "a regex route needs a `regex` pattern",
                ));
            }
            None => None,
        };
        let backend = Backend::parse(raw.backend.get_ref())
            .map_err(|m| self.invalid(raw.backend.span(), "backend", m))?;
        let proxy_protocol = self.one_of(
            raw.proxy_protocol,
            "proxy_protocol",
            crate::proxy_protocol::Version::parse,
            "v1, v2",
        )?;
        let transparent = match raw.transparent {
            Some(t) if *t.get_ref() => {
                crate::transparent::loopback_backend(&backend)
                    .map_err(|m| self.invalid(t.span(), "transparent", m))?;
                true
            }
            _ => false,
        };
        let max_connections = self.count(raw.max_connections, "max_connections")?;
        Ok(Route {
            name,
            protocol,
            sni: raw.sni.map(|s| Glob::new(s.get_ref())),
            alpn: raw
                .alpn
                .map(|a| a.into_inner().into_vec())
                .unwrap_or_default(),
            host: raw.host.map(|h| Glob::new(h.get_ref())),
            regex,
            path_prefix,
            strip_prefix: raw.strip_prefix.is_some_and(|s| *s.get_ref()),
            backend,
            proxy_protocol,
            transparent,
            max_connections,
        })
    }
}

/// A taken-over port must not be one mux itself listens on: that would
/// steer mux's own port to itself.
pub fn check_takeover_port(port: u16, listen: &[String]) -> Result<(), String> {
    let own = listen
        .iter()
        .filter_map(|a| a.rsplit_once(':'))
        .any(|(_, p)| p.parse() == Ok(port));
    if own {
        return Err(format!(
            "mux listens on port {port} itself; take over another service's port (e.g. 22)"
        ));
    }
    Ok(())
}

/// A listen address must name a port; the host may be a name, resolved at bind.
pub fn check_listen(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("`{addr}` is not host:port"))?;
    port.parse::<u16>()
        .map_err(|_| format!("`{addr}`: `{port}` is not a port number"))?;
    if host.is_empty() {
        return Err(format!(
            "`{addr}`: missing host (use 0.0.0.0 or [::] for all addresses)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
listen = ["0.0.0.0:2222"]
datapath = "auto"          # auto | ebpf | splice | copy
classify_timeout = "2s"
on_timeout = "ssh"         # a route name
[[route]]
name = "ssh"
protocol = "ssh"
backend = "127.0.0.1:22"
[[route]]
name = "site"
protocol = "tls"
sni = "*.example.com"
backend = "127.0.0.1:8443"
"#;

    fn err(text: &str) -> String {
        Config::parse(text, "test.toml").unwrap_err().to_string()
    }

    #[test]
    fn max_kernel_bulk_is_a_positive_count() {
        let c = Config::parse(&format!("max_kernel_bulk = 3\n{EXAMPLE}"), "x.toml").unwrap();
        assert_eq!(c.max_kernel_bulk, Some(3));
        let c = Config::parse(EXAMPLE, "x.toml").unwrap();
        assert_eq!(c.max_kernel_bulk, None);
        let e = err(&format!("max_kernel_bulk = 0\n{EXAMPLE}"));
        assert!(
            e.contains("max_kernel_bulk") && e.contains("not a positive"),
            "{e}"
        );
    }

    #[test]
    fn tcp_keepalive_is_on_off_or_an_idle_time() {
        let keepalive = |line: &str| {
            Config::parse(&format!("{line}\n{EXAMPLE}"), "x.toml")
                .unwrap()
                .tcp_keepalive
        };
        assert_eq!(keepalive(""), Keepalive::System);
        assert_eq!(keepalive("tcp_keepalive = true"), Keepalive::System);
        assert_eq!(keepalive("tcp_keepalive = false"), Keepalive::Off);
        assert_eq!(
            keepalive("tcp_keepalive = \"10m\""),
            Keepalive::Idle(Duration::from_secs(600))
        );
        assert_eq!(
            keepalive("tcp_keepalive = 30"),
            Keepalive::Idle(Duration::from_secs(30))
        );
        for bad in ["0", "\"500ms\"", "\"1.5s\"", "\"10h\"", "\"soon\""] {
            let e = err(&format!("tcp_keepalive = {bad}\n{EXAMPLE}"));
            assert!(
                e.contains("tcp_keepalive") && (e.contains(":1:") || e.contains("line 1")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_issue_example_parses() {
        let c = Config::parse(EXAMPLE, "x.toml").unwrap();
        assert_eq!(c.listen, vec!["0.0.0.0:2222"]);
        assert_eq!(c.classify_timeout, Duration::from_secs(2));
        assert_eq!(c.on_timeout, Some(0));
        assert_eq!(c.router.routes().len(), 2);
        assert_eq!(
            c.router.route(1).sni.as_ref().unwrap().as_str(),
            "*.example.com"
        );
    }

    #[test]
    fn the_embedded_default_is_the_gpu_box_layout() {
        let c = Config::parse(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME).unwrap();
        assert_eq!(c.listen, vec!["0.0.0.0:2222"]);
        let r: Vec<(&str, &str)> = c
            .router
            .routes()
            .iter()
            .map(|r| (r.protocol.name(), r.backend.as_str()))
            .collect();
        assert_eq!(
            r,
            vec![("ssh", "127.0.0.1:22"), ("http", "127.0.0.1:30000")]
        );
        assert_eq!(c.on_timeout, Some(0));
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let e = err(
            "listen = [\"127.0.0.1:1\"]\n[[route]]\nprotocol = \"ssh\"\nbackend = \"127.0.0.1:22\"\nbackends = 3\n",
        );
        assert!(e.starts_with("test.toml: "), "{e}");
        assert!(e.contains("line 5"), "{e}");
        assert!(e.contains("backends"), "{e}");
        let e = err("listen = [\"127.0.0.1:1\"]\ntimeout = 3\n");
        assert!(e.contains("line 2") && e.contains("timeout"), "{e}");
    }

    #[test]
    fn impossible_values_name_file_line_and_key() {
        let cases = [
            ("datapath = \"fast\"", "datapath", 2),
            ("classify_timeout = \"2 fortnights\"", "classify_timeout", 2),
            ("classify_timeout = 0", "classify_timeout", 2),
            ("classify_timeout = true", "classify_timeout", 2),
            ("on_timeout = \"nope\"", "on_timeout", 2),
        ];
        for (line, key, n) in cases {
            let text = format!(
                "listen = [\"127.0.0.1:1\"]\n{line}\n[[route]]\nname = \"ssh\"\nprotocol = \"ssh\"\nbackend = \"127.0.0.1:22\"\n"
            );
            let e = err(&text);
            assert!(e.contains("test.toml") && e.contains(key), "{line}: {e}");
            assert!(
                e.contains(&format!(":{n}:")) || e.contains(&format!("line {n}")),
                "{line}: {e}"
            );
        }
        let route_cases = [
            (
                "protocol = \"smtp\"\nbackend = \"127.0.0.1:25\"",
                "protocol",
                4,
            ),
            ("protocol = \"ssh\"\nbackend = \"127.0.0.1\"", "backend", 5),
            (
                "protocol = \"ssh\"\nbackend = \"127.0.0.1:99999\"",
                "backend",
                5,
            ),
            (
                "protocol = \"ssh\"\nsni = \"a.com\"\nbackend = \"127.0.0.1:22\"",
                "sni",
                5,
            ),
            (
                "protocol = \"tls\"\nhost = \"a.com\"\nbackend = \"127.0.0.1:22\"",
                "host",
                5,
            ),
            (
                "protocol = \"regex\"\nregex = \"(\"\nbackend = \"127.0.0.1:22\"",
                "regex",
                5,
            ),
            (
                "protocol = \"regex\"\nbackend = \"127.0.0.1:22\"",
                "regex",
                4,
            ),
        ];
        for (body, key, n) in route_cases {
            let text = format!("listen = \"127.0.0.1:1\"\n\n[[route]]\n{body}\n");
            let e = err(&text);
            assert!(
                e.contains(&format!("test.toml:{n}: `{key}`")),
                "{body}: {e}"
            );
        }
    }

    #[test]
    fn whole_file_problems_are_explained() {
        assert!(
            err("[[route]]\nprotocol = \"ssh\"\nbackend = \"127.0.0.1:22\"\n")
                .contains("`listen` is missing")
        );
        assert!(err("listen = \"127.0.0.1:1\"\n").contains("no [[route]]"));
        let dup = "listen = \"127.0.0.1:1\"\n[[route]]\nprotocol = \"tls\"\nbackend = \"127.0.0.1:1\"\n[[route]]\nprotocol = \"tls\"\nbackend = \"127.0.0.1:2\"\n";
        let e = err(dup);
        assert!(
            e.contains("test.toml:5: `name`") && e.contains("two routes are named `tls`"),
            "{e}"
        );
    }

    #[test]
    fn transparent_routes_need_a_loopback_backend() {
        let route = |backend: &str, t: &str| {
            format!(
                "listen = \"0.0.0.0:443\"\n[[route]]\nprotocol = \"ssh\"\nbackend = \"{backend}\"\n{t}\n[[route]]\nprotocol = \"any\"\nbackend = \"[::1]:80\"\ntransparent = true\n"
            )
        };
        let c = Config::parse(&route("localhost:22", "transparent = true"), "t").unwrap();
        let ports: Vec<_> = c.transparent_ports().into_iter().collect();
        use crate::transparent::Family::{V4, V6};
        assert_eq!(ports, vec![(V4, 22), (V6, 22), (V6, 80)]);
        assert!(c.describe().contains("transparent"), "{}", c.describe());
        let c = Config::parse(&route("127.0.0.1:22", "transparent = false"), "t").unwrap();
        assert_eq!(
            c.transparent_ports().into_iter().collect::<Vec<_>>(),
            vec![(V6, 80)]
        );
        let e = err(&route("10.0.0.5:22", "transparent = true"));
        assert!(
            e.contains("test.toml:5: `transparent`") && e.contains("loopback"),
            "{e}"
        );
        let e = err(&route("127.0.0.1:22", "transparent = \"yes\""));
        assert!(
            e.contains("line 5") && e.contains("expected a boolean"),
            "{e}"
        );
    }

    #[test]
    fn durations_accept_units_and_numbers() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3 parsecs").is_err());
        let c = Config::parse(
            "listen = \"127.0.0.1:1\"\nclassify_timeout = 0.25\n[[route]]\nprotocol = \"any\"\nbackend = \"127.0.0.1:1\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.classify_timeout, Duration::from_millis(250));
        assert_eq!(c.on_timeout, None);
    }

    #[test]
    fn takeover_section_parses_and_checks_its_ports() {
        let base = "listen = \"0.0.0.0:2222\"\n[[route]]\nprotocol = \"ssh\"\nbackend = \"127.0.0.1:22\"\n";
        let c = Config::parse(
            &format!("{base}[takeover]\nports = [22, 443]\nmethod = \"iptables\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(
            c.takeover,
            Some(Takeover {
                ports: vec![22, 443],
                method: Method::Iptables
            })
        );
        let c = Config::parse(&format!("{base}[takeover]\nports = [22]\n"), "t").unwrap();
        assert_eq!(c.takeover.unwrap().method, Method::Auto);
        assert!(Config::parse(base, "t").unwrap().takeover.is_none());
        for (bad, key) in [
            ("ports = []", "ports"),
            ("ports = [70000]", "ports"),
            ("ports = [2222]", "ports"),
            ("ports = [22]\nmethod = \"magic\"", "method"),
            ("ports = [22]\nport = 1", "port"),
        ] {
            let e = err(&format!("{base}[takeover]\n{bad}\n"));
            assert!(
                e.contains(key) && (e.contains("test.toml:") || e.contains("line")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn alpn_takes_one_or_many() {
        let c = Config::parse(
            "listen = \"127.0.0.1:1\"\n[[route]]\nname=\"a\"\nprotocol = \"tls\"\nalpn = \"h2\"\nbackend = \"127.0.0.1:1\"\n[[route]]\nname=\"b\"\nprotocol = \"tls\"\nalpn = [\"h2\", \"http/1.1\"]\nbackend = \"127.0.0.1:1\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.router.route(0).alpn, vec!["h2"]);
        assert_eq!(c.router.route(1).alpn, vec!["h2", "http/1.1"]);
    }
}
