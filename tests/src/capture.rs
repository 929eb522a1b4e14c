//! Packet captures on the cluster's bridge with tcpdump: the independent judge of what is on
//! the wire.

use std::{
    io::{self, BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::sys;

/// A running tcpdump on the bridge. tcpdump puts the bridge in promiscuous mode, so it sees the
/// frames forwarded between ports; `--immediate-mode` hands each packet over at once instead of
/// in blocks that a short capture would stop before they are delivered.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Captures TCP on interface `iface` of the network namespace at `netns`.
    pub(crate) fn start(netns: &Path, iface: &str, file: PathBuf) -> io::Result<Self> {
        let mut command = Command::new("tcpdump");
        command
            .args(["-i", iface, "--immediate-mode", "-U", "-s", "0", "-n", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let netns = netns.to_owned();
        // SAFETY: only setns and prctl between fork and exec.
        unsafe {
            command.pre_exec(move || {
                sys::enter_netns(&netns)?;
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        // tcpdump says "listening on <iface>" once the capture is armed.
        let stderr = child.stderr.take().ok_or_else(|| io::Error::other("no tcpdump stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening on") => break,
                Some(Ok(_)) if Instant::now() < deadline => continue,
                other => {
                    let _ = child.kill();
                    return Err(io::Error::other(format!("tcpdump did not start: {other:?}")));
                }
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child, file })
    }

    /// Stops the capture and returns the pcap file's bytes.
    pub fn finish(&mut self) -> io::Result<Vec<u8>> {
        // Let the last packets reach the file (-U flushes per packet), then stop cleanly.
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        std::fs::read(&self.file)
    }

    /// How many captured packets match a tcpdump `filter` (after [`Capture::finish`]): tcpdump
    /// itself decodes the headers.
    pub fn count(&self, filter: &str) -> io::Result<usize> {
        let out = Command::new("tcpdump").args(["-r"]).arg(&self.file).args(["-n", filter]).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!("tcpdump -r: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(out.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
