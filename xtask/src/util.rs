//! Shared helpers: progress lines, running a command with its output streamed and timed, and
//! where the workspace lives.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Prints one progress line, e.g. `[setup] bpf-linker: present (0.01s)`.
pub fn say(tag: &str, msg: impl std::fmt::Display) {
    println!("[{tag}] {msg}");
}

pub fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// The command as a shell line, to show the user exactly what is run and how to rerun it.
pub fn show(cmd: &Command) -> String {
    let word = |w: &OsStr| {
        let w = w.to_string_lossy();
        if w.is_empty() || w.contains(|c: char| c.is_whitespace() || "'\"$`\\".contains(c)) {
            format!("'{}'", w.replace('\'', r"'\''"))
        } else {
            w.into_owned()
        }
    };
    let mut line = Vec::new();
    if let Some(dir) = cmd.get_current_dir() {
        line.push(format!("cd {} &&", word(dir.as_os_str())));
    }
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            line.push(format!("{}={}", k.to_string_lossy(), word(v)));
        }
    }
    line.push(word(cmd.get_program()));
    line.extend(cmd.get_args().map(word));
    line.join(" ")
}

/// Runs `cmd` with its output going straight to the terminal (so long installs and builds show
/// their own progress), after printing it. Ok only if it exits 0; the error says how long it ran.
pub fn run(tag: &str, cmd: &mut Command) -> Result<Duration> {
    run_tee(tag, cmd, None)
}

/// Like [`run`], but also hands each line of the command's stdout to `on_line` after echoing it.
pub fn run_tee(
    tag: &str,
    cmd: &mut Command,
    mut on_line: Option<&mut dyn FnMut(&str)>,
) -> Result<Duration> {
    let shown = show(cmd);
    say(tag, format!("$ {shown}"));
    let start = Instant::now();
    // Nothing here is interactive: a prompt would hang CI, which has no stdin.
    cmd.stdin(Stdio::null());
    if on_line.is_some() {
        cmd.stdout(Stdio::piped());
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if let (Some(on_line), Some(out)) = (on_line.as_mut(), child.stdout.take()) {
        let mut stdout = std::io::stdout();
        for line in BufReader::new(out).split(b'\n') {
            let line = line.with_context(|| format!("reading the output of `{shown}`"))?;
            stdout.write_all(&line)?;
            stdout.write_all(b"\n")?;
            stdout.flush()?;
            on_line(&String::from_utf8_lossy(&line));
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    let took = start.elapsed();
    if !status.success() {
        bail!("`{shown}` failed ({status}) after {}", secs(took));
    }
    Ok(took)
}

/// Runs a quick presence check quietly. Err only if the program could not be started at all
/// (typically: not installed); a non-zero exit is for the caller to judge.
pub fn probe(program: &str, args: &[&str]) -> std::io::Result<Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

/// Asks cargo rather than guessing, so CARGO_TARGET_DIR and `build.target-dir` are honoured.
pub fn workspace() -> Result<Workspace> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("`cargo metadata` failed: is this run from inside the mux workspace?")?;
    Ok(Workspace {
        root: meta.workspace_root.into(),
        target_dir: meta.target_directory.into(),
    })
}
