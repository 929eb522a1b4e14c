//! Builds the kernel programs of `ambit-ebpf` for the BPF target and puts the object file in
//! `OUT_DIR`, where `src/bpf.rs` embeds it.
//!
//! The BPF target needs `-Z build-std=core`. We build it with the stable toolchain and
//! `RUSTC_BOOTSTRAP=1` for that one nested build, so the project needs one toolchain only.
//! The nested cargo's progress is not repeated (it would print as dozens of `warning:` lines);
//! diagnostics of our own crates are, and our own warnings fail the build (`-D warnings`, which
//! cargo caps for dependencies).
//!
//! `AYA_BUILD_SKIP=1` skips it (for `cargo test -p ambit` without bpf-linker): the embedded
//! object is then empty, and an agent built so says it has no kernel programs.

use std::{
    ffi::OsString,
    io::{BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use cargo_metadata::Message;

const SKIP: &str = "AYA_BUILD_SKIP";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={SKIP}");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("ambit");
    if std::env::var(SKIP).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        if !object.exists() {
            std::fs::write(&object, b"").context("writing the empty kernel object")?;
        }
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "ambit-ebpf")
        .ok_or_else(|| anyhow!("the ambit-ebpf package is missing from the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent directory for {}", ebpf.manifest_path))?;
    // Cargo rebuilds us when the library of ambit-ebpf changes (a build-dependency); its binary
    // is what we embed.
    println!("cargo:rerun-if-changed={root_dir}");
    if which("bpf-linker").is_none() {
        bail!("bpf-linker is not installed; run `cargo xtask setup` (it installs LLVM 22 and bpf-linker)");
    }
    let endian = std::env::var("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN not set")?;
    let target = if endian == "big" { "bpfeb-unknown-none" } else { "bpfel-unknown-none" };
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    build(ebpf.name.as_str(), target, &arch, &out_dir.join("ebpf-target"), &object)
}

/// `cargo build` of `package`'s binary for `target`, copied to `object`.
fn build(package: &str, target: &str, arch: &str, target_dir: &Path, object: &Path) -> anyhow::Result<()> {
    let mut cargo = match which("rustup") {
        Some(rustup) => {
            let mut c = Command::new(rustup);
            c.args(["run", "stable", "cargo"]);
            c
        }
        None => Command::new("cargo"),
    };
    cargo
        .args(["build", "--package", package, "--bins", "--release", "--message-format=json"])
        .args(["--target", target, "-Z", "build-std=core", "--target-dir"])
        .arg(target_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        // The toolchain of the nested build, not of this one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut flags = OsString::new();
    for (i, flag) in [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        "-Dwarnings".into(),
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            flags.push("\x1f");
        }
        flags.push(flag);
    }
    cargo.env("CARGO_ENCODED_RUSTFLAGS", flags);
    let mut child = cargo.spawn().context("spawning the nested cargo for the kernel programs")?;
    // Progress only; kept to explain a failure.
    let mut stderr = child.stderr.take().context("stderr")?;
    let progress = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut executable = None;
    let stdout = BufReader::new(child.stdout.take().context("stdout")?);
    for message in Message::parse_stream(stdout) {
        match message.context("reading the nested cargo's output")? {
            Message::CompilerArtifact(artifact) if artifact.target.name.as_str() == "ambit" => {
                executable = artifact.executable.map(|e| e.into_std_path_buf());
            }
            Message::CompilerMessage(message) => {
                for text in message.message.rendered.unwrap_or_default().lines() {
                    println!("cargo:warning={text}");
                }
            }
            _ => {}
        }
    }
    let status = child.wait().context("waiting for the nested cargo")?;
    let progress = progress.join().unwrap_or_default();
    if !status.success() {
        for text in progress.lines().filter(|l| !l.trim_start().starts_with("Compiling")) {
            println!("cargo:warning={text}");
        }
        bail!("building the kernel programs failed ({status}); see the warnings above");
    }
    let executable = executable.context("the nested cargo built no `ambit` binary")?;
    std::fs::copy(&executable, object)
        .with_context(|| format!("copying {} to {}", executable.display(), object.display()))?;
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}
