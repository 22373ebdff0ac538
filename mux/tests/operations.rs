//! Running mux for months: its metrics add up to what was sent, its limits
//! refuse the excess and only the excess, and SIGTERM lets live connections
//! finish.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(10);

/// The admin address mux logged.
fn admin_addr(mux: &mut Mux) -> Result<String> {
    let line = mux.wait_log("admin: metrics on http://", LIMIT)?;
    let rest = line.rsplit("http://").next().context("admin line")?;
    Ok(rest.trim_end_matches("/metrics").trim().to_string())
}

/// Every sample of a scrape, keyed by the series as written.
async fn scrape(admin: &str) -> Result<BTreeMap<String, f64>> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut raw = String::new();
    timeout(LIMIT, s.read_to_string(&mut raw)).await??;
    ensure!(raw.starts_with("HTTP/1.0 200"), "{raw}");
    let body = raw.split_once("\r\n\r\n").context("no body")?.1;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect())
}

fn sum(samples: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// One exchange: send `request` (then half-close), read to the end.
/// Returns the bytes received.
async fn exchange_all(addr: SocketAddr, request: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    timeout(LIMIT, s.read_to_end(&mut got)).await??;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_add_up_to_what_was_sent() {
    let echo = echo_backend().await;
    let web = http_backend("web").await;
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"ssh\"\nprotocol = \"ssh\"\nbackend = \"{echo}\"\n\
         [[route]]\nname = \"web\"\nprotocol = \"http\"\nbackend = \"{web}\"\n\
         [[route]]\nname = \"dead\"\nprotocol = \"regex\"\nregex = \"^DEAD\"\nbackend = \"{dead}\"\n"
    );
    let mut mux = Mux::with_config(&config).unwrap();
    let admin = admin_addr(&mut mux).unwrap();
    // `auto` runs on the kernel path where it can load (as root), and the
    // byte counts must then include what the kernel moved.
    let datapath = if mux
        .wait_log("datapath auto: kernel path", Duration::from_millis(500))
        .is_ok()
    {
        "ebpf"
    } else {
        "splice"
    };

    // Three SSH-like exchanges of known sizes, echoed back whole.
    let mut ssh_bytes = 0u64;
    for size in [10_000usize, 300_000, 1] {
        let mut request = b"SSH-2.0-metrics\r\n".to_vec();
        request.resize(request.len() + size, b'x');
        let got = exchange_all(mux.addr, &request).await.unwrap();
        assert_eq!(got, request);
        ssh_bytes += request.len() as u64;
    }
    // Two HTTP requests on the spliced web route.
    let (mut web_up, mut web_down) = (0u64, 0u64);
    for path in ["/a", "/bb"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let got = exchange_all(mux.addr, request.as_bytes()).await.unwrap();
        assert!(String::from_utf8_lossy(&got).contains("web"), "{got:?}");
        web_up += request.len() as u64;
        web_down += got.len() as u64;
    }
    // Garbage, and a route whose backend is down.
    exchange_all(mux.addr, b"\x00\x01garbage").await.unwrap();
    exchange_all(mux.addr, b"DEAD beef").await.unwrap();

    // Each connection logs as it ends: wait for all of them.
    let start = Instant::now();
    while mux.logs().iter().filter(|l| l.contains(" route=")).count() < 5
        || !mux.logs().iter().any(|l| l.contains("no route matches"))
        || !mux
            .logs()
            .iter()
            .any(|l| l.contains("backend") && l.contains("failed"))
    {
        assert!(start.elapsed() < LIMIT, "logs: {:#?}", mux.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = scrape(&admin).await.unwrap();
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {m:#?}"))
    };
    assert_eq!(
        get(&format!(
            "mux_connections_accepted_total{{route=\"ssh\",protocol=\"ssh\",datapath=\"{datapath}\"}}"
        )),
        3.0
    );
    assert_eq!(
        get("mux_bytes_total{route=\"ssh\",direction=\"up\"}"),
        ssh_bytes as f64
    );
    assert_eq!(
        get("mux_bytes_total{route=\"ssh\",direction=\"down\"}"),
        ssh_bytes as f64
    );
    assert_eq!(
        get(&format!(
            "mux_connections_accepted_total{{route=\"web\",protocol=\"http\",datapath=\"{datapath}\"}}"
        )),
        2.0
    );
    assert_eq!(
        get("mux_bytes_total{route=\"web\",direction=\"up\"}"),
        web_up as f64
    );
    assert_eq!(
        get("mux_bytes_total{route=\"web\",direction=\"down\"}"),
        web_down as f64
    );
    assert_eq!(get("mux_errors_total{kind=\"bad_input\"}"), 1.0);
    assert_eq!(get("mux_errors_total{kind=\"backend_refused\"}"), 1.0);
    assert_eq!(sum(&m, "mux_connections_active{"), 0.0);
    assert_eq!(get("mux_connections_open"), 0.0);
    // Every routed connection was timed, the garbage one too (it was decided).
    assert_eq!(get("mux_classify_seconds_count"), 6.0);
    assert!(get("mux_tasks_alive") >= 1.0);
    assert!(get("mux_open_fds") > 0.0);

    // `mux status` reads the same figures.
    let (status, out, err) = run(
        Command::new(mux_bin()).args(["status", "--admin", &admin]),
        LIMIT,
    )
    .unwrap();
    assert!(status.success(), "{err}");
    let ssh_row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("ssh "))
        .unwrap_or_else(|| panic!("{out}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        ssh_row[..5],
        [
            "ssh",
            "0",
            "3",
            &ssh_bytes.to_string(),
            &ssh_bytes.to_string()
        ]
    );
    assert!(
        out.contains("backend_refused 1") && out.contains("bad_input 1"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_without_an_admin_endpoint_says_so() {
    let port = free_port();
    let (status, _, err) = run(
        Command::new(mux_bin()).args(["status", "--admin", &format!("127.0.0.1:{port}")]),
        LIMIT,
    )
    .unwrap();
    assert!(!status.success());
    assert!(err.contains("cannot reach mux's admin endpoint"), "{err}");
}

/// Sends an SSH banner and reads the echo back: whether this connection is
/// served.
async fn served(s: &mut TcpStream) -> bool {
    let banner = b"SSH-2.0-limits\r\n";
    if s.write_all(banner).await.is_err() {
        return false;
    }
    let mut got = [0u8; 16];
    matches!(timeout(LIMIT, s.read_exact(&mut got)).await, Ok(Ok(_)) if &got == banner)
}

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_per_source_limit_refuses_the_excess_only() {
    let echo = echo_backend().await;
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\nmax_connections_per_source = 3\n\
         [[route]]\nname = \"ssh\"\nprotocol = \"ssh\"\nbackend = \"{echo}\"\n"
    );
    let mut mux = Mux::with_config(&config).unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.1", mux.addr).await;
        assert!(served(&mut s).await);
        held.push(s);
    }
    let mut excess = connect_from("127.0.0.1", mux.addr).await;
    assert!(
        !served(&mut excess).await,
        "the fourth from one address was served"
    );
    mux.wait_log_async("refused: max_connections_per_source = 3", LIMIT)
        .await
        .unwrap();
    // Another address is not held back by the first one's connections.
    let mut other = connect_from("127.0.0.2", mux.addr).await;
    assert!(served(&mut other).await, "another address was refused");
    // A place given back is a place to take.
    drop(held.pop());
    let start = Instant::now();
    loop {
        let mut again = connect_from("127.0.0.1", mux.addr).await;
        if served(&mut again).await {
            break;
        }
        assert!(start.elapsed() < LIMIT, "no place after one closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http_clients_over_a_limit_hear_503() {
    let echo = echo_backend().await;
    let web = http_backend("web").await;
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\nmax_connections = 3\n\
         [[route]]\nname = \"ssh\"\nprotocol = \"ssh\"\nbackend = \"{echo}\"\n\
         [[route]]\nname = \"web\"\nprotocol = \"http\"\nmax_connections = 1\nbackend = \"{web}\"\n"
    );
    let mux = Mux::with_config(&config).unwrap();
    let request = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n";

    // The route's one place, held by a keep-alive connection.
    let mut first = TcpStream::connect(mux.addr).await.unwrap();
    first.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = timeout(LIMIT, first.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("web /x"));
    let second = exchange_all(mux.addr, request).await.unwrap();
    let second = String::from_utf8_lossy(&second);
    assert!(second.starts_with("HTTP/1.1 503 "), "{second}");
    assert!(
        second.contains("route `web`: max_connections = 1"),
        "{second}"
    );

    // Two SSH connections fill the global limit with the HTTP one.
    let mut a = TcpStream::connect(mux.addr).await.unwrap();
    let mut b = TcpStream::connect(mux.addr).await.unwrap();
    assert!(served(&mut a).await && served(&mut b).await);
    let third = exchange_all(mux.addr, request).await.unwrap();
    let third = String::from_utf8_lossy(&third);
    assert!(third.starts_with("HTTP/1.1 503 "), "{third}");
    assert!(third.contains("max_connections = 3 reached"), "{third}");
    assert!(third.contains("Retry-After: 1"), "{third}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_live_connections_finish() {
    const CHUNK: u64 = 200_000;
    const LEN: u64 = 20 * CHUNK;
    let (backend, mut results) = hashing_backend(LEN, 7).await;
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\ndrain_timeout = \"20s\"\n\
         [[route]]\nname = \"ssh\"\nprotocol = \"ssh\"\nbackend = \"{backend}\"\n"
    );
    let mut mux = Mux::with_config(&config).unwrap();
    let addr = mux.addr;
    let prefix = b"SSH-2.0-drain\r\n";
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(prefix).await.unwrap();
    let (mut r, mut w) = client.into_split();
    let download = tokio::spawn(async move { read_hash(&mut r).await });
    // The upload is slow enough to be under way when SIGTERM comes.
    let upload = tokio::spawn(async move {
        let mut sent = 0;
        for i in 0..20u64 {
            sent += write_stream(&mut w, CHUNK, 100 + i, false).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = w.shutdown().await;
        sent
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = rustix::process::Pid::from_raw(mux.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    mux.wait_log_async("stopped accepting; letting 1 connection(s) finish", LIMIT)
        .await
        .unwrap();
    // No new connections meanwhile...
    let start = Instant::now();
    while TcpStream::connect(addr).await.is_ok() {
        assert!(start.elapsed() < LIMIT, "still accepting while draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(mux.alive(), "mux left before its connection finished");
    // ...while the live one finishes whole, both ways.
    assert_eq!(upload.await.unwrap(), LEN);
    let (down_len, down_sha) = timeout(LIMIT, download).await.unwrap().unwrap();
    assert_eq!((down_len, down_sha), (LEN, stream_sha256(LEN, 7)));
    let (up_len, up_sha) = timeout(LIMIT, results.recv()).await.unwrap().unwrap();
    assert_eq!(up_len, prefix.len() as u64 + LEN);
    let mut want = sha2::Sha256::new();
    want.update(prefix);
    let mut chunk = vec![0u8; CHUNK as usize];
    for i in 0..20u64 {
        // write_stream fills 64 KiB pieces from one stream per call.
        let mut stream = Stream::new(100 + i);
        for piece in chunk.chunks_mut(64 * 1024) {
            stream.fill(piece);
        }
        want.update(&chunk);
    }
    assert_eq!(up_sha, hex(&want.finalize()));
    mux.wait_log_async("all connections finished", LIMIT)
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(move || mux.stop())
        .await
        .unwrap();
    assert!(status.unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_drain_ends_at_drain_timeout() {
    let echo = echo_backend().await;
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\ndrain_timeout = \"500ms\"\n\
         [[route]]\nname = \"ssh\"\nprotocol = \"ssh\"\nbackend = \"{echo}\"\n"
    );
    let mut mux = Mux::with_config(&config).unwrap();
    let mut idle = TcpStream::connect(mux.addr).await.unwrap();
    assert!(served(&mut idle).await);
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = mux.stop();
        (status, mux.logs())
    })
    .await
    .unwrap();
    let (status, logs) = status;
    assert!(status.unwrap().success());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        logs.iter()
            .any(|l| l.contains("drain_timeout reached: closing 1 connection(s)")),
        "{logs:#?}"
    );
    // The connection was closed by mux's exit.
    let mut buf = [0u8; 1];
    assert!(matches!(
        timeout(LIMIT, idle.read(&mut buf)).await.unwrap(),
        Ok(0) | Err(_)
    ));
}

/// A client whose first bytes came back through mux (to an echo backend).
async fn echoed_client(addr: std::net::SocketAddr, hello: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    timeout(LIMIT, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, hello);
    s
}

/// One thread of a process, from /proc.
struct Thread {
    path: std::path::PathBuf,
    name: String,
    /// One of mux's workers: worker 0 runs on the main thread (whose id is
    /// the process id), the others on threads named `mux-worker-N`.
    worker: bool,
}

fn threads(pid: u32) -> Vec<Thread> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| {
            let path = task.unwrap().path();
            let name = std::fs::read_to_string(path.join("comm"))
                .unwrap()
                .trim()
                .to_string();
            let main = path.file_name().unwrap().to_string_lossy() == pid.to_string();
            let worker = main || name.starts_with("mux-worker-");
            Thread { path, name, worker }
        })
        .collect()
}

/// A thread's requested time slice in ns, from /proc (Linux 6.12 and later
/// show it; None before).
fn slice_ns(task: &std::path::Path) -> Option<u64> {
    let sched = std::fs::read_to_string(task.join("sched")).ok()?;
    sched
        .lines()
        .find(|l| l.starts_with("se.slice"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
}

/// Every worker thread asks the scheduler for short slices, so that its
/// wake-ups preempt busy tasks rather than wait out their slice.
#[tokio::test(flavor = "multi_thread")]
async fn workers_ask_for_short_time_slices() {
    let own = std::path::Path::new("/proc/thread-self");
    if !can_run(
        "per-task time slices (Linux 6.12+)",
        slice_ns(own).is_some(),
    ) {
        return;
    }
    let backend = echo_backend().await;
    let mut mux = Mux::with_config(&config("", &[("ssh", "ssh", backend)])).unwrap();
    // A connection served means every worker is up.
    let s = echoed_client(mux.addr, b"SSH-2.0-slice\r\n").await;
    let workers: Vec<_> = threads(mux.pid())
        .into_iter()
        .filter(|t| t.worker)
        .map(|t| (t.name, slice_ns(&t.path)))
        .collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(workers.len(), cpus, "one worker per CPU: {workers:?}");
    assert!(
        workers
            .iter()
            .all(|(_, slice)| *slice == Some(mux::sched::WORKER_SLICE_NS)),
        "slices: {workers:?}, the default is {:?}",
        slice_ns(own)
    );
    // SIGTERM lets live connections finish.
    drop(s);
    assert!(mux.stop().unwrap().success());
}

/// The CPUs a thread may run on, from /proc ("0-1", "0,2-3").
fn cpus_allowed(task: &std::path::Path) -> Vec<usize> {
    let status = std::fs::read_to_string(task.join("status")).unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(first.parse::<usize>().unwrap()..=last.parse().unwrap());
    }
    cpus
}

/// Each worker keeps to a CPU of its own: two workers left to share one
/// took turns a 4 ms tick at a time. Threads a worker spawns (tokio's
/// blocking pool, here resolving a backend's name) may run anywhere.
#[tokio::test(flavor = "multi_thread")]
async fn each_worker_keeps_to_a_cpu_of_its_own() {
    let allowed = cpus_allowed(std::path::Path::new("/proc/thread-self"));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !can_run(
        "as many CPUs allowed as the CPU quota gives (mux pins only then)",
        allowed.len() == cpus,
    ) {
        return;
    }
    let backend = echo_backend().await;
    // A name, not an address: resolving it takes a blocking-pool thread.
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\n[[route]]\nname = \"ssh\"\nprotocol = \"ssh\"\nbackend = \"localhost:{}\"\n",
        backend.port()
    );
    let mut mux = Mux::with_config(&config).unwrap();
    // Enough connections that each worker serves some.
    let mut clients = Vec::new();
    for _ in 0..4 * cpus {
        clients.push(echoed_client(mux.addr, b"SSH-2.0-pinned\r\n").await);
    }
    let (mut workers, mut others) = (Vec::new(), Vec::new());
    for t in threads(mux.pid()) {
        let entry = (t.name, cpus_allowed(&t.path));
        if t.worker {
            workers.push(entry);
        } else {
            others.push(entry);
        }
    }
    assert_eq!(workers.len(), cpus, "one worker per CPU: {workers:?}");
    let mut pinned: Vec<usize> = workers
        .iter()
        .map(|(name, set)| match set[..] {
            [cpu] => cpu,
            _ => panic!("{name} may run on {set:?}"),
        })
        .collect();
    pinned.sort_unstable();
    assert_eq!(pinned, allowed, "a CPU of its own each: {workers:?}");
    assert!(
        others.iter().any(|(name, _)| name.starts_with("tokio-r")),
        "no blocking-pool thread: {others:?}"
    );
    assert!(
        others.iter().all(|(_, set)| *set == allowed),
        "threads that are not workers keep every CPU: {others:?}"
    );
    drop(clients);
    assert!(mux.stop().unwrap().success());
}
