//! Compiles seccomp.json (seccompiler's JSON) to the BPF program cellvm-img installs.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let json = dir.join("seccomp.json");
    println!("cargo:rerun-if-changed={}", json.display());
    let text = std::fs::read(&json).unwrap();
    let progs = seccompiler::compile_from_json(text.as_slice(), seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("{}: {e}", json.display()));
    let prog = &progs["img"];
    let mut bytes = Vec::new();
    for f in prog {
        bytes.extend_from_slice(&f.code.to_le_bytes());
        bytes.push(f.jt);
        bytes.push(f.jf);
        bytes.extend_from_slice(&f.k.to_le_bytes());
    }
    std::fs::write(out.join("seccomp-img.bpf"), bytes).unwrap();
}
