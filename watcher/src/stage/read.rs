//! Reading inotify: one read of the kernel queue (waiting a moment for the second half
//! of a directory move), each event translated to the wire or acted on (a new directory
//! watched, a moved one renamed in the map, a gone root, an overflow).

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use inotify::EventMask;
use protocol::wire::RawKind;
use protocol::PathBytes;
use tracing::{debug, trace, warn};

use super::Watcher;
use crate::error::WatcherError;
use crate::watch_map::RootIx;
use crate::MOVE_PAIR_WAIT;

/// One event as read, owned so that the buffer can be reused.
#[derive(Debug, Clone)]
struct Ev {
    wd: i32,
    mask: EventMask,
    cookie: u32,
    name: Option<Vec<u8>>,
}

/// The wire kind of an event about an entry of a watched directory; `None` for the
/// events that only steer the watcher (`IGNORED`, `*_SELF`, overflow, unmount).
pub(super) fn kind_of(mask: EventMask) -> Option<RawKind> {
    const TABLE: [(EventMask, RawKind); 7] = [
        (EventMask::CREATE, RawKind::Create),
        (EventMask::MODIFY, RawKind::Modify),
        (EventMask::CLOSE_WRITE, RawKind::CloseWrite),
        (EventMask::ATTRIB, RawKind::Attrib),
        (EventMask::DELETE, RawKind::Delete),
        (EventMask::MOVED_FROM, RawKind::MovedFrom),
        (EventMask::MOVED_TO, RawKind::MovedTo),
    ];
    TABLE
        .iter()
        .find(|(m, _)| mask.contains(*m))
        .map(|&(_, k)| k)
}

impl Watcher<'_> {
    /// Reads once (non-blocking); appends to `evs`. False when nothing was queued.
    fn read_into(&mut self, evs: &mut Vec<Ev>) -> Result<bool, WatcherError> {
        let events = match self.inotify.read_events(&mut self.buf) {
            Ok(events) => events,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(source) => return Err(WatcherError::Inotify { op: "read", source }),
        };
        let before = evs.len();
        evs.extend(events.map(|e| Ev {
            wd: e.wd.get_watch_descriptor_id(),
            mask: e.mask,
            cookie: e.cookie,
            name: e.name.map(|n| n.as_bytes().to_vec()),
        }));
        Ok(evs.len() > before)
    }

    /// One inotify read (plus, when it ends with half a directory move, a short wait for
    /// the other half), translated into `out`.
    /// `false` when the kernel had nothing queued.
    pub(super) fn read_and_handle(&mut self) -> Result<bool, WatcherError> {
        let mut evs = Vec::new();
        let read = self.read_into(&mut evs)?;
        self.pacer.read(Instant::now(), evs.len());
        if !read {
            return Ok(false);
        }
        let deadline = Instant::now() + MOVE_PAIR_WAIT;
        while has_unpaired_dir_move(&evs) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !poll_readable(self.inotify.as_raw_fd(), left) {
                break;
            }
            if !self.read_into(&mut evs)? {
                break;
            }
        }
        let paired = moved_to_cookies(&evs);
        let mut pending = HashMap::new();
        for ev in &evs {
            self.handle(ev, &paired, &mut pending)?;
        }
        Ok(true)
    }

    fn handle(
        &mut self,
        ev: &Ev,
        paired: &HashSet<u32>,
        pending: &mut HashMap<u32, (RootIx, PathBytes)>,
    ) -> Result<(), WatcherError> {
        if ev.wd == -1 || ev.mask.contains(EventMask::Q_OVERFLOW) {
            warn!("inotify queue overflowed: re-walking every root, then resyncing them");
            for c in &mut self.counts {
                c.1 += 1;
            }
            self.status_dirty = true;
            return self.rebuild(false);
        }
        if ev.mask.contains(EventMask::IGNORED) {
            self.map.remove_wd(ev.wd);
            self.status_dirty = true;
            return Ok(());
        }
        let Some((root, dir)) = self.map.get(ev.wd).map(|(r, p)| (r, p.clone())) else {
            trace!(wd = ev.wd, mask = ?ev.mask, "event for a forgotten watch");
            return Ok(());
        };
        self.counts[root].0 += 1;
        self.status_dirty = true;
        let is_dir = ev.mask.contains(EventMask::ISDIR);
        let Some(name) = &ev.name else {
            // About the watched directory itself.
            let gone = EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::UNMOUNT;
            if dir.is_root() && ev.mask.intersects(gone) {
                self.root_gone(root, ev.mask);
            } else if ev.mask.contains(EventMask::UNMOUNT) {
                // A filesystem mounted below the root went away: the directory it hid
                // is new to us. Watch it and compare that subtree in full.
                if dir.under(&self.roots[root].path).is_dir() {
                    warn!(root = %self.roots[root].name, path = %dir, "filesystem unmounted below the root: watching what was underneath and resyncing it");
                    self.walk(root, &dir)?;
                    self.push(root, dir, RawKind::Resync, true, 0);
                } else {
                    debug!(root = %self.roots[root].name, path = %dir, "unmounted directory has nothing underneath");
                }
            } else if ev.mask.contains(EventMask::ATTRIB) {
                self.push(root, dir, RawKind::Attrib, true, 0);
            }
            // Other self events of subdirectories are reported by their parent.
            return Ok(());
        };
        let Some(kind) = kind_of(ev.mask) else {
            return Ok(());
        };
        let path = dir.join(name);
        match kind {
            RawKind::Create if is_dir => {
                self.walk(root, &path)?;
            }
            RawKind::MovedFrom if is_dir => {
                if paired.contains(&ev.cookie) {
                    pending.insert(ev.cookie, (root, path.clone()));
                } else {
                    debug!(root = %self.roots[root].name, path = %path, "directory moved out of the tree");
                    self.unwatch_subtree(root, &path);
                }
            }
            RawKind::MovedTo if is_dir => match pending.remove(&ev.cookie) {
                Some((from_root, from)) if from_root == root => {
                    let r = self.map.rename(root, &from, &path);
                    self.rm_watches(&r.displaced);
                    if r.moved == 0 {
                        // The source was never watched (e.g. it could not be): watch now.
                        self.walk(root, &path)?;
                    }
                }
                Some((from_root, from)) => {
                    // Between two roots: forget the old paths, the walk re-adds the same
                    // wds under the new root.
                    self.map.remove_subtree(from_root, &from);
                    self.walk(root, &path)?;
                }
                None => {
                    self.walk(root, &path)?;
                }
            },
            _ => {}
        }
        let cookie = match kind {
            RawKind::MovedFrom | RawKind::MovedTo => ev.cookie,
            _ => 0,
        };
        self.push(root, path, kind, is_dir, cookie);
        Ok(())
    }
}

/// The cookies of every `moved_to` in `evs`: the `moved_from`s that have a partner.
fn moved_to_cookies(evs: &[Ev]) -> HashSet<u32> {
    evs.iter()
        .filter(|e| e.mask.contains(EventMask::MOVED_TO))
        .map(|e| e.cookie)
        .collect()
}

/// True when some directory's `MOVED_FROM` has no `MOVED_TO` with its cookie yet.
fn has_unpaired_dir_move(evs: &[Ev]) -> bool {
    let to = moved_to_cookies(evs);
    evs.iter().any(|e| {
        e.mask.contains(EventMask::MOVED_FROM | EventMask::ISDIR) && !to.contains(&e.cookie)
    })
}

fn poll_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_translate_to_wire_kinds() {
        let cases = [
            (EventMask::CREATE | EventMask::ISDIR, Some(RawKind::Create)),
            (EventMask::MODIFY, Some(RawKind::Modify)),
            (EventMask::CLOSE_WRITE, Some(RawKind::CloseWrite)),
            (EventMask::ATTRIB | EventMask::ISDIR, Some(RawKind::Attrib)),
            (EventMask::DELETE, Some(RawKind::Delete)),
            (EventMask::MOVED_FROM, Some(RawKind::MovedFrom)),
            (
                EventMask::MOVED_TO | EventMask::ISDIR,
                Some(RawKind::MovedTo),
            ),
            (EventMask::IGNORED, None),
            (EventMask::DELETE_SELF, None),
            (EventMask::MOVE_SELF, None),
            (EventMask::Q_OVERFLOW, None),
        ];
        for (mask, kind) in cases {
            assert_eq!(kind_of(mask), kind, "{mask:?}");
        }
    }

    #[test]
    fn a_directory_move_without_its_second_half_is_unpaired() {
        let ev = |mask, cookie| Ev {
            wd: 1,
            mask,
            cookie,
            name: Some(b"x".to_vec()),
        };
        let from_dir = ev(EventMask::MOVED_FROM | EventMask::ISDIR, 7);
        let from_file = ev(EventMask::MOVED_FROM, 8);
        let to = ev(EventMask::MOVED_TO | EventMask::ISDIR, 7);
        assert!(has_unpaired_dir_move(std::slice::from_ref(&from_dir)));
        assert!(!has_unpaired_dir_move(&[from_file]));
        assert!(!has_unpaired_dir_move(&[from_dir, to]));
    }
}
