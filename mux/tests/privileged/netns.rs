//! Network namespaces for the privileged tests: running commands in them and
//! waiting for their listeners. Each test builds its own namespaces, with
//! documentation-range addresses only.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Proc, can_run, have_tool, is_root, run};

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

pub const SERVER_V4: &str = "192.0.2.1";
pub const CLIENT_V4: &str = "192.0.2.2";
pub const SERVER_V6: &str = "2001:db8::1";
pub const CLIENT_V6: &str = "2001:db8::2";

/// Two namespaces, a server host and a client host, and the veth between
/// them; torn down on drop.
pub struct Lab {
    pub server: String,
    pub client: String,
    /// The client host's end of the veth.
    client_if: String,
}

impl Lab {
    pub fn new() -> Lab {
        assert!(can_run("root with ip netns", is_root() && have_tool("ip")));
        let tag = unique_tag();
        let (s_if, c_if) = (format!("mxs{tag}"), format!("mxc{tag}"));
        let lab = Lab {
            server: format!("mux-srv-{tag}"),
            client: format!("mux-cli-{tag}"),
            client_if: c_if.clone(),
        };
        ip(&["netns", "add", &lab.server]);
        ip(&["netns", "add", &lab.client]);
        ip(&["link", "add", &s_if, "type", "veth", "peer", "name", &c_if]);
        ip(&["link", "set", &s_if, "netns", &lab.server]);
        ip(&["link", "set", &c_if, "netns", &lab.client]);
        for (ns, dev, v4, v6) in [
            (&lab.server, &s_if, SERVER_V4, SERVER_V6),
            (&lab.client, &c_if, CLIENT_V4, CLIENT_V6),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    pub fn wait_listening(&self, port: u16) -> bool {
        wait_listening(&self.server, port)
    }

    /// A long-running process in the server namespace, killed on drop.
    pub fn serve(&self, program: &str, args: &[&str]) -> Proc {
        Proc(
            in_ns(&self.server, program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// Runs a client command in the client namespace: (success, stdout+stderr).
    pub fn client(&self, program: &str, args: &[String]) -> (bool, String) {
        let (status, out, err) = run(
            in_ns(&self.client, program).args(args),
            Duration::from_secs(30),
        )
        .unwrap();
        (status.success(), format!("{out}{err}"))
    }

    /// The client host drops off the network without a word: its end of
    /// the veth goes down, so nothing sent to it arrives and it sends
    /// nothing (no FIN, no reset), as a laptop closed or a NAT that forgot
    /// the connection.
    pub fn cut_client(&self) {
        ip(&["-n", &self.client, "link", "set", &self.client_if, "down"]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth, and so the pair.
        for ns in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
