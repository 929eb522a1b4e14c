//! `cargo xtask`: the project's tasks. Each installs what it needs first (`setup`).
//!
//! - `cargo xtask setup`: install whatever is missing (LLVM 22, bpf-linker, rust-src, iproute2...)
//! - `cargo xtask test`: set up, build, and run every test (unit and privileged end-to-end)
//! - `cargo xtask demo`: set up, build, and run the "shop" demo on two simulated nodes
//! - `cargo xtask bench`: set up, build, and measure the mesh against direct pod-to-pod TCP
//! - `cargo xtask image`: set up, build, and make the agent's image without a registry (podman)

mod bench;
mod demo;
mod image;
mod setup;
mod table;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ambit's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent; quick when all is present).
    Setup,
    /// Set up, build, and run all tests (needs root). Extra arguments go to `cargo test`.
    Test {
        /// Passed to `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the shop demo on two simulated nodes (needs root).
    Demo,
    /// Set up, build, and benchmark the mesh against direct TCP (needs root).
    Bench(bench::Options),
    /// Set up, build, and make the agent's image with podman, without a registry (needs root).
    Image {
        /// The image's name.
        #[arg(long, default_value = "localhost/ambit:0.1.0")]
        tag: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test { args } => test(&args),
        Task::Demo => {
            let ambit = prepare_release()?;
            demo::run(&ambit)
        }
        Task::Bench(options) => {
            let ambit = prepare_release()?;
            bench::run(&ambit, &options)
        }
        Task::Image { tag } => {
            let ambit = prepare_release()?;
            image::build(&ambit, &tag)?;
            println!(
                "built {tag}. Load it where there is no registry:\n  podman save {tag} | ctr -n k8s.io images import -   (containerd nodes)\n  podman save -o ambit.tar {tag} && kind load image-archive ambit.tar   (kind)\nand set it under `images:` in daemonset/kustomization.yaml."
            );
            Ok(())
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

fn run(mut command: Command) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn require_root(task: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`cargo xtask {task}` needs root: it creates network namespaces and loads eBPF programs");
    }
    Ok(())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    require_root("test")?;
    setup::run()?;
    // The whole suite (what CI runs) also holds the code to its style; one test does not wait
    // for that.
    if args.is_empty() {
        lint()?;
    }
    let mut build = cargo();
    build.args(["build", "--package", "ambit", "--bin", "ambit"]);
    run(build)?;
    // The container tests run this binary in the agent's image, as the DaemonSet would.
    image::build(&root().join("target/debug/ambit"), ambit_tests::podman::IMAGE)?;
    let mut test = cargo();
    test.args(["test", "--workspace", "--exclude", "ambit-ebpf"])
        .args(args)
        .env("AMBIT_BIN", root().join("target/debug/ambit"))
        .env("RUST_BACKTRACE", "1")
        .stdout(std::process::Stdio::piped());
    let mut child = test.spawn().context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    // Echo the output as it comes, adding up every test binary's result line.
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                summary
                    .split(['.', ';'])
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
            ignored += count("ignored");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("\nall tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// rustfmt and clippy, every warning an error (the kernel programs are held to theirs by the
/// nested build, which clippy cannot drive).
fn lint() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt).context("code not formatted: run `cargo fmt --all`")?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--package", "ambit", "--package", "ambit-tests", "--package", "xtask"]).args([
        "--all-targets",
        "--",
        "--deny",
        "warnings",
    ]);
    run(clippy).context("clippy found something: see above")?;
    Ok(())
}

/// Sets up and builds the release binary used by the demo and the bench.
fn prepare_release() -> anyhow::Result<PathBuf> {
    require_root("demo/bench/image")?;
    setup::run()?;
    let mut build = cargo();
    build.args(["build", "--release", "--package", "ambit", "--bin", "ambit"]);
    run(build)?;
    let ambit = root().join("target/release/ambit");
    // The harness finds the binary through this variable.
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("AMBIT_BIN", &ambit) };
    Ok(ambit)
}
