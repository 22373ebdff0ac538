//! `cargo xtask soak`: mux under many concurrent clients of every kind for a while (as sslh's
//! t_load), every byte checked; then, once idle again, nothing may be left behind: open
//! descriptors, memory, eBPF map entries, open connections and tasks back to where they were.

mod backends;
mod clients;
mod observe;
mod rng;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::bench::peers::{self, Proc, listening_line};
use crate::bench::{TempDir, raise_fd_limit};
use crate::setup::{self, Purpose};
use crate::util::{is_root, run, say, secs, workspace};
use clients::{Kind, Stats};
use observe::Metrics;

/// mux's `classify_timeout` in the soak config: silent clients wait this long for the banner.
pub const CLASSIFY_TIMEOUT: Duration = Duration::from_millis(300);
/// Descriptors mux may hold, once idle again, beyond those it held right after start.
const FD_SLACK: usize = 8;
/// Memory mux may have grown by, at the end, over its size after the warm-up.
const RSS_SLACK_KIB: u64 = 64 * 1024;
/// Tokio tasks alive, once idle again, beyond those alive right after start.
const TASK_SLACK: f64 = 4.0;
/// How long mux gets to settle once the clients are done.
const SETTLE: Duration = Duration::from_secs(10);
/// How long the clients get to finish their connection in progress after the run.
const DRAIN: Duration = Duration::from_secs(100);
/// How often the run samples mux (alive, memory) and redraws the progress.
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Datapath {
    Auto,
    Ebpf,
    Splice,
    Copy,
}

impl Datapath {
    fn name(self) -> &'static str {
        match self {
            Datapath::Auto => "auto",
            Datapath::Ebpf => "ebpf",
            Datapath::Splice => "splice",
            Datapath::Copy => "copy",
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// How long the clients run
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// mux's data path (ebpf needs root)
    #[arg(long, value_enum, default_value_t = Datapath::Auto)]
    datapath: Datapath,
    /// Concurrent clients
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seed of the clients' random choices and payloads (default: from the clock)
    #[arg(long)]
    seed: Option<u64>,
    /// Also a path route (`/api/`, prefix stripped), which puts every HTTP connection
    /// through mux's per-request HTTP layer instead of the data path
    #[arg(long)]
    http_paths: bool,
}

/// The mux under test.
struct Mux {
    proc: Proc,
    pid: u32,
    addr: SocketAddr,
    /// Where its metrics are (`admin` in its config).
    admin: SocketAddr,
    log: std::path::PathBuf,
}

/// One reading of everything that must come back to its start.
#[derive(Debug, Clone, Default)]
struct Reading {
    fds: usize,
    rss_kib: u64,
    threads: u64,
    /// Entries in the connection maps, and all maps by name; None without the kernel path.
    ebpf: Option<(usize, BTreeMap<String, usize>)>,
    metrics: Metrics,
}

impl Reading {
    async fn take(mux: &Mux, ebpf: bool) -> Result<Reading> {
        let maps = if ebpf {
            let maps = observe::map_entries(mux.pid)?;
            Some((observe::connection_entries(&maps), maps))
        } else {
            None
        };
        let metrics = observe::scrape(mux.admin).await?;
        Ok(Reading {
            fds: observe::fd_count(mux.pid)?,
            rss_kib: observe::rss_kib(mux.pid)?,
            threads: observe::status_field(mux.pid, "Threads")?,
            ebpf: maps,
            metrics,
        })
    }

    fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.sum(name)
    }
}

pub fn soak(args: &Args) -> Result<ExitCode> {
    let start = Instant::now();
    if args.datapath == Datapath::Ebpf && !is_root() {
        bail!("--datapath ebpf needs root (the kernel path loads eBPF programs)");
    }
    if args.clients == 0 || args.seconds == 0 {
        bail!("--clients and --seconds must be at least 1");
    }
    setup::ensure(Purpose::Build)?;
    let ws = workspace()?;
    let took = run(
        "soak",
        Command::new("cargo")
            .current_dir(&ws.root)
            .args(["build", "--release", "-p", "mux"]),
    )?;
    say("soak", format!("built mux ({})", secs(took)));
    raise_fd_limit();
    peers::install_interrupt_handler();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let tmp = TempDir::create("soak")?;
    let backends = runtime.block_on(backends::start())?;
    let mut mux = start_mux(
        &tmp.0,
        &ws.target_dir.join("release").join("mux"),
        &config(args.datapath, &backends, args.http_paths),
    )?;
    say(
        "soak",
        format!(
            "mux (pid {}) listening on {}, datapath {}, metrics on http://{}/metrics; {} clients for {}s, seed {seed}",
            mux.pid,
            mux.addr,
            args.datapath.name(),
            mux.admin,
            args.clients,
            args.seconds
        ),
    );
    // The kernel path's maps exist whenever mux runs on it: auto picks it where it can.
    let ebpf = is_root() && observe::map_entries(mux.pid).is_ok_and(|m| !m.is_empty());
    if args.datapath == Datapath::Ebpf && !ebpf {
        bail!("mux runs with datapath ebpf but holds no eBPF maps");
    }

    let outcome = runtime.block_on(soak_run(args, seed, &mut mux, &backends, ebpf));
    let shutdown = mux.proc.terminate();
    drop(runtime);
    let log = std::fs::read_to_string(&mux.log).unwrap_or_default();
    let mut report = outcome?;
    report.log_findings(&log);
    report.check(
        "mux stops cleanly on SIGTERM",
        "-".into(),
        shutdown.map_or("not reaped".into(), |s| s.to_string()),
        "exit 0 within 2 s".into(),
        shutdown.is_some_and(|s| s.success()),
    );
    if report.failed() || std::env::var_os("DBG_KEEP").is_some() {
        // mux's log and config, to look into.
        say(
            "soak",
            format!("kept mux's config and log in {}", tmp.0.display()),
        );
        std::mem::forget(tmp);
    } else {
        drop(tmp);
    }
    report.print();
    say("soak", format!("done in {}", secs(start.elapsed())));
    Ok(if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The backends' and mux's side of the run, then the checks.
async fn soak_run(
    args: &Args,
    seed: u64,
    mux: &mut Mux,
    backends: &backends::Backends,
    ebpf: bool,
) -> Result<Report> {
    // mux has just logged that it listens: let it finish starting before the baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = Reading::take(mux, ebpf).await?;

    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut rng = rng::Rng::new(seed);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.clients {
        tasks.spawn(clients::client(
            mux.addr,
            args.http_paths,
            rng.next_u64(),
            Arc::clone(&stats),
            Arc::clone(&stop),
        ));
    }

    let run_for = Duration::from_secs(args.seconds);
    let warm_up = Duration::from_secs((args.seconds / 6).clamp(1, 10));
    let bar = ProgressBar::new(args.seconds);
    bar.set_style(
        ProgressStyle::with_template("[soak] [{bar:30.cyan/blue}] {pos:>4}/{len}s {msg}")?
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut warm_rss: Option<u64> = None;
    let mut peak_rss = base.rss_kib;
    let mut last_line = Instant::now();
    let mut died = None;
    while started.elapsed() < run_for {
        tokio::time::sleep(TICK).await;
        if peers::interrupted() {
            stop.store(true, Ordering::Relaxed);
            bail!("interrupted");
        }
        if let Err(e) = mux.proc.check_alive() {
            died = Some(format!("{e:#}"));
            break;
        }
        let rss = observe::rss_kib(mux.pid).unwrap_or(0);
        peak_rss = peak_rss.max(rss);
        if warm_rss.is_none() && started.elapsed() >= warm_up {
            warm_rss = Some(rss);
        }
        let line = progress_line(&stats, rss, observe::fd_count(mux.pid).unwrap_or(0));
        bar.set_position(started.elapsed().as_secs().min(args.seconds));
        bar.set_message(line.clone());
        if bar.is_hidden() && last_line.elapsed() >= Duration::from_secs(10) {
            say(
                "soak",
                format!(
                    "{:>3}s/{}s {line}",
                    started.elapsed().as_secs(),
                    args.seconds
                ),
            );
            last_line = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    bar.finish_and_clear();
    let run_time = started.elapsed();
    let warm_rss = warm_rss.unwrap_or(peak_rss);

    // The clients end the connection they are in, each bounded by its own timeout.
    say("soak", "clients finishing their last connection");
    let drained = tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_ok();
    let stuck = tasks.len();
    tasks.abort_all();

    let mut report = Report::default();
    report.kinds(&stats, run_time);
    if let Some(why) = &died {
        report.check(
            "mux alive",
            "-".into(),
            why.clone(),
            "running".into(),
            false,
        );
        report.failures(&stats);
        return Ok(report);
    }

    // Idle now: wait (bounded) for everything to come back.
    let settle_start = Instant::now();
    let mut reading = Reading::take(mux, ebpf).await;
    while settle_start.elapsed() < SETTLE && reading.as_ref().is_ok_and(|r| !settled(&base, r)) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        reading = Reading::take(mux, ebpf).await;
    }
    let settle_time = settle_start.elapsed();
    if reading.as_ref().is_ok_and(|r| !settled(&base, r)) {
        // What a failed run needs to be understood, before mux is stopped:
        // the connections it still holds, their states and queues, and the
        // backend ends they pair with.
        say("soak", "not idle: mux's TCP sockets and their peers (ss)");
        for line in observe::sockets_of(mux.pid) {
            println!("    {line}");
        }
    }
    let end = match (mux.proc.check_alive(), reading) {
        (Ok(()), Ok(end)) => end,
        (Err(e), _) => {
            report.check(
                "mux alive",
                "-".into(),
                format!("{e:#}"),
                "running".into(),
                false,
            );
            report.failures(&stats);
            return Ok(report);
        }
        (Ok(()), Err(e)) => return Err(e.context("reading mux's state once idle")),
    };

    report.check(
        "clients done",
        format!("{}", args.clients),
        format!("{} stuck", stuck),
        format!("all within {}s", DRAIN.as_secs()),
        drained && stuck == 0,
    );
    let failures = stats.total(|k| &k.failed);
    report.check(
        "verification failures",
        "-".into(),
        failures.to_string(),
        "0".into(),
        failures == 0,
    );
    report.check(
        "open fds",
        base.fds.to_string(),
        end.fds.to_string(),
        format!("<= {}", base.fds + FD_SLACK),
        end.fds <= base.fds + FD_SLACK,
    );
    report.check(
        "RSS MiB (start, after warm-up / end, peak)",
        format!("{}, {}", mib(base.rss_kib), mib(warm_rss)),
        format!("{}, {}", mib(end.rss_kib), mib(peak_rss)),
        format!("end < {}", mib(warm_rss + RSS_SLACK_KIB)),
        end.rss_kib < warm_rss + RSS_SLACK_KIB,
    );
    report.info("threads", base.threads.to_string(), end.threads.to_string());
    match (&base.ebpf, &end.ebpf) {
        (Some((b, _)), Some((e, maps))) => report.check(
            "eBPF connection map entries",
            b.to_string(),
            if *e == 0 {
                "0".into()
            } else {
                format!(
                    "{e} {:?}",
                    observe::CONNECTION_MAPS.map(|m| (m, maps.get(m).copied().unwrap_or(0)))
                )
            },
            "0".into(),
            *e == 0,
        ),
        _ => report.skip("eBPF connection map entries", "not on the kernel path"),
    }
    metric_checks(&mut report, &base, &end, &stats);
    report.info(
        "backend connections (ssh / tls / http)",
        "-".into(),
        format!(
            "{} / {} / {}",
            backends.accepted.ssh.load(Ordering::Relaxed),
            backends.accepted.tls.load(Ordering::Relaxed),
            backends.accepted.http.load(Ordering::Relaxed)
        ),
    );
    report.info("settled after", "-".into(), secs(settle_time));
    report.failures(&stats);
    Ok(report)
}

fn settled(base: &Reading, now: &Reading) -> bool {
    let tasks = match (base.metric(TASKS), now.metric(TASKS)) {
        (Some(b), Some(n)) => n <= b + TASK_SLACK,
        _ => true,
    };
    let idle = |name| now.metric(name).is_none_or(|v| v == 0.0);
    now.fds <= base.fds + FD_SLACK
        && now.ebpf.as_ref().is_none_or(|(e, _)| *e == 0)
        && tasks
        && idle(ACTIVE)
        && idle(OPEN)
}

const ACTIVE: &str = "mux_connections_active";
const OPEN: &str = "mux_connections_open";
const TASKS: &str = "mux_tasks_alive";
const ACCEPTED: &str = "mux_connections_accepted_total";

fn metric_checks(report: &mut Report, base: &Reading, end: &Reading, stats: &Stats) {
    let mut values = |name: &str, what: &str| -> Option<(f64, f64)> {
        match (base.metric(name), end.metric(name)) {
            (Some(b), Some(e)) => Some((b, e)),
            _ => {
                report.check(
                    what,
                    "-".into(),
                    format!("no `{name}`"),
                    "present".into(),
                    false,
                );
                None
            }
        }
    };
    let active = values(ACTIVE, "routed connections open (metrics)");
    let open = values(OPEN, "all connections open (metrics)");
    let tasks = values(TASKS, "tokio tasks alive (metrics)");
    let accepted = values(ACCEPTED, "routed connections (metrics)");
    if let Some((b, e)) = active {
        report.check(
            &format!("routed connections open ({ACTIVE})"),
            num(b),
            num(e),
            "0".into(),
            e == 0.0,
        );
    }
    if let Some((b, e)) = open {
        report.check(
            &format!("all connections open ({OPEN})"),
            num(b),
            num(e),
            "0".into(),
            e == 0.0,
        );
    }
    if let Some((b, e)) = tasks {
        report.check(
            &format!("tokio tasks alive ({TASKS})"),
            num(b),
            num(e),
            format!("<= {}", num(b + TASK_SLACK)),
            e <= b + TASK_SLACK,
        );
    }
    if let Some((b, e)) = accepted {
        // Every connection that heard from a backend was routed; aborted ones may have been.
        let (seen, made) = (
            stats.routed.load(Ordering::Relaxed) as f64,
            stats.total(|k| &k.conns) as f64,
        );
        report.check(
            &format!("routed in the run ({ACCEPTED})"),
            num(b),
            num(e - b),
            format!("{} to {}", num(seen), num(made)),
            (seen..=made).contains(&(e - b)),
        );
    }
    let errors: Vec<String> = end
        .metrics
        .series("mux_errors_total")
        .into_iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(labels, v)| {
            format!(
                "{}={}",
                labels.replace('"', "").replace("kind=", ""),
                num(v)
            )
        })
        .collect();
    report.info(
        "errors by kind (metrics)",
        "-".into(),
        if errors.is_empty() {
            "none".into()
        } else {
            errors.join(" ")
        },
    );
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn progress_line(stats: &Stats, rss_kib: u64, fds: usize) -> String {
    let conns = stats.total(|k| &k.conns);
    let failed = stats.total(|k| &k.failed);
    format!(
        "{conns} conns, {} checked, {failed} failed | mux {} MiB, {fds} fds",
        human_bytes(stats.checked_bytes.load(Ordering::Relaxed)),
        mib(rss_kib)
    )
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

// ---- mux ----------------------------------------------------------------------------------

fn config(datapath: Datapath, backends: &backends::Backends, http_paths: bool) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "listen = [\"127.0.0.1:0\"]");
    let _ = writeln!(c, "datapath = \"{}\"", datapath.name());
    let _ = writeln!(
        c,
        "classify_timeout = \"{}ms\"",
        CLASSIFY_TIMEOUT.as_millis()
    );
    let _ = writeln!(c, "admin = \"127.0.0.1:0\"");
    // No on_timeout: silent clients go to the first ssh route, as sslh does.
    let mut route = |name: &str, protocol: &str, extra: &str, backend: SocketAddr| {
        let _ = write!(
            c,
            "\n[[route]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\n{extra}backend = \"{backend}\"\n"
        );
    };
    route("ssh", "ssh", "", backends.ssh);
    route(
        "tls",
        "tls",
        &format!("sni = \"{}\"\n", clients::SNI),
        backends.tls,
    );
    if http_paths {
        // A path route puts every HTTP connection through mux's HTTP layer, per request.
        let prefix = format!(
            "path_prefix = \"{}/\"\nstrip_prefix = true\n",
            clients::API_PREFIX
        );
        route("api", "http", &prefix, backends.http);
    }
    route("http", "http", "", backends.http);
    // A catch-all for what the probes above refuse, but only with a NUL byte first, so
    // that other bytes still find no route and get closed.
    route("any", "regex", "regex = '^\\x00'\n", backends.ssh);
    c
}

/// The `ADDR` of mux's `admin: metrics on http://ADDR/metrics` line.
fn admin_line(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|l| {
        l.split("metrics on http://")
            .nth(1)?
            .split('/')
            .next()?
            .trim()
            .parse()
            .ok()
    })
}

/// Starts mux on a config of its own, and waits for its listening and admin lines.
fn start_mux(dir: &Path, bin: &Path, config: &str) -> Result<Mux> {
    let name = "mux";
    let config_path = dir.join(format!("{name}.toml"));
    std::fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let mut proc = Proc::spawn(
        dir,
        name,
        Command::new(bin)
            .arg("--config")
            .arg(&config_path)
            // One line per connection, and warnings: what the report counts.
            .env("RUST_LOG", "info"),
        false,
    )?;
    let (addr, admin) = proc.wait_ready(Duration::from_secs(15), |_, err| {
        Some((listening_line(err)?, admin_line(err)?))
    })?;
    Ok(Mux {
        pid: proc.pgid() as u32,
        proc,
        addr,
        admin,
        log: dir.join(format!("{name}.stderr")),
    })
}

// ---- the report ---------------------------------------------------------------------------

#[derive(Default)]
struct Report {
    /// (what, before, after, limit, verdict): None for information only.
    rows: Vec<(String, String, String, String, Option<bool>)>,
    kinds: Vec<String>,
    summary: String,
    /// Connections that failed after being late themselves.
    late: u64,
    failures: Vec<String>,
    log: Vec<String>,
}

impl Report {
    fn check(&mut self, what: &str, before: String, after: String, limit: String, ok: bool) {
        self.rows
            .push((what.into(), before, after, limit, Some(ok)));
    }

    fn info(&mut self, what: &str, before: String, after: String) {
        self.rows
            .push((what.into(), before, after, "-".into(), None));
    }

    fn skip(&mut self, what: &str, why: &str) {
        self.rows.push((
            what.into(),
            "-".into(),
            "-".into(),
            format!("skipped: {why}"),
            None,
        ));
    }

    fn failed(&self) -> bool {
        self.rows.iter().any(|r| r.4 == Some(false))
    }

    fn kinds(&mut self, stats: &Stats, run_time: Duration) {
        let mut parts = Vec::new();
        for k in Kind::ALL {
            let s = stats.of(k);
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let (conns, ok, failed, late, ex) = (
                load(&s.conns),
                load(&s.ok),
                load(&s.failed),
                load(&s.late),
                load(&s.exchanges),
            );
            self.kinds.push(format!(
                "    {:<11} {conns:>8} {ok:>8} {failed:>7} {late:>6} {ex:>10}",
                k.name()
            ));
            let mut part = format!("{} {conns}", k.name());
            if failed > 0 {
                part.push_str(&format!(" ({failed} FAILED)"));
            }
            parts.push(part);
        }
        let conns = stats.total(|k| &k.conns);
        let failed = stats.total(|k| &k.failed);
        let late = stats.total(|k| &k.late);
        self.late = late;
        let late = if late > 0 {
            format!(", {late} late (not counted)")
        } else {
            String::new()
        };
        self.summary = format!(
            "{conns} connections in {:.0}s ({:.0}/s): {}; {} exchanges, {} checked; {failed} failed{late}",
            run_time.as_secs_f64(),
            conns as f64 / run_time.as_secs_f64(),
            parts.join(", "),
            stats.total(|k| &k.exchanges),
            human_bytes(stats.checked_bytes.load(Ordering::Relaxed)),
        );
    }

    fn failures(&mut self, stats: &Stats) {
        self.failures = stats.failures.lock().unwrap().clone();
    }

    /// Counts mux's warnings and errors by message (addresses and numbers blanked) and
    /// fails on a panic.
    fn log_findings(&mut self, log: &str) {
        let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
        let mut panics = Vec::new();
        for line in log.lines() {
            if line.contains("panicked") {
                panics.push(line.to_string());
            }
            let level = if line.contains(" WARN ") {
                "WARN"
            } else if line.contains(" ERROR ") {
                "ERROR"
            } else {
                continue;
            };
            let msg = line.split_once("] ").map_or(line, |(_, m)| m);
            let shape: String = shape(msg);
            *by_kind.entry(format!("{level} {shape}")).or_insert(0) += 1;
        }
        let mut lines: Vec<(String, usize)> = by_kind.into_iter().collect();
        lines.sort_by_key(|l| std::cmp::Reverse(l.1));
        self.log = lines
            .into_iter()
            .take(12)
            .map(|(k, n)| format!("    {n:>7}  {k}"))
            .collect();
        self.check(
            "panics in mux's log",
            "-".into(),
            panics.len().to_string(),
            "0".into(),
            panics.is_empty(),
        );
        for p in panics.iter().take(3) {
            self.failures.push(format!("mux: {p}"));
        }
    }

    fn print(&self) {
        println!();
        say("soak", "connections by kind");
        println!(
            "    {:<11} {:>8} {:>8} {:>7} {:>6} {:>10}",
            "kind", "conns", "ok", "failed", "late", "exchanges"
        );
        for k in &self.kinds {
            println!("{k}");
        }
        if self.late > 0 {
            println!(
                "    (late: failed after sending the first bytes only past the classify timeout, this\n     \
             process being short of CPU; mux then rightly treated them as silent)"
            );
        }
        if !self.log.is_empty() {
            println!();
            say("soak", "mux's warnings and errors, by message");
            for l in &self.log {
                println!("{l}");
            }
        }
        println!();
        say("soak", "checks");
        let w = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
        println!(
            "    {:<w$}  {:>16}  {:>22}  {:<20} result",
            "check", "start", "end", "limit"
        );
        for (what, before, after, limit, ok) in &self.rows {
            let verdict = match ok {
                Some(true) => "ok",
                Some(false) => "FAILED",
                None => "",
            };
            println!("    {what:<w$}  {before:>16}  {after:>22}  {limit:<20} {verdict}");
        }
        if !self.failures.is_empty() {
            println!();
            say("soak", "first failures");
            for f in &self.failures {
                println!("    {f}");
            }
        }
        println!();
        let failed: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| r.4 == Some(false))
            .map(|r| r.0.as_str())
            .collect();
        println!(
            "soak: {}; {}",
            self.summary,
            if failed.is_empty() {
                "all checks passed".to_string()
            } else {
                format!("FAILED: {}", failed.join(", "))
            }
        );
    }
}

/// A log message with what varies from line to line (addresses, numbers, hex) blanked, so
/// that lines of one kind count together.
fn shape(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut in_num = false;
    for c in msg.chars() {
        if c.is_ascii_digit() {
            if !in_num {
                out.push('N');
            }
            in_num = true;
        } else if in_num && (c == '.' || c == ':') {
            // 127.0.0.1:4242 and 1.5s stay one N.
        } else {
            in_num = false;
            out.push(c);
        }
    }
    let out = match out.find("bytes (") {
        // The preview of unroutable bytes differs every time.
        Some(i) => match out[i..].find("): ") {
            Some(j) => format!(
                "{}): …{}",
                &out[..i + j],
                out[i + j..].rsplit_once(';').map_or("", |(_, t)| t)
            ),
            None => out,
        },
        None => out,
    };
    out.chars().take(110).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_routes_in_order() {
        let b = backends::Backends {
            ssh: "127.0.0.1:1".parse().unwrap(),
            tls: "127.0.0.1:2".parse().unwrap(),
            http: "127.0.0.1:3".parse().unwrap(),
            accepted: Default::default(),
        };
        let c = config(Datapath::Ebpf, &b, true);
        let at = |s: &str| c.find(s).unwrap_or_else(|| panic!("no `{s}` in\n{c}"));
        assert!(at("name = \"ssh\"") < at("name = \"tls\""));
        assert!(at("name = \"api\"") < at("name = \"http\""));
        assert!(
            c.contains("regex = '^\\x00'\nbackend = \"127.0.0.1:1\""),
            "{c}"
        );
        assert!(c.contains("path_prefix = \"/api/\"\nstrip_prefix = true\n"));
        assert!(c.contains("datapath = \"ebpf\"") && c.contains("classify_timeout = \"300ms\""));
        assert!(!config(Datapath::Auto, &b, false).contains("api"));
    }

    #[test]
    fn reads_the_admin_line() {
        let err = "[2026-11-26T13:45:34Z INFO  mux] listening on 127.0.0.1:35205\n\
                   [2026-11-26T13:45:34Z INFO  mux] admin: metrics on http://127.0.0.1:40111/metrics\n";
        assert_eq!(admin_line(err), Some("127.0.0.1:40111".parse().unwrap()));
        assert_eq!(admin_line("listening on 127.0.0.1:1\n"), None);
    }

    #[test]
    fn log_shapes_group_lines() {
        assert_eq!(
            shape(
                "127.0.0.1:5123: no route matches the first 12 bytes (no probe fits): \"\\xff\\x01\"; closing"
            ),
            shape(
                "127.0.0.1:999: no route matches the first 7 bytes (no probe fits): \"\\xfe\"; closing"
            ),
        );
    }
}
