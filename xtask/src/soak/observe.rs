//! What the soak test reads about the mux process: open descriptors and memory from /proc,
//! entries left in its eBPF connection maps (through bpf(2), as `mux::ebpf::map_entries_of`
//! does), and its Prometheus metrics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// mux's maps that hold one entry per live connection (or per socket of one); every one is
/// empty when no connection is open. Its other maps (listeners, takeover ports, per-CPU
/// statistics) hold entries for as long as it runs.
pub const CONNECTION_MAPS: [&str; 5] = [
    "MUX_SOCKS",
    "MUX_CLIENT_SOCK",
    "MUX_PENDING",
    "MUX_FLOWS",
    "MUX_CLIENTS",
];

/// Open descriptors of `pid`.
pub fn fd_count(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .count())
}

/// A `Key:   value kB`-style field of /proc/PID/status, as a number (`VmRSS`, `Threads`).
pub fn status_field(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
        })
        .with_context(|| format!("no `{key}` in {path}"))
}

pub fn rss_kib(pid: u32) -> Result<u64> {
    status_field(pid, "VmRSS")
}

// ---- eBPF maps ------------------------------------------------------------------------------

// enum bpf_cmd in <linux/bpf.h>; stable ABI.
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `bpf(cmd, attr, sizeof attr)`; the result (a new fd for GET_FD_BY_ID) or the error.
fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<i64> {
    // SAFETY: `attr` is a fully initialised prefix of union bpf_attr for `cmd`, its size is
    // passed along, and the pointers in it point at live buffers of the sizes given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<A>() as libc::c_long,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A map opened by id, closed on drop.
struct MapFd(i32);

impl Drop for MapFd {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

/// The head of `struct bpf_map_info`, as far as the name.
#[repr(C)]
#[derive(Default)]
struct MapInfo {
    kind: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
}

/// Entries in each map that process `pid` holds open (found through the `map_id:` lines of
/// its /proc/PID/fdinfo), by map name. Needs root (CAP_SYS_ADMIN) to open maps by id.
pub fn map_entries(pid: u32) -> Result<BTreeMap<String, usize>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        // A descriptor may close between listing and reading: skip it.
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some(Ok(id)) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .map(|id| id.trim().parse::<u32>())
        {
            ids.insert(id);
        }
    }
    let mut counts = BTreeMap::new();
    for id in ids {
        #[repr(C)]
        struct ById {
            map_id: u32,
            next_id: u32,
            open_flags: u32,
        }
        let fd = match bpf(
            BPF_MAP_GET_FD_BY_ID,
            &mut ById {
                map_id: id,
                next_id: 0,
                open_flags: 0,
            },
        ) {
            Ok(fd) => MapFd(fd as i32),
            // Freed since we listed it (mux closed it).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e).context(format!("bpf(BPF_MAP_GET_FD_BY_ID, {id})")),
        };
        let mut info = MapInfo::default();
        #[repr(C)]
        struct InfoAttr {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        bpf(
            BPF_OBJ_GET_INFO_BY_FD,
            &mut InfoAttr {
                bpf_fd: fd.0 as u32,
                info_len: size_of::<MapInfo>() as u32,
                info: std::ptr::from_mut(&mut info) as u64,
            },
        )
        .with_context(|| format!("bpf(BPF_OBJ_GET_INFO_BY_FD) on map {id}"))?;
        let end = info.name.iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&info.name[..end]).into_owned();
        let n = count_keys(&fd, info.key_size as usize, info.max_entries)
            .with_context(|| format!("walking the keys of map {name} ({id})"))?;
        *counts.entry(name).or_insert(0) += n;
    }
    Ok(counts)
}

/// Keys in a map, walked with GET_NEXT_KEY. The walk restarts from the first key when the
/// one it stands on is deleted meanwhile, hence the set and the bound.
fn count_keys(map: &MapFd, key_size: usize, max_entries: u32) -> std::io::Result<usize> {
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    let mut seen = std::collections::HashSet::new();
    let mut current: Option<Vec<u8>> = None;
    for _ in 0..=max_entries {
        let mut next = vec![0u8; key_size.max(1)];
        let mut attr = ElemAttr {
            map_fd: map.0 as u32,
            _pad: 0,
            key: current.as_ref().map_or(0, |k| k.as_ptr() as u64),
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) if seen.insert(next.clone()) => current = Some(next),
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(seen.len())
}

/// Entries in the connection maps, summed (the breakdown is for messages).
pub fn connection_entries(maps: &BTreeMap<String, usize>) -> usize {
    CONNECTION_MAPS
        .iter()
        .map(|m| maps.get(*m).copied().unwrap_or(0))
        .sum()
}

// ---- metrics ----------------------------------------------------------------------------------

/// One scrape of /metrics: every sample, by metric name, as (labels, value); and the
/// families declared (`# TYPE`), with their type, which may have no sample yet.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    samples: BTreeMap<String, Vec<(String, f64)>>,
    families: BTreeMap<String, String>,
}

impl Metrics {
    /// Prometheus text format: `name{labels} value [timestamp]`, comments start with `#`.
    pub fn parse(text: &str) -> Metrics {
        let mut m: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
        let mut families = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                if let Some((name, kind)) = decl.split_once(' ') {
                    families.insert(name.to_string(), kind.trim().to_string());
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, rest) = match line.find('{') {
                Some(open) => match line[open..].find('}') {
                    Some(close) => line.split_at(open + close + 1),
                    None => continue,
                },
                None => match line.split_once(char::is_whitespace) {
                    Some((name, rest)) => (name, rest),
                    None => continue,
                },
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let Some(value) = rest.split_whitespace().next() else {
                continue;
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => match v.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
            };
            m.entry(name.to_string())
                .or_default()
                .push((labels.to_string(), value));
        }
        Metrics {
            samples: m,
            families,
        }
    }

    /// The sum of every series of `name`: 0 for a declared family with no series yet (a
    /// labelled family before its first label set; a counter `X` is sampled as `X_total`),
    /// None if mux does not have it at all.
    pub fn sum(&self, name: &str) -> Option<f64> {
        if let Some(series) = self.samples.get(name) {
            return Some(series.iter().map(|(_, v)| v).sum());
        }
        let declared = self.families.contains_key(name)
            || name
                .strip_suffix("_total")
                .is_some_and(|f| self.families.get(f).is_some_and(|t| t == "counter"));
        declared.then_some(0.0)
    }

    /// `name`'s series as `labels=value`, for the report.
    pub fn series(&self, name: &str) -> Vec<(String, f64)> {
        self.samples.get(name).cloned().unwrap_or_default()
    }
}

/// GET /metrics from mux's admin address.
pub async fn scrape(admin: SocketAddr) -> Result<Metrics> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("GET http://{admin}/metrics: no answer within 5 s"))?
        .with_context(|| format!("GET http://{admin}/metrics"))?;
    let text = String::from_utf8_lossy(&out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("GET http://{admin}/metrics: not an HTTP response: {text:.200}");
    };
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200") {
        bail!("GET http://{admin}/metrics: {status}");
    }
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Metrics::parse(&body))
}

/// A chunked body, joined.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `ss`'s view (state, queues, TCP info) of the TCP sockets `pid` holds and of
/// the sockets at their other ends, one line each; empty if `ss` cannot run.
pub fn sockets_of(pid: u32) -> Vec<String> {
    let Ok(out) = std::process::Command::new("ss")
        .args(["-tanpieomH"])
        .output()
    else {
        return Vec::new();
    };
    // A socket is a line that starts with its state, then indented lines.
    let mut sockets: Vec<String> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let words = line.split_whitespace().collect::<Vec<_>>().join(" ");
        match sockets.last_mut() {
            Some(last) if line.starts_with(char::is_whitespace) => {
                last.push(' ');
                last.push_str(&words);
            }
            _ => sockets.push(words),
        }
    }
    // State, Recv-Q, Send-Q, local, peer.
    let ends = |s: &str| {
        let mut w = s.split(' ').skip(3);
        (
            w.next().unwrap_or("").to_string(),
            w.next().unwrap_or("").to_string(),
        )
    };
    let owned = format!("pid={pid},");
    let held = |s: &String| s.contains(&owned) && !s.starts_with("LISTEN");
    let other_ends: Vec<(String, String)> = sockets
        .iter()
        .filter(|s| held(s))
        .map(|s| {
            let (local, peer) = ends(s);
            (peer, local)
        })
        .collect();
    sockets
        .into_iter()
        .filter(|s| held(s) || other_ends.contains(&ends(s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_a_process_sockets_and_their_peers() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let lines = sockets_of(std::process::id());
        for end in [&client, &accepted] {
            let local = end.local_addr().unwrap().to_string();
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains(&local) && l.starts_with("ESTAB")),
                "{local} not in {lines:#?}"
            );
        }
        // Not the listener, nor old connections that had the same port.
        assert!(
            !lines
                .iter()
                .any(|l| l.starts_with("LISTEN") || l.starts_with("TIME-WAIT")),
            "{lines:#?}"
        );
    }

    #[test]
    fn parses_prometheus_text() {
        let text = "# HELP mux_connections_active Open connections\n\
                    # TYPE mux_connections_active gauge\n\
                    mux_connections_active{route=\"ssh\",protocol=\"ssh\",datapath=\"ebpf\"} 3\n\
                    mux_connections_active{route=\"web\",protocol=\"http\",datapath=\"splice\"} 2\n\
                    mux_tasks_alive 7\n\
                    mux_errors_total{kind=\"no_match\"} 12 1700000000000\n\
                    weird{a=\"}\"} 1\n";
        let m = Metrics::parse(text);
        assert_eq!(m.sum("mux_connections_active"), Some(5.0));
        assert_eq!(m.sum("mux_tasks_alive"), Some(7.0));
        assert_eq!(
            m.series("mux_errors_total"),
            vec![("kind=\"no_match\"".to_string(), 12.0)]
        );
        assert_eq!(m.sum("absent"), None);
    }

    #[test]
    fn declared_families_without_series_are_zero() {
        let text = "# HELP mux_connections_accepted Client connections routed.\n\
                    # TYPE mux_connections_accepted counter\n\
                    # TYPE mux_connections_active gauge\n\
                    mux_tasks_alive 6\n\
                    # EOF\n";
        let m = Metrics::parse(text);
        assert_eq!(m.sum("mux_connections_accepted_total"), Some(0.0));
        assert_eq!(m.sum("mux_connections_active"), Some(0.0));
        assert_eq!(m.sum("mux_tasks_alive"), Some(6.0));
        assert_eq!(m.sum("mux_connections_active_total"), None);
        assert_eq!(m.sum("mux_errors_total"), None);
    }

    #[test]
    fn joins_chunks() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(fd_count(me).unwrap() >= 3);
        assert!(rss_kib(me).unwrap() > 0);
        assert!(status_field(me, "Threads").unwrap() >= 1);
    }
}
