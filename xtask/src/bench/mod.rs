//! `cargo xtask bench`: mux against direct, sslh, HAProxy and Caddy on loopback (and, for bulk
//! throughput, also to a client across a veth), for bulk throughput, request-response latency,
//! connection rate, memory per connection and HTTP; medians of repetitions, written as
//! Markdown, JSON and SVG charts.

mod netns;
pub(crate) mod peers;
mod procfs;
mod report;
mod workloads;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::MultiProgress;
use serde::Serialize;

use crate::setup::{self, Purpose};
use crate::util::{is_root, probe, run, say, secs, workspace};
use peers::Bins;
use report::Report;
use workloads::{Ctx, Workload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// Bulk throughput, request-response, connection rate, memory per connection
    Datapath,
    /// HTTP through mux, HAProxy and Caddy (path routes)
    Http,
    /// Both
    All,
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(value_enum, default_value_t = Suite::All)]
    suite: Suite,
    /// Short runs, 3 repetitions: about 3 minutes on 2 cores (the default)
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Longer runs, 5 repetitions; also rewrites docs/benchmarks.md and its charts
    #[arg(long)]
    full: bool,
}

/// How long and how often each measurement runs.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub name: &'static str,
    pub reps: usize,
    /// How long each iperf3 run is, as its arguments: `-t SECONDS` or `-n BYTES`.
    pub bulk_length: &'static str,
    pub rr_secs: f64,
    pub connrate_secs: f64,
    /// wrk takes whole seconds.
    pub http_secs: u32,
    /// Idle connections for the memory workload, and why that many.
    pub idle_conns: usize,
    pub idle_conns_why: String,
}

/// The memory workload's target; fewer when the open-file limit cannot hold them.
const IDLE_CONNS: usize = 10_000;
/// Descriptors a proxy holds per relayed connection at most: mux's splice and kernel paths
/// keep two sockets, and two pipes (four ends) once bytes flow in bulk.
const FDS_PER_CONN: usize = 6;

impl Profile {
    fn new(full: bool, fd_limit: usize) -> Profile {
        // A proxy needs some descriptors besides its connections (listeners, logs, BPF maps).
        let fit = fd_limit.saturating_sub(500) / FDS_PER_CONN / 500 * 500;
        let (idle_conns, idle_conns_why) = if fit >= IDLE_CONNS {
            (IDLE_CONNS, "the target".to_string())
        } else {
            (
                fit.max(500),
                format!(
                    "not {IDLE_CONNS}: the open-file hard limit here is {fd_limit} and cannot be raised, and \
                     mux's splice and kernel paths hold up to {FDS_PER_CONN} descriptors per connection (2 sockets, \
                     and 2 pipes once bytes flow in bulk)"
                ),
            )
        };
        // --quick: 3 repetitions of short runs, to stay near 3 minutes on 2 cores with some
        // 300 runs in all. iperf3 counts whole seconds, and 144 bulk runs of `-t 1` alone would
        // take most of that: a fixed 512 MB takes 0.2 to 0.6 s here instead. Its CPU figures
        // are then coarse: /proc counts CPU time in 10 ms ticks. So short a transfer also
        // flatters nothing: the kernel path takes a connection some way into it.
        let (name, reps, bulk_length, rr_secs, connrate_secs, http_secs) = if full {
            // Round trips for 3 s (some 200,000 at 64 connections) keep a turn of that
            // case about as long as one of the VM's slow phases (see `workloads`).
            ("full", 5, "-t 5", 3.0, 5.0, 5)
        } else {
            ("quick", 3, "-n 512M", 0.3, 0.3, 1)
        };
        Profile {
            name,
            reps,
            bulk_length,
            rr_secs,
            connrate_secs,
            http_secs,
            idle_conns,
            idle_conns_why,
        }
    }
}

pub fn bench(args: &Args) -> Result<ExitCode> {
    let start = Instant::now();
    setup::ensure(Purpose::Bench)?;
    let ws = workspace()?;
    let took = run(
        "bench",
        Command::new("cargo").current_dir(&ws.root).args([
            "build",
            "--release",
            "-p",
            "mux",
            "-p",
            "loadgen",
        ]),
    )?;
    say("bench", format!("built mux and loadgen ({})", secs(took)));

    let fd_limit = raise_fd_limit();
    let profile = Profile::new(args.full, fd_limit);
    let workloads: Vec<Workload> = match args.suite {
        Suite::Datapath => vec![
            Workload::Bulk,
            Workload::Remote,
            Workload::Rr,
            Workload::Connrate,
            Workload::Memory,
        ],
        Suite::Http => vec![Workload::Http],
        Suite::All => vec![
            Workload::Bulk,
            Workload::Remote,
            Workload::Rr,
            Workload::Connrate,
            Workload::Memory,
            Workload::Http,
        ],
    };
    // A network namespace needs root; the rest of the run does not.
    let remote_why = (!is_root()).then_some("needs root (ip netns)");
    if let Some(why) = remote_why {
        say("bench", format!("remote workload skipped: {why}"));
    }
    let workloads: Vec<Workload> = workloads
        .into_iter()
        .filter(|w| *w != Workload::Remote || remote_why.is_none())
        .collect();
    let suite = match args.suite {
        Suite::Datapath => "datapath",
        Suite::Http => "http",
        Suite::All => "all",
    };
    let command = format!("cargo xtask bench {suite} --{}", profile.name);
    say(
        "bench",
        format!(
            "{command}: {} repetitions per figure; iperf3 {}, request-response {}s, connection rate {}s, \
             HTTP {}s per run; {} idle connections for memory",
            profile.reps,
            profile.bulk_length,
            profile.rr_secs,
            profile.connrate_secs,
            profile.http_secs,
            profile.idle_conns
        ),
    );

    peers::install_interrupt_handler();
    let tmp = TempDir::create("bench")?;
    let bins = Bins {
        mux: ws.target_dir.join("release").join("mux"),
        loadgen: ws.target_dir.join("release").join("loadgen"),
    };
    let ctx = Ctx {
        dir: &tmp.0,
        bins: &bins,
        profile: &profile,
    };
    let mp = MultiProgress::new();
    let sections = workloads::run_all(&ctx, &workloads, &mp)?;
    drop(tmp);

    let report = Report {
        command,
        machine: procfs::Machine::read(),
        profile,
        versions: versions(&ws.root),
        wall_seconds: start.elapsed().as_secs_f64(),
        sections,
    };
    let out = ws.root.join("bench").join("results");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let charts = report::write_charts(&out, &report.sections)?;
    let md = report::markdown(&report, &charts, "", false);
    write(&out.join("latest.md"), &md)?;
    report::write_json(&out.join("latest.json"), &report)?;
    if args.full {
        write_docs(&ws.root, &out, &report, &charts)?;
    }

    println!();
    for s in &report.sections {
        println!("## {}\n\n{}", s.title, report::table(s));
        for note in &s.notes {
            println!("- {note}");
        }
        println!();
    }
    say(
        "bench",
        format!(
            "wrote {} ({} charts){}",
            out.join("latest.{md,json}").display(),
            charts.len(),
            if args.full {
                " and docs/benchmarks.md"
            } else {
                ""
            }
        ),
    );
    say("bench", format!("done in {}", secs(start.elapsed())));
    Ok(ExitCode::SUCCESS)
}

/// docs/benchmarks.md with the charts beside it as docs/bench-NAME.svg.
fn write_docs(
    root: &Path,
    results: &Path,
    report: &Report,
    charts: &[(String, String)],
) -> Result<()> {
    let docs = root.join("docs");
    std::fs::create_dir_all(&docs)?;
    for (_, name) in charts {
        let (from, to) = (
            results.join(format!("{name}.svg")),
            docs.join(format!("bench-{name}.svg")),
        );
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    write(
        &docs.join("benchmarks.md"),
        &report::markdown(report, charts, "bench-", true),
    )
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The soft open-file limit raised to the hard one, for us and every process we start: they
/// inherit it, and HAProxy sizes its connection limit from it. Gives the limit. Raising the hard limit needs CAP_SYS_RESOURCE, which
/// even root may lack (containers), so that is not attempted.
pub(crate) fn raise_fd_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            }
        }
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

/// What was measured, for the record: the Debian packages' versions and mux's commit.
fn versions(root: &Path) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    if let Ok(out) = probe(
        "dpkg-query",
        &[
            "-W",
            "-f=${Package} ${Version}\\n",
            "sslh",
            "haproxy",
            "caddy",
            "iperf3",
            "wrk",
        ],
    ) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((p, ver)) = line.split_once(' ') {
                v.insert(p.to_string(), ver.to_string());
            }
        }
    }
    let git = Command::new("git")
        .current_dir(root)
        .args(["describe", "--always", "--dirty"])
        .output();
    if let Some(out) = git.ok().filter(|o| o.status.success()) {
        v.insert(
            "mux".into(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        );
    }
    v
}

/// The run's config files and logs; removed when dropped, after every process is gone.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// `mux-{tag}-{our pid}` in the temp directory.
    pub(crate) fn create(tag: &str) -> Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("mux-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("DBG_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connections_fit_the_fd_limit() {
        let p = Profile::new(false, 20_000);
        assert_eq!(p.idle_conns, 3000);
        assert!(p.idle_conns_why.contains("20000"));
        assert_eq!(Profile::new(true, 1_048_576).idle_conns, IDLE_CONNS);
        assert_eq!(Profile::new(true, 1024).idle_conns, 500);
    }
}
