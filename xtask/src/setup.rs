//! Installs what building and testing mux need on a fresh Debian machine, and checks quickly
//! that it is all there when it already is.

use std::collections::BTreeSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util::{is_root, probe, run, say, secs, show};

/// What the caller is about to do, which decides what it needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Build mux with its eBPF objects.
    Build,
    /// Build, then run the whole test suite against real peers, and fuzz.
    Test,
    /// Build, then benchmark mux against the proxies it is compared with.
    Bench,
}

/// bpf-linker links against this LLVM, so the Debian packages and the crate feature must agree.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const EBPF_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"];
/// Real servers and clients the integration and privileged tests talk to or drive.
const PEER_PACKAGES: &[&str] = &[
    "openssh-server",
    "openssh-client",
    "curl",
    "openssl",
    "socat",
    "iproute2",
    "iptables",
    "nftables",
    "netcat-openbsd",
    "iperf3",
];
/// What `cargo xtask bench` drives and compares mux with.
const BENCH_PACKAGES: &[&str] = &["iperf3", "wrk", "sslh", "haproxy", "caddy"];
/// Debian's maintainer scripts start a package's service on install (sslh, HAProxy and Caddy
/// with their default configs and ports, sshd too). Nothing here wants system services: the
/// tests and benchmarks start their own instances. invoke-rc.d asks this script first, and
/// its exit status 101 means "action forbidden".
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
/// Pinned so a fresh machine gets what CI was green with: bpf-linker's `llvm-NN` features
/// follow LLVM releases, and a new one may drop the LLVM that Debian gives us.
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn ensure(purpose: Purpose) -> Result<()> {
    let start = Instant::now();
    let mut groups = vec![EBPF_PACKAGES];
    match purpose {
        Purpose::Build => {}
        Purpose::Test => groups.push(PEER_PACKAGES),
        Purpose::Bench => groups.push(BENCH_PACKAGES),
    }
    debian_packages(&groups)?;
    nightly_rust_src()?;
    bpf_linker()?;
    if purpose == Purpose::Test {
        sshd_privsep_dir()?;
        cargo_fuzz()?;
    }
    say("setup", format!("done ({})", secs(start.elapsed())));
    Ok(())
}

/// aya-build compiles the kernel side with nightly and `-Z build-std`, which needs rust-src.
fn nightly_rust_src() -> Result<()> {
    let start = Instant::now();
    let listed = probe(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .context("cannot run rustup: install Rust with rustup (https://rustup.rs)")?;
    let mut cmd = Command::new("rustup");
    if !listed.status.success() {
        say("setup", "installing: nightly toolchain with rust-src");
        cmd.args(["toolchain", "install", "nightly", "--profile", "minimal"])
            .args(["--component", "rust-src"]);
    } else if has_component(&String::from_utf8_lossy(&listed.stdout), "rust-src") {
        say(
            "setup",
            format!("nightly rust-src: present ({})", secs(start.elapsed())),
        );
        return Ok(());
    } else {
        say("setup", "installing: nightly rust-src");
        cmd.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
    }
    run("setup", &mut cmd)?;
    say(
        "setup",
        format!("nightly rust-src: installed ({})", secs(start.elapsed())),
    );
    Ok(())
}

/// `rustup component list --installed` names target-independent components bare (`rust-src`)
/// and the others with their target (`rust-std-x86_64-unknown-linux-gnu`).
fn has_component(listing: &str, name: &str) -> bool {
    listing.lines().any(|line| line.trim() == name)
}

/// One dpkg-query for every package, then (only if something is missing) one apt-get update and
/// one apt-get install for all of them: the update is what makes llvm-22-dev findable on a
/// fresh machine, whose package lists are stale.
fn debian_packages(groups: &[&[&str]]) -> Result<()> {
    let start = Instant::now();
    let wanted: Vec<&str> = groups.concat();
    let missing = missing_packages(&wanted)?;
    for group in groups {
        let absent: Vec<&str> = group
            .iter()
            .copied()
            .filter(|p| missing.contains(*p))
            .collect();
        let state = if absent.is_empty() {
            "present".to_string()
        } else {
            format!("missing {}", absent.join(" "))
        };
        say(
            "setup",
            format!("{}: {state} ({})", group.join(" "), secs(start.elapsed())),
        );
    }
    if missing.is_empty() {
        return Ok(());
    }
    let missing: Vec<&str> = wanted
        .into_iter()
        .filter(|p| missing.contains(*p))
        .collect();
    let commands = apt_commands(&missing);
    if !is_root() {
        let lines: Vec<String> = commands
            .iter()
            .map(|c| format!("    {}", show(c)))
            .collect();
        bail!(
            "missing Debian packages: {}\ninstalling them needs root; run as root:\n{}\nthen run this again",
            missing.join(" "),
            lines.join("\n")
        );
    }
    say("setup", format!("installing: {}", missing.join(" ")));
    let no_services = NoServiceStarts::forbid()?;
    for mut cmd in commands {
        run("setup", &mut cmd)?;
    }
    drop(no_services);
    let still = missing_packages(&missing)?;
    if !still.is_empty() {
        bail!("apt-get install succeeded, yet still missing: {still:?}");
    }
    say(
        "setup",
        format!(
            "installed {} ({})",
            missing.join(" "),
            secs(start.elapsed())
        ),
    );
    Ok(())
}

/// Forbids service starts while it lives (see [`POLICY_RC_D`]). An existing policy is the
/// machine owner's: it is left as it is, and not removed afterwards.
struct NoServiceStarts {
    created: bool,
}

impl NoServiceStarts {
    fn forbid() -> Result<NoServiceStarts> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(POLICY_RC_D);
        match file {
            Ok(mut f) => {
                use std::io::Write;
                f.write_all(b"#!/bin/sh\n# cargo xtask: no service starts during its apt-get install\nexit 101\n")
                    .with_context(|| format!("writing {POLICY_RC_D}"))?;
                say(
                    "setup",
                    format!("{POLICY_RC_D}: services will not start during the install"),
                );
                Ok(NoServiceStarts { created: true })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                say("setup", format!("{POLICY_RC_D}: present, left as it is"));
                Ok(NoServiceStarts { created: false })
            }
            Err(e) => Err(e).with_context(|| format!("creating {POLICY_RC_D}")),
        }
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.created
            && let Err(e) = std::fs::remove_file(POLICY_RC_D)
        {
            say(
                "setup",
                format!("cannot remove {POLICY_RC_D}: {e}; remove it by hand"),
            );
        }
    }
}

fn missing_packages(wanted: &[&str]) -> Result<BTreeSet<String>> {
    // dpkg-query exits 1 when some package is unknown; its stdout still lists the known ones.
    let out = probe(
        "dpkg-query",
        &[&["-W", "-f=${Package} ${Status}\\n"], wanted].concat(),
    )
    .context("cannot run dpkg-query: this setup expects Debian or Ubuntu")?;
    Ok(missing_from_dpkg(
        &String::from_utf8_lossy(&out.stdout),
        wanted,
    ))
}

/// `wanted` less the packages that `dpkg-query -W -f='${Package} ${Status}\n'` reports as
/// installed. Unknown packages are simply absent from its output; removed ones show up as
/// `deinstall ok config-files` and half-done ones as e.g. `install ok half-configured`.
fn missing_from_dpkg(dpkg_output: &str, wanted: &[&str]) -> BTreeSet<String> {
    let installed: BTreeSet<&str> = dpkg_output
        .lines()
        .filter_map(|line| line.trim().strip_suffix(" install ok installed"))
        .collect();
    wanted
        .iter()
        .filter(|p| !installed.contains(*p))
        .map(|p| p.to_string())
        .collect()
}

/// The commands that install `missing`, in order; none when nothing is missing.
fn apt_commands(missing: &[&str]) -> Vec<Command> {
    if missing.is_empty() {
        return Vec::new();
    }
    let mut update = Command::new("apt-get");
    update.arg("update");
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(missing);
    vec![update, install]
}

/// The linker aya-build hands the eBPF objects to; built from source against Debian's LLVM.
fn bpf_linker() -> Result<()> {
    let start = Instant::now();
    if probe("bpf-linker", &["--version"]).is_ok_and(|o| o.status.success()) {
        say(
            "setup",
            format!("bpf-linker: present ({})", secs(start.elapsed())),
        );
        return Ok(());
    }
    say(
        "setup",
        format!("installing: bpf-linker {BPF_LINKER_VERSION} (builds from source, about 90s)"),
    );
    run(
        "setup",
        Command::new("cargo")
            // Without it llvm-sys cannot find Debian's LLVM: "unable to find library -lLLVM".
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"]),
    )?;
    if !probe("bpf-linker", &["--version"]).is_ok_and(|o| o.status.success()) {
        bail!(
            "bpf-linker was installed but does not run: is ~/.cargo/bin (or $CARGO_HOME/bin) on PATH?"
        );
    }
    say(
        "setup",
        format!("bpf-linker: installed ({})", secs(start.elapsed())),
    );
    Ok(())
}

/// sshd refuses to start without its privilege-separation directory, which only the service
/// unit creates; tests start their own sshd, so make sure it is there.
fn sshd_privsep_dir() -> Result<()> {
    let start = Instant::now();
    let dir = Path::new("/run/sshd");
    if dir.is_dir() {
        say(
            "setup",
            format!("/run/sshd: present ({})", secs(start.elapsed())),
        );
        return Ok(());
    }
    if !is_root() {
        bail!(
            "/run/sshd is missing and creating it needs root; run as root:\n    mkdir -p -m 755 /run/sshd"
        );
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .context("creating /run/sshd")?;
    say(
        "setup",
        format!("/run/sshd: created ({})", secs(start.elapsed())),
    );
    Ok(())
}

fn cargo_fuzz() -> Result<()> {
    let start = Instant::now();
    if probe("cargo", &["fuzz", "--version"]).is_ok_and(|o| o.status.success()) {
        say(
            "setup",
            format!("cargo-fuzz: present ({})", secs(start.elapsed())),
        );
        return Ok(());
    }
    say(
        "setup",
        format!("installing: cargo-fuzz {CARGO_FUZZ_VERSION}"),
    );
    run(
        "setup",
        Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]),
    )?;
    say(
        "setup",
        format!("cargo-fuzz: installed ({})", secs(start.elapsed())),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_output_to_missing() {
        let out = "curl install ok installed\n\
                   socat deinstall ok config-files\n\
                   iperf3 install ok half-configured\n\
                   libzstd-dev install ok installed\n\
                   libzstd-dev install ok installed\n";
        let wanted = ["curl", "socat", "iperf3", "libzstd-dev", "llvm-22-dev"];
        let missing: Vec<String> = missing_from_dpkg(out, &wanted).into_iter().collect();
        assert_eq!(missing, ["iperf3", "llvm-22-dev", "socat"]);
    }

    #[test]
    fn nothing_reported_means_all_missing() {
        assert_eq!(missing_from_dpkg("", &["a", "b"]).len(), 2);
        assert!(missing_from_dpkg("a install ok installed\n", &["a"]).is_empty());
    }

    #[test]
    fn asks_the_real_dpkg() {
        let missing = missing_packages(&["dpkg", "no-such-package-xtask"]).unwrap();
        assert_eq!(
            missing.into_iter().collect::<Vec<_>>(),
            ["no-such-package-xtask"]
        );
    }

    #[test]
    fn apt_updates_once_before_installing() {
        assert!(apt_commands(&[]).is_empty());
        let cmds = apt_commands(&["llvm-22-dev", "socat"]);
        let shown: Vec<String> = cmds.iter().map(show).collect();
        assert_eq!(
            shown,
            [
                "apt-get update",
                "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends llvm-22-dev socat",
            ]
        );
    }

    #[test]
    fn rust_src_in_component_listing() {
        let listing = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64-unknown-linux-gnu\n";
        assert!(has_component(listing, "rust-src"));
        assert!(!has_component(
            "rust-std-x86_64-unknown-linux-gnu\n",
            "rust-src"
        ));
    }
}
