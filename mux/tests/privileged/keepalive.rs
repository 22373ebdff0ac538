//! A host that drops off the network without a FIN or a reset, the client's
//! or a backend's: mux's TCP keepalive finds it gone, ends the pair and
//! closes the other side's connection, between two network namespaces this
//! test builds (addresses of the documentation range 192.0.2.0/24 only).

use std::time::Duration;

use super::netns::{CLIENT_V4, Lab, SERVER_V4, in_ns};
use crate::common::*;

/// The backend, on the address given: takes one connection, says so, and
/// says how it ended.
const BACKEND: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000))
s.listen()
c, _ = s.accept()
print("backend: accepted", file=sys.stderr, flush=True)
while True:
    try:
        data = c.recv(65536)
    except OSError as e:
        print("backend: closed,", e, file=sys.stderr, flush=True)
        break
    if not data:
        print("backend: closed, end of stream", file=sys.stderr, flush=True)
        break
"#;

/// The client in the client host: connects, says hello, then waits silent.
fn client_script(port: u16) -> String {
    format!(
        "import socket, time\ns = socket.create_connection(({SERVER_V4:?}, {port}))\ns.sendall(b'hello')\ntime.sleep(120)\n"
    )
}

#[test]
fn a_client_gone_silent_is_found_by_keepalive() {
    assert!(can_run("python3", have_tool("python3")));
    let lab = Lab::new();
    let mut backend = Logged::spawn(
        in_ns(&lab.server, "python3").args(["-c", BACKEND, "127.0.0.1"]),
        "backend",
    )
    .unwrap();
    assert!(lab.wait_listening(9000), "the backend does not listen");
    let mut mux = probing_mux(&lab, &format!("{SERVER_V4}:0"), "127.0.0.1:9000");
    let _client = Proc(
        in_ns(&lab.client, "python3")
            .args(["-c", &client_script(mux.addr.port())])
            .spawn()
            .unwrap(),
    );
    cut_once_accepted(&lab, &mut backend);
    let closed = backend
        .wait_log("backend: closed", Duration::from_secs(30))
        .expect("the backend's connection outlived its client's host");
    timed_out(&mut mux, &closed);
}

/// mux in the server host, one route to `backend`, probing a silent peer
/// after 1 s and then every second; the kernel gives up after its 9 probes
/// (`tcp_keepalive_probes`): about 10 s.
fn probing_mux(lab: &Lab, listen: &str, backend: &str) -> Mux {
    let wrapper = ["ip", "netns", "exec", lab.server.as_str()];
    Mux::with_config_under(
        &wrapper,
        &format!(
            "listen = \"{listen}\"\ntcp_keepalive = \"1s\"\n[[route]]\nprotocol = \"any\"\nbackend = \"{backend}\"\n"
        ),
    )
    .unwrap()
}

/// Cuts the client host off once the backend holds its connection.
fn cut_once_accepted(lab: &Lab, backend: &mut Logged) {
    backend
        .wait_log("backend: accepted", Duration::from_secs(10))
        .unwrap();
    lab.cut_client();
}

/// The side that outlived the other's host saw its connection `closed`;
/// mux must say why.
fn timed_out(mux: &mut Mux, closed: &str) {
    let line = mux
        .wait_log("timed out", Duration::from_secs(5))
        .expect("mux did not say why the connection ended");
    assert!(line.contains("route=any"), "{line}");
    println!("{closed}\n{line}");
}

/// A backend on another host (the test's second namespace, as a CONNECT
/// target or a route to the private network would be) whose link goes down
/// while the client is idle: the client's own keepalive probes would reach
/// mux, which answers them, so mux probes the backend itself.
#[test]
fn a_backend_host_gone_silent_is_found_by_keepalive() {
    assert!(can_run("python3", have_tool("python3")));
    let lab = Lab::new();
    let mut backend = Logged::spawn(
        in_ns(&lab.client, "python3").args(["-c", BACKEND, CLIENT_V4]),
        "backend",
    )
    .unwrap();
    assert!(
        super::netns::wait_listening(&lab.client, 9000),
        "the backend does not listen"
    );
    let mut mux = probing_mux(&lab, "127.0.0.1:0", &format!("{CLIENT_V4}:9000"));
    // The client, on the server host itself: says hello, then waits for
    // the end of its connection, silent.
    let client = format!(
        "import socket, sys, time\ns = socket.create_connection(('127.0.0.1', {}))\ns.sendall(b'hello')\nt = time.time()\ns.settimeout(60)\ntry:\n    s.recv(1)\nexcept OSError as e:\n    print('client: error', e, file=sys.stderr, flush=True)\nprint(f'client: closed after {{time.time() - t:.1f}} s', file=sys.stderr, flush=True)\n",
        mux.addr.port()
    );
    let mut client = Logged::spawn(
        in_ns(&lab.server, "python3").args(["-c", &client]),
        "client",
    )
    .unwrap();
    cut_once_accepted(&lab, &mut backend);
    let closed = client
        .wait_log("client: closed", Duration::from_secs(30))
        .expect("the client's connection outlived its backend's host");
    timed_out(&mut mux, &closed);
}
