//! References to pinned kernel objects that the agent holds itself.
//!
//! A pin in bpffs keeps a link or map alive after the agent exits, for the next agent to take
//! over. It must not be the only reference while the agent runs: anyone who may write to bpffs
//! could remove it and silently detach enforcement. So the agent keeps its own file descriptor
//! of every link and map it pins, checks the pins and attachments periodically, and puts back
//! what is missing.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use super::sys;

/// A link or map this agent pinned, with its own reference to it.
#[derive(Debug)]
pub(crate) struct Held {
    fd: OwnedFd,
    path: PathBuf,
}

/// What [`Held::check`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// Pinned and (for a link) attached.
    Intact,
    /// The pin was gone (or replaced by something else) and is back.
    Repinned,
    /// The link was detached: only attaching anew helps.
    Detached,
    /// The pin is missing and could not be put back.
    Unpinnable(String),
}

impl Held {
    /// Takes our own reference to the object just pinned at `path`.
    pub(crate) fn from_pin(path: &Path) -> io::Result<Self> {
        Ok(Self { fd: sys::get(path)?, path: path.to_owned() })
    }

    /// The pin path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// For a link: checks that it is attached and that its pin names it; re-pins if not. For a
    /// map (`link = false`): re-pins when the pin is gone.
    pub(crate) fn check(&self, link: bool) -> Check {
        if link {
            match sys::link_state(self.fd.as_fd()) {
                Ok(state) if !state.attached => return Check::Detached,
                Ok(state) => match sys::pinned_link_id(&self.path) {
                    Ok(id) if id == state.id => return Check::Intact,
                    // Gone, or another link there: ours goes back.
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    // Not readable now (out of descriptors, say): leave the pin as it is.
                    Err(e) => return Check::Unpinnable(format!("reading the pin: {e}")),
                },
                Err(e) => return Check::Unpinnable(format!("reading link info: {e}")),
            }
        } else if self.path.exists() {
            return Check::Intact;
        }
        // Something else at the path (a stale pin of another link) goes; our object goes back.
        let _ = std::fs::remove_file(&self.path);
        match sys::pin(self.fd.as_fd(), &self.path) {
            Ok(()) => Check::Repinned,
            Err(e) => Check::Unpinnable(e.to_string()),
        }
    }
}

impl AsFd for Held {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
