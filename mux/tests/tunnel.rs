//! Targets through the shared port on loopback: HTTP CONNECT to named hosts
//! with their tokens, `mux connect` as an ssh ProxyCommand, and `mux agent`
//! exposing a target from the far side, all through the real binary.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::*;
use tokio::runtime::Runtime;

const LIMIT: Duration = Duration::from_secs(5);

/// mux on loopback with one ssh route (to `ssh`) and these `[[target]]`
/// tables, `top` going before them (a global token).
/// The backends most tests need, on a runtime that must outlive them: an
/// echo server (to stand for a target) and an SSH-like route's banner server.
fn backends() -> Result<(Runtime, SocketAddr, SocketAddr)> {
    let rt = Runtime::new()?;
    let (echo, ssh) =
        rt.block_on(async { (echo_backend().await, banner_backend("SSH-2.0-route").await) });
    Ok((rt, echo, ssh))
}

fn start(top: &str, ssh: SocketAddr, targets: &str) -> Result<Mux> {
    Mux::with_config(&format!("{}{targets}", config(top, &[("ssh", "ssh", ssh)])))
}

/// A target that must never be dialled: a listener nobody accepts on, so a
/// connection made to it waits in its queue and a nonblocking accept shows it.
fn untouched_listener() -> Result<(std::net::TcpListener, SocketAddr)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    let addr = l.local_addr()?;
    Ok((l, addr))
}

/// Whether nothing connected to `l`, after giving a stray dial time to land.
fn accepted_nothing(l: &std::net::TcpListener) -> bool {
    std::thread::sleep(Duration::from_millis(300));
    matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// An echo backend that counts the connections it accepted.
async fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    let addr = backend(move |mut s| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    })
    .await;
    (addr, n)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Asserts a refusal with `code` and a one-line body; returns the answer.
fn refused(c: Connected, code: u16) -> Result<(String, String)> {
    ensure!(c.code() == code, "expected {code}, got head:\n{}", c.head);
    let head = c.head.clone();
    let body = c.body()?;
    ensure!(
        !body.trim().is_empty() && !body.trim().contains('\n'),
        "{code}: body should be one line, is {body:?}"
    );
    Ok((head, body))
}

/// Asserts the tunnel is open, per the spec's exact answer.
fn established(c: &Connected) -> Result<()> {
    ensure!(
        c.head == "HTTP/1.1 200 Connection Established",
        "expected a bare 200 Connection Established, got head:\n{}",
        c.head
    );
    Ok(())
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Stream::new(seed).fill(&mut v);
    v
}

#[test]
fn connect_reaches_the_target_and_pipelined_bytes_arrive_first() -> Result<()> {
    let (rt, echo, ssh) = backends()?;
    let mux = start(
        "",
        ssh,
        &format!("[[target]]\nname = \"echo\"\naddress = \"{echo}\"\n"),
    )?;

    // The client's own port in the authority is ignored for a name, and the
    // name matches whatever its case; the first bytes ride with the head.
    let first = b"first bytes, in the same write as the CONNECT head\n";
    let mut c = http_connect(mux.addr, "EcHo:1", None, first, LIMIT)?;
    established(&c)?;
    let echoed = c.read_early(first.len(), LIMIT)?;
    ensure!(
        echoed == first,
        "the pipelined bytes came back as {:?}",
        String::from_utf8_lossy(&echoed)
    );
    let more = payload(256 * 1024, 1);
    let back = c.echo(&more, Duration::from_secs(10))?;
    ensure!(
        back.len() == more.len() && sha256(&back) == sha256(&more),
        "echo through the tunnel: {} bytes back of {}",
        back.len(),
        more.len(),
    );

    // The target's address string matches too.
    let mut c = http_connect(mux.addr, &echo.to_string(), None, b"", LIMIT)?;
    established(&c)?;
    ensure!(c.echo(b"by address", LIMIT)? == b"by address");

    // Other traffic on the port still goes by the routes.
    let out = rt.block_on(exchange(mux.addr, b"SSH-2.0-client\r\n", true))?;
    ensure!(
        out.starts_with(b"SSH-2.0-route\n"),
        "ssh route beside targets: {:?}",
        String::from_utf8_lossy(&out)
    );
    Ok(())
}

#[test]
fn unknown_targets_get_403_and_nothing_is_dialled() -> Result<()> {
    let (_rt, echo, ssh) = backends()?;
    let mut mux = start(
        "",
        ssh,
        &format!("[[target]]\nname = \"echo\"\naddress = \"{echo}\"\n"),
    )?;

    let (head, _) = refused(
        http_connect(mux.addr, "unlisted:22", None, b"", LIMIT)?,
        403,
    )?;
    ensure!(head.starts_with("HTTP/1.1 403 Forbidden"), "{head}");
    let line = mux.wait_log("refused", LIMIT)?;
    ensure!(line.contains("unlisted"), "refusal log line: {line}");

    // A live listener that is no target's name or address is not reachable,
    // not even by its exact address.
    let (listener, addr) = untouched_listener()?;
    let (head, _) = refused(
        http_connect(mux.addr, &addr.to_string(), None, b"", LIMIT)?,
        403,
    )?;
    ensure!(head.starts_with("HTTP/1.1 403 Forbidden"), "{head}");
    ensure!(
        accepted_nothing(&listener),
        "mux dialled {addr}, which is no target"
    );
    wait_lines(|| mux.logs(), "refused", 2, LIMIT)?;
    Ok(())
}

#[test]
fn tokens_are_checked_before_anything_is_dialled() -> Result<()> {
    let rt = Runtime::new()?;
    let ((locked, locked_n), (global, global_n), (filed, _), ssh) = rt.block_on(async {
        (
            counting_echo().await,
            counting_echo().await,
            counting_echo().await,
            banner_backend("SSH-2.0-route").await,
        )
    });
    let dir = Scratch::new("tunnel-token");
    let file = dir.write("filed.token", "  file-secret\n");
    let mux = start(
        "token = \"global-secret\"",
        ssh,
        &format!(
            "[[target]]\nname = \"locked\"\naddress = \"{locked}\"\ntoken = \"node-secret\"\n\
             [[target]]\nname = \"global\"\naddress = \"{global}\"\n\
             [[target]]\nname = \"filed\"\naddress = \"{filed}\"\ntoken_file = \"{}\"\n",
            file.display()
        ),
    )?;

    // Wrong, missing, and the global token where the target has its own.
    for (i, auth) in [
        Some(bearer("wrong")),
        None,
        Some(bearer("global-secret")),
        Some(format!("Basic {}", base64(b"anyuser:wrong"))),
    ]
    .iter()
    .enumerate()
    {
        let c = http_connect(mux.addr, "locked:22", auth.as_deref(), b"", LIMIT)?;
        let challenge = c.header("proxy-authenticate");
        let (head, _) = refused(c, 407)?;
        ensure!(
            head.starts_with("HTTP/1.1 407 Proxy Authentication Required"),
            "{auth:?}: {head}"
        );
        ensure!(
            challenge.as_deref() == Some("Bearer realm=\"mux\""),
            "{auth:?}: challenge {challenge:?}"
        );
        wait_lines(|| mux.logs(), "refused", i + 1, LIMIT)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        locked_n.load(Ordering::SeqCst) == 0,
        "mux dialled the target before the token was right"
    );

    // Basic with any user name and the token as password, or Bearer.
    for auth in [
        format!("Basic {}", base64(b"anyuser:node-secret")),
        bearer("node-secret"),
    ] {
        let mut c = http_connect(mux.addr, "locked:22", Some(&auth), b"", LIMIT)?;
        established(&c).map_err(|e| e.context(auth.clone()))?;
        ensure!(c.echo(b"locked open", LIMIT)? == b"locked open", "{auth}");
    }
    ensure!(locked_n.load(Ordering::SeqCst) == 2);

    // A target without its own token takes the global one, and only it.
    let (head, _) = refused(http_connect(mux.addr, "global:22", None, b"", LIMIT)?, 407)?;
    ensure!(head.contains("Bearer realm=\"mux\""), "{head}");
    refused(
        http_connect(
            mux.addr,
            "global:22",
            Some(&bearer("node-secret")),
            b"",
            LIMIT,
        )?,
        407,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(global_n.load(Ordering::SeqCst) == 0);
    let mut c = http_connect(
        mux.addr,
        "global:22",
        Some(&bearer("global-secret")),
        b"",
        LIMIT,
    )?;
    established(&c)?;
    ensure!(c.echo(b"global open", LIMIT)? == b"global open");
    ensure!(global_n.load(Ordering::SeqCst) == 1);

    // token_file: its content, trimmed.
    let mut c = http_connect(
        mux.addr,
        "filed:22",
        Some(&bearer("file-secret")),
        b"",
        LIMIT,
    )?;
    established(&c)?;
    ensure!(c.echo(b"filed open", LIMIT)? == b"filed open");
    Ok(())
}

#[test]
fn a_dead_target_gets_502_and_mux_serves_on() -> Result<()> {
    let (_rt, echo, ssh) = backends()?;
    let dead = format!("127.0.0.1:{}", free_port());
    let mut mux = start(
        "",
        ssh,
        &format!(
            "[[target]]\nname = \"dead\"\naddress = \"{dead}\"\n\
             [[target]]\nname = \"echo\"\naddress = \"{echo}\"\n"
        ),
    )?;
    let (head, _) = refused(
        http_connect(mux.addr, "dead:22", None, b"lost", LIMIT)?,
        502,
    )?;
    ensure!(head.starts_with("HTTP/1.1 502 Bad Gateway"), "{head}");
    let mut c = http_connect(mux.addr, "echo:22", None, b"", LIMIT)?;
    established(&c)?;
    ensure!(c.echo(b"still here", LIMIT)? == b"still here");
    ensure!(mux.alive());
    Ok(())
}

#[test]
fn without_targets_connect_is_left_to_the_routes() -> Result<()> {
    let (rt, web, ssh) = backends()?;
    let mux = Mux::with_config(&config("", &[("ssh", "ssh", ssh), ("web", "http", web)]))?;
    // The http route's backend (an echo) gets the CONNECT request as sent.
    let request = b"CONNECT node2:22 HTTP/1.1\r\nHost: node2:22\r\n\r\n";
    let out = rt.block_on(exchange(mux.addr, request, true))?;
    ensure!(
        out == request,
        "CONNECT without targets: {:?}",
        String::from_utf8_lossy(&out)
    );
    Ok(())
}

/// `mux connect` with these extra arguments, MUX_TOKEN as given.
fn mux_connect(args: &[&str], env_token: Option<&str>) -> Command {
    let mut c = Command::new(mux_bin());
    c.arg("connect").args(args).env_remove("MUX_TOKEN");
    if let Some(t) = env_token {
        c.env("MUX_TOKEN", t);
    }
    c.env("RUST_LOG", "info");
    c
}

#[test]
fn mux_connect_carries_a_mib_through_the_target_unchanged() -> Result<()> {
    let (_rt, echo, ssh) = backends()?;
    let mux = start(
        "",
        ssh,
        &format!("[[target]]\nname = \"echo\"\naddress = \"{echo}\"\ntoken = \"echo-secret\"\n"),
    )?;
    let dir = Scratch::new("tunnel-connect");
    let token = dir.write("token", "echo-secret\n");
    let server = mux.addr.to_string();
    let input = payload(1 << 20, 7);
    let (status, out, err) = run_with_input(
        &mut mux_connect(
            &["--token-file", token.to_str().unwrap(), &server, "echo"],
            None,
        ),
        input.clone(),
        Duration::from_secs(30),
    )?;
    ensure!(status.success(), "mux connect: {status}; stderr: {err}");
    ensure!(
        out.len() == input.len() && sha256(&out) == sha256(&input),
        "{} bytes back of {}; stderr: {err}",
        out.len(),
        input.len()
    );

    // The token from the environment, the target as name:port.
    let (status, out, err) = run_with_input(
        &mut mux_connect(&[&server, "echo:22"], Some("echo-secret")),
        b"from the environment".to_vec(),
        Duration::from_secs(10),
    )?;
    ensure!(status.success(), "mux connect (MUX_TOKEN): {status}; {err}");
    ensure!(out == b"from the environment", "{out:?}");
    Ok(())
}

#[test]
fn mux_connect_reports_a_refusal_and_exits_1() -> Result<()> {
    let rt = Runtime::new()?;
    let (echo, n) = rt.block_on(counting_echo());
    let ssh = rt.block_on(banner_backend("SSH-2.0-route"));
    let mux = start(
        "",
        ssh,
        &format!("[[target]]\nname = \"echo\"\naddress = \"{echo}\"\ntoken = \"echo-secret\"\n"),
    )?;
    let server = mux.addr.to_string();
    for (args, token, expect) in [
        (vec![server.as_str(), "echo"], Some("wrong"), "407"),
        (vec![server.as_str(), "echo"], None, "407"),
        (
            vec![server.as_str(), "unlisted:22"],
            Some("echo-secret"),
            "403 Forbidden",
        ),
    ] {
        let (status, out, err) = run_with_input(
            &mut mux_connect(&args, token),
            b"never delivered".to_vec(),
            Duration::from_secs(10),
        )?;
        ensure!(
            status.code() == Some(1),
            "{args:?} token {token:?}: {status}; stderr: {err}"
        );
        ensure!(
            err.contains("mux connect:") && err.contains(expect),
            "{args:?} token {token:?}: stderr {err:?}"
        );
        ensure!(out.is_empty(), "{args:?}: stdout {out:?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    ensure!(n.load(Ordering::SeqCst) == 0);
    Ok(())
}

/// `mux agent` to `server` exposing node3 as `expose`, token from `token`.
fn agent(server: SocketAddr, token: &std::path::Path, expose: SocketAddr) -> Result<Logged> {
    Logged::spawn(
        Command::new(mux_bin())
            .arg("agent")
            .arg("--server")
            .arg(server.to_string())
            .arg("--token-file")
            .arg(token)
            .arg("--expose")
            .arg(format!("node3={expose}"))
            .env_remove("MUX_TOKEN"),
        "agent",
    )
}

/// Polls CONNECT node3 until a 502 answer arrives; how long after `since`.
fn first_502(mux: SocketAddr, since: Instant, within: Duration) -> Option<Duration> {
    while since.elapsed() < within {
        let left = within.saturating_sub(since.elapsed());
        if let Ok(c) = http_connect(mux, "node3:22", Some(&bearer("node3-secret")), b"", left)
            && c.code() == 502
        {
            return Some(since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn an_agent_exposes_its_target_and_mux_follows_its_life() -> Result<()> {
    let (_rt, echo, ssh) = backends()?;
    let mut mux = start(
        "",
        ssh,
        "[[target]]\nname = \"node3\"\ntoken = \"node3-secret\"\n",
    )?;
    let dir = Scratch::new("tunnel-agent");
    let good = dir.write("good.token", "node3-secret\n");
    let bad = dir.write("bad.token", "not-the-secret\n");
    let auth = bearer("node3-secret");

    // No agent yet.
    let (head, _) = refused(
        http_connect(mux.addr, "node3:22", Some(&auth), b"", LIMIT)?,
        502,
    )?;
    ensure!(head.starts_with("HTTP/1.1 502 Bad Gateway"), "{head}");

    // An agent with the wrong token is turned away and exposes nothing.
    let refused_before = mux.logs().iter().filter(|l| l.contains("refused")).count();
    let mut impostor = agent(mux.addr, &bad, echo)?;
    let start = Instant::now();
    loop {
        let mux_says = mux.logs().iter().filter(|l| l.contains("refused")).count() > refused_before;
        let agent_says = impostor.logs().iter().any(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("401") || l.contains("refused")
        });
        if mux_says || agent_says {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "an agent with a wrong token was not refused within 10 s; agent log:\n{}\nmux log:\n{}",
            impostor.logs().join("\n"),
            mux.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        !mux.logs()
            .iter()
            .any(|l| l.contains("registered target node3")),
        "mux registered an agent with a wrong token:\n{}",
        mux.logs().join("\n")
    );
    refused(
        http_connect(mux.addr, "node3:22", Some(&auth), b"", LIMIT)?,
        502,
    )?;
    impostor.kill();

    let mut node3 = agent(mux.addr, &good, echo)?;
    mux.wait_log("registered target node3", Duration::from_secs(10))?;
    node3.wait_log(
        &format!("agent: connected to {}, exposing node3", mux.addr),
        Duration::from_secs(10),
    )?;
    let first = b"pipelined through the agent\n";
    let mut c = http_connect(mux.addr, "node3:22", Some(&auth), first, LIMIT)?;
    established(&c)?;
    ensure!(c.read_early(first.len(), LIMIT)? == first);
    let more = payload(256 * 1024, 3);
    let back = c.echo(&more, Duration::from_secs(10))?;
    ensure!(
        sha256(&back) == sha256(&more),
        "echo through the agent: {} bytes back of {}",
        back.len(),
        more.len()
    );
    drop(c);
    // The target's token still applies with an agent behind it.
    refused(
        http_connect(mux.addr, "node3:22", Some(&bearer("wrong")), b"", LIMIT)?,
        407,
    )?;

    // Killed outright: mux notices at once.
    let killed = Instant::now();
    node3.kill();
    let took = first_502(mux.addr, killed, Duration::from_secs(1));
    ensure!(
        took.is_some(),
        "no 502 for node3 within 1 s of SIGKILL of its agent; mux log:\n{}",
        mux.logs().join("\n")
    );

    // A new agent restores it, mux untouched.
    let mut node3 = agent(mux.addr, &good, echo)?;
    wait_lines(
        || mux.logs(),
        "registered target node3",
        2,
        Duration::from_secs(10),
    )?;
    node3.wait_log("agent: connected to", Duration::from_secs(10))?;
    let mut c = http_connect(mux.addr, "node3:22", Some(&auth), b"", LIMIT)?;
    established(&c)?;
    ensure!(c.echo(b"back again", LIMIT)? == b"back again");
    ensure!(mux.alive());
    Ok(())
}

/// `mux check --config` on `toml`: (success, stdout + stderr).
fn check(toml: &str) -> Result<(bool, String)> {
    let dir = Scratch::new("tunnel-check");
    let path = dir.write("mux.toml", toml);
    let (status, out, err) = run(
        Command::new(mux_bin())
            .arg("check")
            .arg("--config")
            .arg(&path),
        Duration::from_secs(10),
    )?;
    Ok((status.success(), format!("{out}{err}")))
}

#[test]
fn an_agent_target_without_any_token_is_a_config_error() -> Result<()> {
    let route = "listen = [\"127.0.0.1:0\"]\n\
                 [[route]]\nname = \"ssh\"\nprotocol = \"ssh\"\nbackend = \"127.0.0.1:22\"\n";
    let (ok, out) = check(&format!("{route}[[target]]\nname = \"node3\"\n"))?;
    ensure!(!ok, "an agent target with no token anywhere passed: {out}");
    ensure!(out.contains("token"), "the message should say why: {out}");

    // Either token makes it whole; an addressed target needs none.
    for toml in [
        format!("token = \"g\"\n{route}[[target]]\nname = \"node3\"\n"),
        format!("{route}[[target]]\nname = \"node3\"\ntoken = \"t\"\n"),
        format!("{route}[[target]]\nname = \"node2\"\naddress = \"198.51.100.2:22\"\n"),
    ] {
        let (ok, out) = check(&toml)?;
        ensure!(ok, "{toml}\n-> {out}");
    }

    // Targets do not replace routes.
    let (ok, out) = check(
        "listen = [\"127.0.0.1:0\"]\n[[target]]\nname = \"node2\"\naddress = \"198.51.100.2:22\"\n",
    )?;
    ensure!(!ok, "a config with targets and no route passed: {out}");
    Ok(())
}

#[test]
fn an_agent_comes_back_by_itself_when_the_box_restarts() -> Result<()> {
    let (_rt, echo, ssh) = backends()?;
    let targets = "[[target]]\nname = \"node3\"\ntoken = \"node3-secret\"\n";
    let mut first = start("", ssh, targets)?;
    let addr = first.addr;
    let dir = Scratch::new("tunnel-agent-back");
    let token = dir.write("node3.token", "node3-secret\n");
    let mut node3 = agent(addr, &token, echo)?;
    first.wait_log("registered target node3", Duration::from_secs(10))?;
    ensure!(first.stop()?.success());

    // A new mux on the same address: the agent, left running, finds it.
    let mut second = Mux::with_config(&format!(
        "listen = [\"{addr}\"]\n[[route]]\nname = \"ssh\"\nprotocol = \"ssh\"\nbackend = \"{ssh}\"\n{targets}"
    ))?;
    second.wait_log("registered target node3", Duration::from_secs(10))?;
    wait_lines(
        || node3.logs(),
        "agent: connected to",
        2,
        Duration::from_secs(5),
    )?;
    let mut c = http_connect(addr, "node3:22", Some(&bearer("node3-secret")), b"", LIMIT)?;
    established(&c)?;
    ensure!(c.echo(b"after the box restarted", LIMIT)? == b"after the box restarted");
    node3.kill();
    Ok(())
}
