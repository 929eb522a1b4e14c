//! `cargo xtask`: the project's tasks. Each installs what it needs first (`setup`).
//!
//! - `cargo xtask setup`: install whatever is missing (LLVM 22, bpf-linker, rust-src, iproute2...)
//! - `cargo xtask test`: set up, build, and run every test (unit and privileged end-to-end)
//! - `cargo xtask fuzz [TARGET]`: set up, build, and run the fuzz targets of `fuzz/`
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
    /// Set up, build, and run the fuzz targets of `fuzz/` (every one, or TARGET).
    Fuzz {
        /// One target (`cargo fuzz list` in fuzz/ names them).
        target: Option<String>,
        /// How long to fuzz each target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
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
        Task::Fuzz { target, seconds } => {
            setup::run()?;
            fuzz(seconds, target.as_deref())
        }
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
    // The whole suite (what CI runs) holds the code to its style and the tree to its licenses,
    // runs the tier that needs no privilege as `nobody` (so that it provably needs none), and
    // fuzzes the parsers briefly; one test does not wait for any of that.
    let whole = args.is_empty();
    let mut tiers = Vec::new();
    if whole {
        lint()?;
        tiers.push(("unprivileged (as nobody)", unprivileged()?));
        fuzz(FUZZ_SECONDS_IN_TEST, None)?;
    }
    let mut build = cargo();
    build.args(["build", "--package", "ambit", "--bin", "ambit"]);
    run(build)?;
    // The container tests run this binary in the agent's image, as the DaemonSet would.
    image::build(&root().join("target/debug/ambit"), ambit_tests::podman::IMAGE)?;
    let mut test = cargo();
    test.args(["test", "--workspace", "--exclude", "ambit-ebpf"]);
    if whole {
        // Its tests ran above; here only those that need root (ignored there).
        test.args(["--exclude", "ambit"]);
    }
    test.args(args).env("AMBIT_BIN", root().join("target/debug/ambit")).env("RUST_BACKTRACE", "1");
    let mut privileged = counted(test)?;
    if whole {
        let mut root_only = cargo();
        root_only.args(["test", "--package", "ambit", "--", "--ignored"]);
        let root_only = counted(root_only)?;
        // They were skipped as nobody only to run here.
        if let Some((_, unprivileged)) = tiers.first_mut() {
            unprivileged.ignored = unprivileged.ignored.saturating_sub(root_only.passed + root_only.failed);
        }
        privileged += root_only;
    }
    tiers.push(("privileged (as root)", privileged));
    let total = tiers.iter().fold(Counts::default(), |sum, (_, c)| sum + *c);
    println!();
    for (tier, c) in &tiers {
        println!("{tier}: {} passed, {} failed, {} skipped", c.passed, c.failed, c.ignored);
    }
    println!("all tests: {} passed, {} failed, {} skipped", total.passed, total.failed, total.ignored);
    if total.failed > 0 || !total.ok {
        bail!("tests failed");
    }
    Ok(())
}

/// Test results added up over the `test result:` lines of test binaries.
#[derive(Clone, Copy, Debug)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Every binary exited successfully.
    ok: bool,
}

impl Default for Counts {
    fn default() -> Self {
        Self { passed: 0, failed: 0, ignored: 0, ok: true }
    }
}

impl std::ops::Add for Counts {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self {
            passed: self.passed + other.passed,
            failed: self.failed + other.failed,
            ignored: self.ignored + other.ignored,
            ok: self.ok && other.ok,
        }
    }
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Self) {
        *self = *self + other;
    }
}

/// Runs `command`, echoing its output as it comes, and adds up its test results.
fn counted(mut command: Command) -> anyhow::Result<Counts> {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    let stdout = child.stdout.take().context("test output")?;
    let mut counts = Counts::default();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.context("reading test output")?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                summary
                    .split(['.', ';'])
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().parse().ok())
                    .unwrap_or(0)
            };
            counts.passed += count("passed");
            counts.failed += count("failed");
            counts.ignored += count("ignored");
        }
    }
    let status = child.wait().context("waiting for the tests")?;
    counts.ok = status.success();
    Ok(counts)
}

/// The agent crate's own tests (unit tests and `agent/tests/`), built as root and run as
/// `nobody` with no capabilities: they must need neither root nor the kernel programs.
fn unprivileged() -> anyhow::Result<Counts> {
    let mut build = cargo();
    build.args(["test", "--package", "ambit", "--no-run", "--message-format=json"]);
    let output =
        build.stderr(std::process::Stdio::inherit()).output().context("building the agent's tests")?;
    if !output.status.success() {
        bail!("building the agent's tests failed: {}", output.status);
    }
    let executables: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| m["executable"].as_str().map(str::to_owned))
        .collect();
    if executables.is_empty() {
        bail!("no test executables of the agent were built");
    }
    let mut counts = Counts::default();
    for executable in executables {
        let mut test = Command::new("setpriv");
        test.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(&executable)
        .current_dir(root().join("agent"))
        .env("RUST_BACKTRACE", "1");
        counts += counted(test)?;
    }
    Ok(counts)
}

/// How long `cargo xtask test` fuzzes each target.
const FUZZ_SECONDS_IN_TEST: u32 = 20;

/// Builds the fuzz targets of `fuzz/` and runs each (or `only`) for `seconds`, from its seeds.
/// cargo-fuzz wants nightly for its `-Z` flags; the stable toolchain is told to accept them,
/// as for the kernel programs. Without a sanitizer: the agent has no `unsafe` on these paths,
/// and a panic or a failed assertion is what the targets look for.
fn fuzz(seconds: u32, only: Option<&str>) -> anyhow::Result<()> {
    let dir = root().join("fuzz");
    let target = root().join("target/fuzz");
    let fuzz = |args: &[&str]| {
        let mut command = cargo();
        command
            .current_dir(&dir)
            .args(["fuzz"])
            .args(args)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("AYA_BUILD_SKIP", "1")
            .env("CARGO_TARGET_DIR", &target);
        command
    };
    run(fuzz(&["build", "--sanitizer", "none", "--dev"]))?;
    let listed = fuzz(&["list"]).output().context("cargo fuzz list")?;
    let targets: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty() && only.is_none_or(|o| o == *t))
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("no fuzz target {}", only.unwrap_or("at all"));
    }
    for name in &targets {
        let corpus = root().join("target/fuzz-corpus").join(name);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = dir.join("seeds").join(name);
        let (corpus, seeds, time) =
            (corpus.display().to_string(), seeds.display().to_string(), format!("-max_total_time={seconds}"));
        eprintln!("fuzz: {name} for {seconds} s");
        // libFuzzer reports every new input; only a failure needs all of it.
        let output = fuzz(&[
            "run",
            "--sanitizer",
            "none",
            "--dev",
            name,
            &corpus,
            &seeds,
            "--",
            &time,
            "-max_len=4096",
        ])
        .output()
        .with_context(|| format!("running fuzz target {name}"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            eprintln!("{log}");
            bail!("fuzz target {name} failed: the input that broke it is in fuzz/artifacts/{name}/");
        }
        let done = log.lines().rev().find(|l| l.starts_with('#') && l.contains("DONE")).unwrap_or("done");
        eprintln!("fuzz: {name}: {}", done.trim());
    }
    Ok(())
}

/// rustfmt, clippy (every warning an error; the kernel programs are held to theirs by the
/// nested build, which clippy cannot drive) and cargo-deny (licenses, bans, sources; see
/// deny.toml for why not advisories).
fn lint() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt).context("code not formatted: run `cargo fmt --all`")?;
    let mut fuzz_fmt = cargo();
    fuzz_fmt.current_dir(root().join("fuzz")).args(["fmt", "--", "--check"]);
    run(fuzz_fmt).context("fuzz targets not formatted: run `cargo fmt` in fuzz/")?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--package", "ambit", "--package", "ambit-tests", "--package", "xtask"]).args([
        "--all-targets",
        "--",
        "--deny",
        "warnings",
    ]);
    run(clippy).context("clippy found something: see above")?;
    let mut deny = cargo();
    deny.args(["deny", "check", "licenses", "bans", "sources"]);
    run(deny).context("cargo deny: see above and deny.toml")?;
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
