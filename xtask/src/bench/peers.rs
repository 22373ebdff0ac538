//! Starting and stopping every process the benchmark runs: the systems under test (mux with
//! each data path, sslh, HAProxy, Caddy), the backends and the clients. Each runs as the
//! leader of its own process group, held by a guard that kills the whole group when dropped,
//! so nothing outlives the harness: not on error, not on Ctrl-C.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::procfs;
use crate::util::is_root;

/// How long a system may take to open its port.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a stopped process gets to exit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often waits look at their process, the interrupt flag, and (for CPU) the group.
pub const POLL: Duration = Duration::from_millis(50);

// ---- interruption -----------------------------------------------------------------------

/// Process groups alive now, for the signal handler to kill: it cannot wait for the guards.
static GROUPS: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // A second Ctrl-C: the user wants out now.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
    for g in &GROUPS {
        let pgid = g.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: kill is async-signal-safe; the group is one we started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: kill every group we started at once, and let the waits
/// notice (they poll [`interrupted`]) so that the guards and temp directory unwind normally.
pub fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches atomics and calls async-signal-safe functions.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

fn register(pgid: i32) {
    for g in &GROUPS {
        if g.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
    // Only an interrupt would miss it; the guard still kills it on the normal path.
}

fn unregister(pgid: i32) {
    for g in &GROUPS {
        let _ = g.compare_exchange(pgid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

// ---- one process --------------------------------------------------------------------------

/// A started process (and its group). Output goes to files in the run's directory, which the
/// harness reads for readiness lines and results, and shows when something fails.
pub struct Proc {
    pub name: String,
    child: Child,
    pub stdin: Option<ChildStdin>,
    stdout: PathBuf,
    stderr: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` as the leader of a new process group. With `stdin_pipe` the caller can
    /// talk to it (or close it to say stop); otherwise stdin is /dev/null.
    pub fn spawn(dir: &Path, name: &str, cmd: &mut Command, stdin_pipe: bool) -> Result<Proc> {
        check_interrupted()?;
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        cmd.stdin(if stdin_pipe {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(File::create(&stdout)?)
        .stderr(File::create(&stderr)?)
        // Not the terminal's group: Ctrl-C reaches only us, and we stop everyone in order.
        .process_group(0);
        let shown = crate::util::show(cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{shown}`"))?;
        register(child.id() as i32);
        Ok(Proc {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            exited: None,
        })
    }

    pub fn pgid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The last lines of its stderr (and stdout, if stderr is empty), to say why it failed.
    pub fn tail(&self) -> String {
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let text = if err.trim().is_empty() {
            self.stdout()
        } else {
            err
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    }

    /// Err with its last words if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        match self.exited {
            None => Ok(()),
            Some(status) => bail!("{} exited ({status}): {}", self.name, self.tail()),
        }
    }

    /// Waits until `ready` says so (given stdout and stderr), the process exits, or `limit`.
    pub fn wait_ready<T>(
        &mut self,
        limit: Duration,
        mut ready: impl FnMut(&str, &str) -> Option<T>,
    ) -> Result<T> {
        let start = Instant::now();
        loop {
            let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            if let Some(v) = ready(&self.stdout(), &err) {
                return Ok(v);
            }
            check_interrupted()?;
            self.check_alive()?;
            if start.elapsed() > limit {
                bail!(
                    "{} not ready after {}s: {}",
                    self.name,
                    limit.as_secs(),
                    self.tail()
                );
            }
            std::thread::sleep(POLL / 5);
        }
    }

    /// Waits for it to exit (calling `tick` every [`POLL`] meanwhile); Err if it fails, runs
    /// past `limit` (it is then killed), or we are interrupted. Ok gives its stdout.
    pub fn finish(&mut self, limit: Duration, mut tick: impl FnMut()) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some(status);
                if !status.success() {
                    bail!("{} failed ({status}): {}", self.name, self.tail());
                }
                return Ok(self.stdout());
            }
            check_interrupted()?;
            if start.elapsed() > limit {
                self.stop();
                bail!(
                    "{} still running after {}s: killed",
                    self.name,
                    limit.as_secs()
                );
            }
            tick();
            std::thread::sleep(POLL);
        }
    }

    /// Stops it as [`Drop`] does, now; gives how it exited (None: it could not be reaped).
    /// A process that exits 0 within the grace period after SIGTERM stopped cleanly.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.stop();
        self.exited
    }

    /// SIGTERM to the group, SIGKILL to whatever is left after a grace period, then reap.
    fn stop(&mut self) {
        let pgid = self.pgid();
        if self.exited.is_none() {
            // SAFETY: signalling our own child's group.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < STOP_GRACE {
                if let Ok(Some(s)) = self.child.try_wait() {
                    self.exited = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Also after a clean exit of the leader: a forking proxy's children may live on.
        // SAFETY: as above; the group id cannot be reused while members remain.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
        unregister(pgid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The address in a `listening on ADDR` line, which mux (stderr) and loadgen (stdout) print.
pub fn listening_line(text: &str) -> Option<SocketAddr> {
    text.lines()
        .find_map(|l| l.split("listening on ").nth(1)?.trim().parse().ok())
}

/// A free port on `host`, for programs that cannot be told to pick one and report it. Asked
/// of `host` itself: a port free on loopback may be taken on the remote workload's address (an
/// sslh-select run once found its port held by an iperf3 server there). Another process could
/// take it in between; in a benchmark run, that does not happen.
pub fn free_port(host: IpAddr) -> Result<u16> {
    Ok(TcpListener::bind(SocketAddr::new(host, 0))?
        .local_addr()?
        .port())
}

fn wait_listening(proc: &mut Proc, addr: SocketAddr) -> Result<SocketAddr> {
    proc.wait_ready(START_TIMEOUT, |_, _| {
        procfs::listening(addr.port()).then_some(addr)
    })
}

// ---- the systems under test ---------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datapath {
    /// What mux runs on by default: the kernel path where it loads (here, as
    /// root), dropping back to splice for backends that never send in bulk.
    Auto,
    Ebpf,
    Splice,
    Copy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// The client talks to the backend itself: the limit of this machine.
    Direct,
    Mux(Datapath),
    SslhFork,
    SslhSelect,
    HaproxyTcp,
    HaproxyHttp,
    Caddy,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::Mux(Datapath::Auto) => "mux-auto",
            System::Mux(Datapath::Ebpf) => "mux-ebpf",
            System::Mux(Datapath::Splice) => "mux-splice",
            System::Mux(Datapath::Copy) => "mux-copy",
            System::SslhFork => "sslh-fork",
            System::SslhSelect => "sslh-select",
            System::HaproxyTcp => "haproxy-tcp",
            System::HaproxyHttp => "haproxy-http",
            System::Caddy => "caddy",
        }
    }
}

/// Where a system sends what, in the terms of the workload.
#[derive(Debug, Clone, Copy)]
pub enum Routes {
    /// Everything to one backend (mux and sslh: a catch-all route).
    Any(SocketAddr),
    /// SSH-like clients to one backend, HTTP to another, told apart by their first bytes.
    SshHttp { ssh: SocketAddr, http: SocketAddr },
    /// HTTP by path: `/embedding-model/*` (prefix stripped) to `embed`, the rest to `main`.
    HttpPaths { main: SocketAddr, embed: SocketAddr },
}

/// Paths of the programs the harness runs.
pub struct Bins {
    pub mux: PathBuf,
    pub loadgen: PathBuf,
}

/// A system that is up. `addr` is None for [`System::Direct`]: clients then go to the backend.
pub struct Running {
    pub system: System,
    pub addr: Option<SocketAddr>,
    proc: Option<Proc>,
}

impl Running {
    /// The group to measure CPU and memory of; None for direct (there is no proxy).
    pub fn pgid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pgid)
    }

    /// Err if the proxy died (e.g. sslh-select past FD_SETSIZE), so its figures are not used.
    pub fn check_alive(&mut self) -> Result<()> {
        self.proc.as_mut().map_or(Ok(()), Proc::check_alive)
    }
}

/// Starts `system` with `routes`, listening on `host`; its config file and logs go in `dir`,
/// named `{tag}-{system}`. Err says why it cannot run here, in words fit for a table cell.
pub fn start(
    dir: &Path,
    bins: &Bins,
    system: System,
    routes: Routes,
    tag: &str,
    host: IpAddr,
) -> Result<Running> {
    let name = &format!("{tag}-{}", system.name());
    let (mut proc, addr) = match system {
        System::Direct => {
            return Ok(Running {
                system,
                addr: None,
                proc: None,
            });
        }
        System::Mux(dp) => {
            if dp == Datapath::Ebpf && !is_root() {
                bail!("n/a (needs root)");
            }
            let config = write(dir, &format!("{name}.toml"), &mux_config(dp, routes, host))?;
            let mut proc = Proc::spawn(
                dir,
                name,
                Command::new(&bins.mux).arg("--config").arg(config),
                false,
            )?;
            let addr = proc.wait_ready(START_TIMEOUT, |_, err| listening_line(err))?;
            (proc, addr)
        }
        System::SslhFork | System::SslhSelect => {
            let port = free_port(host)?;
            let program = if system == System::SslhFork {
                "/usr/sbin/sslh"
            } else {
                "/usr/sbin/sslh-select"
            };
            let mut cmd = Command::new(program);
            // -f: stay in the foreground (and in our process group); -n: no DNS lookups.
            cmd.args(["-f", "-n", "-p", &SocketAddr::new(host, port).to_string()]);
            match routes {
                Routes::Any(b) => cmd.arg("--anyprot").arg(b.to_string()),
                Routes::SshHttp { ssh, http } => cmd
                    .arg("--ssh")
                    .arg(ssh.to_string())
                    .arg("--http")
                    .arg(http.to_string()),
                Routes::HttpPaths { main, .. } => cmd.arg("--http").arg(main.to_string()),
            };
            let mut proc = Proc::spawn(dir, name, &mut cmd, false)?;
            let addr = wait_listening(&mut proc, SocketAddr::new(host, port))?;
            (proc, addr)
        }
        System::HaproxyTcp | System::HaproxyHttp => {
            let port = free_port(host)?;
            let config = write(
                dir,
                &format!("{name}.cfg"),
                &haproxy_config(system, SocketAddr::new(host, port), routes),
            )?;
            // -db: foreground, no daemon; it then stays in our process group.
            let mut proc = Proc::spawn(
                dir,
                name,
                Command::new("haproxy").arg("-f").arg(config).arg("-db"),
                false,
            )?;
            let addr = wait_listening(&mut proc, SocketAddr::new(host, port))?;
            (proc, addr)
        }
        System::Caddy => {
            // The Caddyfile binds loopback, whatever `host` is.
            let port = free_port(IpAddr::from([127, 0, 0, 1]))?;
            let Routes::HttpPaths { main, embed } = routes else {
                bail!("n/a: caddy runs only the HTTP workload");
            };
            let config = write(
                dir,
                &format!("{name}.Caddyfile"),
                &caddyfile(port, main, embed),
            )?;
            let home = dir.join(format!("{name}-home"));
            std::fs::create_dir_all(&home)?;
            let mut proc = Proc::spawn(
                dir,
                name,
                Command::new("caddy")
                    .args(["run", "--adapter", "caddyfile", "--config"])
                    .arg(config)
                    // Caddy keeps state (autosave.json, certificates) under these: not ~.
                    .env("HOME", &home)
                    .env("XDG_DATA_HOME", home.join("data"))
                    .env("XDG_CONFIG_HOME", home.join("config")),
                false,
            )?;
            let addr = wait_listening(&mut proc, SocketAddr::from(([127, 0, 0, 1], port)))?;
            (proc, addr)
        }
    };
    // Some programs open their port and only then find a problem (HAProxy's fd limit).
    std::thread::sleep(POLL);
    proc.check_alive()?;
    Ok(Running {
        system,
        addr: Some(addr),
        proc: Some(proc),
    })
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn mux_config(dp: Datapath, routes: Routes, host: IpAddr) -> String {
    let datapath = match dp {
        Datapath::Auto => "auto",
        Datapath::Ebpf => "ebpf",
        Datapath::Splice => "splice",
        Datapath::Copy => "copy",
    };
    let route = |name: &str, protocol: &str, backend: SocketAddr| {
        format!(
            "\n[[route]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\nbackend = \"{backend}\"\n"
        )
    };
    let routes = match routes {
        Routes::Any(b) => route("any", "any", b),
        Routes::SshHttp { ssh, http } => route("ssh", "ssh", ssh) + &route("http", "http", http),
        // The Caddyfile, in mux's terms: routed per request.
        Routes::HttpPaths { main, embed } => {
            format!(
                "\n[[route]]\nname = \"embed\"\nprotocol = \"http\"\npath_prefix = \"/embedding-model/\"\n\
                 strip_prefix = true\nbackend = \"{embed}\"\n"
            ) + &route("http", "http", main)
        }
    };
    let listen = SocketAddr::new(host, 0);
    format!("listen = \"{listen}\"\ndatapath = \"{datapath}\"\n{routes}")
}

fn haproxy_config(system: System, bind: SocketAddr, routes: Routes) -> String {
    let mode = if system == System::HaproxyHttp {
        "http"
    } else {
        "tcp"
    };
    // No `maxconn`: HAProxy then sizes it from the open-file limit it is given, which is what
    // a packaged HAProxy does too. No `log`: none of the systems logs to a file here but mux.
    let mut cfg = format!(
        "global\n    nbthread 2\n\ndefaults\n    mode {mode}\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n"
    );
    if mode == "tcp" {
        cfg.push_str("    option splice-auto\n");
    }
    cfg.push_str(&format!("\nfrontend fe\n    bind {bind}\n"));
    let backends = match routes {
        Routes::Any(b) => {
            cfg.push_str("    default_backend main\n");
            vec![("main", b, "")]
        }
        Routes::SshHttp { ssh, http } => {
            // The usual HAProxy recipe for sslh's job: wait for the first bytes, match them.
            cfg.push_str(
                "    tcp-request inspect-delay 2s\n    acl ssh req.payload(0,4) -m str SSH-\n    tcp-request content accept if ssh\n    tcp-request content accept if HTTP\n    use_backend http if HTTP\n    default_backend ssh\n",
            );
            vec![("ssh", ssh, ""), ("http", http, "")]
        }
        Routes::HttpPaths { main, embed } => {
            // The same job as mux's and Caddy's defaults: both set X-Forwarded-For, -Proto and
            // -Host, which HAProxy does only when told.
            cfg.push_str(
                "    option forwardfor\n    http-request set-header X-Forwarded-Proto http\n    \
                 http-request set-header X-Forwarded-Host %[req.hdr(host)]\n",
            );
            cfg.push_str(
                "    acl embed path_beg /embedding-model/\n    use_backend embed if embed\n    default_backend main\n",
            );
            vec![
                ("main", main, ""),
                // In the backend, so that the frontend's ACL still saw the original path.
                (
                    "embed",
                    embed,
                    "    http-request replace-path ^/embedding-model(/.*)$ \\1\n",
                ),
            ]
        }
    };
    for (name, addr, extra) in backends {
        cfg.push_str(&format!("\nbackend {name}\n{extra}    server s1 {addr}\n"));
    }
    cfg
}

fn caddyfile(port: u16, main: SocketAddr, embed: SocketAddr) -> String {
    // admin off: no :2019 listener; auto_https off: plain HTTP on our port only; bind: loopback
    // only (a bare `:PORT` would listen on every interface).
    format!(
        "{{\n\tadmin off\n\tauto_https off\n}}\n\n:{port} {{\n\tbind 127.0.0.1\n\thandle_path /embedding-model/* {{\n\t\treverse_proxy {embed}\n\t}}\n\thandle {{\n\t\treverse_proxy {main}\n\t}}\n}}\n"
    )
}

// ---- backends and clients -----------------------------------------------------------------

/// A loadgen backend (`echo`, `banner`, `http`), on a port of its choosing.
pub struct Backend {
    pub addr: SocketAddr,
    _proc: Proc,
}

pub fn backend(dir: &Path, bins: &Bins, name: &str, mode: &[&str]) -> Result<Backend> {
    let mut proc = Proc::spawn(
        dir,
        name,
        Command::new(&bins.loadgen).args(mode).args([
            "--listen",
            "127.0.0.1:0",
            "--lifetime",
            "7200",
        ]),
        false,
    )?;
    let addr = proc.wait_ready(START_TIMEOUT, |out, _| listening_line(out))?;
    Ok(Backend { addr, _proc: proc })
}

/// `iperf3 -s`, bound to `host`.
pub fn iperf_server(dir: &Path, name: &str, host: IpAddr) -> Result<Backend> {
    let port = free_port(host)?;
    let mut proc = Proc::spawn(
        dir,
        name,
        Command::new("iperf3").args(["-s", "-B", &host.to_string(), "-p", &port.to_string()]),
        false,
    )?;
    let addr = wait_listening(&mut proc, SocketAddr::new(host, port))?;
    Ok(Backend { addr, _proc: proc })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_lines() {
        let mux = "[2026-11-26T13:45:34Z INFO  mux] listening on 127.0.0.1:35205\n";
        assert_eq!(
            listening_line(mux),
            Some("127.0.0.1:35205".parse().unwrap())
        );
        assert_eq!(
            listening_line("listening on [::1]:80\n"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(listening_line("starting\n"), None);
    }

    #[test]
    fn mux_gets_the_path_routes() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let host = "198.18.231.1".parse().unwrap();
        let cfg = mux_config(
            Datapath::Splice,
            Routes::HttpPaths { main: a, embed: b },
            host,
        );
        let embed = cfg.find("backend = \"127.0.0.1:2\"").unwrap();
        let main = cfg.find("backend = \"127.0.0.1:1\"").unwrap();
        assert!(
            embed < main,
            "the path route must come before the catch-all:\n{cfg}"
        );
        assert!(
            cfg.contains("path_prefix = \"/embedding-model/\"")
                && cfg.contains("strip_prefix = true")
        );
        assert!(cfg.contains("datapath = \"splice\""));
        assert!(cfg.starts_with("listen = \"198.18.231.1:0\"\n"));
    }

    #[test]
    fn haproxy_strips_the_prefix_in_the_backend() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let bind = "127.0.0.1:9".parse().unwrap();
        let cfg = haproxy_config(
            System::HaproxyHttp,
            bind,
            Routes::HttpPaths { main: a, embed: b },
        );
        let embed = cfg.split("\nbackend embed\n").nth(1).unwrap();
        assert!(embed.contains("replace-path"));
        assert!(embed.contains("server s1 127.0.0.1:2"));
        assert!(!cfg.contains("splice"));
        assert!(cfg.contains("\n    option forwardfor\n"));
        assert!(cfg.contains("\n    http-request set-header X-Forwarded-Host %[req.hdr(host)]\n"));
        assert!(cfg.contains("\n    bind 127.0.0.1:9\n"));
        assert!(haproxy_config(System::HaproxyTcp, bind, Routes::Any(a)).contains("splice-auto"));
    }

    #[test]
    fn killing_the_guard_kills_the_group() {
        let dir = std::env::temp_dir();
        // A group leader that forks a child, as sslh-fork does.
        let mut p = Proc::spawn(
            &dir,
            &format!("xtask-guard-test-{}", std::process::id()),
            Command::new("sh").args(["-c", "sleep 30 & sleep 30"]),
            false,
        )
        .unwrap();
        let pgid = p.pgid();
        let start = Instant::now();
        while procfs::group_pids(pgid).len() < 3 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(p.check_alive().is_ok());
        drop(p);
        // SIGKILL is delivered asynchronously; give the kernel a moment to finish them off.
        let start = Instant::now();
        while !procfs::group_pids(pgid).is_empty() && start.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(procfs::group_pids(pgid).is_empty());
        for ext in ["stdout", "stderr"] {
            let _ = std::fs::remove_file(
                dir.join(format!("xtask-guard-test-{}.{ext}", std::process::id())),
            );
        }
    }
}
