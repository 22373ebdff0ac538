//! End-to-end routing through the real binary on loopback: real ssh, curl and
//! openssl clients reach the backend their first bytes call for.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread")]
async fn openssh_logs_in_and_runs_a_command_through_mux() {
    if !can_run(
        "sshd (as root)",
        have_tool("sshd") && have_tool("ssh") && is_root(),
    ) {
        return;
    }
    let sshd = Sshd::start().unwrap();
    let web = http_backend("web").await;
    let mut mux = Mux::with_config(&config(
        "",
        &[("ssh", "ssh", sshd.addr), ("web", "http", web)],
    ))
    .unwrap();
    let args = sshd.ssh_args(mux.addr.port());
    let (status, out, err) = tokio::task::spawn_blocking(move || {
        run(
            Command::new("ssh").args(&args).arg("echo mux-ssh-$((6*7))"),
            Duration::from_secs(30),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "ssh failed: {err}");
    assert_eq!(out.trim(), "mux-ssh-42");
    let line = mux
        .wait_log_async("route=ssh", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(line.contains(&format!("backend={}", sshd.addr)), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_reaches_the_http_backend() {
    if !can_run("curl", have_tool("curl")) {
        return;
    }
    let ssh = banner_backend("SSH-2.0-fake").await;
    let web = http_backend("web").await;
    let mut mux =
        Mux::with_config(&config("", &[("ssh", "ssh", ssh), ("web", "http", web)])).unwrap();
    let url = format!("http://{}/v1/models?x=1", mux.addr);
    let (status, out, err) = tokio::task::spawn_blocking(move || {
        run(
            Command::new("curl").args(["-sS", "--max-time", "10", &url]),
            Duration::from_secs(15),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "curl: {err}");
    assert_eq!(out, "web /v1/models?x=1\n");
    let line = mux
        .wait_log_async("route=web", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        line.contains("http GET /v1/models?x=1 host=127.0.0.1:"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn openssl_servername_reaches_the_backend_of_its_sni() {
    if !can_run("openssl", have_tool("openssl")) {
        return;
    }
    let dir = Scratch::new("tls");
    let (a_cert, a_key) = certificate(&dir, "a.example.com").unwrap();
    let (b_cert, b_key) = certificate(&dir, "b.example.com").unwrap();
    let (_a, a_addr) = tls_server(&a_cert, &a_key).unwrap();
    let (_b, b_addr) = tls_server(&b_cert, &b_key).unwrap();
    let ssh = banner_backend("SSH-2.0-fake").await;
    let toml = format!(
        "listen = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"a\"\nprotocol = \"tls\"\nsni = \"a.example.com\"\nbackend = \"{a_addr}\"\n\
         [[route]]\nname = \"rest\"\nprotocol = \"tls\"\nsni = \"*.example.com\"\nbackend = \"{b_addr}\"\n\
         [[route]]\nname = \"ssh\"\nprotocol = \"ssh\"\nbackend = \"{ssh}\"\n"
    );
    let mut mux = Mux::with_config(&toml).unwrap();
    for (servername, expect_cn, route) in [
        ("a.example.com", "a.example.com", "route=a"),
        ("zzz.example.com", "b.example.com", "route=rest"),
    ] {
        let connect = mux.addr.to_string();
        let (status, out, err) = tokio::task::spawn_blocking(move || {
            run(
                Command::new("openssl").args([
                    "s_client",
                    "-connect",
                    &connect,
                    "-servername",
                    servername,
                    "-brief",
                ]),
                Duration::from_secs(15),
            )
        })
        .await
        .unwrap()
        .unwrap();
        // -brief prints the peer certificate's subject on stderr.
        let all = format!("{out}{err}");
        assert!(
            all.contains(&format!("CN = {expect_cn}")) || all.contains(&format!("CN={expect_cn}")),
            "{servername}: status {status}, output:\n{all}"
        );
        let line = mux
            .wait_log_async(&format!(" tls sni={servername} "), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(line.contains(route), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_client_reaches_the_on_timeout_backend() {
    let ssh = banner_backend("SSH-2.0-on-timeout").await;
    let web = http_backend("web").await;
    let mux = Mux::with_config(&config(
        "classify_timeout = \"300ms\"",
        &[("web", "http", web), ("ssh", "ssh", ssh)],
    ))
    .unwrap();
    let mut s = TcpStream::connect(mux.addr).await.unwrap();
    let mut banner = [0u8; 19];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"SSH-2.0-on-timeout\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hello_trickling_in_byte_by_byte_arrives_whole() {
    // The classifier reads the ClientHello in many small reads; every byte
    // it consumed must reach the backend first and in order.
    let (backend_addr, mut got) = hashing_backend(0, 1).await;
    let other = echo_backend().await;
    let mux = Mux::with_config(&config(
        "classify_timeout = \"10s\"",
        &[("ssh", "ssh", other), ("tls", "tls", backend_addr)],
    ))
    .unwrap();
    let hello = client_hello("trickle.example.com");
    let mut tail = vec![0u8; 100_000];
    Stream::new(9).fill(&mut tail);
    let mut s = TcpStream::connect(mux.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    for b in &hello {
        s.write_all(&[*b]).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    s.write_all(&tail).await.unwrap();
    s.shutdown().await.unwrap();
    let (len, hash) = tokio::time::timeout(Duration::from_secs(20), got.recv())
        .await
        .unwrap()
        .unwrap();
    let mut all = hello.clone();
    all.extend_from_slice(&tail);
    assert_eq!(len, all.len() as u64);
    assert_eq!(hash, sha256(&all));
}

#[test]
fn the_sslh_command_line_runs_unchanged() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ssh, web) = rt.block_on(async {
        (
            banner_backend("SSH-2.0-sslh-style").await,
            http_backend("web").await,
        )
    });
    let dir = Scratch::new("sslh");
    let pidfile = dir.path("sslh.pid");
    let (ssh, web) = (ssh.to_string(), web.to_string());
    let mut args = vec![
        "--foreground",
        "--listen",
        "127.0.0.1:0",
        "--ssh",
        &ssh,
        "--http",
        &web,
        "--pidfile",
    ];
    let pid_arg = pidfile.to_str().unwrap().to_string();
    args.push(&pid_arg);
    let mux = Mux::with_args(&args).unwrap();
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    assert_eq!(pid.trim(), mux.pid().to_string());
    rt.block_on(async {
        let out = exchange(mux.addr, b"GET /sslh HTTP/1.0\r\nHost: x\r\n\r\n", false)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&out).ends_with("web /sslh\n"));
    });
    let mut mux = mux;
    assert!(mux.stop().unwrap().success());
    assert!(!pidfile.exists(), "pid file left behind after exit");
}

#[test]
fn user_flag_drops_root_and_still_serves() {
    if !can_run("root (to drop privileges)", is_root()) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let web = rt.block_on(http_backend("web")).to_string();
    let mux = Mux::with_args(&[
        "--listen",
        "127.0.0.1:0",
        "--http",
        &web,
        "--user",
        "nobody",
    ])
    .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", mux.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );
    let out = rt
        .block_on(exchange(
            mux.addr,
            b"GET /as-nobody HTTP/1.0\r\n\r\n",
            false,
        ))
        .unwrap();
    assert!(String::from_utf8_lossy(&out).ends_with("web /as-nobody\n"));
}

/// `mux check --config PATH`: (status, stdout, stderr).
fn check(path: &std::path::Path) -> (std::process::ExitStatus, String, String) {
    run(
        Command::new(mux_bin())
            .arg("check")
            .arg("--config")
            .arg(path),
        Duration::from_secs(10),
    )
    .unwrap()
}

#[test]
fn every_example_config_checks() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let (status, out, err) = check(&path);
        assert!(status.success(), "{}: {err}", path.display());
        assert!(out.starts_with("configuration OK"), "{out}");
        n += 1;
    }
    assert!(
        n >= 3,
        "expected the examples folder to hold a config per use case, found {n}"
    );
}

/// The README's TOML blocks are configurations users copy: each must check.
/// A block without `listen` is an excerpt of a larger file (the targets of
/// "SSH to inner hosts"): it is checked with a `listen` and a route added.
#[test]
fn every_toml_block_in_the_readme_checks() {
    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(readme).unwrap();
    let dir = Scratch::new("readme");
    let mut n = 0;
    for (i, block) in text.split("```toml\n").skip(1).enumerate() {
        let block = block.split("```").next().unwrap();
        let whole = if block.lines().any(|l| l.starts_with("listen")) {
            block.to_string()
        } else {
            format!(
                "listen = [\"127.0.0.1:0\"]\n{block}\n[[route]]\nprotocol = \"ssh\"\nbackend = \"127.0.0.1:22\"\n"
            )
        };
        let path = dir.write(&format!("block{i}.toml"), &whole);
        let (status, out, err) = check(&path);
        assert!(status.success(), "README block {i}: {err}\n{block}");
        assert!(out.starts_with("configuration OK"), "{out}");
        n += 1;
    }
    assert!(n >= 3, "expected the README's TOML blocks, found {n}");
}

#[test]
fn check_names_file_line_and_key_and_fails() {
    let dir = Scratch::new("check");
    let path = dir.write("bad.toml", "listen = \"127.0.0.1:1\"\n[[route]]\nprotocol = \"ssh\"\nbackend = \"127.0.0.1:22\"\nsni = \"x\"\n");
    let (status, _, err) = check(&path);
    assert_eq!(status.code(), Some(1));
    assert!(
        err.contains(&format!("{}:5: `sni`", path.display())),
        "{err}"
    );
    // The daemon refuses to start on it too, with the same message.
    let (status, _, err) = run(
        Command::new(mux_bin()).arg("--config").arg(&path),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(
        err.contains("`sni`: only applies to protocol = \"tls\""),
        "{err}"
    );
}

#[test]
fn check_prints_the_embedded_default_routes() {
    let (status, out, _) = run(
        Command::new(mux_bin()).arg("check"),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(status.success());
    assert!(
        out.contains("ssh") && out.contains("127.0.0.1:22") && out.contains("127.0.0.1:30000"),
        "{out}"
    );
    assert!(out.contains("0.0.0.0:2222"), "{out}");
}

/// A minimal but real TLS 1.2/1.3-style ClientHello carrying `sni`.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let mut ext = Vec::new();
    let name = sni.as_bytes();
    let mut sni_ext = Vec::new();
    sni_ext.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni_ext.push(0);
    sni_ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni_ext.extend_from_slice(name);
    ext.extend_from_slice(&0u16.to_be_bytes());
    ext.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
    ext.extend_from_slice(&sni_ext);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}
