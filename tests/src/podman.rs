//! Containers run with podman (runc, cgroupfs, `tests/fixtures/podman/containers.conf`), for
//! the tests that start the agent's image as the DaemonSet does. The image is built by
//! `cargo xtask image` (which `cargo xtask test` runs first).

use std::{
    ffi::OsString,
    io,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use crate::sys;

/// The image the tests run: the current agent binary on a locally made Debian base.
pub const IMAGE: &str = "localhost/ambit:test";

/// `podman` with the project's configuration.
pub fn podman() -> Command {
    let mut command = Command::new("podman");
    command.env(
        "CONTAINERS_CONF",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/podman/containers.conf"),
    );
    command
}

fn run(args: &[&str]) -> io::Result<Output> {
    crate::agent::output_with_timeout(
        {
            let mut c = podman();
            c.args(args);
            c
        },
        Duration::from_secs(60),
    )
}

/// Fails with what to do when the image is missing.
pub fn require_image() -> io::Result<()> {
    let out = run(&["image", "exists", IMAGE])?;
    if !out.status.success() {
        return Err(io::Error::other(format!("no image {IMAGE}: build it with `cargo xtask image`")));
    }
    Ok(())
}

/// Removes containers of earlier runs whose test process is gone (named `ambit-t<pid>x<n>-…`).
fn sweep() {
    let Ok(out) = run(&["ps", "-a", "--format", "{{.Names}}"]) else { return };
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        if sys::run_owner(name).is_some_and(|pid| !sys::pid_alive(pid)) {
            let _ = run(&["rm", "-f", "-t", "0", name]);
        }
    }
}

/// A container started detached; removed when dropped.
pub struct Running {
    name: String,
    /// The network namespace it shares (its node's), for reaching its ports.
    netns: PathBuf,
}

impl Running {
    /// `podman run -d --name NAME ARGS…` (ARGS: options, then the image and its arguments);
    /// `netns` is where its ports are reached.
    pub fn start(name: &str, netns: &Path, args: &[OsString]) -> io::Result<Self> {
        sweep();
        let _ = run(&["rm", "-f", "-t", "0", name]);
        let mut command = podman();
        command.args(["run", "-d", "--name", name]).args(args);
        let out = crate::agent::output_with_timeout(command, Duration::from_secs(60))?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "podman run {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(Self { name: name.to_owned(), netns: netns.to_owned() })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything it wrote (stdout and stderr).
    pub fn logs(&self) -> String {
        std::thread::sleep(crate::agent::LOG_BATCH);
        run(&["logs", &self.name])
            .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
            .unwrap_or_default()
    }

    /// Its JSON log lines.
    pub fn log_events(&self) -> Vec<serde_json::Value> {
        self.logs().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Whether it still runs, and else its exit code.
    pub fn state(&self) -> io::Result<(bool, i64)> {
        let out = run(&["inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", &self.name])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut parts = text.split_whitespace();
        Ok((parts.next() == Some("true"), parts.next().and_then(|c| c.parse().ok()).unwrap_or(-1)))
    }

    /// SIGKILL, as a node losing the pod abruptly.
    pub fn kill(&self) -> io::Result<()> {
        let out = run(&["kill", &self.name])?;
        if !out.status.success() {
            return Err(io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        // Wait until it is really gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.state()?.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts it again (same container, as the kubelet restarts one).
    pub fn restart(&self) -> io::Result<()> {
        let out = run(&["start", &self.name])?;
        if !out.status.success() {
            return Err(io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        Ok(())
    }

    /// The HTTP status of `GET path` on `127.0.0.1:port` in its network namespace; `None` when
    /// nothing answers.
    pub fn http_get(&self, port: u16, path: &str) -> io::Result<Option<(u16, String)>> {
        sys::in_netns(&self.netns, || -> io::Result<Option<(u16, String)>> {
            use std::io::{Read as _, Write as _};
            let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return Ok(None) };
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut response = String::new();
            if stream.read_to_string(&mut response).is_err() {
                return Ok(None);
            }
            let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            Ok(status.map(|s| (s, body)))
        })?
    }

    /// Waits until `/healthz/ready` on 15021 answers 200; fails with its logs.
    pub fn wait_ready(&self, limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if matches!(self.http_get(15021, "/healthz/ready")?, Some((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline || !self.state()?.0 {
                return Err(io::Error::other(format!(
                    "container {} not ready after {limit:?}; state {:?}; logs:\n{}",
                    self.name,
                    self.state()?,
                    self.logs()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET path` on the admin API (15000), decoded.
    pub fn admin_json(&self, path: &str) -> Option<serde_json::Value> {
        match self.http_get(15000, path) {
            Ok(Some((200, body))) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- container {} logs\n{}", self.name, self.logs());
        }
        let _ = run(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// The `podman run` options that start `template`'s container as the kubelet would on a node
/// whose network namespace is `netns`: `hostNetwork` (the node's netns), `hostPID`, the user,
/// exactly the listed capabilities after dropping all, the kubelet's default seccomp
/// (`Unconfined` unless a profile is set), each volume where and as read-only as the manifest
/// says (host paths as the host has them, with `HostToContainer` propagation; every other
/// volume from `sources`, by name), and the environment. The image and its arguments follow.
pub fn run_options(
    template: &crate::manifest::PodTemplate,
    netns: &Path,
    sources: &[(&str, PathBuf)],
) -> io::Result<Vec<OsString>> {
    use crate::manifest::Source;
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |a: &str| args.push(a.into());
    if template.host_network {
        push("--network");
        push(&format!("ns:{}", netns.display()));
    }
    if template.host_pid {
        push("--pid=host");
    }
    if let Some((uid, gid)) = template.user {
        push(&format!("--user={uid}:{gid}"));
    }
    if template.privileged {
        push("--privileged");
    }
    if template.drops_all {
        push("--cap-drop=all");
    }
    for cap in &template.capabilities {
        push(&format!("--cap-add=CAP_{cap}"));
    }
    push("--security-opt=seccomp=unconfined");
    // containerd gives a container a cgroup namespace of its own on cgroup v2 hosts: the
    // agent must find pods from there.
    push("--cgroupns=private");
    push("--ulimit=host");
    for mount in &template.mounts {
        let source = match &mount.source {
            Source::Host(path) => path.clone(),
            Source::Volume(name) => sources
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| io::Error::other(format!("no source for volume {name}")))?,
        };
        let mut options = vec![if mount.read_only { "ro" } else { "rw" }];
        if mount.host_to_container {
            options.push("rslave");
        }
        push("--volume");
        push(&format!("{}:{}:{}", source.display(), mount.target.display(), options.join(",")));
    }
    for (key, value) in &template.env {
        push("--env");
        push(&format!("{key}={value}"));
    }
    Ok(args)
}
