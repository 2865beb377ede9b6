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
/// `comment` per thread kind and an optional `include` list, both dropped here) to BPF,
/// in two variants: the profile as written (kill on violation) and one that logs
/// instead, for diagnosis. `include` names sections in policy/seccomp/common/ (a
/// `filter` list and their own `include`s): their rules are appended, so the rules every
/// backend shares are written once.
fn compile_seccomp_profiles() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let dir = manifest.join("policy/seccomp");
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-changed={}", dir.join("common").display());
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
            let t = thread
                .as_object_mut()
                .expect("each thread kind is an object");
            t.remove("comment");
            let mut seen = Vec::new();
            let extra = match t.remove("include") {
                Some(names) => include_rules(&dir, &names, &mut seen),
                None => Vec::new(),
            };
            t.get_mut("filter")
                .and_then(|f| f.as_array_mut())
                .unwrap_or_else(|| panic!("{}: each thread kind has a filter list", file.display()))
                .extend(extra);
        }
        for (variant, action) in [("kill", None), ("log", Some("log"))] {
            let mut d = doc.clone();
            if let Some(a) = action {
                // Only what kills is softened: a profile that answers an errno (clone3)
                // stays as it is.
                for thread in d.values_mut() {
                    if thread["default_action"] == "kill_process" {
                        thread["default_action"] = serde_json::Value::String(a.into());
                    }
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

/// The rules of the sections named in `names` (policy/seccomp/common/NAME.json) and of
/// the sections they include, each section once.
fn include_rules(
    dir: &std::path::Path,
    names: &serde_json::Value,
    seen: &mut Vec<String>,
) -> Vec<serde_json::Value> {
    let mut rules = Vec::new();
    for name in names
        .as_array()
        .expect("include is a list of section names")
    {
        let name = name.as_str().expect("a section name").to_string();
        if seen.contains(&name) {
            continue;
        }
        seen.push(name.clone());
        let path = dir.join("common").join(format!("{name}.json"));
        println!("cargo:rerun-if-changed={}", path.display());
        let section: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Some(inner) = section.get("include") {
            rules.extend(include_rules(dir, inner, seen));
        }
        rules.extend(
            section["filter"]
                .as_array()
                .unwrap_or_else(|| panic!("{}: no filter list", path.display()))
                .iter()
                .cloned(),
        );
    }
    rules
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
        "vsock.rs",
        "restart.rs",
        "fs.rs",
        "console.rs",
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
