//! Network namespaces for the privileged tests: running commands in them and
//! waiting for their listeners. Each test builds its own namespaces, with
//! documentation-range addresses only.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::run;

/// Runs `ip ARGS`, failing the test if it fails.
pub fn ip(args: &[&str]) {
    let (status, _, err) = run(Command::new("ip").args(args), Duration::from_secs(10)).unwrap();
    assert!(status.success(), "ip {}: {err}", args.join(" "));
}

/// `program` to be run in namespace `ns`.
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// A tag no other lab of this test process (or of another one running at
/// the same time) uses, for namespace and interface names.
pub fn unique_tag() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{}{n}", std::process::id() % 100_000)
}

/// Whether something listens on TCP `port` in `ns`.
pub fn listening(ns: &str, port: u16) -> bool {
    let out = in_ns(ns, "ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .unwrap();
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// Waits (up to 5 s) until something listens on TCP `port` in `ns`.
pub fn wait_listening(ns: &str, port: u16) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if listening(ns, port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
