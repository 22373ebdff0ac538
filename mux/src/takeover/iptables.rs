//! The REDIRECT-rule takeover, for kernels without sk_lookup: what the
//! classic sslh setup does, but added and removed by mux itself.
//!
//! The rules are held by a small root child process (`mux takeover
//! --guard`) that removes them when its standard input closes, which
//! happens when the daemon exits for any reason, SIGKILL included, and
//! works even after the daemon dropped root. Every rule carries a comment
//! (iptables) or lives in its own table (nft) so that `mux takeover
//! --cleanup` finds what is left if the guard itself was killed.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Marks mux's rules.
const COMMENT: &str = "mux-takeover";
/// The nft table mux owns.
const NFT_TABLE: &str = "mux_takeover";

/// Which tool holds the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Iptables,
    Nft,
}

/// Rules in force; removed when dropped.
#[derive(Debug)]
struct Rules {
    tool: Tool,
    /// For iptables: (binary, port, to_port) of each rule added.
    added: Vec<(&'static str, u16, u16)>,
}

fn have(binary: &str) -> bool {
    Command::new(binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(binary: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(binary)
        .args(args)
        .output()
        .map_err(|e| format!("{binary}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{binary} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Adds (`-A`) or deletes (`-D`) the rule redirecting `port` to `to_port`.
fn iptables(binary: &str, action: &str, port: u16, to_port: u16) -> Result<String, String> {
    let (port, to_port) = (port.to_string(), to_port.to_string());
    run(
        binary,
        &[
            "-w",
            "-t",
            "nat",
            action,
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            &port,
            "-m",
            "comment",
            "--comment",
            COMMENT,
            "-j",
            "REDIRECT",
            "--to-ports",
            &to_port,
        ],
    )
}

/// The daemon's handle on its guard process; dropping it has the guard
/// remove the rules.
#[derive(Debug)]
pub struct Guard {
    child: Child,
    tool: Tool,
}

impl Guard {
    /// Starts the guard, which adds rules redirecting `ports` to the port of
    /// the first listener of each family; returns once they are in place.
    pub fn start(ports: &[u16], listeners: &[SocketAddr]) -> Result<Guard, String> {
        let exe = std::env::current_exe().map_err(|e| format!("finding mux's own binary: {e}"))?;
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut command = Command::new(exe);
        command.args(["takeover", "--guard", "--ports", &list.join(",")]);
        if let Some(a) = listeners.iter().find(|a| a.is_ipv4()) {
            command.args(["--to-v4", &a.port().to_string()]);
        }
        if let Some(a) = listeners.iter().find(|a| a.is_ipv6()) {
            command.args(["--to-v6", &a.port().to_string()]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the takeover guard: {e}"))?;
        let stdout = child.stdout.take().ok_or("no guard stdout")?;
        let mut first = String::new();
        let ready = BufReader::new(stdout).read_line(&mut first).is_ok();
        let tool = match first.trim() {
            "ready iptables" if ready => Tool::Iptables,
            "ready nft" if ready => Tool::Nft,
            _ => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                let _ = child.wait();
                return Err(err.trim().trim_start_matches("mux takeover: ").to_string());
            }
        };
        Ok(Guard { child, tool })
    }

    pub fn describe(&self) -> &'static str {
        match self.tool {
            Tool::Iptables => {
                "an iptables REDIRECT rule, held by a guard process that removes it when mux exits"
            }
            Tool::Nft => {
                "an nft redirect rule, held by a guard process that removes it when mux exits"
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Closing its standard input is the guard's signal.
        drop(self.child.stdin.take());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                log::info!("takeover: redirect rules removed");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        log::error!("takeover: the guard did not finish; run `mux takeover --cleanup`");
    }
}

/// The guard process: adds the rules, says `ready <tool>`, holds them until
/// standard input closes or a stop signal comes, then removes them.
pub fn guard(ports: &[u16], to_v4: Option<u16>, to_v6: Option<u16>) -> Result<(), String> {
    let rules = Rules::add(ports, to_v4, to_v6)?;
    println!(
        "ready {}",
        if rules.tool == Tool::Iptables {
            "iptables"
        } else {
            "nft"
        }
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        use tokio::io::AsyncReadExt;
        use tokio::signal::unix::{SignalKind, signal};
        let mut stdin = tokio::io::stdin();
        let mut sink = [0u8; 64];
        let eof = async { while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {} };
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            return eof.await;
        };
        tokio::select! {
            () = eof => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
    });
    drop(rules);
    Ok(())
}

impl Rules {
    /// Redirects `ports` to `to_v4` (IPv4) and `to_v6` (IPv6).
    fn add(ports: &[u16], to_v4: Option<u16>, to_v6: Option<u16>) -> Result<Rules, String> {
        if have("iptables") {
            let mut rules = Rules {
                tool: Tool::Iptables,
                added: Vec::new(),
            };
            for (binary, to) in [("iptables", to_v4), ("ip6tables", to_v6)] {
                let Some(to) = to else { continue };
                for &port in ports {
                    iptables(binary, "-A", port, to)?;
                    // Recorded as soon as it exists, so a later failure still
                    // removes it (on drop).
                    rules.added.push((binary, port, to));
                }
            }
            return Ok(rules);
        }
        if have("nft") {
            let rules = Rules {
                tool: Tool::Nft,
                added: Vec::new(),
            };
            run("nft", &["add", "table", "inet", NFT_TABLE])?;
            run(
                "nft",
                &[
                    "add",
                    "chain",
                    "inet",
                    NFT_TABLE,
                    "prerouting",
                    "{ type nat hook prerouting priority dstnat; }",
                ],
            )?;
            for &port in ports {
                for (family, to) in [("ipv4", to_v4), ("ipv6", to_v6)] {
                    let Some(to) = to else { continue };
                    let rule = format!("meta nfproto {family} tcp dport {port} redirect to :{to}");
                    run(
                        "nft",
                        &["add", "rule", "inet", NFT_TABLE, "prerouting", &rule],
                    )?;
                }
            }
            return Ok(rules);
        }
        Err("neither iptables nor nft is installed".into())
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        match self.tool {
            Tool::Iptables => {
                for &(binary, port, to) in &self.added {
                    if let Err(e) = iptables(binary, "-D", port, to) {
                        log::error!(
                            "takeover: removing a REDIRECT rule: {e}; run `mux takeover --cleanup`"
                        );
                    }
                }
            }
            Tool::Nft => {
                if let Err(e) = run("nft", &["delete", "table", "inet", NFT_TABLE]) {
                    log::error!(
                        "takeover: removing the nft table: {e}; run `mux takeover --cleanup`"
                    );
                }
            }
        }
    }
}

/// Removes every rule mux added, whoever added it (a crashed mux). Returns
/// how many it removed.
pub fn cleanup() -> Result<usize, String> {
    let mut removed = 0;
    for binary in ["iptables", "ip6tables"] {
        if !have(binary) {
            continue;
        }
        let listing = run(binary, &["-w", "-t", "nat", "-S", "PREROUTING"])?;
        for line in listing.lines().filter(|l| l.contains(COMMENT)) {
            let Some(spec) = line.strip_prefix("-A ") else {
                continue;
            };
            let spec = split_rule(spec);
            let mut args = vec!["-w", "-t", "nat", "-D"];
            args.extend(spec.iter().map(String::as_str));
            run(binary, &args)?;
            removed += 1;
        }
    }
    if have("nft") && run("nft", &["list", "table", "inet", NFT_TABLE]).is_ok() {
        run("nft", &["delete", "table", "inet", NFT_TABLE])?;
        removed += 1;
    }
    Ok(removed)
}

/// Splits an `iptables -S` rule into arguments, keeping quoted parts whole.
fn split_rule(spec: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in spec.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    args.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        args.push(current);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_listing_lines_split_back_into_arguments() {
        let line = r#"PREROUTING -p tcp -m tcp --dport 22 -m comment --comment "mux-takeover" -j REDIRECT --to-ports 2222"#;
        let args = split_rule(line);
        assert_eq!(args[0], "PREROUTING");
        assert!(args.contains(&"mux-takeover".to_string()));
        assert_eq!(args.last().unwrap(), "2222");
    }
}
