//! Test harness shared by the integration tests: the real mux binary on an
//! ephemeral loopback port, in-process backends, real peers (sshd, openssl).
#![allow(dead_code)] // each test binary uses a different part of it

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// True under CI, where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Whether a test that needs `what` can run. Under CI a missing requirement
/// fails the test: the suite must exercise everything there.
pub fn can_run(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if in_ci() {
        panic!("{what} is required under CI=true (cargo xtask test installs it)");
    }
    eprintln!("SKIPPED: {what} is not available on this machine");
    false
}

pub fn have_tool(name: &str) -> bool {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|d| d.join(name).is_file())
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A per-test scratch directory, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mux-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write scratch file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The mux binary under test, running until dropped.
pub struct Mux {
    proc: Logged,
    pub addr: SocketAddr,
    _scratch: Option<Scratch>,
}

pub fn mux_bin() -> &'static str {
    env!("CARGO_BIN_EXE_mux")
}

impl Mux {
    /// Runs mux on `config` (TOML). Its `listen` should be 127.0.0.1:0.
    pub fn with_config(config: &str) -> Result<Mux> {
        let scratch = Scratch::new("mux");
        let path = scratch.write("mux.toml", config);
        let mut mux = Mux::with_args(&["--config", path.to_str().unwrap()])?;
        mux._scratch = Some(scratch);
        Ok(mux)
    }

    /// Runs mux with these arguments and waits until it listens.
    pub fn with_args(args: &[&str]) -> Result<Mux> {
        Mux::spawn(Command::new(mux_bin()).args(args))
    }

    /// Runs mux on `config` under `wrapper`, a command that execs the rest
    /// of its arguments (e.g. setpriv dropping capabilities).
    pub fn with_config_under(wrapper: &[&str], config: &str) -> Result<Mux> {
        Mux::with_config_under_and(wrapper, config, &[])
    }

    /// The same, with more arguments after `--config FILE`.
    pub fn with_config_under_and(wrapper: &[&str], config: &str, args: &[&str]) -> Result<Mux> {
        let scratch = Scratch::new("mux");
        let path = scratch.write("mux.toml", config);
        let mut command = Command::new(wrapper[0]);
        command
            .args(&wrapper[1..])
            .arg(mux_bin())
            .arg("--config")
            .arg(&path)
            .args(args);
        let mut mux = Mux::spawn(&mut command)?;
        mux._scratch = Some(scratch);
        Ok(mux)
    }

    pub fn spawn(command: &mut Command) -> Result<Mux> {
        let mut mux = Mux {
            proc: Logged::spawn(command, "mux")?,
            addr: "0.0.0.0:0".parse().unwrap(),
            _scratch: None,
        };
        let line = mux.wait_log("listening on ", Duration::from_secs(10))?;
        let addr = line.rsplit("listening on ").next().unwrap().trim();
        mux.addr = addr.parse().with_context(|| format!("parsing `{addr}`"))?;
        Ok(mux)
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    pub fn logs(&self) -> Vec<String> {
        self.proc.logs()
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_log(&mut self, needle: &str, limit: Duration) -> Result<String> {
        self.proc.wait_log(needle, limit)
    }

    /// Like `wait_log`, for async tests (polls without blocking the runtime).
    pub async fn wait_log_async(&mut self, needle: &str, limit: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            match self.wait_log(needle, Duration::ZERO) {
                Ok(line) => return Ok(line),
                Err(e) if start.elapsed() > limit => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// SIGTERM, then waits (bounded) for the exit; returns the exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).context("pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.proc.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("mux did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.proc.child.try_wait(), Ok(None))
    }
}

/// A TOML config listening on an ephemeral loopback port, with these routes.
pub fn config(extra: &str, routes: &[(&str, &str, SocketAddr)]) -> String {
    let mut s = format!("listen = [\"127.0.0.1:0\"]\n{extra}\n");
    for (name, protocol, backend) in routes {
        s.push_str(&format!(
            "[[route]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\nbackend = \"{backend}\"\n"
        ));
    }
    s
}

/// A loopback listener whose connections are served by `handler`.
pub async fn backend<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(handler(s));
        }
    });
    addr
}

/// Hands every accepted connection to the test, which plays the backend.
pub async fn handing_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = backend(move |s| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(s);
        }
    })
    .await;
    (addr, rx)
}

/// A client of `mux` that sent `go`, and the backend's end of its
/// connection, handed over by [`handing_backend`].
pub async fn open_pair(
    mux: &Mux,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<TcpStream>,
) -> (TcpStream, TcpStream) {
    let mut client = TcpStream::connect(mux.addr).await.unwrap();
    client.write_all(b"go").await.unwrap();
    let backend = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    (client, backend)
}

/// Echoes everything, then closes when the client does.
pub async fn echo_backend() -> SocketAddr {
    backend(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// Says its name first (like an SSH server's banner), then echoes.
pub async fn banner_backend(name: &'static str) -> SocketAddr {
    backend(move |mut s| async move {
        let _ = s.write_all(format!("{name}\n").as_bytes()).await;
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// An HTTP/1.x backend answering every request with `<name> <path>`.
pub async fn http_backend(name: &'static str) -> SocketAddr {
    backend(move |mut s| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            let path = head.split_whitespace().nth(1).unwrap_or("?").to_string();
            let body = format!("{name} {path}\n");
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(response.as_bytes()).await.is_err() {
                return;
            }
            let lower = head.to_ascii_lowercase();
            if lower.contains("connection: close")
                || lower
                    .lines()
                    .next()
                    .is_some_and(|l| l.ends_with("http/1.0"))
            {
                return;
            }
        }
    })
    .await
}

/// Records the sha256 and length of everything it receives, sends `send`
/// bytes of a deterministic stream meanwhile, and closes its write side when
/// both are done. Results arrive on the returned channel.
pub async fn hashing_backend(
    send: u64,
    seed: u64,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(u64, String)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = backend(move |s| {
        let tx = tx.clone();
        async move {
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                let sent = write_stream(&mut w, send, seed, false).await;
                let _ = w.shutdown().await;
                sent
            });
            let got = read_hash(&mut r).await;
            let _ = writer.await;
            let _ = tx.send(got);
        }
    })
    .await;
    (addr, rx)
}

/// A fast deterministic byte stream (xorshift), the same for a given seed.
pub struct Stream {
    state: u64,
}

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream { state: seed | 1 }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.state = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }

    pub fn below(&mut self, n: u64) -> u64 {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b) % n
    }
}

/// sha256 of `len` bytes of `Stream::new(seed)` written in the same sized
/// pieces as `write_stream`.
pub fn stream_sha256(len: u64, seed: u64) -> String {
    prefixed_stream_sha256(b"", len, seed)
}

/// sha256 of `prefix` followed by `len` bytes of `Stream::new(seed)`.
pub fn prefixed_stream_sha256(prefix: &[u8], len: u64, seed: u64) -> String {
    let mut s = Stream::new(seed);
    let mut h = Sha256::new();
    h.update(prefix);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    hex(&h.finalize())
}

/// Writes `len` bytes of `Stream::new(seed)`; with `jitter`, in random sizes
/// with occasional pauses. Returns bytes written (less on error).
pub async fn write_stream<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    len: u64,
    seed: u64,
    jitter: bool,
) -> u64 {
    let mut s = Stream::new(seed);
    let mut rng = Stream::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while sent < len {
        let n = (len - sent).min(buf.len() as u64) as usize;
        s.fill(&mut buf[..n]);
        let mut piece = &buf[..n];
        while !piece.is_empty() {
            let k = if jitter {
                1 + rng.below(piece.len() as u64) as usize
            } else {
                piece.len()
            };
            if w.write_all(&piece[..k]).await.is_err() {
                return sent;
            }
            sent += k as u64;
            piece = &piece[k..];
            if jitter && rng.below(64) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    sent
}

/// Reads to EOF; returns (length, sha256).
pub async fn read_hash<R: AsyncReadExt + Unpin>(r: &mut R) -> (u64, String) {
    read_hash_paced(r, 256 * 1024, None).await
}

/// Reads to EOF at most `piece` bytes at a time, with `pause` after each
/// read if given (a client that checks as it goes, or a slow one); returns
/// (length, sha256).
pub async fn read_hash_paced<R: AsyncReadExt + Unpin>(
    r: &mut R,
    piece: usize,
    pause: Option<Duration>,
) -> (u64, String) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; piece];
    let mut total = 0;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
        }
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    (total, hex(&h.finalize()))
}

pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Connects, writes `request`, optionally half-closes, reads to EOF (bounded).
pub async fn exchange(addr: SocketAddr, request: &[u8], half_close: bool) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    if half_close {
        s.shutdown().await?;
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
    Ok(out)
}

/// Runs a command to completion with a time limit; returns (status, stdout, stderr).
pub fn run(
    cmd: &mut Command,
    limit: Duration,
) -> Result<(std::process::ExitStatus, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let start = Instant::now();
    loop {
        if let Some(_status) = child.try_wait()? {
            let out = child.wait_with_output()?;
            return Ok((
                out.status,
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{cmd:?} did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A background process killed on drop (sshd, openssl s_server ...).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago, for peers that cannot report the port
/// they bound (sshd). The race is tolerated by retrying their start.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts on `addr`.
pub fn wait_listening(addr: SocketAddr, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A real OpenSSH server on loopback with a fresh host key, accepting one
/// freshly generated client key for root.
pub struct Sshd {
    _proc: Proc,
    pub addr: SocketAddr,
    pub client_key: PathBuf,
    _scratch: Scratch,
}

impl Sshd {
    /// On 127.0.0.1, on a free port.
    pub fn start() -> Result<Sshd> {
        for _attempt in 0..5 {
            let port = free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            if let Some(sshd) = Sshd::start_with(&[], port, &["127.0.0.1"], || {
                wait_listening(addr, Duration::from_secs(5))
            })? {
                return Ok(Sshd { addr, ..sshd });
            }
        }
        bail!("sshd did not start")
    }

    /// Under `wrapper` (e.g. `ip netns exec NS`), on `port` of `listen`;
    /// `None` if `ready` never said it was listening.
    pub fn start_with(
        wrapper: &[&str],
        port: u16,
        listen: &[&str],
        ready: impl FnOnce() -> bool,
    ) -> Result<Option<Sshd>> {
        let scratch = Scratch::new("sshd");
        let host_key = scratch.path("host_ed25519");
        let client_key = scratch.path("client_ed25519");
        for key in [&host_key, &client_key] {
            let (st, _, err) = run(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(key),
                Duration::from_secs(10),
            )?;
            anyhow::ensure!(st.success(), "ssh-keygen: {err}");
        }
        let authorized = scratch.path("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized)?;
        // sshd's privilege separation directory; Debian creates it at boot.
        std::fs::create_dir_all("/run/sshd")?;
        let listen: String = listen
            .iter()
            .map(|a| format!("ListenAddress {a}\n"))
            .collect();
        let config = scratch.write(
            "sshd_config",
            &format!(
                "Port {port}\n{listen}HostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n",
                host_key.display(),
                authorized.display()
            ),
        );
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(sshd_path());
                c
            }
            None => Command::new(sshd_path()),
        };
        let child = command
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning sshd")?;
        let proc = Proc(child);
        if !ready() {
            return Ok(None);
        }
        Ok(Some(Sshd {
            _proc: proc,
            addr: format!("127.0.0.1:{port}").parse()?,
            client_key,
            _scratch: scratch,
        }))
    }

    /// `ssh` arguments that log in as root on 127.0.0.1 with the test key,
    /// host key unchecked.
    pub fn ssh_args(&self, port: u16) -> Vec<String> {
        self.ssh_args_to("127.0.0.1", port)
    }

    /// The same, to `host`.
    pub fn ssh_args_to(&self, host: &str, port: u16) -> Vec<String> {
        let mut args = ssh_options(&self.client_key);
        args.extend(["-p".into(), port.to_string(), format!("root@{host}")]);
        args
    }
}

/// ssh options for a batch login with `key`, the host key unchecked; the
/// port and destination follow.
pub fn ssh_options(key: &Path) -> Vec<String> {
    [
        "-i",
        key.to_str().unwrap(),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn sshd_path() -> &'static str {
    "/usr/sbin/sshd"
}

/// A self-signed certificate and key for `cn`, written into `dir`.
pub fn certificate(dir: &Scratch, cn: &str) -> Result<(PathBuf, PathBuf)> {
    let cert = dir.path(&format!("{cn}.crt"));
    let key = dir.path(&format!("{cn}.key"));
    let (st, _, err) = run(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
            ])
            .arg("-subj")
            .arg(format!("/CN={cn}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(20),
    )?;
    anyhow::ensure!(st.success(), "openssl req: {err}");
    Ok((cert, key))
}

/// `openssl s_server -www` on an ephemeral port with this certificate.
pub fn tls_server(cert: &Path, key: &Path) -> Result<(Proc, SocketAddr)> {
    let mut child = Command::new("openssl")
        .args(["s_server", "-accept", "127.0.0.1:0", "-www", "-cert"])
        .arg(cert)
        .arg("-key")
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("ACCEPT ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .context("s_server did not report its port")?;
    Ok((proc, addr.parse()?))
}

/// The client sends its request and shuts its write side; the backend reads
/// to EOF, only then answers (1 MiB) and closes. The client gets it all.
/// `start` runs mux with the given routes, the way the test wants it.
pub async fn client_half_close(start: impl Fn(&[(&str, &str, SocketAddr)]) -> Mux) {
    let backend = backend(|mut s| async move {
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap();
        let answer = format!("{}:{}", request.len(), sha256(&request));
        s.write_all(answer.as_bytes()).await.unwrap();
        let mut filler = vec![0u8; 1 << 20];
        Stream::new(5).fill(&mut filler);
        s.write_all(&filler).await.unwrap();
    })
    .await;
    let mux = start(&[("any", "any", backend)]);
    let request = b"half-close request: the answer comes only after my FIN".repeat(1000);
    let out = exchange(mux.addr, &request, true).await.unwrap();
    let expect = format!("{}:{}", request.len(), sha256(&request));
    assert!(
        out.starts_with(expect.as_bytes()),
        "answer head: {:?}",
        String::from_utf8_lossy(&out[..out.len().min(80)])
    );
    assert_eq!(out.len(), expect.len() + (1 << 20));
}

/// The backend speaks first and shuts its write side at once; the client,
/// having seen EOF, still sends, and the backend still receives all of it.
pub async fn backend_half_close(start: impl Fn(&[(&str, &str, SocketAddr)]) -> Mux) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            s.write_all(b"bye\n").await.unwrap();
            s.shutdown().await.unwrap();
            let _ = tx.send(read_hash(&mut s).await);
        }
    })
    .await;
    let mux = start(&[("ssh", "ssh", backend)]);
    let mut s = TcpStream::connect(mux.addr).await.unwrap();
    let mut payload = b"SSH-2.0-client\r\n".to_vec();
    s.write_all(&payload).await.unwrap();
    let mut greeting = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, b"bye\n");
    let mut more = vec![0u8; 4 << 20];
    Stream::new(6).fill(&mut more);
    s.write_all(&more).await.unwrap();
    s.shutdown().await.unwrap();
    payload.extend_from_slice(&more);
    let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, (payload.len() as u64, sha256(&payload)));
}

/// The side of a pair that goes away in [`reset_after_fin`].
#[derive(Clone, Copy, Debug)]
pub enum Leaver {
    Client,
    Backend,
}

/// On a pair from [`open_pair`] (`go` not yet read by the backend), the
/// leaver sends its FIN, which reaches the other side, then resets while
/// the other side stays quiet. mux must end the pair on its own (its log
/// line names the side that went away and `datapath`) and close the quiet
/// side's connection. A quiet backend is reset: its very first send fails
/// (after a plain close it would be taken, and fail only later). A quiet
/// client gets a plain close, which keeps what was still on its way to it:
/// a send of its fails within a second.
pub async fn reset_after_fin(
    mux: &mut Mux,
    client: TcpStream,
    mut backend: TcpStream,
    leaver: Leaver,
    datapath: &str,
) {
    // What the quiet side still has to read before the leaver's FIN.
    let (mut leaving, mut quiet, unread, gone): (_, _, &[u8], _) = match leaver {
        Leaver::Client => (client, backend, b"go", "the client went away"),
        Leaver::Backend => {
            let mut request = [0u8; 2];
            backend.read_exact(&mut request).await.unwrap();
            (backend, client, b"", "the backend went away")
        }
    };
    leaving.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), quiet.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("the {leaver:?}'s FIN never reached the other side"))
        .unwrap();
    assert_eq!(rest, unread);
    leaving.set_zero_linger().unwrap();
    drop(leaving);
    let line = mux
        .wait_log_async(gone, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| {
            panic!("mux never ended the pair ({leaver:?} reset after its FIN): {e:#}")
        });
    assert!(line.contains(&format!("datapath={datapath}")), "{line}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    match leaver {
        Leaver::Client => {
            let sent = quiet.try_write(b"anyone?");
            assert!(sent.is_err(), "the backend was not reset: {sent:?}");
        }
        Leaver::Backend => {
            let start = Instant::now();
            while quiet.try_write(b"anyone?").is_ok() {
                assert!(
                    start.elapsed() < Duration::from_secs(1),
                    "mux still takes the client's bytes"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// An HTTP CONNECT sent to mux: the answer's head, and the socket after it.
pub struct Connected {
    /// The status line, without its CRLF.
    pub status: String,
    /// The whole head, status line included, up to the blank line.
    pub head: String,
    pub stream: std::net::TcpStream,
    /// Bytes that arrived after the head in the same reads.
    pub early: Vec<u8>,
}

/// Sends `CONNECT authority` with `auth` as its Proxy-Authorization value
/// (e.g. `Bearer TOKEN`) and `pipelined` in the same write, then reads the
/// answer's head, all within `limit`.
pub fn http_connect(
    addr: SocketAddr,
    authority: &str,
    auth: Option<&str>,
    pipelined: &[u8],
    limit: Duration,
) -> Result<Connected> {
    use std::io::{Read, Write};
    let start = Instant::now();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, limit)
        .with_context(|| format!("connecting to {addr}"))?;
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = auth {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(pipelined);
    stream.write_all(&bytes)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            bail!(
                "no answer head to CONNECT {authority} within {limit:?}; got {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => bail!(
                "connection closed before an answer head to CONNECT {authority}; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "reading the answer to CONNECT {authority}; got {:?}",
                        String::from_utf8_lossy(&buf)
                    )
                });
            }
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let early = buf[end + 4..].to_vec();
    stream.set_read_timeout(None)?;
    Ok(Connected {
        status: head.lines().next().unwrap_or("").to_string(),
        head,
        stream,
        early,
    })
}

impl Connected {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// The status code.
    pub fn code(&self) -> u16 {
        self.status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    /// The body of a refusal: Content-Length bytes if given, else up to EOF,
    /// within 5 s.
    pub fn body(mut self) -> Result<String> {
        use std::io::Read;
        let want = self
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok());
        let mut body = std::mem::take(&mut self.early);
        let start = Instant::now();
        let mut chunk = [0u8; 4096];
        while want.is_none_or(|w| body.len() < w) {
            let left = Duration::from_secs(5).saturating_sub(start.elapsed());
            if left.is_zero() {
                bail!(
                    "refusal body not complete within 5 s: {:?}",
                    String::from_utf8_lossy(&body)
                );
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Reads until `n` bytes have come after the head (counting `early`),
    /// within `limit`, and returns them: what an echo target sends back for
    /// bytes pipelined with the CONNECT, which may or may not have arrived
    /// with the answer.
    pub fn read_early(&mut self, n: usize, limit: Duration) -> Result<Vec<u8>> {
        use std::io::Read;
        let start = Instant::now();
        let mut chunk = vec![0u8; n.max(1)];
        while self.early.len() < n {
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                bail!("{} of {n} bytes within {limit:?}", self.early.len());
            }
            self.stream.set_read_timeout(Some(left))?;
            let want = n - self.early.len();
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => bail!("EOF after {} of {n} bytes", self.early.len()),
                Ok(k) => self.early.extend_from_slice(&chunk[..k]),
                Err(e) => return Err(e).context("reading"),
            }
        }
        let rest = self.early.split_off(n);
        Ok(std::mem::replace(&mut self.early, rest))
    }

    /// Writes `data` and reads back as many bytes (an echo target), within
    /// `limit`; returns what came back, after any `early` bytes.
    pub fn echo(&mut self, data: &[u8], limit: Duration) -> Result<Vec<u8>> {
        use std::io::{Read, Write};
        let mut got = std::mem::take(&mut self.early);
        let want = got.len() + data.len();
        let mut writer = self.stream.try_clone()?;
        let data = data.to_vec();
        // Written from another thread: the echo can fill both socket buffers.
        let w = std::thread::spawn(move || writer.write_all(&data));
        let start = Instant::now();
        let mut chunk = vec![0u8; 64 * 1024];
        while got.len() < want {
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                bail!("echo: {} of {want} bytes within {limit:?}", got.len());
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("echo: EOF after {} of {want} bytes", got.len()),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e).context("echo: reading"),
            }
        }
        w.join().unwrap()?;
        Ok(got)
    }
}

/// A background process whose stderr lines are kept (mux agent); SIGKILLed
/// on drop.
pub struct Logged {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    /// Spawns `command` with mux's log settings, stderr captured under `tag`.
    pub fn spawn(command: &mut Command, tag: &'static str) -> Result<Logged> {
        let mut child = command
            .env("RUST_LOG", "info,mux=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("MUX_TEST_ECHO").is_some() {
                    eprintln!("{tag}| {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Logged { child, logs })
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_log(&mut self, needle: &str, limit: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some(line) = self.logs().into_iter().find(|l| l.contains(needle)) {
                return Ok(line);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // The last lines may still be on their way from the pipe.
                std::thread::sleep(Duration::from_millis(50));
                if let Some(line) = self.logs().into_iter().find(|l| l.contains(needle)) {
                    return Ok(line);
                }
                bail!(
                    "exited ({status}) before logging `{needle}`; log:\n{}",
                    self.logs().join("\n")
                );
            }
            if start.elapsed() > limit {
                bail!(
                    "no log line with `{needle}` within {limit:?}; log:\n{}",
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and waits for the exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `logs()` holds at least `n` lines containing `needle`.
pub fn wait_lines(
    logs: impl Fn() -> Vec<String>,
    needle: &str,
    n: usize,
    limit: Duration,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let lines = logs();
        if lines.iter().filter(|l| l.contains(needle)).count() >= n {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!(
                "fewer than {n} log lines with `{needle}` within {limit:?}; log:\n{}",
                lines.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command fed `input` on stdin (then closed), with a time limit;
/// returns (status, stdout, stderr).
pub fn run_with_input(
    cmd: &mut Command,
    input: Vec<u8>,
    limit: Duration,
) -> Result<(std::process::ExitStatus, Vec<u8>, String)> {
    use std::io::{Read, Write};
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let err = err.join().unwrap();
            bail!(
                "{cmd:?} did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    Ok((
        status,
        out.join().unwrap(),
        String::from_utf8_lossy(&err.join().unwrap()).into_owned(),
    ))
}
