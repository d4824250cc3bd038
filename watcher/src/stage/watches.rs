//! Setting watches up and taking them down: the walk that watches a directory and
//! everything below it, the rebuild of every root (start, overflow), roots gone and back.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Instant;

use inotify::{EventMask, WatchMask, Watches};
use protocol::PathBytes;
use tracing::{debug, error, info, trace, warn};

use super::Watcher;
use crate::error::{inotify_sysctl, WatcherError};
use crate::watch_map::{RootIx, WatchMap};
use crate::ROOT_POLL;

fn watch_mask() -> WatchMask {
    WatchMask::ONLYDIR
        | WatchMask::DONT_FOLLOW
        | WatchMask::EXCL_UNLINK
        | WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::ATTRIB
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

impl Watcher<'_> {
    /// Watches `start` of `root` and every directory below it, into the live map.
    pub(super) fn walk(&mut self, root: RootIx, start: &PathBytes) -> Result<usize, WatcherError> {
        self.status_dirty = true;
        let r = &self.roots[root];
        let walked = walk(
            &mut self.watches,
            &mut self.map,
            root,
            &r.name,
            &r.path,
            start,
        );
        self.limited(root, walked)
    }

    /// Watches every existing root from scratch into a fresh map, unwatches what the old
    /// map had that the walk did not find, then queues `Resync ""` for each existing root.
    /// Used at start (`first`) and after a queue overflow.
    pub(super) fn rebuild(&mut self, first: bool) -> Result<(), WatcherError> {
        self.status_dirty = true;
        let mut fresh = WatchMap::new();
        let mut live = Vec::new();
        for i in 0..self.roots.len() {
            if !first && !self.roots[i].alive {
                continue; // polled for separately
            }
            let r = &self.roots[i];
            if r.two_way {
                for dir in [
                    protocol::config::TWO_WAY_INCOMING,
                    protocol::config::TWO_WAY_BACKUP,
                ] {
                    // A root that is not there yet gets its dirs when it is rebuilt.
                    if r.path.is_dir() {
                        if let Err(e) = std::fs::create_dir_all(r.path.join(dir)) {
                            tracing::warn!(root = %r.name, dir, error = %e, "cannot create the two-way dir; the peer's runs fail until it exists");
                        }
                    }
                }
            }
            let walked = walk(
                &mut self.watches,
                &mut fresh,
                i,
                &r.name,
                &r.path,
                &PathBytes::root(),
            );
            self.roots[i].unwatched = None;
            let n = self.limited(i, walked)?;
            let r = &self.roots[i];
            // A root the watch limit hit is live too, in part: it is resynced like the
            // others and walked again later.
            if fresh.wd(i, &PathBytes::root()).is_some() || r.unwatched.is_some() {
                info!(root = %r.name, path = %r.path.display(), watches = n, "watches live");
                live.push(i);
            } else {
                self.roots[i].alive = true; // so that root_gone logs the transition
                self.root_gone(i, EventMask::empty());
            }
        }
        let stale: Vec<i32> = self
            .map
            .wds()
            .filter(|wd| !fresh.contains_wd(*wd))
            .collect();
        self.rm_watches(&stale);
        // Watches of dead roots stay forgotten: they were removed when the root went.
        self.map = fresh;
        for i in live {
            self.roots[i].alive = true;
            self.resync(i);
        }
        Ok(())
    }

    pub(super) fn root_gone(&mut self, root: RootIx, mask: EventMask) {
        let r = &mut self.roots[root];
        r.next_check = Instant::now() + ROOT_POLL;
        if !r.alive {
            return;
        }
        r.alive = false;
        r.unwatched = None;
        error!(
            root = %r.name,
            path = %r.path.display(),
            event = ?mask,
            "root directory is gone; the other roots keep running; looking for it every second"
        );
        self.unwatch_subtree(root, &PathBytes::root());
    }

    /// Looks for missing roots that are due; a root that is back is watched and resynced.
    pub(super) fn check_missing_roots(&mut self) -> Result<(), WatcherError> {
        let now = Instant::now();
        for i in 0..self.roots.len() {
            let r = &mut self.roots[i];
            if r.alive || r.next_check > now {
                continue;
            }
            r.next_check = now + ROOT_POLL;
            if !r.path.is_dir() {
                continue;
            }
            let n = self.walk(i, &PathBytes::root())?;
            let r = &mut self.roots[i];
            if self.map.wd(i, &PathBytes::root()).is_some() {
                r.alive = true;
                info!(root = %r.name, path = %r.path.display(), watches = n, "root directory is back: watching it and resyncing");
                self.resync(i);
            } else {
                // It vanished again during the walk: drop what was added.
                self.unwatch_subtree(i, &PathBytes::root());
            }
        }
        Ok(())
    }

    pub(super) fn unwatch_subtree(&mut self, root: RootIx, path: &PathBytes) {
        let wds = self.map.remove_subtree(root, path);
        self.rm_watches(&wds);
    }

    pub(super) fn rm_watches(&mut self, wds: &[i32]) {
        self.status_dirty = true;
        for &wd in wds {
            // SAFETY: inotify_rm_watch takes two integers; a wrong wd yields EINVAL.
            let rc = unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
            if rc != 0 {
                // EINVAL: the kernel already dropped it (the directory is gone).
                trace!(wd, error = %io::Error::last_os_error(), "inotify_rm_watch");
            }
        }
    }
}

/// Adds a watch on `start` and every directory below it (never through a symlink) and
/// records them in `map`. The watch on a directory is added *before* it is listed, so an
/// entry created meanwhile is either listed or reported by that watch.
fn walk(
    watches: &mut Watches,
    map: &mut WatchMap,
    root: RootIx,
    root_name: &str,
    root_path: &Path,
    start: &PathBytes,
) -> Result<usize, WatcherError> {
    let mut stack = vec![start.clone()];
    let mut added = 0;
    while let Some(rel) = stack.pop() {
        let abs = rel.under(root_path);
        match watches.add(&abs, watch_mask()) {
            Ok(wd) => {
                map.insert(wd.get_watch_descriptor_id(), root, rel.clone());
                added += 1;
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) => {
                    return Err(WatcherError::WatchLimit {
                        limit: inotify_sysctl("max_user_watches"),
                        path: abs,
                    })
                }
                // Vanished meanwhile, or replaced by a non-directory / symlink.
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {
                    debug!(root = root_name, path = %rel, error = %e, "directory vanished before it could be watched");
                    continue;
                }
                _ => {
                    warn!(root = root_name, path = %rel, error = %e, "cannot watch directory; skipping it");
                    continue;
                }
            },
        }
        let entries = match std::fs::read_dir(&abs) {
            Ok(entries) => entries,
            Err(e) => {
                debug!(root = root_name, path = %rel, error = %e, "cannot list directory");
                continue;
            }
        };
        for entry in entries.flatten() {
            // DirEntry::file_type does not follow symlinks.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(rel.join(entry.file_name().as_bytes()));
            }
        }
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_watches_every_directory_but_not_through_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("a/b\n/c")).unwrap();
        std::fs::create_dir_all(outside.join("deep")).unwrap();
        std::fs::write(root.join("a/file"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let inotify = inotify::Inotify::init().unwrap();
        let mut watches = inotify.watches();
        let mut map = WatchMap::new();
        let n = walk(&mut watches, &mut map, 0, "r", &root, &PathBytes::root()).unwrap();
        assert_eq!(n, 4, "root, a, a/b\\n, a/b\\n/c");
        for p in ["", "a", "a/b\n", "a/b\n/c"] {
            assert!(
                map.wd(0, &PathBytes::from(p)).is_some(),
                "{p:?} not watched"
            );
        }
        assert!(map.wd(0, &PathBytes::from("link")).is_none());
        // A symlink given as the start is refused, not followed.
        assert_eq!(
            walk(&mut watches, &mut map, 0, "r", &root, &"link".into()).unwrap(),
            0
        );
    }
}
