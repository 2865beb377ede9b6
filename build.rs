//! Builds the test guest (tests/guest) from source with the host toolchain and hands its
//! path to the crate, which embeds it. The guest is freestanding: `core` only, its own
//! linker script, `panic = "abort"`, no libc.
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest = manifest.join("tests/guest");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("cellvm-testguest.elf");
    for file in ["guest.rs", "hw.rs", "acpi.rs", "boot.S", "guest.ld"] {
        println!("cargo:rerun-if-changed={}", guest.join(file).display());
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .current_dir(&guest)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "cellvm_testguest",
        ])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "relocation-model=static",
        ])
        .args(["-C", "debuginfo=0", "-C", "strip=debuginfo"])
        .args([
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-no-pie",
        ])
        .args([
            "-C",
            "link-arg=-Wl,-T,guest.ld",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
        .args(["-C", "link-arg=-Wl,-n"])
        .arg("-o")
        .arg(&out)
        .arg("guest.rs")
        .status()
        .expect("cannot run rustc for the test guest");
    assert!(status.success(), "building the test guest failed");
    println!("cargo:rustc-env=CELLVM_TESTGUEST={}", out.display());
}
