//! Makes cargo rebuild the kernel object when bpf-linker changes (a new
//! linker can change the object without any source change).

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        // Only the bpf build needs the linker; the host build of this crate's
        // empty library (mux's build-dependency, also under AYA_BUILD_SKIP)
        // must not fail for want of it.
        Err(err) if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") => panic!(
            "bpf-linker not found in PATH ({err}); install it with \
             `LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features --features llvm-22 --locked`"
        ),
        Err(_) => {}
    }
}
