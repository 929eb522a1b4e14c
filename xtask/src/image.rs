//! `cargo xtask image`: the agent's image without a registry. A Debian base made from the
//! package mirrors with `mmdebstrap` and imported into podman (once; cached in podman's
//! storage), then the Dockerfile's `prebuilt` stage on top of it with a binary built here.

use std::{path::Path, process::Command};

use ambit_tests::podman::podman;
use anyhow::{Context as _, bail};

/// The locally made base image.
const BASE: &str = "localhost/ambit-base:bookworm";

/// The image ID `tag` names, if any.
fn id(tag: &str) -> Option<String> {
    let out = podman().args(["image", "inspect", "--format", "{{.Id}}", tag]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The base image, made if podman does not have it.
fn base() -> anyhow::Result<()> {
    if id(BASE).is_some() {
        return Ok(());
    }
    eprintln!("image: making the base {BASE} with mmdebstrap (once; about half a minute)");
    let dir = crate::root().join("target/image");
    std::fs::create_dir_all(&dir)?;
    let tar = dir.join("base.tar");
    let mut strap = Command::new("mmdebstrap");
    strap
        .args(["--variant=minbase", "--include=ca-certificates", "--quiet", "bookworm"])
        .arg(&tar)
        .arg("http://deb.debian.org/debian");
    crate::run(strap).context("mmdebstrap (Debian's mmdebstrap package)")?;
    let mut import = podman();
    import.arg("import").arg(&tar).arg(BASE);
    crate::run(import).context("podman import")?;
    let _ = std::fs::remove_file(&tar);
    Ok(())
}

/// Builds `tag` from `binary` on the local base.
pub(crate) fn build(binary: &Path, tag: &str) -> anyhow::Result<()> {
    base()?;
    let context = crate::root().join("target/image/context");
    std::fs::create_dir_all(&context)?;
    // Without debug information: a quarter of the size, and the image is rebuilt every test run.
    let mut strip = Command::new("llvm-strip-22");
    strip.arg("--strip-debug").arg("-o").arg(context.join("ambit")).arg(binary);
    crate::run(strip).context("llvm-strip-22 (from the llvm-22 packages setup installs)")?;
    let previous = id(tag);
    let mut build = podman();
    build
        .args(["build", "--quiet", "--target", "prebuilt", "--build-arg"])
        .arg(format!("RUNTIME_BASE={BASE}"))
        .args(["--tag", tag, "--file"])
        .arg(crate::root().join("Dockerfile"))
        .arg(&context);
    let out = build.output().context("podman build")?;
    if !out.status.success() {
        bail!("podman build failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The image this tag named before is now untagged; every test run would leave one behind.
    if let Some(old) = previous.filter(|old| id(tag).as_ref() != Some(old)) {
        let _ = podman().args(["rmi", &old]).output();
    }
    Ok(())
}
