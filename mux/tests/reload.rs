//! Reloading a running mux (SIGHUP, the admin endpoint, `mux reload`): new
//! connections follow the new file, streams under way are not disturbed, a
//! bad file changes nothing, and listeners come and go with the file.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const BANNER: &[u8] = b"SSH-2.0-test\r\n";
const MIB: u64 = 1 << 20;

/// Sends SIGHUP to mux. Its handler is in place before it listens (a
/// SIGHUP during set-up must not kill it), which /proc shows.
fn hup(mux: &Mux) -> Result<()> {
    ensure!(
        catches_sighup(mux.pid())?,
        "mux listens but does not catch SIGHUP"
    );
    let pid = rustix::process::Pid::from_raw(mux.pid() as i32).context("pid")?;
    rustix::process::kill_process(pid, rustix::process::Signal::HUP)?;
    Ok(())
}

fn catches_sighup(pid: u32) -> Result<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .context("no SigCgt in /proc/PID/status")?;
    // Bit n-1 stands for signal n; SIGHUP is 1.
    Ok(u64::from_str_radix(mask.trim(), 16)? & 1 == 1)
}

/// Waits (without blocking the runtime) until mux has logged `n` lines
/// containing `needle`.
async fn wait_count(mux: &Mux, needle: &str, n: usize, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let logs = mux.logs();
        if logs.iter().filter(|l| l.contains(needle)).count() >= n {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!(
                "fewer than {n} log lines with `{needle}` within {limit:?}; log tail:\n{}",
                logs[logs.len().saturating_sub(40)..].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fresh HTTP request through `addr`: the body of its 200 answer, which
/// `http_backend` makes `<name> /x`.
async fn served_by(addr: SocketAddr) -> Result<String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("no answer through {addr} within 10 s"))??;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP answer through {addr}: {text:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200 "), "answer: {text:?}");
    Ok(body.trim_end().to_string())
}

/// The web route first so that mux's route table names it in every config;
/// the ssh route sits behind it unchanged.
fn web_and_ssh(web: SocketAddr, ssh: SocketAddr) -> String {
    config("", &[("web", "http", web), ("ssh", "ssh", ssh)])
}

/// Writes `len` bytes of `Stream::new(seed)` in random pieces, spread evenly
/// over `over`, so that a stream outlives everything the test does meanwhile.
/// The stream is filled 64 KiB at a time, as `prefixed_stream_sha256` does.
async fn paced_stream<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    len: u64,
    seed: u64,
    over: Duration,
) -> u64 {
    let mut s = Stream::new(seed);
    let mut rng = Stream::new(seed ^ 0x5bd1_e995);
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < len {
        let n = (len - sent).min(buf.len() as u64) as usize;
        s.fill(&mut buf[..n]);
        let mut piece = &buf[..n];
        while !piece.is_empty() {
            let k = 1 + rng.below(piece.len() as u64) as usize;
            if w.write_all(&piece[..k]).await.is_err() {
                return sent;
            }
            sent += k as u64;
            piece = &piece[k..];
            let due = over.mul_f64(sent as f64 / len as f64);
            if let Some(ahead) = due.checked_sub(start.elapsed())
                && ahead > Duration::from_millis(2)
            {
                tokio::time::sleep(ahead).await;
            }
        }
    }
    sent
}

/// Reads to EOF; returns (length, sha256). Says so on `first` as soon as a
/// byte arrives, i.e. once mux relays this connection.
async fn read_hash_telling<R: AsyncReadExt + Unpin>(
    r: &mut R,
    first: mpsc::UnboundedSender<()>,
) -> (u64, String) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if total == 0 {
                    let _ = first.send(());
                }
                h.update(&buf[..n]);
                total += n as u64;
            }
        }
    }
    (total, hex(&h.finalize()))
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_under_load_keeps_every_stream_and_moves_new_connections() {
    const STREAMS: u64 = 200;
    const RELOADS: usize = 20;
    const DOWN: u64 = 2 * MIB;
    const DOWN_SEED: u64 = 77;
    // Long enough to outlast setup and all reloads on a busy 2-core box.
    const PACE: Duration = Duration::from_secs(12);
    let test_start = Instant::now();
    let a = http_backend("A").await;
    let b = http_backend("B").await;
    let (ssh, mut uploads) = hashing_backend(DOWN, DOWN_SEED).await;
    let dir = Scratch::new("reload-load");
    let file = dir.write("mux.toml", &web_and_ssh(a, ssh));
    let mut mux = Mux::with_args(&["--config", file.to_str().unwrap()]).unwrap();
    assert_eq!(served_by(mux.addr).await.unwrap(), "A /x");

    // Distinct lengths between 2 and 4 MiB, so every backend result is
    // told apart even though they arrive in any order.
    let upload_len = |i: u64| 2 * MIB + (i * 104_729) % (2 * MIB);
    let (first_tx, mut first) = mpsc::unbounded_channel();
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let (addr, first_tx) = (mux.addr, first_tx.clone());
        let len = upload_len(i);
        streams.spawn(async move {
            let (mut r, mut w) = TcpStream::connect(addr).await?.into_split();
            w.write_all(BANNER).await?;
            let reader = tokio::spawn(async move { read_hash_telling(&mut r, first_tx).await });
            let sent = paced_stream(&mut w, len, 1000 + i, PACE).await;
            w.shutdown().await?;
            let upload_done = Instant::now();
            let down = reader.await?;
            anyhow::Ok((i, sent, upload_done, down))
        });
    }
    drop(first_tx);
    // Every stream is relayed (its backend speaks) before the first reload,
    // so all of them started under the first configuration.
    tokio::time::timeout(Duration::from_secs(20), async {
        for _ in 0..STREAMS {
            first
                .recv()
                .await
                .expect("a stream ended before its first byte");
        }
    })
    .await
    .expect("not every stream was relayed within 20 s");

    for k in 1..=RELOADS {
        let (name, web) = if k % 2 == 1 { ("B", b) } else { ("A", a) };
        std::fs::write(&file, web_and_ssh(web, ssh)).unwrap();
        hup(&mux).unwrap();
        wait_count(&mux, "reload: ", k, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            served_by(mux.addr).await.unwrap(),
            format!("{name} /x"),
            "a new HTTP connection after reload {k}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reloads_done = Instant::now();
    assert!(mux.alive());

    let results = tokio::time::timeout(Duration::from_secs(40), async {
        let mut all = Vec::new();
        while let Some(r) = streams.join_next().await {
            all.push(r.unwrap().unwrap());
        }
        all
    })
    .await
    .expect("the streams did not all finish within 40 s");
    assert_eq!(results.len() as u64, STREAMS);
    let down_sha = stream_sha256(DOWN, DOWN_SEED);
    for (i, sent, upload_done, down) in &results {
        assert_eq!(*sent, upload_len(*i), "stream {i}: upload cut short");
        assert!(
            *upload_done > reloads_done,
            "stream {i} finished before the last reload: the test did not load the reloads"
        );
        assert_eq!(
            down,
            &(DOWN, down_sha.clone()),
            "stream {i}: backend to client"
        );
    }
    let mut got = tokio::time::timeout(Duration::from_secs(20), async {
        let mut got = Vec::new();
        while got.len() < STREAMS as usize {
            got.push(uploads.recv().await.unwrap());
        }
        got
    })
    .await
    .expect("the backend did not see every stream end");
    let mut want = tokio::task::spawn_blocking(move || {
        (0..STREAMS)
            .map(|i| {
                let len = upload_len(i);
                (
                    BANNER.len() as u64 + len,
                    prefixed_stream_sha256(BANNER, len, 1000 + i),
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    got.sort();
    want.sort();
    assert!(
        got == want,
        "client to backend: some stream arrived altered"
    );

    let logs = mux.logs();
    assert!(
        !logs.iter().any(|l| l.contains("reload refused")),
        "{logs:#?}"
    );
    assert!(!logs.iter().any(|l| l.contains("panicked")), "{logs:#?}");
    let relayed = logs
        .iter()
        .filter(|l| l.contains(" route=ssh ") && l.contains(&format!("backend={ssh}")))
        .count();
    assert_eq!(relayed as u64, STREAMS, "one relay line per stream");
    eprintln!("took {:?}", test_start.elapsed());
}

/// `mux reload --admin ADDR`: (exit status, stdout, stderr).
async fn mux_reload(admin: &str) -> Result<(std::process::ExitStatus, String, String)> {
    let admin = admin.to_string();
    tokio::task::spawn_blocking(move || {
        run(
            Command::new(mux_bin()).args(["reload", "--admin", &admin]),
            Duration::from_secs(30),
        )
    })
    .await?
}

fn admin_addr(line: &str) -> Result<String> {
    let after = line
        .split_once("http://")
        .with_context(|| format!("no address in {line:?}"))?
        .1;
    Ok(after.trim_end().trim_end_matches("/metrics").to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_config_is_refused_and_the_old_one_keeps_serving() {
    let a = http_backend("A").await;
    let b = http_backend("B").await;
    let ssh = banner_backend("SSH-2.0-backend").await;
    let with_admin = |web| {
        config(
            "admin = \"127.0.0.1:0\"",
            &[("web", "http", web), ("ssh", "ssh", ssh)],
        )
    };
    let dir = Scratch::new("reload-bad");
    let file = dir.write("mux.toml", &with_admin(a));
    let mut mux = Mux::with_args(&["--config", file.to_str().unwrap()]).unwrap();
    let admin = admin_addr(
        &mux.wait_log_async("admin: metrics on ", Duration::from_secs(5))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(served_by(mux.addr).await.unwrap(), "A /x");

    // Not TOML at all, by SIGHUP.
    std::fs::write(&file, "listen = [\"127.0.0.1:0\"\n[[route]] name = ").unwrap();
    hup(&mux).unwrap();
    let refused = mux
        .wait_log_async("reload refused", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        refused.contains(file.to_str().unwrap()),
        "the refusal names the file: {refused}"
    );
    assert_eq!(served_by(mux.addr).await.unwrap(), "A /x");
    assert_still_ssh(mux.addr).await;

    // Valid TOML, invalid route, through the admin endpoint.
    std::fs::write(
        &file,
        with_admin(b).replace("protocol = \"http\"", "protocol = \"gopher\""),
    )
    .unwrap();
    let (status, out, err) = mux_reload(&admin).await.unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "mux reload: stdout {out:?} stderr {err:?}"
    );
    assert!(
        err.contains("gopher"),
        "the error says what is wrong: {err:?}"
    );
    assert!(
        err.contains("422"),
        "the admin endpoint refused it: {err:?}"
    );
    wait_count(&mux, "reload refused", 2, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(served_by(mux.addr).await.unwrap(), "A /x");
    assert_still_ssh(mux.addr).await;

    std::fs::write(&file, with_admin(b)).unwrap();
    let (status, out, err) = mux_reload(&admin).await.unwrap();
    assert!(
        status.success(),
        "mux reload: stdout {out:?} stderr {err:?}"
    );
    assert!(out.starts_with("reloaded: 2 route(s)"), "{out:?}");
    assert_eq!(served_by(mux.addr).await.unwrap(), "B /x");
    assert_still_ssh(mux.addr).await;
    wait_count(&mux, "reload: 2 route(s)", 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(mux.alive());
}

/// The ssh route, unchanged by every config here, still reaches its backend.
async fn assert_still_ssh(addr: SocketAddr) {
    let out = exchange(addr, b"SSH-2.0-client\r\n", true).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out),
        "SSH-2.0-backend\nSSH-2.0-client\r\n"
    );
}

fn listen_on(ports: &[u16], web: SocketAddr) -> String {
    let specs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    listening(&specs, web)
}

fn listening(specs: &[String], web: SocketAddr) -> String {
    let listen: Vec<String> = specs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "listen = [{}]\n[[route]]\nname = \"web\"\nprotocol = \"http\"\nbackend = \"{web}\"\n",
        listen.join(", ")
    )
}

/// mux on a fixed free port (a `:0` address means "the port it already
/// got" to a reload, which would blur adding and removing).
fn mux_on_free_port(file: &Path, web: SocketAddr) -> Result<(Mux, u16)> {
    for _attempt in 0..5 {
        let port = free_port();
        std::fs::write(file, listen_on(&[port], web))?;
        // Someone may have taken the port meanwhile: then mux exits; retry.
        if let Ok(mux) = Mux::with_args(&["--config", file.to_str().unwrap()]) {
            return Ok((mux, port));
        }
    }
    bail!("mux did not start on a free port in 5 attempts")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_can_add_a_listener() {
    let web = http_backend("web").await;
    let dir = Scratch::new("reload-listen");
    let file = dir.path("mux.toml");
    let (mut mux, first) = mux_on_free_port(&file, web).unwrap();
    let first_addr: SocketAddr = format!("127.0.0.1:{first}").parse().unwrap();
    assert_eq!(mux.addr, first_addr);

    // Another process may take the free port before mux binds it; mux then
    // refuses the reload, and another port is tried.
    let mut second = 0;
    for attempt in 0..5 {
        second = free_port();
        std::fs::write(&file, listen_on(&[first, second], web)).unwrap();
        hup(&mux).unwrap();
        let start = Instant::now();
        let count = |needle: &str| mux.logs().iter().filter(|l| l.contains(needle)).count();
        while count("reload: ") == 0 && count("reload refused") == attempt {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no reload outcome within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if count("reload: ") == 1 {
            break;
        }
    }
    let second_addr: SocketAddr = format!("127.0.0.1:{second}").parse().unwrap();
    let line = mux
        .wait_log_async("reload: ", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        line.contains(&format!("now listening on {second_addr}")),
        "{line}"
    );
    assert_eq!(served_by(second_addr).await.unwrap(), "web /x");
    assert_eq!(served_by(first_addr).await.unwrap(), "web /x");

    std::fs::write(&file, listen_on(&[first], web)).unwrap();
    hup(&mux).unwrap();
    wait_count(&mux, "reload: ", 2, Duration::from_secs(10))
        .await
        .unwrap();
    let line = mux
        .logs()
        .into_iter()
        .rfind(|l| l.contains("reload: "))
        .unwrap();
    assert!(
        line.contains(&format!("no longer listening on {second_addr}")),
        "{line}"
    );
    refused_soon(second_addr).await.unwrap();
    assert_eq!(served_by(first_addr).await.unwrap(), "web /x");
    assert!(mux.alive());
}

/// A reload that changes the data path and `max_kernel_bulk` applies the
/// rest, says that those two take a restart, and serves on as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_keeps_the_data_path_and_says_so() {
    let web = http_backend("web").await;
    let dir = Scratch::new("reload-datapath");
    let file = dir.path("mux.toml");
    let (mut mux, port) = mux_on_free_port(&file, web).unwrap();
    let config = format!(
        "datapath = \"copy\"\nmax_kernel_bulk = 3\n{}",
        listen_on(&[port], web)
    );
    std::fs::write(&file, config).unwrap();
    hup(&mux).unwrap();
    // The last of the lines this reload logs.
    wait_count(&mux, "reload: 1 route(s)", 1, Duration::from_secs(10))
        .await
        .unwrap();
    let logs = mux.logs();
    for says in [
        "reload: datapath auto -> copy takes a restart; keeping auto",
        "reload: a new max_kernel_bulk takes a restart",
    ] {
        assert!(logs.iter().any(|l| l.contains(says)), "{says}: {logs:#?}");
    }
    assert_eq!(served_by(mux.addr).await.unwrap(), "web /x");
    assert!(mux.alive());
}

/// Waits until connecting to `addr` is refused: the workers drop their
/// sockets on their own time after mux logs the reload.
async fn refused_soon(addr: SocketAddr) -> Result<()> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(()),
            Err(e) => bail!("connecting to the dropped listener {addr}: {e}"),
            Ok(_) if start.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(_) => bail!("{addr} still accepts 5 s after a reload dropped it"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]

async fn a_reload_drops_a_listener_added_next_to_a_port_zero_one() {
    let web = http_backend("web").await;
    let dir = Scratch::new("reload-listen0");
    let zero = "127.0.0.1:0".to_string();
    let file = dir.write("mux.toml", &listening(std::slice::from_ref(&zero), web));
    let mux = Mux::with_args(&["--config", file.to_str().unwrap()]).unwrap();
    let second_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(
        &file,
        listening(&[zero.clone(), second_addr.to_string()], web),
    )
    .unwrap();
    hup(&mux).unwrap();
    wait_count(&mux, "reload: ", 1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(served_by(second_addr).await.unwrap(), "web /x");

    std::fs::write(&file, listening(&[zero], web)).unwrap();
    hup(&mux).unwrap();
    wait_count(&mux, "reload: ", 2, Duration::from_secs(10))
        .await
        .unwrap();
    refused_soon(second_addr).await.unwrap();
    assert_eq!(served_by(mux.addr).await.unwrap(), "web /x");
}

/// Whether mux's end of the connection from local port `client` to mux's
/// `port` runs a keepalive timer, as `ss` shows it.
fn keepalive_timer(port: u16, client: u16) -> bool {
    let filter = format!("( sport = :{port} and dport = :{client} )");
    let (status, out, err) = run(
        Command::new("ss").args(["-tnoH", "state", "established", &filter]),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(status.success() && !out.trim().is_empty(), "ss: {out}{err}");
    out.contains("timer:(keepalive")
}

/// Client connections have TCP keepalive unless the file says
/// `tcp_keepalive = false`, and a reload that changes it applies to the
/// connections accepted from then on (the listening sockets pass it on).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_changes_tcp_keepalive_for_new_connections() {
    assert!(can_run("ss (iproute2)", have_tool("ss")));
    let web = http_backend("web").await;
    let dir = Scratch::new("reload-keepalive");
    let file = dir.path("mux.toml");
    let (mut mux, port) = mux_on_free_port(&file, web).unwrap();
    let mut held = Vec::new();
    // The default first, then what each turn set.
    let mut was = true;
    for (n, (line, says, timer)) in [
        ("tcp_keepalive = false\n", "tcp keepalive off", false),
        (
            "tcp_keepalive = \"20s\"\n",
            "tcp keepalive after 20s silent",
            true,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let before = TcpStream::connect(mux.addr).await.unwrap();
        let client = before.local_addr().unwrap().port();
        assert_eq!(keepalive_timer(port, client), was, "before: {line}");
        held.push(before);
        std::fs::write(&file, format!("{line}{}", listen_on(&[port], web))).unwrap();
        hup(&mux).unwrap();
        wait_count(&mux, "reload: 1 route(s)", n + 1, Duration::from_secs(10))
            .await
            .unwrap();
        let reloaded = mux.wait_log_async(says, Duration::ZERO).await.unwrap();
        assert!(reloaded.contains("reload: "), "{reloaded}");
        let after = TcpStream::connect(mux.addr).await.unwrap();
        let client = after.local_addr().unwrap().port();
        assert_eq!(keepalive_timer(port, client), timer, "after: {line}");
        held.push(after);
        was = timer;
    }
    assert_eq!(served_by(mux.addr).await.unwrap(), "web /x");
}
