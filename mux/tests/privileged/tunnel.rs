//! Targets across three network namespaces this test builds: a client host,
//! a box running mux, and an inner host the client has no route to (a real
//! sshd as target node2, and `mux agent` exposing a second sshd as node3).
//! Only addresses of the documentation ranges 192.0.2.0/24 and
//! 198.51.100.0/24, inside the test's own namespaces, are used.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::netns::{in_ns, ip, unique_tag, wait_listening};
use crate::common::*;

const CLIENT: &str = "192.0.2.2";
const BOX_OUTER: &str = "192.0.2.1";
const BOX_INNER: &str = "198.51.100.1";
const INNER: &str = "198.51.100.2";
/// mux's port on the box.
const PORT: u16 = 2222;

/// client — veth — box — veth — inner, and no routes beyond each link:
/// the client reaches the inner host only through mux. Torn down on drop.
struct Lab {
    client: String,
    boxed: String,
    inner: String,
}

impl Lab {
    /// `None` (the test skips) where it cannot run, except under CI.
    fn new() -> Option<Lab> {
        if !can_run(
            "root with ip netns, sshd, ssh, nc",
            is_root()
                && have_tool("ip")
                && have_tool("sshd")
                && have_tool("ssh")
                && have_tool("nc"),
        ) {
            return None;
        }
        let tag = unique_tag();
        let lab = Lab {
            client: format!("mux-tcli-{tag}"),
            boxed: format!("mux-tbox-{tag}"),
            inner: format!("mux-tin-{tag}"),
        };
        for ns in [&lab.client, &lab.boxed, &lab.inner] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let links = [
            (
                &lab.client,
                format!("mtc{tag}"),
                CLIENT,
                &lab.boxed,
                format!("mtb{tag}"),
                BOX_OUTER,
            ),
            (
                &lab.boxed,
                format!("mtd{tag}"),
                BOX_INNER,
                &lab.inner,
                format!("mti{tag}"),
                INNER,
            ),
        ];
        for (a_ns, a_if, a_ip, b_ns, b_if, b_ip) in &links {
            ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if]);
            for (ns, dev, addr) in [(a_ns, a_if, a_ip), (b_ns, b_if, b_ip)] {
                ip(&["link", "set", dev, "netns", ns]);
                ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
                ip(&["-n", ns, "link", "set", dev, "up"]);
            }
        }
        Some(lab)
    }

    fn wrapper(ns: &str) -> [&str; 4] {
        ["ip", "netns", "exec", ns]
    }

    /// Runs `program` in the client namespace: (success, stdout+stderr).
    fn client(&self, program: &str, args: &[String], env: &[(&str, &str)]) -> (bool, String) {
        let mut c = in_ns(&self.client, program);
        c.args(args).env_remove("MUX_TOKEN");
        for (k, v) in env {
            c.env(k, v);
        }
        let (status, out, err) = run(&mut c, Duration::from_secs(60)).unwrap();
        (status.success(), format!("{out}{err}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace removes its ends of the veths, and so the pairs.
        for ns in [&self.client, &self.boxed, &self.inner] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a thread that joined namespace `ns`'s network: sockets it
/// opens live there.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).expect("netns file");
            // SAFETY: a plain syscall on a valid fd; it affects this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

/// mux as the client host sees it.
fn box_addr() -> SocketAddr {
    format!("{BOX_OUTER}:{PORT}").parse().unwrap()
}

/// The inner host's sshd on INNER:22, target node2.
fn node2_sshd(lab: &Lab) -> Sshd {
    Sshd::start_with(&Lab::wrapper(&lab.inner), 22, &[INNER], || {
        wait_listening(&lab.inner, 22)
    })
    .unwrap()
    .expect("sshd on 198.51.100.2:22 in the inner namespace")
}

/// mux on the box, port 2222, with an ssh route (unused) and `targets`.
fn box_mux(lab: &Lab, port: u16, targets: &str) -> Mux {
    let config = format!(
        "listen = [\"0.0.0.0:{port}\"]\n\
         [[route]]\nname = \"ssh\"\nprotocol = \"ssh\"\nbackend = \"127.0.0.1:22\"\n{targets}"
    );
    Mux::with_config_under_and(&Lab::wrapper(&lab.boxed), &config, &[]).unwrap()
}

const TARGETS: &str = "[[target]]\nname = \"node2\"\naddress = \"198.51.100.2:22\"\ntoken = \"node2-secret\"\n\
     [[target]]\nname = \"counted\"\naddress = \"198.51.100.2:2024\"\ntoken = \"node2-secret\"\n\
     [[target]]\nname = \"node3\"\ntoken = \"node3-secret\"\n";

/// ssh options for logging in as root with `key` through `proxy`; the
/// destination (root@HOST) and command follow.
fn ssh_opts(key: &Path, proxy: &str) -> Vec<String> {
    let mut args = ssh_options(key);
    args.extend(["-o".into(), format!("ProxyCommand={proxy}")]);
    args
}

/// The ProxyCommand running `mux connect` to the box, with `args` first.
fn mux_connect_proxy(args: &str) -> String {
    format!("{} connect {args} {BOX_OUTER}:{PORT} %h:%p", mux_bin())
}

/// Logs in to `host` through `proxy` and runs `ip -4 -br addr`, which names
/// the namespace the login landed in by its addresses.
fn ssh_addresses(
    lab: &Lab,
    key: &Path,
    proxy: &str,
    host: &str,
    env: &[(&str, &str)],
) -> (bool, String) {
    let args = [
        ssh_opts(key, proxy),
        vec![
            format!("root@{host}"),
            "echo logged-in-$((40+2)); ip -4 -br addr".into(),
        ],
    ]
    .concat();
    lab.client("ssh", &args, env)
}

fn secret(dir: &Scratch, name: &str, token: &str) -> PathBuf {
    dir.write(name, &format!("{token}\n"))
}

#[test]
fn the_inner_host_is_unreachable_but_ssh_gets_there_through_mux() {
    let Some(lab) = Lab::new() else {
        return;
    };
    let node2 = node2_sshd(&lab);
    let secrets = Scratch::new("tunnel-secrets");
    let token = secret(&secrets, "node2.token", "node2-secret");

    // No route from the client to the inner network; the box has one.
    let (ok, out) = lab.client("nc", &["-z", "-w", "2", INNER, "22"].map(String::from), &[]);
    assert!(!ok, "the client reached {INNER}:22 directly: {out}");
    let (status, _, err) = run(
        in_ns(&lab.boxed, "nc").args(["-z", "-w", "2", INNER, "22"]),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(status.success(), "the box cannot reach {INNER}:22: {err}");

    // OpenBSD nc as ProxyCommand sends no token: a target without one.
    {
        let _open = box_mux(
            &lab,
            PORT + 1,
            "[[target]]\nname = \"node2\"\naddress = \"198.51.100.2:22\"\n",
        );
        let proxy = format!("nc -X connect -x {BOX_OUTER}:{} %h %p", PORT + 1);
        let (ok, out) = ssh_addresses(&lab, &node2.client_key, &proxy, "node2", &[]);
        assert!(ok && out.contains("logged-in-42"), "ssh via nc: {out}");
        assert!(
            out.contains(INNER),
            "ssh via nc did not land on the inner host: {out}"
        );
    }

    let mut mux = box_mux(&lab, PORT, TARGETS);
    let proxy = mux_connect_proxy(&format!("--token-file {}", token.display()));
    let (ok, out) = ssh_addresses(&lab, &node2.client_key, &proxy, "node2", &[]);
    assert!(
        ok && out.contains("logged-in-42"),
        "ssh via mux connect: {out}"
    );
    assert!(
        out.contains(INNER),
        "ssh via mux connect did not land on the inner host: {out}"
    );
    // Without the token, mux connect's refusal is what ssh gets.
    let proxy = mux_connect_proxy("");
    let (ok, out) = ssh_addresses(&lab, &node2.client_key, &proxy, "node2", &[]);
    assert!(
        !ok && out.contains("407"),
        "ssh via mux connect without token: {out}"
    );
    mux.wait_log("refused", Duration::from_secs(5)).unwrap();
}

#[test]
fn scp_of_256_mib_through_mux_connect_keeps_its_sha256() -> Result<()> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    const LEN: usize = 256 << 20;
    let Some(lab) = Lab::new() else {
        return Ok(());
    };
    if !can_run("scp", have_tool("scp")) {
        return Ok(());
    }
    let node2 = node2_sshd(&lab);
    let _mux = box_mux(&lab, PORT, TARGETS);
    let secrets = Scratch::new("tunnel-secrets");
    let token = secret(&secrets, "node2.token", "node2-secret");

    let inner_dir = Scratch::new("tunnel-inner");
    let source = inner_dir.path("big.bin");
    let mut h = Sha256::new();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&source)?);
        let mut s = Stream::new(11);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..LEN / buf.len() {
            s.fill(&mut buf);
            h.update(&buf);
            f.write_all(&buf)?;
        }
        f.flush()?;
    }
    let want = hex(&h.finalize());

    let client_dir = Scratch::new("tunnel-client");
    let dest = client_dir.path("big.bin");
    let proxy = mux_connect_proxy(&format!("--token-file {}", token.display()));
    // -O: the scp protocol, as the test sshd has no sftp subsystem.
    let mut args = vec!["-O".to_string(), "-q".to_string()];
    args.extend(ssh_opts(&node2.client_key, &proxy));
    args.push(format!("root@node2:{}", source.display()));
    args.push(dest.display().to_string());
    let started = Instant::now();
    let (status, out, err) = run(
        in_ns(&lab.client, "scp")
            .args(&args)
            .env_remove("MUX_TOKEN"),
        Duration::from_secs(120),
    )?;
    ensure!(status.success(), "scp: {status}: {out}{err}");
    eprintln!(
        "scp of 256 MiB through mux connect took {:?}",
        started.elapsed()
    );

    let mut h = Sha256::new();
    let mut f = std::fs::File::open(&dest).context("the copy")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n;
        h.update(&buf[..n]);
    }
    ensure!(len == LEN, "copied {len} bytes of {LEN}");
    ensure!(hex(&h.finalize()) == want, "the copy's sha256 differs");
    Ok(())
}

/// A listener in the inner namespace that nobody accepts on: a connection
/// made to it waits in its queue, where a nonblocking accept finds it.
fn inner_listener(lab: &Lab, port: u16) -> std::net::TcpListener {
    let l = in_netns(&lab.inner, || std::net::TcpListener::bind((INNER, port))).unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

/// How many connections waited on `l`, after giving stray ones time to land.
fn accepted(l: &std::net::TcpListener) -> usize {
    std::thread::sleep(Duration::from_millis(300));
    let mut n = 0;
    while l.accept().is_ok() {
        n += 1;
    }
    n
}

#[test]
fn refusals_from_the_client_host_dial_nothing() {
    let Some(lab) = Lab::new() else {
        return;
    };
    let _node2 = node2_sshd(&lab);
    let mux = box_mux(&lab, PORT, TARGETS);
    let raw = inner_listener(&lab, 2023);
    let counted = inner_listener(&lab, 2024);
    let limit = Duration::from_secs(5);

    let answers: Vec<(String, String, u16, String)> = in_netns(&lab.client, || {
        let cases = [
            ("unlisted:22", None),
            ("198.51.100.2:2023", None),
            ("198.51.100.2:2023", Some("Bearer node2-secret")),
            ("counted:22", Some("Bearer wrong")),
            ("counted:22", None),
            ("node2:22", Some("Bearer node3-secret")),
        ];
        cases
            .iter()
            .map(|(authority, auth)| {
                let c = http_connect(box_addr(), authority, *auth, b"", limit).unwrap();
                let challenge = c.header("proxy-authenticate").unwrap_or_default();
                (authority.to_string(), c.status.clone(), c.code(), challenge)
            })
            .collect()
    });
    let expect = [403, 403, 403, 407, 407, 407];
    for ((authority, status, code, challenge), want) in answers.iter().zip(expect) {
        assert_eq!(*code, want, "CONNECT {authority}: {status}");
        if want == 407 {
            assert_eq!(challenge, "Bearer realm=\"mux\"", "CONNECT {authority}");
        }
    }
    assert_eq!(
        accepted(&raw),
        0,
        "mux dialled 198.51.100.2:2023, no target"
    );
    assert_eq!(
        accepted(&counted),
        0,
        "mux dialled `counted` without its token"
    );
    wait_lines(
        || mux.logs(),
        "refused",
        expect.len(),
        Duration::from_secs(5),
    )
    .unwrap();

    // The listener does see a connection when the token is right.
    let code = in_netns(&lab.client, || {
        http_connect(
            box_addr(),
            "counted:22",
            Some("Bearer node2-secret"),
            b"",
            limit,
        )
        .unwrap()
        .code()
    });
    assert_eq!(code, 200);
    assert_eq!(accepted(&counted), 1);
}

/// `mux agent` in the inner namespace, exposing its sshd on 127.0.0.1:2022
/// as node3 to the box.
fn agent(lab: &Lab, token: &Path) -> Logged {
    Logged::spawn(
        in_ns(&lab.inner, mux_bin())
            .args([
                "agent",
                "--server",
                &format!("{BOX_INNER}:{PORT}"),
                "--token-file",
            ])
            .arg(token)
            .args(["--expose", "node3=127.0.0.1:2022"])
            .env_remove("MUX_TOKEN"),
        "agent",
    )
    .unwrap()
}

/// From the client host, polls CONNECT node3 until a 502 arrives; how long
/// after `since` it came.
fn first_502(lab: &Lab, since: Instant, within: Duration) -> Option<Duration> {
    in_netns(&lab.client, || {
        while since.elapsed() < within {
            let left = within.saturating_sub(since.elapsed());
            if let Ok(c) = http_connect(
                box_addr(),
                "node3:22",
                Some("Bearer node3-secret"),
                b"",
                left,
            ) && c.code() == 502
            {
                return Some(since.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    })
}

#[test]
fn ssh_through_an_agent_survives_the_agent_s_restart() {
    let Some(lab) = Lab::new() else {
        return;
    };
    let node3 = Sshd::start_with(&Lab::wrapper(&lab.inner), 2022, &["127.0.0.1"], || {
        wait_listening(&lab.inner, 2022)
    })
    .unwrap()
    .expect("sshd on 127.0.0.1:2022 in the inner namespace");
    let mut mux = box_mux(&lab, PORT, TARGETS);
    let secrets = Scratch::new("tunnel-secrets");
    let token = secret(&secrets, "node3.token", "node3-secret");
    let proxy = mux_connect_proxy("");
    let env = [("MUX_TOKEN", "node3-secret")];

    let mut a = agent(&lab, &token);
    mux.wait_log("registered target node3", Duration::from_secs(10))
        .unwrap();
    a.wait_log(
        &format!("agent: connected to {BOX_INNER}:{PORT}, exposing node3"),
        Duration::from_secs(10),
    )
    .unwrap();
    let (ok, out) = ssh_addresses(&lab, &node3.client_key, &proxy, "node3", &env);
    assert!(ok && out.contains("logged-in-42"), "ssh to node3: {out}");
    assert!(
        out.contains(INNER),
        "ssh to node3 did not land on the inner host: {out}"
    );

    let killed = Instant::now();
    a.kill();
    let took = first_502(&lab, killed, Duration::from_secs(1));
    assert!(
        took.is_some(),
        "no 502 for node3 within 1 s of SIGKILL of its agent; mux log:\n{}",
        mux.logs().join("\n")
    );
    let (ok, out) = ssh_addresses(&lab, &node3.client_key, &proxy, "node3", &env);
    assert!(
        !ok && out.contains("502"),
        "ssh to node3 with no agent: {out}"
    );

    let mut a = agent(&lab, &token);
    wait_lines(
        || mux.logs(),
        "registered target node3",
        2,
        Duration::from_secs(10),
    )
    .unwrap();
    a.wait_log("agent: connected to", Duration::from_secs(10))
        .unwrap();
    let (ok, out) = ssh_addresses(&lab, &node3.client_key, &proxy, "node3", &env);
    assert!(
        ok && out.contains("logged-in-42"),
        "ssh to node3 after the agent's restart: {out}"
    );
    assert!(mux.alive(), "mux was restarted or died");
}
