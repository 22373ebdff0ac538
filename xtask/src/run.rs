//! `cargo xtask run`: build mux (eBPF objects included) and become the daemon.

use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Context, Result};

use crate::setup::{self, Purpose};
use crate::util::{run, say, secs, show, workspace};

pub fn run_mux(args: &[String]) -> Result<()> {
    setup::ensure(Purpose::Build)?;
    let ws = workspace()?;
    let took = run(
        "run",
        Command::new("cargo")
            .current_dir(&ws.root)
            .args(["build", "--release", "-p", "mux"]),
    )?;
    say("run", format!("built ({})", secs(took)));

    let mut mux = Command::new(ws.target_dir.join("release").join("mux"));
    mux.args(args);
    say("run", format!("exec {}", show(&mux)));
    // exec rather than spawn: Ctrl-C and service managers' signals then reach mux itself.
    let err = mux.exec();
    Err(err).with_context(|| format!("cannot exec {}", show(&mux)))
}
