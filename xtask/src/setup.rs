//! Installs what the project needs on a fresh Debian machine, and nothing when all is there.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian packages: LLVM 22 for bpf-linker (rustc's LLVM is 22), iproute2 for the test
/// harness, tcpdump and openssl as independent judges in the tests, nftables for the NodePort
/// DNAT a test builds in a node (never used by ambit itself), nginx as the ingress proxy of a
/// test, iperf3 and sockperf for the
/// bench, podman with runc and mmdebstrap
/// for the agent's image and the tests that run it as the DaemonSet does, chromium to load the
/// service graph page in a real browser, g++ for libFuzzer (the fuzz targets), util-linux's
/// `setpriv` to run the unprivileged test tier as `nobody`.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
    "iproute2",
    "tcpdump",
    "openssl",
    "nftables",
    "iperf3",
    "nginx-light",
    "sockperf",
    "python3",
    "python3-pip",
    "podman",
    "runc",
    "mmdebstrap",
    "chromium",
    "g++",
    "util-linux",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs every check, installing what is missing.
pub(crate) fn run() -> anyhow::Result<()> {
    packages()?;
    rust_src()?;
    cargo_tools()?;
    python_packages()?;
    Ok(())
}

/// Independent judges the tests use: Prometheus' own text-format parser for the metrics, the
/// Kubernetes schemas (kubernetes-validate, which brings jsonschema and PyYAML) for the
/// manifests and CRDs, and gRPC's own Python client (grpcio, grpcio-tools for the messages,
/// cryptography for the CSR) for the CA protocol.
fn python_packages() -> anyhow::Result<()> {
    let present = Command::new("python3")
        .args([
            "-c",
            "import prometheus_client, kubernetes_validate, jsonschema, yaml, grpc, grpc_tools, cryptography",
        ])
        .output();
    if present.is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    let wanted = ["prometheus-client", "kubernetes-validate", "grpcio", "grpcio-tools", "cryptography"];
    eprintln!("setup: installing Python packages {} (test judges)", wanted.join(" "));
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet"])
        .args(wanted)
        .status()
        .context("python3 -m pip (install Debian's python3-pip if pip is missing)")?;
    if !status.success() {
        bail!("pip install {} failed: {status}", wanted.join(" "));
    }
    Ok(())
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    ensure_root("install Debian packages")?;
    let update = Command::new("apt-get").args(["update", "-q"]).status().context("apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed: {update}");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get install")?;
    if !status.success() {
        bail!(
            "apt-get install {} failed ({status}); LLVM 22 comes from Debian's bookworm-security or a newer release",
            missing.join(" ")
        );
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "stable"])
        .output()
        .context("rustup (the eBPF build needs rustup's rust-src component)")?;
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the stable toolchain (the eBPF target builds core from source)");
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "stable"])
        .status()
        .context("rustup component add")?;
    if !status.success() {
        bail!("rustup component add rust-src failed: {status}");
    }
    Ok(())
}

/// A tool installed with `cargo install`, at its pinned version.
struct CargoTool {
    binary: &'static str,
    version: &'static str,
    why: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

const CARGO_TOOLS: &[CargoTool] = &[
    CargoTool {
        binary: "bpf-linker",
        version: BPF_LINKER_VERSION,
        why: "links the kernel programs, against LLVM 22 (about a minute)",
        args: &["--no-default-features", "--features", "llvm-22"],
        env: &[
            ("LLVM_PREFIX", "/usr/lib/llvm-22"),
            ("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"),
            ("LLVM_SYS_220_PREFIX", "/usr/lib/llvm-22"),
        ],
    },
    CargoTool {
        binary: "cargo-deny",
        version: "0.20.2",
        why: "checks the dependency tree's licenses, bans and sources (about five minutes)",
        args: &["--no-default-features"],
        env: &[],
    },
    CargoTool {
        binary: "cargo-fuzz",
        version: "0.13.2",
        why: "builds and runs the fuzz targets (about a minute)",
        args: &[],
        env: &[],
    },
];

fn cargo_tools() -> anyhow::Result<()> {
    for tool in CARGO_TOOLS {
        let current = Command::new(tool.binary).arg("--version").output();
        if current
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(tool.version))
        {
            continue;
        }
        eprintln!("setup: installing {} {}: {}", tool.binary, tool.version, tool.why);
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", tool.binary, "--version", tool.version, "--locked"])
            .args(tool.args)
            .envs(tool.env.iter().copied())
            .status()
            .with_context(|| format!("cargo install {}", tool.binary))?;
        if !status.success() {
            bail!("cargo install {} failed: {status}", tool.binary);
        }
    }
    Ok(())
}

fn ensure_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("setup needs root to {what}");
    }
    Ok(())
}
