//! The workloads: what each one starts, what it runs per repetition, and what it measures.
//! Every run is bounded in time (the clients stop themselves, and are killed past a limit)
//! and talks only to loopback addresses, or to the network namespace the remote workload makes.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value as Json;

use super::Profile;
use super::netns::{self, ClientHost};
use super::peers::{self, Backend, Bins, Datapath, Proc, Routes, Running, System};
use super::procfs::{self, CpuMeter};
use super::report::{Metric, Row, Section, Value};

/// The systems of the TCP workloads, in table order.
const TCP_SYSTEMS: &[System] = &[
    System::Direct,
    System::Mux(Datapath::Auto),
    System::Mux(Datapath::Ebpf),
    System::Mux(Datapath::Splice),
    System::Mux(Datapath::Copy),
    System::SslhFork,
    System::SslhSelect,
    System::HaproxyTcp,
];
/// mux, HAProxy and Caddy all get the path routes. mux serves them in its
/// HTTP layer, whatever its data path, so one mux is enough.
const HTTP_SYSTEMS: &[System] = &[
    System::Direct,
    System::Mux(Datapath::Splice),
    System::HaproxyHttp,
    System::Caddy,
];
const HTTP_PATHS: [&str; 2] = ["/v1/models", "/embedding-model/v1/models"];
const EMBED_PREFIX: &str = "/embedding-model";
/// Slack for a client beyond its own duration before it is killed as stuck.
const CLIENT_SLACK: Duration = Duration::from_secs(30);
/// The longest an iperf3 run may take, however it is bounded (`-t` or `-n`).
const IPERF_LIMIT_SECS: f64 = 60.0;
/// Time for a proxy to finish what it was doing before its memory is read.
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Bulk,
    Remote,
    Rr,
    Connrate,
    Memory,
    Http,
}

#[derive(Debug, Clone, Copy)]
enum Case {
    Bulk {
        download: bool,
        streams: u32,
    },
    /// One stream between a client in its own network namespace and the backend here.
    Remote {
        download: bool,
    },
    Rr {
        connections: u32,
    },
    Connrate {
        http: bool,
    },
    Memory,
    Http {
        path: &'static str,
    },
}

impl Case {
    fn label(self) -> String {
        match self {
            Case::Bulk { download, streams } => format!(
                "{} {streams} stream{}",
                if download { "download" } else { "upload" },
                if streams == 1 { "" } else { "s" }
            ),
            Case::Remote { download } => Case::Bulk {
                download,
                streams: 1,
            }
            .label(),
            Case::Rr { connections } => format!("{connections} conn"),
            Case::Connrate { http } => (if http { "HTTP" } else { "SSH" }).into(),
            Case::Memory => "idle".into(),
            Case::Http { path } => path.into(),
        }
    }
}

impl Workload {
    pub fn key(self) -> &'static str {
        match self {
            Workload::Bulk => "bulk",
            Workload::Remote => "remote",
            Workload::Rr => "rr",
            Workload::Connrate => "connrate",
            Workload::Memory => "memory",
            Workload::Http => "http",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Workload::Bulk => "Bulk throughput (iperf3)",
            Workload::Remote => {
                "Bulk throughput to a client across a network device (iperf3 over veth)"
            }
            Workload::Rr => "Request-response, 64-byte round trips (loadgen rr)",
            Workload::Connrate => "Connection rate, 64 concurrent clients (loadgen connrate)",
            Workload::Memory => "Memory per idle relayed connection (loadgen idle)",
            Workload::Http => "HTTP through a reverse proxy (wrk -t2 -c64)",
        }
    }

    pub fn systems(self) -> &'static [System] {
        if self == Workload::Http {
            HTTP_SYSTEMS
        } else {
            TCP_SYSTEMS
        }
    }

    fn cases(self) -> Vec<Case> {
        match self {
            Workload::Bulk => [false, true]
                .into_iter()
                .flat_map(|download| [1, 8].map(|streams| Case::Bulk { download, streams }))
                .collect(),
            Workload::Remote => vec![
                Case::Remote { download: false },
                Case::Remote { download: true },
            ],
            Workload::Rr => [1, 16, 64]
                .map(|connections| Case::Rr { connections })
                .into(),
            Workload::Connrate => vec![
                Case::Connrate { http: false },
                Case::Connrate { http: true },
            ],
            Workload::Memory => vec![Case::Memory],
            Workload::Http => HTTP_PATHS.map(|path| Case::Http { path }).into(),
        }
    }

    fn metrics(self) -> Vec<Metric> {
        let m = Metric::new;
        match self {
            Workload::Bulk | Workload::Remote => vec![
                m("gbps", "Gbit/s", false),
                m("proxy_cpu_s_per_gb", "proxy CPU s/GB", true),
                m("softirq_s_per_gb", "softirq s/GB", true),
                m("machine_cpu_s_per_gb", "all CPU s/GB", true),
            ],
            Workload::Rr => vec![
                m("p50_us", "p50 µs", true),
                m("p99_us", "p99 µs", true),
                m("p999_us", "p99.9 µs", true),
                m("round_trips_per_s", "round trips/s", false),
            ],
            Workload::Connrate => vec![
                m("conns_per_s", "connections/s", false),
                m("errors", "failed connections", true),
            ],
            Workload::Memory => vec![
                m("rss_kib_per_conn", "RSS KiB/conn", true),
                m("pss_kib_per_conn", "PSS KiB/conn", true),
                m("idle_rss_mib", "RSS idle MiB", true),
                m("connections", "connections held", false),
            ],
            Workload::Http => vec![
                m("requests_per_s", "requests/s", false),
                m("p99_ms", "p99 ms", true),
                m("errors", "errors", true),
            ],
        }
    }

    /// Repetitions each system gets in all: the length of its progress bar.
    fn steps(self, profile: &Profile) -> u64 {
        (self.cases().len() * profile.reps) as u64
    }

    fn about(self, p: &Profile) -> String {
        match self {
            Workload::Bulk => format!(
                "`iperf3 {}` through each system to `iperf3 -s`; upload is client to server, download `-R`. \
                 Proxy CPU is user+system time of the proxy's processes per GB moved. Softirq is the whole \
                 machine's softirq time per GB (where the kernel moves loopback packets). All CPU is the whole \
                 machine's busy time per GB: client, backend, proxy and kernel together. It is the fair total \
                 for mux-ebpf and mux-auto, whose sk_msg program runs inside the backend's own sends, so that its work is \
                 charged to the backend process rather than to mux.",
                p.bulk_length
            ),
            Workload::Remote => format!(
                "`iperf3 {}`, one stream, from a client in a network namespace of its own, joined to this \
                 one by a veth pair: its packets cross a network device, as a remote client's do, instead of \
                 taking loopback's shortcut. Every system listens on this end of the veth, and the backend \
                 (`iperf3 -s`) is bound to the same address, so it is still local to the proxy. The CPU \
                 columns count as in the table above; the veth's work is softirq.",
                p.bulk_length
            ),
            Workload::Rr => format!(
                "Each connection sends 64 bytes and waits for the echo, back to back, for {}s after one \
                 unmeasured warm-up round trip; latency percentiles over all round trips of all connections.",
                p.rr_secs
            ),
            Workload::Connrate => format!(
                "64 clients for {}s each loop: connect, send `SSH-2.0-loadgen\\r\\n` (backend answers a banner \
                 line) or `GET / HTTP/1.0\\r\\n\\r\\n` (backend answers and closes), read the answer, close. \
                 Each proxy routes SSH and HTTP to different backends by the first bytes (HAProxy: \
                 `tcp-request inspect-delay` with a payload ACL and `HTTP`).",
                p.connrate_secs
            ),
            Workload::Memory => "Resident memory of the proxy (all its processes) holding N idle relayed \
                 connections (each echoed its first bytes end to end), minus its resident memory when idle, \
                 divided by N; a fresh proxy each repetition. Kernel memory (socket buffers, pipes, BPF maps) \
                 is not in RSS. PSS divides pages shared between processes among them, which matters for \
                 sslh-fork's one process per connection."
                .into(),
            Workload::Http => format!(
                "`wrk -t2 -c64 -d{}s --latency` on each path (keep-alive), after an unmeasured 1 s run on the same path. HAProxy (`mode http`, `path_beg` + \
                 `replace-path`), Caddy (`handle_path`) and mux (`path_prefix` with `strip_prefix`, routed per \
                 request by its HTTP layer) route `/embedding-model/*` to a second backend with the prefix \
                 stripped. All three set X-Forwarded-For, -Proto and -Host (mux's and Caddy's default; \
                 HAProxy is told to with `option forwardfor` and two `set-header` rules), and mux and Caddy \
                 add the Date header that the backend leaves out. Direct: wrk to each backend \
                 (`/v1/models`). sslh takes no part: it cannot route HTTP by path.",
                p.http_secs
            ),
        }
    }
}

/// The files, programs and settings every run shares.
pub struct Ctx<'a> {
    pub dir: &'a Path,
    pub bins: &'a Bins,
    pub profile: &'a Profile,
}

/// Backends a workload's systems all share, started once per workload: the echo server
/// (request-response, memory), the banner and HTTP servers (connection rate), the main and
/// embedding-model HTTP servers. None for bulk: iperf3 serves one test at a time, so each
/// system gets its own server.
struct Backends {
    first: Option<Backend>,
    second: Option<Backend>,
    /// The remote workload's client host, removed when the workload ends.
    client: Option<ClientHost>,
}

/// Runs `workloads` in order. Progress: a line per (workload, system) of the workload under
/// way, above a line for the whole run; each system's line, once done, is printed for good
/// (so the live area stays small in any terminal, and CI logs get the same lines in plain).
pub fn run_all(ctx: &Ctx, workloads: &[Workload], mp: &MultiProgress) -> Result<Vec<Section>> {
    let steps: u64 = workloads
        .iter()
        .map(|w| w.steps(ctx.profile) * w.systems().len() as u64)
        .sum();
    let total = mp.add(ProgressBar::new(steps));
    total.set_style(
        ProgressStyle::with_template(
            "{prefix:<22} [{bar:24.green}] {pos:>3}/{len:<3} {elapsed:>4} elapsed, about {eta} to go",
        )?
        .progress_chars("=> "),
    );
    total.set_prefix("all runs");
    let mut sections = Vec::new();
    for w in workloads {
        sections.push(run_workload(ctx, *w, mp, &total)?);
    }
    total.finish_and_clear();
    Ok(sections)
}

fn run_workload(
    ctx: &Ctx,
    w: Workload,
    mp: &MultiProgress,
    total: &ProgressBar,
) -> Result<Section> {
    let style = ProgressStyle::with_template(
        "{prefix:<22} [{bar:24.cyan/blue}] {pos:>3}/{len:<3} {elapsed:>4} {msg}",
    )?
    .progress_chars("=> ");
    let bars: Vec<ProgressBar> = w
        .systems()
        .iter()
        .map(|s| {
            let bar = mp.insert_before(total, ProgressBar::new(w.steps(ctx.profile)));
            bar.set_style(style.clone());
            bar.set_prefix(format!("{} {}", w.key(), s.name()));
            bar.set_message("waiting");
            bar
        })
        .collect();
    let backends = start_backends(ctx, w)?;
    let mut notes = Vec::new();
    let mut states = w
        .systems()
        .iter()
        .map(|&system| SystemState::new(ctx, w, system, &backends))
        .collect::<Result<Vec<_>>>()?;
    // Repetitions are interleaved case by case: each turn measures one case on every
    // system, each started afresh, one after another. This VM has slow phases of 20-25 s in
    // which even direct loses a quarter of its round-trip rate; a turn takes 25-55 s in the
    // full profile, so a phase falls on neighbouring measurements of several systems alike
    // rather than on every case of whichever system ran then (in one full run, three of
    // mux-auto's five rounds of round trips at 64 connections ran at the slow phase's rate,
    // none of mux-splice's). Each turn starts one system later than the one before, so that
    // no system is always measured at the same point of a turn.
    let cases = w.cases();
    let n = states.len();
    for rep in 0..ctx.profile.reps {
        for (c, &case) in cases.iter().enumerate() {
            let turn = rep * cases.len() + c;
            for i in turn_order(turn, n) {
                let (state, bar) = (&mut states[i], &bars[i]);
                if turn == 0 {
                    bar.reset_elapsed();
                }
                let start = Instant::now();
                bar.set_message(case.label());
                let values = run_case(ctx, w, state, case, rep, &mut notes)?;
                state.reps[c].push(values);
                state.seconds += start.elapsed().as_secs_f64();
                bar.inc(1);
                total.inc(1);
                if rep + 1 == ctx.profile.reps && c + 1 == cases.len() {
                    say_done(mp, bar, w, state)?;
                }
            }
        }
    }
    let rows = states
        .iter()
        .flat_map(|state| {
            w.cases()
                .into_iter()
                .zip(&state.reps)
                .map(|(case, reps)| Row::new(case.label(), state.system.name(), reps))
        })
        .collect();
    if w == Workload::Memory {
        notes.push(memory_counts_note(ctx.profile));
    }
    Ok(Section::new(
        w.key(),
        w.title(),
        w.about(ctx.profile),
        w.metrics(),
        rows,
        notes,
    ))
}

/// The systems (as indices) in the order turn `turn` measures them: all of them, starting one
/// later than the turn before.
fn turn_order(turn: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (turn + k) % n)
}

fn start_backends(ctx: &Ctx, w: Workload) -> Result<Backends> {
    let (dir, bins) = (ctx.dir, ctx.bins);
    Ok(match w {
        Workload::Bulk => Backends {
            first: None,
            second: None,
            client: None,
        },
        Workload::Remote => Backends {
            first: None,
            second: None,
            client: Some(ClientHost::create()?),
        },
        Workload::Rr | Workload::Memory => Backends {
            first: Some(peers::backend(
                dir,
                bins,
                &format!("{}-echo", w.key()),
                &["echo"],
            )?),
            second: None,
            client: None,
        },
        Workload::Connrate => Backends {
            first: Some(peers::backend(dir, bins, "connrate-banner", &["banner"])?),
            second: Some(peers::backend(
                dir,
                bins,
                "connrate-http",
                &["http", "--name", "connrate"],
            )?),
            client: None,
        },
        Workload::Http => Backends {
            first: Some(peers::backend(
                dir,
                bins,
                "http-main",
                &["http", "--name", "main"],
            )?),
            second: Some(peers::backend(
                dir,
                bins,
                "http-embed",
                &["http", "--name", "embedding-model"],
            )?),
            client: None,
        },
    })
}

fn addr(b: &Option<Backend>) -> SocketAddr {
    b.as_ref().expect("the workload started this backend").addr
}

fn routes(w: Workload, b: &Backends, iperf: Option<SocketAddr>) -> Routes {
    match w {
        Workload::Bulk | Workload::Remote => {
            Routes::Any(iperf.expect("bulk has its iperf3 server"))
        }
        Workload::Rr | Workload::Memory => Routes::Any(addr(&b.first)),
        Workload::Connrate => Routes::SshHttp {
            ssh: addr(&b.first),
            http: addr(&b.second),
        },
        Workload::Http => Routes::HttpPaths {
            main: addr(&b.first),
            embed: addr(&b.second),
        },
    }
}

/// The line that says a system has run all its rounds, in place of its progress bar.
fn say_done(mp: &MultiProgress, bar: &ProgressBar, w: Workload, state: &SystemState) -> Result<()> {
    let line = format!(
        "[bench] {} {}: {} ({:.1}s)",
        w.key(),
        state.system.name(),
        state
            .failure()
            .map_or("done".into(), |why| format!("done, with {why}")),
        state.seconds
    );
    bar.finish_and_clear();
    if mp.is_hidden() {
        println!("{line}");
    } else {
        mp.println(line)?;
    }
    Ok(())
}

/// One system's figures so far, per case and repetition, and what it runs against.
struct SystemState {
    system: System,
    /// Its iperf3 server (bulk only), kept over all rounds.
    _iperf: Option<Backend>,
    routes: Routes,
    /// The address it listens on (and its iperf3 server too).
    host: IpAddr,
    /// The namespace its clients run in, if not this one.
    netns: Option<String>,
    /// Per case, in `Workload::cases` order: one entry per repetition run so far.
    reps: Vec<Vec<Vec<Value>>>,
    /// Time spent measuring it, over all rounds.
    seconds: f64,
}

impl SystemState {
    fn new(ctx: &Ctx, w: Workload, system: System, backends: &Backends) -> Result<SystemState> {
        let host = backends
            .client
            .as_ref()
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), ClientHost::host);
        let iperf = match w {
            Workload::Bulk | Workload::Remote => Some(peers::iperf_server(
                ctx.dir,
                &format!("{}-{}-iperf3-server", w.key(), system.name()),
                host,
            )?),
            _ => None,
        };
        let routes = routes(w, backends, iperf.as_ref().map(|b| b.addr));
        Ok(SystemState {
            system,
            _iperf: iperf,
            routes,
            host,
            netns: backends.client.as_ref().map(|c| c.name.clone()),
            reps: vec![Vec::new(); w.cases().len()],
            seconds: 0.0,
        })
    }

    /// Why a figure of this system is missing, if one is.
    fn failure(&self) -> Option<String> {
        self.reps.iter().flatten().flatten().find_map(|v| match v {
            Value::Na(why) if !why.contains("no proxy") => Some(why.clone()),
            _ => None,
        })
    }
}

/// Repetition `rep` of `case` on one system, started afresh for it and stopped after it,
/// so that only one system runs at a time: the case's figures. What the table should say
/// besides them goes in `notes`.
fn run_case(
    ctx: &Ctx,
    w: Workload,
    state: &SystemState,
    case: Case,
    rep: usize,
    notes: &mut Vec<String>,
) -> Result<Vec<Value>> {
    let system = state.system;
    let routes = state.routes;
    let name = format!("{}-{}", w.key(), system.name());
    let metrics = w.metrics().len();
    let mut running: Option<Result<Running>> = None;
    let mut retried = false;
    let values = loop {
        // A system that died (sslh-select past FD_SETSIZE) is started again for the retry;
        // one that failed to start is tried again, in case that was passing.
        let alive = match running.as_mut() {
            Some(Ok(r)) => r.check_alive().is_ok(),
            _ => false,
        };
        // Memory also starts afresh for a retry: an allocator that has once held N
        // connections keeps some of that memory, which would flatter what follows.
        if w == Workload::Memory || !alive {
            // Stop the old one before its successor takes its place.
            drop(running.take());
            running = Some(peers::start(
                ctx.dir,
                ctx.bins,
                system,
                routes,
                w.key(),
                state.host,
            ));
        }
        let r = match running.as_mut().expect("just started") {
            Ok(r) => r,
            // Why it cannot run here: no point in trying again right away.
            Err(e) => break failure_cells(e, metrics)?,
        };
        if rep == 0 && !retried && w == Workload::Http && case.label() == HTTP_PATHS[0] {
            notes.extend(http_answers(r, routes));
        }
        match measure(ctx, case, r, routes, state.netns.as_deref(), &name, notes) {
            Ok(v) => break v,
            Err(e) if retried => break failure_cells(&e, metrics)?,
            Err(e) => {
                // Once in many runs a client fails for no reason the proxy is to blame
                // for; one more try, said in the notes so that nothing is hidden.
                failure_cells(&e, metrics)?;
                notes.push(format!(
                    "{} {}: a repetition failed and was run again: {}",
                    system.name(),
                    case.label(),
                    format!("{e:#}").replace('\n', " ")
                ));
                retried = true;
            }
        }
    };
    drop(running);
    Ok(values)
}

/// The cells of a repetition that failed, saying why; Err (ending the whole run, so that
/// everything is stopped) when the failure is that the user interrupted.
fn failure_cells(e: &anyhow::Error, metrics: usize) -> Result<Vec<Value>> {
    if peers::interrupted() {
        bail!("interrupted");
    }
    Ok(vec![Value::Na(na(e)); metrics])
}

/// A failure as a table cell: why, in one line.
fn na(e: &anyhow::Error) -> String {
    let why = format!("{e:#}");
    if why.starts_with("n/a") {
        why
    } else {
        format!("n/a: {}", why.replace('\n', " "))
    }
}

/// One repetition of one case against a running system: the workload's metrics in order.
/// Direct goes to the backend the routes name for this case. Clients run in `netns` if given.
fn measure(
    ctx: &Ctx,
    case: Case,
    r: &mut Running,
    routes: Routes,
    netns: Option<&str>,
    name: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<Value>> {
    let p = ctx.profile;
    let loadgen = || Command::new(&ctx.bins.loadgen);
    match (case, routes) {
        (Case::Bulk { download, streams }, Routes::Any(server)) => {
            let to = r.addr.unwrap_or(server);
            bulk(ctx, r, to, download, streams, None, name)
        }
        (Case::Remote { download }, Routes::Any(server)) => {
            let to = r.addr.unwrap_or(server);
            bulk(ctx, r, to, download, 1, netns, name)
        }
        (Case::Rr { connections }, Routes::Any(echo)) => {
            let j = client_json(
                ctx,
                r,
                &format!("{name}-rr"),
                loadgen()
                    .args(["rr", "--target", &r.addr.unwrap_or(echo).to_string()])
                    .args(["--connections", &connections.to_string()])
                    .args(["--duration", &p.rr_secs.to_string()]),
                p.rr_secs,
            )?;
            ["p50_us", "p99_us", "p999_us", "per_sec"]
                .iter()
                .map(|k| num(&j, k))
                .collect()
        }
        (Case::Connrate { http: is_http }, Routes::SshHttp { ssh, http }) => {
            let backend = if is_http { http } else { ssh };
            let j = client_json(
                ctx,
                r,
                &format!("{name}-connrate"),
                loadgen()
                    .args([
                        "connrate",
                        "--target",
                        &r.addr.unwrap_or(backend).to_string(),
                    ])
                    .args(["--kind", if is_http { "http" } else { "ssh" }])
                    .args(["--concurrency", "64"])
                    .args(["--duration", &p.connrate_secs.to_string()]),
                p.connrate_secs,
            )?;
            let errors = num(&j, "errors")?;
            if let (Value::Num(n), Some(e)) = (&errors, j["first_error"].as_str()) {
                let what = format!("{}, {}:", r.system.name(), case.label());
                if *n > 0.0 && !notes.iter().any(|x| x.starts_with(&what)) {
                    notes.push(format!(
                        "{what} {n} failed connections in one run; the first: {e}"
                    ));
                }
            }
            Ok(vec![num(&j, "per_sec")?, errors])
        }
        (Case::Memory, Routes::Any(echo)) => memory(ctx, r, echo, name),
        (Case::Http { path }, Routes::HttpPaths { main, embed }) => {
            let (to, path) = match (r.addr, path.strip_prefix(EMBED_PREFIX)) {
                (Some(a), _) => (a, path),
                (None, Some(stripped)) => (embed, stripped),
                (None, None) => (main, path),
            };
            wrk(ctx, r, to, path, name)
        }
        (case, routes) => bail!("internal: case {case:?} with routes {routes:?}"),
    }
}

fn num(j: &Json, key: &str) -> Result<Value> {
    j.get(key)
        .and_then(Json::as_f64)
        .map(Value::Num)
        .with_context(|| format!("no number `{key}` in {j}"))
}

/// Runs a client to completion (bounded: its own duration plus slack), watching that the
/// system under test stays up; gives its stdout.
fn client(ctx: &Ctx, r: &mut Running, name: &str, cmd: &mut Command, secs: f64) -> Result<String> {
    client_sampled(ctx, r, name, cmd, secs, || {})
}

fn client_sampled(
    ctx: &Ctx,
    r: &mut Running,
    name: &str,
    cmd: &mut Command,
    secs: f64,
    tick: impl FnMut(),
) -> Result<String> {
    let mut proc = Proc::spawn(ctx.dir, name, cmd, false)?;
    let result = proc.finish(Duration::from_secs_f64(secs) + CLIENT_SLACK, tick);
    // If the proxy died, that is the story, not the client's broken connections.
    r.check_alive()?;
    result
}

fn client_json(
    ctx: &Ctx,
    r: &mut Running,
    name: &str,
    cmd: &mut Command,
    secs: f64,
) -> Result<Json> {
    let out = client(ctx, r, name, cmd, secs)?;
    serde_json::from_str(out.trim()).with_context(|| format!("{name}: not JSON: {out}"))
}

/// One iperf3 run, its client in `netns` if given: [Gbit/s, proxy CPU s/GB, softirq s/GB,
/// all CPU s/GB].
fn bulk(
    ctx: &Ctx,
    r: &mut Running,
    to: SocketAddr,
    download: bool,
    streams: u32,
    netns: Option<&str>,
    name: &str,
) -> Result<Vec<Value>> {
    let mut cmd = match netns {
        Some(ns) => netns::command_in(ns, "iperf3"),
        None => Command::new("iperf3"),
    };
    cmd.args(["-c", &to.ip().to_string(), "-p", &to.port().to_string()])
        .args(ctx.profile.bulk_length.split_whitespace())
        .args(["-J", "--connect-timeout", "3000"])
        .args(["-P", &streams.to_string()]);
    if download {
        cmd.arg("-R");
    }
    // iperf3's server takes a moment after one test before it accepts the next.
    let mut tries = 0;
    let (out, cpu) = loop {
        tries += 1;
        let mut meter = CpuMeter::start(r.pgid());
        let result = client_sampled(
            ctx,
            r,
            &format!("{name}-iperf3"),
            &mut cmd,
            IPERF_LIMIT_SECS,
            || meter.sample(),
        );
        let cpu = meter.finish();
        match result {
            Ok(out) => break (out, cpu),
            Err(e) if tries < 3 && format!("{e:#}").contains("busy") => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    };
    let j: Json = serde_json::from_str(&out).context("iperf3 -J output")?;
    if let Some(err) = j.get("error").and_then(Json::as_str) {
        bail!("iperf3: {err}");
    }
    let sum = &j["end"]["sum_received"];
    let bytes = sum["bytes"]
        .as_f64()
        .context("iperf3: no end.sum_received.bytes")?;
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received.bits_per_second")?;
    if bytes <= 0.0 {
        bail!("iperf3 moved no bytes");
    }
    let gb = bytes / 1e9;
    Ok(vec![
        Value::Num(bps / 1e9),
        cpu.group
            .map_or_else(|| Value::Na("n/a: no proxy".into()), |c| Value::Num(c / gb)),
        Value::Num(cpu.softirq / gb),
        Value::Num(cpu.machine / gb),
    ])
}

/// How many idle connections each system holds in the memory workload, and why.
pub fn idle_connections(p: &Profile, system: System) -> usize {
    match system {
        // One process per connection: 1,000 processes is already a lot for 2 cores.
        System::SslhFork => p.idle_conns.min(1000),
        // select(2) takes descriptors below FD_SETSIZE (1,024), two per connection; past
        // that sslh-select aborts ("bit out of range 0 - FD_SETSIZE").
        System::SslhSelect => p.idle_conns.min(400),
        _ => p.idle_conns,
    }
}

fn memory_counts_note(p: &Profile) -> String {
    format!(
        "Connections held: {n} for mux and HAProxy ({why}); {fork} for sslh-fork (one process per \
         connection); {select} for sslh-select (select(2) is limited to descriptors below 1,024, two \
         per connection: past that it aborts).",
        n = p.idle_conns,
        why = p.idle_conns_why,
        fork = idle_connections(p, System::SslhFork),
        select = idle_connections(p, System::SslhSelect),
    )
}

/// Memory of a fresh proxy: [RSS KiB/conn, PSS KiB/conn, idle RSS MiB, connections].
fn memory(ctx: &Ctx, r: &mut Running, echo: SocketAddr, name: &str) -> Result<Vec<Value>> {
    let Some(pgid) = r.pgid() else {
        return Ok(vec![Value::Na("n/a: no proxy".into()); 4]);
    };
    std::thread::sleep(SETTLE);
    let (rss0, pss0) = procfs::group_memory_kib(pgid);
    let n = idle_connections(ctx.profile, r.system);
    let mut idle = Proc::spawn(
        ctx.dir,
        &format!("{name}-idle"),
        Command::new(&ctx.bins.loadgen)
            .args(["idle", "--target", &r.addr.unwrap_or(echo).to_string()])
            .args(["--connections", &n.to_string(), "--hold", "120"]),
        true,
    )?;
    let ready = idle.wait_ready(Duration::from_secs(120), |out, _| {
        out.lines().any(|l| l.starts_with("ready ")).then_some(())
    });
    r.check_alive()?;
    ready?;
    std::thread::sleep(SETTLE);
    let (rss1, pss1) = procfs::group_memory_kib(pgid);
    r.check_alive()?;
    // Closing its stdin tells loadgen to let go of the connections and report.
    drop(idle.stdin.take());
    idle.finish(Duration::from_secs(30), || {})?;
    let per_conn = |a: u64, b: u64| Value::Num((b as f64 - a as f64) / n as f64);
    Ok(vec![
        per_conn(rss0, rss1),
        per_conn(pss0, pss1),
        Value::Num(rss0 as f64 / 1024.0),
        Value::Num(n as f64),
    ])
}

/// One wrk run: [requests/s, p99 ms, errors (non-2xx responses and socket errors)].
fn wrk(ctx: &Ctx, r: &mut Running, to: SocketAddr, path: &str, name: &str) -> Result<Vec<Value>> {
    // Unmeasured: every system starts afresh for each case, and the first second after a
    // start (64 connections opening at once, caches and allocators warming) is not the
    // steady state this measures.
    client(
        ctx,
        r,
        &format!("{name}-wrk-warmup"),
        Command::new("wrk")
            .args(["-t2", "-c64", "-d1s"])
            .arg(format!("http://{to}{path}")),
        1.0,
    )?;
    let secs = ctx.profile.http_secs;
    let out = client(
        ctx,
        r,
        &format!("{name}-wrk"),
        Command::new("wrk")
            .args(["-t2", "-c64", &format!("-d{secs}s"), "--latency"])
            .arg(format!("http://{to}{path}")),
        secs as f64,
    )?;
    let (rps, p99_ms, errors) = parse_wrk(&out).with_context(|| format!("wrk output: {out}"))?;
    Ok(vec![
        Value::Num(rps),
        Value::Num(p99_ms),
        Value::Num(errors),
    ])
}

/// (requests/s, p99 in ms, errors) from `wrk --latency` output.
fn parse_wrk(out: &str) -> Option<(f64, f64, f64)> {
    let mut rps = None;
    let mut p99 = None;
    let mut errors = 0.0;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = wrk_ms(v.trim());
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<f64>().ok()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            for part in v.split(',') {
                errors += part.split_whitespace().nth(1)?.parse::<f64>().ok()?;
            }
        }
    }
    Some((rps?, p99?, errors))
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.01s`, `1.5m`.
fn wrk_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// Which backend answers each path, checked once per system: a note when it is not the one
/// the path routes want.
fn http_answers(r: &Running, routes: Routes) -> Option<String> {
    let (Some(front), Routes::HttpPaths { .. }) = (r.addr, routes) else {
        return None;
    };
    let answers: Vec<String> = HTTP_PATHS
        .iter()
        .map(|path| {
            let who = http_get(front, path).unwrap_or_else(|e| format!("error: {e:#}"));
            format!("`{path}` -> {}", who.trim())
        })
        .collect();
    let wanted = ["ok main", "ok embedding-model"];
    let right = HTTP_PATHS.iter().zip(wanted).all(|(p, w)| {
        answers
            .iter()
            .any(|a| a.starts_with(&format!("`{p}`")) && a.ends_with(w))
    });
    (!right).then(|| format!("{} answers {}.", r.system.name(), answers.join(", ")))
}

/// A one-off HTTP/1.0 GET on loopback; gives the response body.
fn http_get(to: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (_, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every turn measures every system once, and over as many turns as there are systems
    /// each one goes first once.
    #[test]
    fn turns_rotate_over_all_systems() {
        let n = TCP_SYSTEMS.len();
        let mut firsts = Vec::new();
        let mut follows = std::collections::HashSet::new();
        for turn in 0..n {
            let order: Vec<usize> = turn_order(turn, n).collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "turn {turn}: {order:?}");
            firsts.push(order[0]);
            follows.extend(order.windows(2).map(|w| (w[0], w[1])));
        }
        firsts.sort_unstable();
        assert_eq!(firsts, (0..n).collect::<Vec<_>>());
        assert_eq!(
            turn_order(n, n).collect::<Vec<_>>(),
            turn_order(0, n).collect::<Vec<_>>()
        );
        // A rotation keeps the cyclic order: each system is followed by the same one.
        assert_eq!(follows.len(), n);
    }

    const WRK: &str = "Running 1s test @ http://127.0.0.1:40302/v1/models
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     9.59ms    7.63ms  45.16ms   72.23%
    Req/Sec     3.66k     1.17k    6.28k    65.00%
  Latency Distribution
     50%    7.84ms
     75%   13.48ms
     90%   19.78ms
     99%  834.59us
  7308 requests in 1.00s, 0.95MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   7286.64
Transfer/sec:      0.95MB
";

    #[test]
    fn reads_wrk() {
        let (rps, p99, errors) = parse_wrk(WRK).unwrap();
        assert_eq!(rps, 7286.64);
        assert!((p99 - 0.83459).abs() < 1e-9);
        assert_eq!(errors, 7.0);
        assert!((wrk_ms("2.01s").unwrap() - 2010.0).abs() < 1e-9);
        assert!(parse_wrk("Running 1s test\n").is_none());
    }

    #[test]
    fn every_workload_has_cases_and_metrics() {
        for w in [
            Workload::Bulk,
            Workload::Remote,
            Workload::Rr,
            Workload::Connrate,
            Workload::Memory,
            Workload::Http,
        ] {
            assert!(!w.cases().is_empty());
            assert!(!w.metrics().is_empty());
            assert_eq!(w.systems()[0], System::Direct);
        }
        assert_eq!(
            Case::Bulk {
                download: true,
                streams: 8
            }
            .label(),
            "download 8 streams"
        );
        assert_eq!(Case::Remote { download: false }.label(), "upload 1 stream");
    }
}
