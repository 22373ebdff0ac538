//! The command line: sslh's flags as they are (so its systemd unit and
//! /etc/default/sslh work unchanged), `--config FILE` for TOML, and subcommands.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::classify::Protocol;
use crate::config::{self, Config, ConfigError, DataPathKind};
use crate::route::{Backend, Route, Router};
use crate::takeover::{Method, Takeover};

#[derive(Debug, Parser)]
#[command(
    name = "mux",
    version,
    about = "Many services through one TCP port: SSH, TLS, HTTP and more, told apart by their first bytes.",
    long_about = "Many services through one TCP port: SSH, TLS, HTTP and more, told apart by their first bytes.\n\n\
        With no arguments mux runs its embedded default config (0.0.0.0:2222: SSH to 127.0.0.1:22, HTTP to 127.0.0.1:30000).\n\
        sslh's command line works as is, e.g.\n  \
        mux --user sslh --listen 0.0.0.0:443 --ssh 127.0.0.1:22 --tls 127.0.0.1:8443 --pidfile /run/sslh.pid",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration (file, flags or the embedded default) and print the effective routes.
    Check(Box<RunArgs>),
    /// Manage port takeover outside the daemon.
    Takeover(TakeoverArgs),
    /// Open a tunnel to a target through a mux port and join it to standard
    /// input and output, e.g. ssh -o ProxyCommand='mux connect BOX:2222 %h:%p'.
    Connect(ConnectArgs),
    /// Serve targets of this host through a box's mux: dial out to its port
    /// and keep one connection up, reconnecting when it drops.
    Agent(AgentArgs),
    /// Print what a running mux is doing (from its admin endpoint).
    Status(AdminArgs),
    /// Make a running mux read its configuration again (as SIGHUP does) and
    /// say whether it took it.
    Reload(AdminArgs),
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The running mux's `admin` address.
    #[arg(long, value_name = "HOST:PORT", default_value = DEFAULT_ADMIN)]
    pub admin: String,
}

/// Where the example configurations put the admin endpoint.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9122";

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The box's mux port.
    #[arg(value_name = "BOX:PORT")]
    pub server: String,
    /// The target's name as configured on the box, optionally with a port
    /// (which the box ignores: the target's configured address decides).
    #[arg(value_name = "TARGET")]
    pub target: String,
    /// File holding the token (first line). Default: the MUX_TOKEN
    /// environment variable, else no token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The box's mux port to dial.
    #[arg(long, value_name = "BOX:PORT")]
    pub server: String,
    /// A target this agent serves, and the local address it stands for;
    /// repeatable, e.g. --expose node3=127.0.0.1:22.
    #[arg(long, value_name = "NAME=HOST:PORT", required = true)]
    pub expose: Vec<String>,
    /// File holding the token (first line). Default: the MUX_TOKEN
    /// environment variable.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// More logging: -v for debug, -vv for trace. RUST_LOG overrides.
    #[arg(short = 'v', long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The token for `mux connect` and `mux agent`: the file's first line, else
/// MUX_TOKEN, else none.
pub fn client_token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    let token = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Some(text.lines().next().unwrap_or("").trim().to_string())
        }
        None => std::env::var("MUX_TOKEN")
            .ok()
            .map(|t| t.trim().to_string()),
    };
    match token {
        Some(t) if t.is_empty() => Err("the token is empty".into()),
        t => Ok(t),
    }
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("action").required(true).args(["cleanup", "guard"]))]
pub struct TakeoverArgs {
    /// Remove the REDIRECT rules (iptables or nft) a crashed mux left behind.
    #[arg(long)]
    pub cleanup: bool,
    /// Internal: add REDIRECT rules, hold them while standard input stays
    /// open, then remove them (the daemon runs this as a root child, so the
    /// rules go even if the daemon dropped root or was killed).
    #[arg(long, hide = true, requires = "ports")]
    pub guard: bool,
    #[arg(long, hide = true, value_delimiter = ',')]
    pub ports: Vec<u16>,
    #[arg(long, hide = true)]
    pub to_v4: Option<u16>,
    #[arg(long, hide = true)]
    pub to_v6: Option<u16>,
}

/// Everything that shapes a running mux. sslh's flags keep sslh's names.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML configuration file (see examples/). sslh's libconfig files are not read.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on; repeat for several. Overrides the config's `listen`.
    #[arg(short = 'p', long = "listen", value_name = "HOST:PORT")]
    pub listen: Vec<String>,
    /// Where SSH connections go.
    #[arg(long, value_name = "HOST:PORT")]
    pub ssh: Option<String>,
    /// Where TLS connections go.
    #[arg(long, visible_alias = "ssl", value_name = "HOST:PORT")]
    pub tls: Option<String>,
    /// Where HTTP/1.x connections go.
    #[arg(long, value_name = "HOST:PORT")]
    pub http: Option<String>,
    /// HTTP requests under PREFIX go to HOST:PORT, PREFIX stripped (Caddy's
    /// handle_path), e.g. /embedding-model/=127.0.0.1:30001; repeatable.
    #[arg(long = "http-route", value_name = "PREFIX=HOST:PORT")]
    pub http_route: Vec<String>,
    /// Where OpenVPN (TCP) connections go.
    #[arg(long, value_name = "HOST:PORT")]
    pub openvpn: Option<String>,
    /// Where SOCKS5 connections go.
    #[arg(long, value_name = "HOST:PORT")]
    pub socks5: Option<String>,
    /// Where connections that no other protocol claims go.
    #[arg(long, value_name = "HOST:PORT")]
    pub anyprot: Option<String>,
    /// Seconds (or a duration such as 500ms) a client may stay silent before it goes to --on-timeout.
    #[arg(short = 't', long, value_name = "SECONDS")]
    pub timeout: Option<String>,
    /// Route (protocol name with sslh flags) for clients that stay silent. Default: ssh.
    #[arg(long = "on-timeout", value_name = "ROUTE")]
    pub on_timeout: Option<String>,
    /// How bytes move after classification: auto, ebpf, splice or copy.
    #[arg(long, value_name = "KIND")]
    pub datapath: Option<String>,
    /// Take this port over from its own server (e.g. 22, with sshd kept on it); repeatable.
    #[arg(long = "takeover", value_name = "PORT")]
    pub takeover: Vec<u16>,
    /// How to take ports over: auto (sk_lookup, else iptables), sk_lookup or iptables.
    #[arg(long = "takeover-method", value_name = "METHOD")]
    pub takeover_method: Option<String>,
    /// Serve /metrics and /reload on this address (keep it on loopback).
    #[arg(long, value_name = "HOST:PORT")]
    pub admin: Option<String>,
    /// Drop root for this user once the listening sockets are open.
    #[arg(short = 'u', long, value_name = "NAME")]
    pub user: Option<String>,
    /// Write the process id to this file.
    #[arg(short = 'P', long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Accepted for sslh compatibility: mux always stays in the foreground.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Accepted for sslh compatibility: mux never resolves client names.
    #[arg(short = 'n', long)]
    pub numeric: bool,
    /// More logging: -v for debug, -vv for trace. RUST_LOG overrides.
    #[arg(short = 'v', long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Connect to each backend from the client's own address, so that sshd
    /// and other backends see it (every route; backends on loopback only).
    #[arg(long)]
    pub transparent: bool,
    #[arg(short = 'i', long, hide = true)]
    pub inetd: bool,
    #[arg(short = 'C', long, hide = true, value_name = "DIR")]
    pub chroot: Option<String>,
    #[arg(short = 'F', hide = true, value_name = "FILE")]
    pub libconfig: Option<String>,
}

/// The sslh protocol flags, in the order sslh documents them.
const SSLH_PROTOCOLS: [(&str, Protocol); 6] = [
    ("ssh", Protocol::Ssh),
    ("tls", Protocol::Tls),
    ("http", Protocol::Http),
    ("openvpn", Protocol::Openvpn),
    ("socks5", Protocol::Socks5),
    ("anyprot", Protocol::Any),
];

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },
    #[error("{0}")]
    Unsupported(&'static str),
}

fn flag_error(flag: &str, message: impl Into<String>) -> CliError {
    CliError::Flag {
        flag: flag.to_string(),
        message: message.into(),
    }
}

/// Parses the process's arguments. Kept apart from clap's derive output
/// because sslh's protocol flags mean something by their order.
pub fn parse() -> (Cli, ArgMatches) {
    parse_from(std::env::args_os())
}

pub fn parse_from<I, T>(args: I) -> (Cli, ArgMatches)
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    (cli, matches)
}

impl RunArgs {
    /// The configuration these arguments describe: a TOML file, sslh-style
    /// flags, or the embedded default, with the overriding flags applied.
    /// `matches` are the matches these args were parsed from.
    pub fn config(&self, matches: &ArgMatches) -> Result<Config, CliError> {
        self.refuse_unsupported()?;
        let sslh = self.sslh_protocols(matches);
        let mut config = match (&self.config, sslh.is_empty()) {
            (Some(_), false) => {
                return Err(flag_error(
                    "--config",
                    "give either a config file or sslh-style protocol flags (--ssh, --tls ...), not both",
                ));
            }
            (Some(path), true) => Config::load(path)?,
            (None, false) => self.sslh_config(&sslh)?,
            (None, true) => Config::parse(config::DEFAULT_CONFIG, config::DEFAULT_CONFIG_NAME)?,
        };

        if !self.listen.is_empty() {
            for addr in &self.listen {
                config::check_listen(addr).map_err(|m| flag_error("--listen", m))?;
            }
            config.listen = self.listen.clone();
        }
        if let Some(t) = &self.timeout {
            let d = config::parse_duration(t).map_err(|m| flag_error("--timeout", m))?;
            if d.is_zero() {
                return Err(flag_error("--timeout", "must be more than 0"));
            }
            config.classify_timeout = d;
        }
        if let Some(name) = &self.on_timeout {
            let routes = config.router.routes();
            let index = routes.iter().position(|r| r.name == *name).ok_or_else(|| {
                let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
                flag_error(
                    "--on-timeout",
                    format!("no route named `{name}` (routes: {})", names.join(", ")),
                )
            })?;
            config.on_timeout = Some(index);
        }
        if !self.http_route.is_empty() {
            self.add_http_routes(&mut config)?;
        }
        if self.transparent {
            let mut routes = config.router.routes().to_vec();
            for route in &mut routes {
                crate::transparent::loopback_backend(&route.backend).map_err(|m| {
                    flag_error("--transparent", format!("route `{}`: {m}", route.name))
                })?;
                route.transparent = true;
            }
            config.router = Router::new(routes);
        }
        if let Some(addr) = &self.admin {
            config::check_listen(addr).map_err(|m| flag_error("--admin", m))?;
            config.admin = Some(addr.clone());
        }
        if !self.takeover.is_empty() || self.takeover_method.is_some() {
            config.takeover = Some(self.takeover_over(&config)?);
        }
        if let Some(kind) = &self.datapath {
            config.datapath = DataPathKind::parse(kind).ok_or_else(|| {
                flag_error(
                    "--datapath",
                    format!("`{kind}` is not one of auto, ebpf, splice, copy"),
                )
            })?;
        }
        Ok(config)
    }

    /// `--http-route PREFIX=BACKEND`: path routes, placed before the first
    /// HTTP route so that they win over a catch-all.
    fn add_http_routes(&self, config: &mut Config) -> Result<(), CliError> {
        let mut routes = config.router.routes().to_vec();
        let at = routes
            .iter()
            .position(|r| r.protocol == Protocol::Http)
            .unwrap_or(routes.len());
        for (i, spec) in self.http_route.iter().enumerate() {
            let (prefix, backend) = spec.split_once('=').ok_or_else(|| {
                flag_error("--http-route", format!("`{spec}` is not PREFIX=HOST:PORT"))
            })?;
            if !prefix.starts_with('/') {
                return Err(flag_error(
                    "--http-route",
                    format!("`{prefix}` must start with /"),
                ));
            }
            let backend = Backend::parse(backend).map_err(|m| flag_error("--http-route", m))?;
            let prefix = crate::http::normalize_prefix(prefix);
            let name = match prefix.trim_start_matches('/') {
                "" => "http-route".to_string(),
                p => p.replace('/', "-"),
            };
            let mut route = Route::new(&name, Protocol::Http, backend);
            route.path_prefix = Some(prefix);
            route.strip_prefix = true;
            routes.insert(at + i, route);
        }
        config.router = Router::new(routes);
        Ok(())
    }

    /// The takeover the flags ask for, on top of the config's section.
    fn takeover_over(&self, config: &Config) -> Result<Takeover, CliError> {
        let method = match &self.takeover_method {
            None => config.takeover.as_ref().map_or(Method::Auto, |t| t.method),
            Some(m) => Method::parse(m).ok_or_else(|| {
                flag_error(
                    "--takeover-method",
                    format!("`{m}` is not one of auto, sk_lookup, iptables"),
                )
            })?,
        };
        let ports = if self.takeover.is_empty() {
            config
                .takeover
                .as_ref()
                .map(|t| t.ports.clone())
                .unwrap_or_default()
        } else {
            self.takeover.clone()
        };
        if ports.is_empty() {
            return Err(flag_error(
                "--takeover-method",
                "no port to take over: add --takeover PORT",
            ));
        }
        for &port in &ports {
            if port == 0 {
                return Err(flag_error("--takeover", "0 is not a port number"));
            }
            config::check_takeover_port(port, &config.listen)
                .map_err(|m| flag_error("--takeover", m))?;
        }
        Ok(Takeover { ports, method })
    }

    fn refuse_unsupported(&self) -> Result<(), CliError> {
        if self.inetd {
            return Err(CliError::Unsupported("--inetd: mux runs as a daemon only"));
        }
        if self.chroot.is_some() {
            return Err(CliError::Unsupported(
                "--chroot: not supported; the packaged systemd unit confines mux instead",
            ));
        }
        if self.libconfig.is_some() {
            return Err(CliError::Unsupported(
                "-F reads sslh's libconfig files, which mux does not: write a TOML file (see examples/) and pass --config FILE",
            ));
        }
        Ok(())
    }

    /// The sslh protocol flags given, in command-line order, anyprot last
    /// (it matches everything, so anything after it could never be reached).
    fn sslh_protocols(&self, matches: &ArgMatches) -> Vec<(&'static str, Protocol, &str)> {
        let values = [
            &self.ssh,
            &self.tls,
            &self.http,
            &self.openvpn,
            &self.socks5,
            &self.anyprot,
        ];
        let mut given: Vec<(usize, &'static str, Protocol, &str)> = SSLH_PROTOCOLS
            .iter()
            .zip(values)
            .filter_map(|(&(id, protocol), value)| {
                let value = value.as_deref()?;
                let position = matches.index_of(id).unwrap_or(usize::MAX);
                let position = if protocol == Protocol::Any {
                    usize::MAX
                } else {
                    position
                };
                Some((position, id, protocol, value))
            })
            .collect();
        given.sort_by_key(|&(position, ..)| position);
        given.into_iter().map(|(_, id, p, v)| (id, p, v)).collect()
    }

    /// sslh semantics: each flag is a route named after its protocol; a
    /// client matching none goes to the first protocol given; a silent one to
    /// ssh if given, else to the first protocol.
    fn sslh_config(&self, protocols: &[(&str, Protocol, &str)]) -> Result<Config, CliError> {
        if self.listen.is_empty() {
            return Err(flag_error(
                "--listen",
                "no listening address: add e.g. --listen 0.0.0.0:443",
            ));
        }
        let mut routes = Vec::new();
        for &(name, protocol, addr) in protocols {
            let backend = Backend::parse(addr).map_err(|m| flag_error(&format!("--{name}"), m))?;
            routes.push(Route::new(name, protocol, backend));
        }
        if routes.last().is_some_and(|r| r.protocol != Protocol::Any) {
            let first = routes[0].backend.clone();
            routes.push(Route::new("unmatched", Protocol::Any, first));
        }
        let on_timeout = routes
            .iter()
            .position(|r| r.protocol == Protocol::Ssh)
            .or(Some(0));
        Ok(Config {
            listen: self.listen.clone(),
            datapath: DataPathKind::Auto,
            classify_timeout: Duration::from_secs(2),
            on_timeout,
            connect_timeout: Duration::from_secs(10),
            router: Router::new(routes),
            takeover: None,
            response_timeout: Duration::from_secs(120),
            forwarded_headers: true,
            targets: Default::default(),
            admin: None,
            drain_timeout: Duration::from_secs(30),
            limits: Default::default(),
            max_kernel_bulk: None,
            tcp_keepalive: config::Keepalive::System,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, CliError> {
        let (cli, matches) = parse_from(std::iter::once("mux").chain(args.iter().copied()));
        cli.run.config(&matches)
    }

    fn table(c: &Config) -> Vec<(String, &'static str, String)> {
        c.router
            .routes()
            .iter()
            .map(|r| (r.name.clone(), r.protocol.name(), r.backend.to_string()))
            .collect()
    }

    #[test]
    fn the_debian_sslh_default_line_parses() {
        let c = config(&[
            "--foreground",
            "--user",
            "sslh",
            "--listen",
            "0.0.0.0:443",
            "--ssh",
            "127.0.0.1:22",
            "--ssl",
            "127.0.0.1:443",
            "--pidfile",
            "/var/run/sslh/sslh.pid",
        ])
        .unwrap();
        assert_eq!(c.listen, vec!["0.0.0.0:443"]);
        assert_eq!(
            table(&c),
            vec![
                ("ssh".into(), "ssh", "127.0.0.1:22".into()),
                ("tls".into(), "tls", "127.0.0.1:443".into()),
                ("unmatched".into(), "any", "127.0.0.1:22".into()),
            ]
        );
        assert_eq!(c.on_timeout, Some(0));
    }

    #[test]
    fn transparent_makes_every_route_transparent_and_wants_loopback_backends() {
        let sslh = [
            "--transparent",
            "-p",
            "0.0.0.0:443",
            "--ssh",
            "127.0.0.1:22",
            "--tls",
            "localhost:8443",
        ];
        let c = config(&sslh).unwrap();
        assert!(c.router.routes().iter().all(|r| r.transparent));
        assert!(c.describe().contains("transparent"), "{}", c.describe());
        assert!(
            config(&sslh[1..])
                .unwrap()
                .router
                .routes()
                .iter()
                .all(|r| !r.transparent)
        );
        let e = config(&["--transparent", "-p", "0.0.0.0:443", "--ssh", "10.0.0.5:22"])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--transparent: route `ssh`") && e.contains("loopback"),
            "{e}"
        );
    }

    #[test]
    fn sslh_flags_keep_command_line_order_with_anyprot_last() {
        let c = config(&[
            "-p",
            "127.0.0.1:1",
            "-p",
            "[::1]:1",
            "--anyprot",
            "127.0.0.1:9",
            "--http",
            "127.0.0.1:80",
            "--ssh",
            "127.0.0.1:22",
            "-t",
            "5",
            "--on-timeout",
            "http",
            "-v",
            "-n",
        ])
        .unwrap();
        let names: Vec<String> = table(&c).into_iter().map(|(n, ..)| n).collect();
        assert_eq!(names, vec!["http", "ssh", "anyprot"]);
        assert_eq!(c.listen, vec!["127.0.0.1:1", "[::1]:1"]);
        assert_eq!(c.classify_timeout, Duration::from_secs(5));
        assert_eq!(c.on_timeout, Some(0));
    }

    #[test]
    fn no_arguments_means_the_embedded_default() {
        let c = config(&[]).unwrap();
        assert_eq!(c.listen, vec!["0.0.0.0:2222"]);
        assert_eq!(c.router.routes().len(), 2);
        let c = config(&[
            "--listen",
            "127.0.0.1:0",
            "--datapath",
            "copy",
            "--timeout",
            "250ms",
        ])
        .unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:0"]);
        assert_eq!(c.datapath, DataPathKind::Copy);
        assert_eq!(c.classify_timeout, Duration::from_millis(250));
    }

    #[test]
    fn mistakes_name_the_flag() {
        let msg = |args: &[&str]| config(args).unwrap_err().to_string();
        assert!(msg(&["--ssh", "127.0.0.1:22"]).starts_with("--listen:"));
        assert!(msg(&["-p", "0.0.0.0:1", "--ssh", "localhost"]).starts_with("--ssh:"));
        assert!(
            msg(&["-p", "0.0.0.0:1", "--ssh", "a:1", "--on-timeout", "tls"])
                .starts_with("--on-timeout:")
        );
        assert!(msg(&["--datapath", "warp"]).starts_with("--datapath:"));
        assert!(msg(&["--timeout", "0"]).starts_with("--timeout:"));
        assert!(msg(&["--listen", "2222"]).starts_with("--listen:"));
        assert!(msg(&["-Fsslh.cfg"]).contains("libconfig"));
        assert!(msg(&["--config", "x.toml", "--ssh", "a:1"]).starts_with("--config:"));
    }

    #[test]
    fn takeover_flags_add_or_override_the_section() {
        let c = config(&[
            "-p",
            "0.0.0.0:2222",
            "--ssh",
            "127.0.0.1:22",
            "--takeover",
            "22",
            "--takeover",
            "443",
        ])
        .unwrap();
        assert_eq!(
            c.takeover,
            Some(Takeover {
                ports: vec![22, 443],
                method: Method::Auto
            })
        );
        let c = config(&["--takeover", "22", "--takeover-method", "iptables"]).unwrap();
        assert_eq!(c.takeover.unwrap().method, Method::Iptables);
        let msg = |args: &[&str]| config(args).unwrap_err().to_string();
        assert!(msg(&["--takeover", "2222"]).starts_with("--takeover:"));
        assert!(msg(&["--takeover-method", "iptables"]).starts_with("--takeover-method:"));
        assert!(
            msg(&["--takeover", "22", "--takeover-method", "magic"])
                .starts_with("--takeover-method:")
        );
    }

    #[test]
    fn http_route_flags_put_path_routes_before_the_catch_all() {
        let c = config(&[
            "-p",
            "0.0.0.0:2222",
            "--ssh",
            "127.0.0.1:22",
            "--http",
            "127.0.0.1:30000",
            "--http-route",
            "/embedding-model/=127.0.0.1:30001",
        ])
        .unwrap();
        let names: Vec<String> = table(&c).into_iter().map(|(n, ..)| n).collect();
        assert_eq!(names, vec!["ssh", "embedding-model", "http", "unmatched"]);
        let r = c.router.route(1);
        assert_eq!(
            (r.path_prefix.as_deref(), r.strip_prefix),
            (Some("/embedding-model"), true)
        );
        assert!(c.routes_per_request());
        assert!(
            config(&["--http-route", "nope=127.0.0.1:1"])
                .unwrap_err()
                .to_string()
                .starts_with("--http-route:")
        );
    }

    #[test]
    fn check_takes_the_same_arguments() {
        let (cli, matches) = parse_from([
            "mux",
            "check",
            "-p",
            "127.0.0.1:1",
            "--http",
            "127.0.0.1:2",
            "--ssh",
            "127.0.0.1:3",
        ]);
        let Some(Command::Check(args)) = cli.command else {
            panic!("expected check")
        };
        let c = args
            .config(matches.subcommand_matches("check").unwrap())
            .unwrap();
        let names: Vec<String> = table(&c).into_iter().map(|(n, ..)| n).collect();
        assert_eq!(names, vec!["http", "ssh", "unmatched"]);
    }
}
