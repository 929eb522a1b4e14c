//! Running real `ambit agent` processes inside node network namespaces.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    net::TcpStream,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::sys;

/// Where a spawned agent learns about the cluster.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Source<'a> {
    /// `--local FILE`.
    Local(&'a Path),
    /// The Kubernetes API a kubeconfig points at.
    Kubernetes(&'a Path),
}

/// What a pod spec shapes of a spawned process: its filesystem (in a mount namespace of its
/// own, as volumes shape a container's view), its environment and its user.
#[derive(Clone, Debug, Default)]
pub struct Container {
    /// Paths bound onto themselves read-only (`readOnly: true` volumes).
    pub read_only: Vec<PathBuf>,
    /// `(source, target)`: a file or directory bound read-only at `target` (a ConfigMap key,
    /// a projected token, `/etc/hosts`). A missing target is created, and removed again when
    /// the process is dropped.
    pub files: Vec<(PathBuf, PathBuf)>,
    /// Paths covered by an empty read-only tmpfs: whatever is there cannot be read.
    pub hidden: Vec<PathBuf>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// `(uid, gid)` to run as, after the mounts (`runAsUser`, `runAsGroup`).
    pub user: Option<(u32, u32)>,
}

/// A running agent (or other `ambit` process in a node); killed when dropped.
pub struct Agent {
    child: Child,
    log: PathBuf,
    netns: PathBuf,
    /// Mount targets made for it, deepest first: removed when it is dropped.
    created: Vec<PathBuf>,
}

/// Creates `target` (a directory, or an empty file) and its missing parents, recording each.
fn make_target(target: &Path, dir: bool, created: &mut Vec<PathBuf>) -> io::Result<()> {
    if target.exists() {
        return Ok(());
    }
    if let Some(parent) = target.parent() {
        make_target(parent, true, created)?;
    }
    if dir {
        std::fs::create_dir(target)?;
    } else {
        File::create(target)?;
    }
    created.insert(0, target.to_owned());
    Ok(())
}

/// Longer than the agent's log batching delay (`telemetry::writer`), with room for the write.
pub(crate) const LOG_BATCH: Duration = Duration::from_millis(25);

/// How an agent process ended.
#[derive(Debug)]
pub struct AgentOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything it wrote.
    pub log: String,
}

impl Agent {
    #[allow(clippy::too_many_arguments, reason = "one call site, the harness's own")]
    pub(crate) fn spawn(
        netns: &Path,
        source: Source<'_>,
        node: &str,
        instance: &str,
        log: &Path,
        ca_dir: &Path,
        extra: &[&str],
        mounts: &Container,
    ) -> io::Result<Self> {
        let mut command = Command::new(sys::ambit_binary());
        command.arg("agent");
        match source {
            Source::Local(file) => command.arg("--local").arg(file),
            Source::Kubernetes(kubeconfig) => command.env("KUBECONFIG", kubeconfig),
        };
        command.args(["--node", node, "--instance", instance]).arg("--ca-dir").arg(ca_dir).args(extra);
        Self::spawn_command(command, netns, log, mounts)
    }

    /// Runs `command` (an `ambit` subcommand) in `netns` with `mounts`, logging JSON to `log`.
    pub(crate) fn spawn_command(
        mut command: Command,
        netns: &Path,
        log: &Path,
        mounts: &Container,
    ) -> io::Result<Self> {
        let out = File::options().create(true).append(true).open(log)?;
        let mut created = Vec::new();
        for (source, target) in &mounts.files {
            make_target(target, source.is_dir(), &mut created)?;
        }
        command.envs(mounts.env.iter().map(|(k, v)| (k, v)));
        command
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", std::env::var("AMBIT_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let path = netns.to_owned();
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other);
        // Prepared here, before the fork.
        let mut binds = Vec::new();
        for p in &mounts.read_only {
            binds.push((c(p)?, c(p)?));
        }
        for (file, target) in &mounts.files {
            binds.push((c(file)?, c(target)?));
        }
        let hidden: Vec<std::ffi::CString> = mounts.hidden.iter().map(|p| c(p)).collect::<Result<_, _>>()?;
        let private = !binds.is_empty() || !hidden.is_empty();
        let user = mounts.user;
        // SAFETY: only setns, unshare, mount, setgroups/setgid/setuid and prctl between fork
        // and exec.
        unsafe {
            command.pre_exec(move || {
                sys::enter_netns(&path)?;
                if private {
                    sys::private_mounts(&binds, &hidden)?;
                }
                // After the mounts, which need root; as the kubelet starts a non-root container.
                if let Some((uid, gid)) = user {
                    let check =
                        |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
                    check(libc::setgroups(1, &gid))?;
                    check(libc::setgid(gid))?;
                    check(libc::setuid(uid))?;
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn()?;
        Ok(Self { child, log: log.to_owned(), netns: netns.to_owned(), created })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/healthz/ready` answers 200, or fails with the agent's log.
    pub fn wait_ready(&self, limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.readiness()? == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "agent not ready after {limit:?}; log:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The HTTP status of the readiness endpoint, `None` if nothing answers.
    pub fn readiness(&self) -> io::Result<Option<u16>> {
        Ok(self.http_get(15021, "/healthz/ready")?.map(|(status, _)| status))
    }

    /// `GET path` on `127.0.0.1:port` in the agent's node: status and body, `None` if refused.
    pub fn http_get(&self, port: u16, path: &str) -> io::Result<Option<(u16, String)>> {
        sys::in_netns(&self.netns, || -> io::Result<Option<(u16, String)>> {
            let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
                return Ok(None);
            };
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let status = response
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::other(format!("bad HTTP response: {response:?}")))?;
            let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            Ok(Some((status, body)))
        })?
    }

    /// `GET path` on the admin API, decoded; `None` if it does not answer 200 with JSON.
    pub fn admin_json(&self, path: &str) -> Option<Value> {
        match self.http_get(15000, path) {
            Ok(Some((200, body))) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// The number of good loads of the cluster file so far (`ambit status`).
    pub fn generation(&self) -> u64 {
        self.admin_json("/status").and_then(|s| s["config"]["generation"].as_u64()).unwrap_or(0)
    }

    /// Waits until the agent has loaded a cluster file written after `generation` was read.
    pub fn wait_generation_after(&self, generation: u64, limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        while self.generation() <= generation {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "agent did not reload the cluster file; log:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(())
    }

    /// The capture state of a pod of this node as `/workloads` reports it.
    pub fn pod_state(&self, pod: &str) -> Option<String> {
        let pods = self.admin_json("/workloads")?;
        let pod = pods.as_array()?.iter().find(|p| p["name"] == pod)?;
        pod["state"].as_str().map(str::to_owned)
    }

    /// The full `/workloads` entry of a pod of this node.
    pub fn pod_report(&self, pod: &str) -> Option<Value> {
        let pods = self.admin_json("/workloads")?;
        pods.as_array()?.iter().find(|p| p["name"] == pod).cloned()
    }

    /// How many file descriptors the agent process holds.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map(|d| d.count()).unwrap_or(0)
    }

    /// Stops the agent process (SIGSTOP) until [`Agent::resume`]: it does nothing meanwhile.
    pub fn pause(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    /// Continues a paused agent (SIGCONT).
    pub fn resume(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    /// SIGKILLs the agent, as a crash or OOM kill would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERMs the agent and waits for it to exit.
    pub fn terminate(&mut self, limit: Duration) -> io::Result<ExitStatus> {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(io::Error::other("agent did not exit after SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit on its own (start-up failures).
    pub fn wait_exit(mut self, limit: Duration) -> io::Result<AgentOutput> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(AgentOutput { status, log: self.log_text() });
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(io::Error::other(format!(
                    "agent still running after {limit:?}:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the agent logged.
    pub fn log_text(&self) -> String {
        // The agent writes its log in batches, each at most 10 ms after its first line: what
        // it logged before this call is in the file after this pause.
        std::thread::sleep(LOG_BATCH);
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's JSON log lines.
    pub fn log_events(&self) -> Vec<Value> {
        self.log_text().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The access-log records (`connection complete`).
    pub fn access_records(&self) -> Vec<Value> {
        self.log_events().into_iter().filter(|v| v["target"] == "access").collect()
    }

    /// Waits until a log event satisfies `matches`, returning it.
    pub fn wait_for_event(&self, limit: Duration, matches: impl Fn(&Value) -> bool) -> io::Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(event) = self.log_events().into_iter().find(|e| matches(e)) {
                return Ok(event);
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "no matching log event after {limit:?}; log:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        // Its mounts went with its namespace; what was made for them goes too (only if
        // empty: nothing else's is ever removed).
        for path in self.created.drain(..) {
            let _ = if path.is_dir() { std::fs::remove_dir(&path) } else { std::fs::remove_file(&path) };
        }
    }
}

/// Runs a command to completion, killing it after `limit`.
pub(crate) fn output_with_timeout(mut command: Command, limit: Duration) -> io::Result<Output> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn()?;
    let mut stdout = child.stdout.take().ok_or_else(|| io::Error::other("no stdout"))?;
    let mut stderr = child.stderr.take().ok_or_else(|| io::Error::other("no stderr"))?;
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break ExitStatus::from_raw(libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    })
}
