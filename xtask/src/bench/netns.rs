//! The client host of the `remote` workload: a network namespace joined to this one by a
//! veth pair, so that its traffic crosses a network device as a remote client's does, rather
//! than loopback's shortcut.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Addresses from 198.18.0.0/15, which RFC 2544 sets aside for benchmarks: no real network
/// uses them, so the route this adds in the host's namespace (a /30 on the veth) shadows
/// nothing.
const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 231, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 231, 2);

/// The namespace and its veth, removed on drop.
pub struct ClientHost {
    pub name: String,
    host_if: String,
}

impl ClientHost {
    pub fn create() -> Result<ClientHost> {
        let tag = std::process::id() % 100_000;
        let net = ClientHost {
            name: format!("mux-bench-{tag}"),
            host_if: format!("mxbh{tag}"),
        };
        let client_if = format!("mxbc{tag}");
        // A namespace left by a run that was killed would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", &net.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &net.host_if])
            .output();
        ip(&["netns", "add", &net.name])?;
        ip(&[
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
        ])?;
        ip(&["link", "set", &client_if, "netns", &net.name])?;
        ip(&["addr", "add", &format!("{HOST}/30"), "dev", &net.host_if])?;
        ip(&["link", "set", &net.host_if, "up"])?;
        let ns = net.name.as_str();
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{CLIENT}/30"),
            "dev",
            &client_if,
        ])?;
        ip(&["-n", ns, "link", "set", &client_if, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    /// The address servers listen on for this client: the host's end of the veth.
    pub fn host(&self) -> IpAddr {
        IpAddr::V4(HOST)
    }
}

/// `program` run inside namespace `name`.
pub fn command_in(name: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", name, program]);
    cmd
}

impl Drop for ClientHost {
    fn drop(&mut self) {
        // Deleting the namespace removes its end of the veth, and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
