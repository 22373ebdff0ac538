//! What mux is doing, as Prometheus metrics (prometheus-client): one
//! process-wide set, updated by the connection code and rendered in the text
//! format by the admin endpoint.

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub route: String,
    pub protocol: String,
    pub datapath: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub route: String,
    /// `up` (client to backend) or `down`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Error kinds, as the `kind` label spells them.
pub mod kind {
    /// A client that sent nothing, or too little, in time.
    pub const TIMEOUT: &str = "timeout";
    /// A backend, target or agent that could not be reached.
    pub const BACKEND: &str = "backend_refused";
    /// A connection refused by a limit.
    pub const LIMIT: &str = "limit";
    /// Bytes no route accepts, or a malformed request.
    pub const BAD_INPUT: &str = "bad_input";
    /// A CONNECT or agent refused for its target or token.
    pub const DENIED: &str = "denied";
}

pub struct Metrics {
    registry: Registry,
    /// Client connections accepted and not yet ended (the limits' count).
    open: Gauge,
    pub accepted: Family<ConnectionLabels, Counter>,
    pub active: Family<ConnectionLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub classify_seconds: Histogram,
    pub errors: Family<ErrorLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    tasks_alive: Gauge,
    open_fds: Gauge,
    resident_bytes: Gauge,
    /// The runtimes whose tasks `mux_tasks_alive` counts.
    runtimes: Mutex<Vec<tokio::runtime::Handle>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mux");
        let m = Metrics {
            open: Gauge::default(),
            accepted: Family::default(),
            active: Family::default(),
            bytes: Family::default(),
            // 50 µs to about 3 s: a pipelined first packet decides in
            // microseconds, a silent SSH client waits out the timeout.
            classify_seconds: Histogram::new(exponential_buckets(0.00005, 3.0, 11)),
            errors: Family::default(),
            reloads: Family::default(),
            tasks_alive: Gauge::default(),
            open_fds: Gauge::default(),
            resident_bytes: Gauge::default(),
            runtimes: Mutex::new(Vec::new()),
            registry: Registry::default(),
        };
        registry.register(
            "connections_open",
            "Client connections open now, classified or not",
            m.open.clone(),
        );
        registry.register(
            "connections_accepted",
            "Client connections routed, by route, protocol and data path",
            m.accepted.clone(),
        );
        registry.register(
            "connections_active",
            "Client connections routed and still open",
            m.active.clone(),
        );
        registry.register(
            "bytes",
            "Bytes relayed, counted when a connection ends (kernel counters included)",
            m.bytes.clone(),
        );
        registry.register(
            "classify_seconds",
            "Time from accept to a routing decision",
            m.classify_seconds.clone(),
        );
        registry.register(
            "errors",
            "Connections that failed, by kind",
            m.errors.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads, by result",
            m.reloads.clone(),
        );
        registry.register(
            "tasks_alive",
            "Tokio tasks alive across mux's runtimes",
            m.tasks_alive.clone(),
        );
        registry.register(
            "open_fds",
            "File descriptors open in the mux process",
            m.open_fds.clone(),
        );
        registry.register(
            "resident_memory_bytes",
            "Resident memory of the mux process",
            m.resident_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts the tasks of the runtime this is called on.
    pub fn add_runtime(&self, handle: tokio::runtime::Handle) {
        self.runtimes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    pub fn classified(&self, took: Duration) {
        self.classify_seconds.observe(took.as_secs_f64());
    }

    /// Counts a routed connection as active until the guard drops.
    pub fn routed(&'static self, labels: ConnectionLabels) -> ActiveGuard {
        self.accepted.get_or_create(&labels).inc();
        self.active.get_or_create(&labels).inc();
        ActiveGuard {
            metrics: self,
            labels,
        }
    }

    pub fn moved(&self, route: &str, up: u64, down: u64) {
        for (direction, n) in [("up", up), ("down", down)] {
            self.bytes
                .get_or_create(&BytesLabels {
                    route: route.to_string(),
                    direction,
                })
                .inc_by(n);
        }
    }

    /// The text exposition, with the process figures read now.
    pub fn render(&self) -> String {
        let tasks: usize = self
            .runtimes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|h| h.metrics().num_alive_tasks())
            .sum();
        self.tasks_alive.set(tasks as i64);
        self.open.set(crate::limits::open() as i64);
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        if let Some(rss) = resident_bytes() {
            self.resident_bytes.set(rss as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Keeps a connection in `mux_connections_active` while it lives, so every
/// way out (an early return, an error, a panic) takes it off again.
pub struct ActiveGuard {
    metrics: &'static Metrics,
    labels: ConnectionLabels,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.metrics.active.get_or_create(&self.labels).dec();
    }
}

fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_the_counters() {
        let m = get();
        let labels = ConnectionLabels {
            route: "ssh".into(),
            protocol: "ssh".into(),
            datapath: "splice".into(),
        };
        let guard = m.routed(labels);
        m.moved("ssh", 10, 20);
        m.error(kind::LIMIT);
        let text = m.render();
        assert!(
            text.contains(
                "mux_connections_active{route=\"ssh\",protocol=\"ssh\",datapath=\"splice\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("mux_bytes_total{route=\"ssh\",direction=\"down\"} 20"),
            "{text}"
        );
        assert!(
            text.contains("mux_errors_total{kind=\"limit\"} 1"),
            "{text}"
        );
        drop(guard);
        assert!(m.render().contains(
            "mux_connections_active{route=\"ssh\",protocol=\"ssh\",datapath=\"splice\"} 0"
        ));
    }
}
