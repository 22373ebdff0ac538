//! Transparent routes: a backend on the server host's loopback sees the
//! client host's own address and port, on every data path and both address
//! families, between two network namespaces this test builds (documentation
//! addresses only); a route without `transparent` shows it mux's.

use std::time::Duration;

use super::netns::{CLIENT_V4, CLIENT_V6, Lab, SERVER_V4, SERVER_V6, in_ns};
use crate::common::*;

/// A backend on HOST:PORT: reads a line, answers with the address it sees
/// the connection from, then sends 8 MiB and closes.
const BACKEND: &str = r#"
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(64)
payload = bytes(range(256)) * 32768
def serve(c, peer):
    c.makefile("rb").readline()
    c.sendall(f"peer {peer[0]} {peer[1]}\n".encode() + payload)
    c.close()
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"#;

/// The client: connects to HOST:PORT, sends TAG, and prints what the
/// backend saw next to its own address, and whether the 8 MiB arrived whole.
const CLIENT: &str = r#"
import socket, sys
host, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = socket.create_connection((host, port), timeout=20)
me = c.getsockname()
c.sendall(tag.encode() + b"\n")
f = c.makefile("rb")
seen = f.readline().decode().split()
data = f.read()
whole = data == bytes(range(256)) * 32768
print(f"seen={seen[1]}:{seen[2]} me={me[0]}:{me[1]} whole={whole}")
"#;

/// An HTTP backend on 127.0.0.1:9002 answering any GET with the address
/// it sees the connection from.
const HTTP_BACKEND: &str = r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"peer {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", 9002), H).serve_forever()
"#;

/// Runs the client from the client host; returns (seen, own, whole).
fn ask(lab: &Lab, server: &str, port: u16, tag: &str) -> (String, String, bool) {
    let (ok, out) = lab.client(
        "python3",
        &[
            "-c".into(),
            CLIENT.into(),
            server.into(),
            port.to_string(),
            tag.into(),
        ],
    );
    assert!(ok, "client to {server}:{port} ({tag}): {out}");
    let field = |name: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    (field("seen="), field("me="), field("whole=") == "True")
}

#[test]
fn backends_on_loopback_see_the_client_address() {
    assert!(can_run("python3", have_tool("python3")));
    let lab = Lab::new();
    let _v4 = lab.serve("python3", &["-c", BACKEND, "127.0.0.1", "9000"]);
    let _v6 = lab.serve("python3", &["-c", BACKEND, "::1", "9001"]);
    let _http = lab.serve("python3", &["-c", HTTP_BACKEND]);
    assert!(
        lab.wait_listening(9000) && lab.wait_listening(9001) && lab.wait_listening(9002),
        "backends did not start"
    );
    // Not `ip netns exec`, which mounts a /sys of its own without the
    // cgroup file system the kernel path attaches to.
    let net = format!("--net=/run/netns/{}", lab.server);
    let wrapper = ["nsenter", net.as_str()];
    for datapath in ["copy", "splice", "ebpf"] {
        // A fixed port: the namespace is the test's own.
        let mut mux = Mux::with_config_under(
            &wrapper,
            &format!(
                "listen = [\"0.0.0.0:2222\", \"[::]:2222\"]\ndatapath = \"{datapath}\"\n\
                 [[route]]\nname = \"who\"\nprotocol = \"http\"\npath_prefix = \"/who\"\nbackend = \"127.0.0.1:9002\"\ntransparent = true\n\
                 [[route]]\nname = \"v6\"\nprotocol = \"regex\"\nregex = \"^v6\"\nbackend = \"[::1]:9001\"\ntransparent = true\n\
                 [[route]]\nname = \"plain\"\nprotocol = \"regex\"\nregex = \"^plain\"\nbackend = \"127.0.0.1:9000\"\n\
                 [[route]]\nname = \"v4\"\nprotocol = \"any\"\nbackend = \"localhost:9000\"\ntransparent = true\n"
            ),
        )
        .unwrap();
        mux.wait_log("transparent: answers from", Duration::from_secs(5))
            .unwrap();
        let port = 2222;
        for (server, tag, client) in [(SERVER_V4, "v4", CLIENT_V4), (SERVER_V6, "v6", CLIENT_V6)] {
            let (seen, me, whole) = ask(&lab, server, port, tag);
            assert_eq!(
                seen, me,
                "{datapath}: the backend saw {seen}, the client is {me}"
            );
            assert!(seen.starts_with(client), "{datapath}: {seen}");
            assert!(whole, "{datapath} {tag}: the 8 MiB did not arrive whole");
            let line = mux
                .wait_log(&format!("route={tag} "), Duration::from_secs(5))
                .unwrap();
            assert!(line.contains(&format!("datapath={datapath}")), "{line}");
        }
        // The HTTP layer (routing per request) connects the same way.
        let (ok, out) = lab.client(
            "curl",
            &[
                "-sS".into(),
                "--max-time".into(),
                "10".into(),
                format!("http://{SERVER_V4}:{port}/who/"),
            ],
        );
        assert!(
            ok && out.trim() == format!("peer {CLIENT_V4}"),
            "{datapath} http: {out}"
        );
        let (seen, me, whole) = ask(&lab, SERVER_V4, port, "plain");
        assert!(
            seen.starts_with("127.0.0.1:") && me.starts_with(CLIENT_V4) && whole,
            "plain: {seen} {me}"
        );
    }
    // The rules the first mux added serve the next ones, and stay alone.
    let rules = run(
        in_ns(&lab.server, "ip").args(["-4", "rule", "show"]),
        Duration::from_secs(5),
    )
    .unwrap()
    .1;
    let ours: Vec<&str> = rules
        .lines()
        .filter(|l| l.contains("lookup 28021"))
        .map(|l| l.split_once("from ").map_or(l, |(_, r)| r))
        .collect();
    assert_eq!(
        ours,
        [9000, 9002].map(|p| format!("127.0.0.0/8 iif lo ipproto tcp sport {p} lookup 28021")),
        "{rules}"
    );
}

/// Starts mux in the server host on the config in `file`, with more
/// arguments.
fn start(lab: &Lab, file: &std::path::Path, args: &[&str]) -> Mux {
    let mut command = in_ns(&lab.server, mux_bin());
    command.arg("--config").arg(file).args(args);
    Mux::spawn(&mut command).unwrap()
}

fn hup(mux: &Mux) {
    let (status, _, err) = run(
        std::process::Command::new("kill").args(["-HUP", &mux.pid().to_string()]),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(status.success(), "kill -HUP: {err}");
}

/// A reload can make a route transparent; one that cannot work (mux runs
/// as another user, without the capability) is refused, and the route
/// keeps working as it was.
#[test]
fn a_reload_makes_a_route_transparent_or_says_why_not() {
    assert!(can_run("python3", have_tool("python3")));
    let lab = Lab::new();
    let _backend = lab.serve("python3", &["-c", BACKEND, "127.0.0.1", "9000"]);
    assert!(lab.wait_listening(9000), "the backend did not start");
    let config = |port: u16, transparent: bool| {
        format!(
            "listen = \"{SERVER_V4}:{port}\"\n[[route]]\nprotocol = \"any\"\nbackend = \"127.0.0.1:9000\"\ntransparent = {transparent}\n"
        )
    };
    let dir = Scratch::new("transparent-reload");
    for (port, args, works) in [
        (2222, &[][..], true),
        (2223, &["--user", "nobody"][..], false),
    ] {
        let name = format!("mux{port}.toml");
        let mut mux = start(&lab, &dir.write(&name, &config(port, false)), args);
        let (seen, me, _) = ask(&lab, SERVER_V4, port, "before");
        assert!(
            seen.starts_with("127.0.0.1:") && me.starts_with(CLIENT_V4),
            "{seen}"
        );
        dir.write(&name, &config(port, true));
        hup(&mux);
        if works {
            mux.wait_log(
                "reload: transparent: answers from 127.0.0.0/8:9000",
                Duration::from_secs(10),
            )
            .unwrap();
            mux.wait_log("reload: 1 route(s)", Duration::from_secs(5))
                .unwrap();
        } else {
            let line = mux
                .wait_log("reload refused", Duration::from_secs(10))
                .unwrap();
            assert!(line.contains("IP_TRANSPARENT needs"), "{line}");
        }
        let (seen, me, whole) = ask(&lab, SERVER_V4, port, "after");
        if works {
            assert_eq!(seen, me, "after the reload");
        } else {
            assert!(seen.starts_with("127.0.0.1:"), "{seen}");
        }
        assert!(whole);
    }
}
