//! Builds the kernel programs (mux-ebpf) for the bpf target and leaves the
//! object at `$OUT_DIR/mux`, where `mux::ebpf` embeds it.
//!
//! aya-build runs `rustup run nightly cargo build -p mux-ebpf --target
//! bpfel-unknown-none -Z build-std=core` in a target directory of its own.
//! With `AYA_BUILD_SKIP=1` (the fuzz build, which must not need nightly or
//! bpf-linker) it builds nothing and an empty object is written instead, so
//! `include_bytes!` still compiles; loading it then fails with a clear error.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const SKIP: &str = "AYA_BUILD_SKIP";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={SKIP}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("mux");

    if env::var_os(SKIP).is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
        println!("cargo:warning={SKIP} is set: eBPF object not built, kernel splicing unavailable");
        return Ok(());
    }

    // Checked here because without it the failure surfaces as a rustc
    // "linker not found" line buried in the nested build's output.
    which::which("bpf-linker").map_err(|err| {
        anyhow!(
            "bpf-linker not found in PATH ({err}): it links mux's eBPF programs. Install it with \
             `LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features \
             --features llvm-22 --locked`, or set {SKIP}=1 to build mux without them"
        )
    })?;

    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let dir_of = |name: &str| {
        metadata
            .packages
            .iter()
            .find(|p| p.name.as_str() == name)
            .and_then(|p| p.manifest_path.parent())
            .map(|dir| dir.to_string())
            .ok_or_else(|| anyhow!("package {name} not found in the workspace"))
    };
    let ebpf_dir = dir_of("mux-ebpf")?;
    // The object bakes in mux-common's layouts: rebuild it when they change
    // (aya-build only watches the kernel crate's own directory).
    println!("cargo:rerun-if-changed={}", dir_of("mux-common")?);

    aya_build::build_ebpf(
        [Package {
            name: "mux-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF programs (mux-ebpf)")?;

    // aya-build copies each binary target to OUT_DIR/<name>; make sure ours
    // is there so a renamed target fails here rather than as a missing file.
    if !object.is_file() {
        return Err(anyhow!("aya-build did not produce {}", object.display()));
    }
    Ok(())
}
