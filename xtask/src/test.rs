//! `cargo xtask test`: the whole test suite, as CI runs it, in phases that all run even when
//! an earlier one fails, then a summary.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::setup::{self, Purpose};
use crate::util::{is_root, run, run_tee, say, secs, workspace};

/// How long libFuzzer gets in each fuzz phase.
const FUZZ_SECONDS: u32 = 30;
/// The fuzz phases: phase name, what it covers, cargo-fuzz target, and its committed seeds
/// under `mux/fuzz/seeds`.
const FUZZ_TARGETS: [(&str, &str, &str, &str); 2] = [
    (
        "fuzz",
        "libFuzzer on the classifiers",
        "classify",
        "classify",
    ),
    (
        "fuzz-tunnel",
        "libFuzzer on the tunnel's CONNECT and agent requests",
        "tunnel_request",
        "tunnel",
    ),
];
/// How long the soak phase's clients run.
const SOAK_SECONDS: u32 = 60;

#[derive(clap::Args)]
pub struct Args {
    /// Skip the fuzz phase, for quick local iteration (CI runs everything)
    #[arg(long, visible_alias = "quick")]
    no_fuzz: bool,
    /// Handed to the test binaries of the cargo test phases, e.g. a test name filter
    #[arg(last = true, value_name = "TEST_ARGS")]
    test_args: Vec<String>,
}

struct Phase {
    name: &'static str,
    what: &'static str,
    /// Err: why the phase cannot run; it then counts as failed.
    cmd: Result<Command, String>,
    /// Parse libtest's `test result:` lines from its stdout.
    counts_tests: bool,
}

enum Outcome {
    Passed,
    Failed,
    Skipped,
}

pub fn test(args: &Args) -> Result<ExitCode> {
    setup::ensure(Purpose::Test)?;
    let ws = workspace()?;

    let cargo = || {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&ws.root);
        cmd
    };
    let mut workspace_tests = cargo();
    // The privileged tests need root and a kernel to load programs into, and must not run
    // concurrently with each other: they get their own serial phase below.
    workspace_tests
        .args(["test", "--release", "--", "--skip", "privileged::"])
        .args(&args.test_args);
    let mut privileged = cargo();
    privileged
        .args([
            "test",
            "--release",
            "-p",
            "mux",
            "--test",
            "privileged",
            "--",
        ])
        .arg("--test-threads=1")
        .args(&args.test_args);

    let mut phases = vec![
        Phase {
            name: "workspace",
            what: "unit and integration tests, but the privileged ones",
            cmd: Ok(workspace_tests),
            counts_tests: true,
        },
        Phase {
            name: "privileged",
            what: "tests that need root and the kernel, one at a time",
            cmd: Ok(privileged),
            counts_tests: true,
        },
        Phase {
            name: "soak",
            what: "many clients of every kind for a while, then nothing left behind",
            cmd: soak_command(),
            counts_tests: false,
        },
    ];
    if !args.no_fuzz {
        for (name, what, target, seeds) in FUZZ_TARGETS {
            phases.push(Phase {
                name,
                what,
                cmd: fuzz_command(&ws.root, target, seeds),
                counts_tests: false,
            });
        }
    }

    let total = phases.len();
    let mut counts = Counts::default();
    let mut failures = Failures::default();
    let mut results = Vec::new();
    for (i, mut phase) in phases.into_iter().enumerate() {
        say(
            "test",
            format!(
                "==== phase {}/{total}: {} ({})",
                i + 1,
                phase.name,
                phase.what
            ),
        );
        let start = Instant::now();
        let result = match &mut phase.cmd {
            Err(why) => Err(anyhow::anyhow!("{why}")),
            Ok(cmd) if phase.counts_tests => {
                let mut on_line = |line: &str| {
                    counts.add(parse_test_result(line));
                    failures.see(line);
                };
                run_tee("test", cmd, Some(&mut on_line))
            }
            Ok(cmd) => run("test", cmd),
        };
        let outcome = match result {
            Ok(_) => Outcome::Passed,
            Err(e) => {
                say("test", format!("{}: {e:#}", phase.name));
                Outcome::Failed
            }
        };
        let took = start.elapsed();
        say(
            "test",
            format!(
                "==== phase {}/{total}: {} {} ({})",
                i + 1,
                phase.name,
                word(&outcome),
                secs(took)
            ),
        );
        results.push((phase.name, outcome, took));
    }
    if args.no_fuzz {
        for (name, ..) in FUZZ_TARGETS {
            results.push((name, Outcome::Skipped, Duration::ZERO));
        }
    }

    println!();
    say("test", "summary");
    println!("    {:<12} {:<8} {:>9}", "phase", "result", "time");
    for (name, outcome, took) in &results {
        let time = if matches!(outcome, Outcome::Skipped) {
            "-".into()
        } else {
            secs(*took)
        };
        println!("    {name:<12} {:<8} {time:>9}", word(outcome));
    }
    // A plain closing line that counts the tests of all phases, for people and for CI logs.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
    // CI keeps only the end of a long log: repeat why each failed test failed, last.
    for (name, why) in &failures.tests {
        println!("failed: {name}");
        for line in why {
            println!("    {line}");
        }
    }
    let failed = results.iter().any(|(_, o, _)| matches!(o, Outcome::Failed));
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn word(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Passed => "passed",
        Outcome::Failed => "FAILED",
        Outcome::Skipped => "skipped",
    }
}

/// `cargo xtask soak` (this very program), on the kernel path where it can load (as root,
/// which CI is), else on whatever mux picks.
fn soak_command() -> Result<Command, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut cmd = Command::new(me);
    cmd.args(["soak", "--seconds", &SOAK_SECONDS.to_string(), "--datapath"])
        .arg(if is_root() { "ebpf" } else { "auto" });
    Ok(cmd)
}

fn fuzz_command(root: &std::path::Path, target: &str, seeds: &str) -> Result<Command, String> {
    let crate_dir = root.join("mux");
    let source = crate_dir.join(format!("fuzz/fuzz_targets/{target}.rs"));
    if !source.is_file() {
        return Err(format!(
            "{} does not exist: the fuzz target `{target}` is missing",
            source.display()
        ));
    }
    let corpus = format!("fuzz/corpus/{target}");
    let _ = std::fs::create_dir_all(crate_dir.join(&corpus));
    let mut cmd = Command::new("cargo");
    cmd.current_dir(crate_dir)
        // The fuzz targets need only the user-space classifiers, and cargo-fuzz's RUSTFLAGS
        // (sanitizer, coverage) would leak into aya-build's nested build for the bpf target.
        .env("AYA_BUILD_SKIP", "1")
        // The first directory collects new inputs; the committed seeds (real
        // ClientHellos, requests, banners, CONNECTs) start the fuzzer deep in each parser.
        .args(["+nightly", "fuzz", "run", target, &corpus])
        .arg(format!("fuzz/seeds/{seeds}"))
        .arg("--")
        .arg(format!("-max_total_time={FUZZ_SECONDS}"))
        .arg("-rss_limit_mb=4096");
    Ok(cmd)
}

/// The failed tests of libtest's output, each with the first lines of its captured output
/// from the panic on (libtest prints them after all tests ran, under `---- name stdout ----`).
#[derive(Default)]
struct Failures {
    tests: Vec<(String, Vec<String>)>,
    /// Inside a failure's section: lines are kept from its panic on.
    open: Option<bool>,
}

impl Failures {
    /// Lines kept per failure, and characters per line: enough for an assertion message.
    const LINES: usize = 8;
    const WIDTH: usize = 400;

    fn see(&mut self, line: &str) {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            self.tests.push((name.to_string(), Vec::new()));
            self.open = Some(false);
            return;
        }
        if line == "failures:" || line.starts_with("test result: ") {
            self.open = None;
            return;
        }
        let (Some(panicked), Some((_, why))) = (self.open.as_mut(), self.tests.last_mut()) else {
            return;
        };
        *panicked |= line.contains("panicked at");
        if *panicked && why.len() < Self::LINES {
            why.push(line.chars().take(Self::WIDTH).collect());
        }
    }
}

#[derive(Default, Debug, PartialEq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Counts {
    fn add(&mut self, other: Option<Counts>) {
        if let Some(o) = other {
            self.passed += o.passed;
            self.failed += o.failed;
            self.ignored += o.ignored;
        }
    }
}

/// Reads libtest's closing line of one test binary, e.g.
/// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`.
fn parse_test_result(line: &str) -> Option<Counts> {
    let (_, fields) = line
        .trim()
        .strip_prefix("test result: ")?
        .split_once(". ")?;
    let mut counts = Counts::default();
    for field in fields.split("; ") {
        let (n, what) = field.split_once(' ')?;
        let slot = match what {
            "passed" => &mut counts.passed,
            "failed" => &mut counts.failed,
            "ignored" => &mut counts.ignored,
            _ => continue,
        };
        *slot = n.parse().ok()?;
    }
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_result_lines() {
        let ok = "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 0.01s";
        assert_eq!(
            parse_test_result(ok),
            Some(Counts {
                passed: 3,
                failed: 0,
                ignored: 1
            })
        );
        let bad = "test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s";
        assert_eq!(
            parse_test_result(bad),
            Some(Counts {
                passed: 5,
                failed: 2,
                ignored: 0
            })
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
        assert_eq!(parse_test_result("test foo ... ok"), None);
    }

    #[test]
    fn failed_tests_keep_their_panic() {
        let out = "test a ... FAILED\ntest b ... ok\n\nfailures:\n\n---- a stdout ----\n\
                   log line before\nthread 'a' panicked at x.rs:1:2:\nthe kernel moved too little\n\
                   note: run with `RUST_BACKTRACE=1`\n\nfailures:\n    a\n\n\
                   test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out";
        let mut failures = Failures::default();
        out.lines().for_each(|l| failures.see(l));
        assert_eq!(failures.tests.len(), 1);
        let (name, why) = &failures.tests[0];
        assert_eq!(name, "a");
        assert_eq!(why[0], "thread 'a' panicked at x.rs:1:2:");
        assert_eq!(why[1], "the kernel moved too little");
        assert!(!why.iter().any(|l| l.contains("before")));
    }
}
