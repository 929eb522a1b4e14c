//! Where the agent learns about the cluster: the local cluster file ([`local`]) or the
//! Kubernetes API ([`kube`]). Both hand their objects to the snapshot ([`crate::state`]) as
//! [`crate::state::Change`]s; nothing else of the agent reads a source directly.

pub mod kube;
pub mod local;

use std::path::PathBuf;

/// Errors reading a source of truth. Each names where the bad input came from.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid YAML, or a field of the wrong type.
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, with the object it belongs to when known.
        message: String,
    },
    /// The Kubernetes API could not be reached or configured.
    #[error("Kubernetes API: {0}")]
    Kubernetes(String),
    /// Well-formed YAML with a meaning we cannot accept.
    #[error("{file}:{line}: {object}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line of the document.
        line: usize,
        /// `Kind namespace/name`.
        object: String,
        /// What is wrong.
        message: String,
    },
}
