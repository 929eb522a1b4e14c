//! Builds the kernel programs of `ambit-ebpf` for the BPF target and puts the object file in
//! `OUT_DIR`, where `src/bpf.rs` embeds it.
//!
//! The BPF target needs `-Z build-std=core`. We build it with the stable toolchain and
//! `RUSTC_BOOTSTRAP=1` for that one nested build, so the project needs one toolchain only.

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
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
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not installed; run `cargo xtask setup` (it installs LLVM 22 and bpf-linker)"
        ));
    }
    // SAFETY: build scripts are single-threaded; the variable is meant for the nested cargo.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::Custom("stable"),
    )
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("bpf-linker")).find(|candidate| candidate.is_file())
}
