//! `mux status` and `mux reload`: talk to a running mux's admin endpoint.
//! The summary is computed from the Prometheus text, so it shows exactly
//! what a scraper would see.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach mux's admin endpoint at {addr} (is `admin` set in its configuration?): {source}"
    )]
    Dial {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr}: no answer within {limit:?}")]
    Timeout { addr: String, limit: Duration },
    #[error("{addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} answered {status}: {body}")]
    Failed {
        addr: String,
        status: String,
        body: String,
    },
}

/// Sends one request to the admin endpoint; returns the body of a 200.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    limit: Duration,
) -> Result<String, StatusError> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| StatusError::Dial {
                addr: addr.to_string(),
                source,
            })?;
        let io = |source| StatusError::Io {
            addr: addr.to_string(),
            source,
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(io)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.lines().next().unwrap_or("").to_string();
        let body = dechunk(head, body);
        if status.split(' ').nth(1) == Some("200") {
            Ok(body)
        } else {
            Err(StatusError::Failed {
                addr: addr.to_string(),
                status,
                body: body.trim().to_string(),
            })
        }
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(r) => r,
        Err(_) => Err(StatusError::Timeout {
            addr: addr.to_string(),
            limit,
        }),
    }
}

/// A chunked body put back together (hyper chunks bodies of unknown length).
fn dechunk(head: &str, body: &str) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

/// One sample of the exposition: name, labels, value.
struct Sample<'a> {
    name: &'a str,
    labels: BTreeMap<&'a str, &'a str>,
    value: f64,
}

fn samples(text: &str) -> Vec<Sample<'_>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            Some(Sample {
                name,
                labels,
                value,
            })
        })
        .collect()
}

/// One route's line in the summary.
#[derive(Default)]
struct Row {
    paths: std::collections::BTreeSet<String>,
    active: f64,
    accepted: f64,
    up: f64,
    down: f64,
}

/// The readable summary `mux status` prints.
pub fn summarize(text: &str) -> String {
    let all = samples(text);
    let one = |name: &str| {
        all.iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum::<f64>()
    };
    let mut out = String::new();
    out.push_str(&format!(
        "connections open: {}   tasks: {}   open fds: {}   memory: {:.1} MiB\n",
        one("mux_connections_open"),
        one("mux_tasks_alive"),
        one("mux_open_fds"),
        one("mux_resident_memory_bytes") / (1024.0 * 1024.0)
    ));
    let mut routes: BTreeMap<&str, Row> = BTreeMap::new();
    for s in &all {
        let Some(&route) = s.labels.get("route") else {
            continue;
        };
        let row = match s.name {
            "mux_connections_active" | "mux_connections_accepted_total" | "mux_bytes_total" => {
                routes.entry(route).or_default()
            }
            _ => continue,
        };
        if let (Some(p), Some(d)) = (s.labels.get("protocol"), s.labels.get("datapath")) {
            row.paths.insert(format!("{p}/{d}"));
        }
        match (s.name, s.labels.get("direction").copied()) {
            ("mux_connections_active", _) => row.active += s.value,
            ("mux_connections_accepted_total", _) => row.accepted += s.value,
            ("mux_bytes_total", Some("up")) => row.up += s.value,
            ("mux_bytes_total", _) => row.down += s.value,
            _ => {}
        }
    }
    if routes.is_empty() {
        out.push_str("no connection routed yet\n");
    } else {
        let width = routes.keys().map(|k| k.len()).max().unwrap_or(5).max(5);
        out.push_str(&format!(
            "{:<width$} {:>8} {:>10} {:>14} {:>14}  protocol/datapath\n",
            "route", "active", "accepted", "bytes up", "bytes down"
        ));
        for (route, row) in &routes {
            let paths: Vec<&str> = row.paths.iter().map(String::as_str).collect();
            out.push_str(&format!(
                "{route:<width$} {:>8} {:>10} {:>14} {:>14}  {}\n",
                row.active,
                row.accepted,
                row.up,
                row.down,
                paths.join(", ")
            ));
        }
    }
    let errors: Vec<String> = all
        .iter()
        .filter(|s| s.name == "mux_errors_total" && s.value > 0.0)
        .map(|s| format!("{} {}", s.labels.get("kind").unwrap_or(&"?"), s.value))
        .collect();
    out.push_str(&format!(
        "errors: {}\n",
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join(", ")
        }
    ));
    let reloads: Vec<String> = all
        .iter()
        .filter(|s| s.name == "mux_reloads_total")
        .map(|s| format!("{} {}", s.labels.get("result").unwrap_or(&"?"), s.value))
        .collect();
    if !reloads.is_empty() {
        out.push_str(&format!("reloads: {}\n", reloads.join(", ")));
    }
    let (count, sum) = (
        one("mux_classify_seconds_count"),
        one("mux_classify_seconds_sum"),
    );
    if count > 0.0 {
        out.push_str(&format!(
            "classification: {count} decided, {:.3} ms on average\n",
            sum / count * 1000.0
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_adds_up_the_series() {
        let text = "# HELP x\n\
            mux_connections_open 3\n\
            mux_connections_active{route=\"ssh\",protocol=\"ssh\",datapath=\"splice\"} 2\n\
            mux_connections_accepted_total{route=\"ssh\",protocol=\"ssh\",datapath=\"splice\"} 7\n\
            mux_bytes_total{route=\"ssh\",direction=\"up\"} 100\n\
            mux_bytes_total{route=\"ssh\",direction=\"down\"} 2000\n\
            mux_errors_total{kind=\"timeout\"} 4\n\
            mux_errors_total{kind=\"limit\"} 0\n\
            mux_classify_seconds_sum 0.014\n\
            mux_classify_seconds_count 7\n\
            # EOF\n";
        let s = summarize(text);
        assert!(s.contains("connections open: 3"), "{s}");
        assert!(
            s.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["ssh", "2", "7", "100", "2000", "ssh/splice"]),
            "{s}"
        );
        assert!(s.contains("errors: timeout 4\n"), "{s}");
        assert!(s.contains("7 decided, 2.000 ms"), "{s}");
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked",
                "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            ),
            "abcde"
        );
        assert_eq!(dechunk("HTTP/1.1 200 OK", "plain"), "plain");
    }
}
