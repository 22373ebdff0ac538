//! What the benchmark reads from /proc: a process group's members, CPU time and memory, the
//! kernel's softirq time, listening ports, and what machine this is.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// The state letter and the numeric fields of /proc/PID/stat after the `(comm)` field, which
/// may itself contain spaces and parentheses: so split after its last `)`. Index 0 of the
/// numbers is field 4 (`ppid`).
fn stat_fields(pid: i32) -> Option<(char, Vec<u64>)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut rest = text[text.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let numbers = rest.map(|f| f.parse::<i64>().unwrap_or(0) as u64).collect();
    Some((state, numbers))
}

/// Every live (not zombie) process in process group `pgid`: the harness starts each system
/// as a group leader, so this is the system with whatever it forked.
pub fn group_pids(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        // Field 5 (pgrp) is index 1 of the numbers.
        .filter(|&pid| {
            stat_fields(pid)
                .is_some_and(|(state, f)| state != 'Z' && f.get(1) == Some(&(pgid as u64)))
        })
        .collect()
}

/// utime + stime of all threads of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let (_, f) = stat_fields(pid)?;
    // Fields 14 and 15 (utime, stime) are indices 10 and 11 of the numbers.
    Some(f.get(10)? + f.get(11)?)
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (softirq, busy) time of all CPUs so far, in clock ticks, from the `cpu` line of /proc/stat:
/// `cpu user nice system idle iowait irq softirq steal guest guest_nice`. Busy is all but idle
/// and iowait (guest time is already in user).
fn machine_ticks() -> (u64, u64) {
    let fields: Vec<u64> = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("cpu "))?.to_string();
            Some(
                line.split_whitespace()
                    .skip(1)
                    .filter_map(|f| f.parse().ok())
                    .collect(),
            )
        })
        .unwrap_or_default();
    let f = |i: usize| fields.get(i).copied().unwrap_or(0);
    (f(6), f(0) + f(1) + f(2) + f(5) + f(6) + f(7))
}

/// CPU time over a run, in seconds.
pub struct CpuUse {
    /// The system under test's processes; None without one (direct).
    pub group: Option<f64>,
    /// Softirq time of the whole machine.
    pub softirq: f64,
    /// Busy time of the whole machine: proxy, client, backend and kernel together.
    pub machine: f64,
}

/// CPU spent by a process group, and by the machine, over a run. Sampled while the run goes
/// on because a forking proxy's per-connection children exit (taking their CPU time with
/// them, when the parent ignores SIGCHLD) as soon as their connection closes.
pub struct CpuMeter {
    pgid: Option<i32>,
    /// pid -> (ticks when first seen, ticks when last seen).
    seen: HashMap<i32, (u64, u64)>,
    machine_start: (u64, u64),
}

impl CpuMeter {
    pub fn start(pgid: Option<i32>) -> CpuMeter {
        let mut m = CpuMeter {
            pgid,
            seen: HashMap::new(),
            machine_start: machine_ticks(),
        };
        if let Some(g) = pgid {
            for pid in group_pids(g) {
                if let Some(t) = cpu_ticks(pid) {
                    m.seen.insert(pid, (t, t));
                }
            }
        }
        m
    }

    pub fn sample(&mut self) {
        let Some(g) = self.pgid else { return };
        for pid in group_pids(g) {
            if let Some(t) = cpu_ticks(pid) {
                // A process born during the run spent all its time in the run.
                self.seen.entry(pid).or_insert((0, t)).1 = t;
            }
        }
    }

    pub fn finish(mut self) -> CpuUse {
        self.sample();
        let hz = ticks_per_sec();
        let (softirq, busy) = machine_ticks();
        let group = self.pgid.map(|_| {
            self.seen
                .values()
                .map(|(first, last)| last.saturating_sub(*first))
                .sum::<u64>() as f64
                / hz
        });
        CpuUse {
            group,
            softirq: softirq.saturating_sub(self.machine_start.0) as f64 / hz,
            machine: busy.saturating_sub(self.machine_start.1) as f64 / hz,
        }
    }
}

/// Resident and proportional set sizes summed over a process group, in KiB. PSS splits
/// pages shared between processes (a forking proxy's children share most of theirs).
pub fn group_memory_kib(pgid: i32) -> (u64, u64) {
    let field = |path: String, key: &str| -> u64 {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with(key))?;
                line[key.len()..].split_whitespace().next()?.parse().ok()
            })
            .unwrap_or(0)
    };
    group_pids(pgid)
        .into_iter()
        .fold((0, 0), |(rss, pss), pid| {
            (
                rss + field(format!("/proc/{pid}/status"), "VmRSS:"),
                pss + field(format!("/proc/{pid}/smaps_rollup"), "Pss:"),
            )
        })
}

/// Whether some socket listens on TCP `port` (IPv4 or IPv6). Used instead of connecting to
/// see if a proxy is up, since a test connection would itself go through the proxy.
pub fn listening(port: u16) -> bool {
    let needle = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|s| {
            s.lines().skip(1).any(|l| {
                let mut cols = l.split_whitespace();
                let local = cols.nth(1).unwrap_or("");
                // st (column 4) 0A is TCP_LISTEN.
                cols.nth(1) == Some("0A") && format!("{local} ").ends_with(&needle)
            })
        })
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub date: String,
}

impl Machine {
    pub fn read() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let mem_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            date: utc_now(),
        }
    }
}

/// Now as `YYYY-MM-DD HH:MM UTC`, without a date crate: days to civil date after
/// Howard Hinnant's `civil_from_days`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_its_own_reading() {
        let me = std::process::id() as i32;
        assert!(cpu_ticks(me).is_some());
        // SAFETY: getpgrp has no preconditions.
        let pgid = unsafe { libc::getpgrp() };
        assert!(group_pids(pgid).contains(&me));
        assert!(group_memory_kib(pgid).0 > 0);
    }

    #[test]
    fn sees_a_listening_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening(port));
        drop(l);
        assert!(!listening(port));
    }

    #[test]
    fn date_looks_like_a_date() {
        let d = utc_now();
        assert_eq!(d.len(), "2026-11-26 13:45 UTC".len(), "{d}");
        assert!(d.starts_with("20"));
    }
}
