//! The watch limit reached (`ENOSPC`) ends nothing: the root is watched in part, says so
//! in its status (`unwatched`), and is walked again every [`LIMIT_RETRY`]; once whole,
//! it is resynced.

use std::time::Instant;

use protocol::PathBytes;
use tracing::{error, info};

use super::Watcher;
use crate::error::WatcherError;
use crate::watch_map::RootIx;
use crate::LIMIT_RETRY;

impl Watcher<'_> {
    /// A walk that hit the watch limit leaves `root` watched in part: it is marked so
    /// (status CRITICAL) and walked again later, and the stage carries on.
    pub(super) fn limited(
        &mut self,
        root: RootIx,
        walked: Result<usize, WatcherError>,
    ) -> Result<usize, WatcherError> {
        let e = match walked {
            Err(e @ WatcherError::WatchLimit { .. }) => e,
            other => return other,
        };
        let r = &mut self.roots[root];
        if r.unwatched.is_none() {
            error!(root = %r.name, error = %e, "not every directory of the root is watched: changes in the others go unseen until the limit is raised or directories go; the other roots carry on");
        }
        r.unwatched = Some((e.to_string(), Instant::now() + LIMIT_RETRY));
        self.status_dirty = true;
        Ok(0)
    }

    /// Walks again the roots that hit the watch limit, when due; one now watched in
    /// full is resynced, for the changes its unwatched directories did not report.
    pub(super) fn rewalk_unwatched(&mut self) -> Result<(), WatcherError> {
        let now = Instant::now();
        for i in 0..self.roots.len() {
            let due = self.roots[i].unwatched.as_ref().is_some_and(|u| u.1 <= now);
            if !due || !self.roots[i].alive {
                continue;
            }
            self.roots[i].unwatched = None;
            let n = self.walk(i, &PathBytes::root())?;
            let r = &self.roots[i];
            if r.unwatched.is_none() {
                info!(root = %r.name, watches = n, "every directory of the root is watched again: resyncing it");
                self.resync(i);
            }
        }
        Ok(())
    }
}
