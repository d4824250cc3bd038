//! ssh targets share one connection each (`rsync::ssh`): its sockets' private directory
//! is made when the dispatcher starts, and the connections of the targets it serves
//! are closed when it stops. One left by a killed dispatcher closes by itself once idle
//! for `ControlPersist` seconds, or is found again by the next one.

use std::path::{Path, PathBuf};

use protocol::config::{Config, Endpoint, Target};

use crate::command;

/// The directory of the connection sockets (`<runtime_dir>/ssh`, 0700), made if any of
/// `targets` is an ssh target. `None`, with a WARN, when it cannot be: runs then log in
/// each time, as they would without sharing.
pub(crate) fn prepare(config: &Config, targets: &[&Target]) -> Option<PathBuf> {
    if !targets
        .iter()
        .any(|t| matches!(t.endpoint, Endpoint::Ssh { .. }))
    {
        return None;
    }
    let made = ::rsync::ssh::control_dir(&config.runtime_dir).and_then(|dir| {
        // Whoever can reach a master's socket can run commands over its connection:
        // the directory is ours alone, or not used.
        protocol::bus::private_dir(&dir)
            .map(|_| dir.clone())
            .map_err(|e| format!("`{}`: {e}", dir.display()))
    });
    match made {
        Ok(dir) => Some(dir),
        Err(e) => {
            tracing::warn!(error = %e, "ssh targets do not share a connection: every run logs in");
            None
        }
    }
}

/// Closes the shared connection of each ssh target in `targets` (`ssh -O exit`); one
/// that is not open costs a failed connect to its socket, nothing on the network.
pub(crate) fn close(dir: &Path, targets: &[&Target]) {
    for t in targets {
        let Some(args) = ::rsync::ssh::exit_args(t, dir) else {
            continue;
        };
        let r = command::run_ssh_control(&args);
        tracing::debug!(target = %t.name, outcome = ?r.outcome, error = %r.error, "ssh connection closed");
    }
}
