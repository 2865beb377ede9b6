//! Builds the test guest (tests/guest) from source with the host toolchain and hands its
//! path to the crate, which embeds it. The guest is freestanding: `core` only, its own
//! linker script, `panic = "abort"`, no libc.
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    build_test_guest();
    compile_seccomp_profiles();
}

/// Compiles every profile in policy/seccomp/*.json (seccompiler's JSON, plus a
/// `comment` per thread kind, which is dropped here) to BPF, in two variants: the
/// profile as written (kill on violation) and one that logs instead, for diagnosis.
fn compile_seccomp_profiles() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let dir = manifest.join("policy/seccomp");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut index = String::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for file in files {
        println!("cargo:rerun-if-changed={}", file.display());
        let role = file.file_stem().unwrap().to_string_lossy().to_string();
        let mut doc: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for thread in doc.values_mut() {
            thread
                .as_object_mut()
                .expect("each thread kind is an object")
                .remove("comment");
        }
        for (variant, action) in [("kill", None), ("log", Some("log"))] {
            let mut d = doc.clone();
            if let Some(a) = action {
                for thread in d.values_mut() {
                    thread["default_action"] = serde_json::Value::String(a.into());
                }
            }
            let json = serde_json::to_vec(&d).unwrap();
            let progs =
                seccompiler::compile_from_json(json.as_slice(), seccompiler::TargetArch::x86_64)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let mut names: Vec<_> = progs.keys().cloned().collect();
            names.sort();
            for name in names {
                let bytes: Vec<u8> = progs[&name]
                    .iter()
                    .flat_map(|f| {
                        [
                            &f.code.to_le_bytes()[..],
                            &[f.jt, f.jf],
                            &f.k.to_le_bytes()[..],
                        ]
                        .concat()
                    })
                    .collect();
                let path = out.join(format!("seccomp-{role}-{name}-{variant}.bpf"));
                std::fs::write(&path, bytes).unwrap();
                index.push_str(&format!(
                    "(\"{role}\", \"{name}\", \"{variant}\", include_bytes!(\"{}\")),\n",
                    path.display()
                ));
            }
        }
    }
    std::fs::write(out.join("seccomp_profiles.rs"), format!("&[\n{index}]")).unwrap();
}

fn build_test_guest() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest = manifest.join("tests/guest");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("cellvm-testguest.elf");
    for file in [
        "guest.rs",
        "hw.rs",
        "acpi.rs",
        "virtio.rs",
        "devices.rs",
        "net.rs",
        "boot.S",
        "guest.ld",
    ] {
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
