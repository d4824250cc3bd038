//! The only code in the filter that writes the user's tree: it carries out a
//! [`PeerVerdict`] on a two-way root. Each repair is a rename, a hard link, an unlink or
//! a new mtime of one file; whatever it changes in the tree outside `.syncbus/` the
//! watcher reports like any local change, so it goes to the peer.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocol::config::{Root, TWO_WAY_BACKUP};
use protocol::PathBytes;

use super::names::{conflict_name, version_name};
use super::PeerVerdict;

/// A backup copy linked longer ago than this is of another replace or delete.
const LINKED_JUST_NOW_S: i64 = 5;

/// Carries out `verdict` for `path` of `root`. Verdicts that ask nothing of the tree
/// do nothing.
pub(super) fn execute(root: &Root, path: &PathBytes, verdict: &PeerVerdict) {
    match *verdict {
        PeerVerdict::PeerWrote { conflict, .. } => keep_newer(root, path, conflict),
        PeerVerdict::StaleRepeat => delete_again(root, path),
        PeerVerdict::PeerDeleted { raced } => {
            if raced {
                put_back(root, path);
            }
            keep_version(&path.under(&root.path.join(TWO_WAY_BACKUP)));
        }
        PeerVerdict::NotPeer
        | PeerVerdict::OwnDir
        | PeerVerdict::IncomingLeft
        | PeerVerdict::IntoBackup(_)
        | PeerVerdict::BackupDirMade(_) => {}
    }
}

/// The peer sent again a copy this side has deleted since: the unlink is this side's
/// delete once more, and goes to the peer.
fn delete_again(root: &Root, path: &PathBytes) {
    if let Err(e) = std::fs::remove_file(path.under(&root.path)) {
        tracing::warn!(root = root.name.as_str(), path = %path, error = %e, "cannot delete again a copy the peer sent twice");
    }
}

/// A delete from the peer raced a change made here: the changed file goes back
/// where it was (from the backup the peer's rsync moved it to), and that rename is
/// an ordinary change that goes to the peer.
fn put_back(root: &Root, path: &PathBytes) {
    let to = path.under(&root.path);
    let from = path.under(&root.path.join(TWO_WAY_BACKUP));
    if std::fs::symlink_metadata(&to).is_ok() {
        return; // something is there again already
    }
    if let Some(parent) = to.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    match std::fs::rename(&from, &to) {
        Ok(()) => {
            tracing::info!(root = root.name.as_str(), path = %path, "a delete from the peer raced a change made here; kept the changed file")
        }
        Err(e) => {
            tracing::warn!(root = root.name.as_str(), path = %path, error = %e, "a delete from the peer raced a change made here; could not put the file back (it is in the backup dir)")
        }
    }
}

/// The peer's copy of `path` just replaced the one here (which rsync hard-linked
/// into the backup). If the replaced copy is the newer, it goes back in place, and
/// from there to the peer: rsync's `--update` compares whole seconds, and checks
/// when its run begins, so an edit made here within the same second, or while the
/// copy was in flight, would lose. `conflict`: the replaced copy was a change made
/// here that had not reached the peer.
fn keep_newer(root: &Root, path: &PathBytes, conflict: bool) {
    let here = path.under(&root.path);
    let kept = path.under(&root.path.join(TWO_WAY_BACKUP));
    let times = |p: &Path| {
        std::fs::symlink_metadata(p)
            .ok()
            .map(|m| ((m.mtime(), m.mtime_nsec()), (m.ctime(), m.ctime_nsec())))
    };
    let Some(((theirs, _), (ours, linked))) = times(&here).zip(times(&kept)) else {
        return;
    };
    // Only a backup this run made (linked just now): an older one is of another
    // replace or delete, long ago.
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if now_s - linked.0 > LINKED_JUST_NOW_S {
        return;
    }
    if ours > theirs {
        match std::fs::rename(&kept, &here) {
            Ok(()) => {
                // A microsecond later: a run of ours may have sent the peer's
                // copy's bytes under this file's size and mtime (it was replaced
                // under rsync's feet), and the quick check must not take that for
                // this. Still the newer of the two (not "now": clocks may differ).
                let later = UNIX_EPOCH
                    + Duration::new(ours.0.max(0) as u64, ours.1.clamp(0, 999_999_999) as u32)
                    + Duration::from_micros(1);
                let _ = std::fs::File::options()
                    .write(true)
                    .open(&here)
                    .and_then(|f| f.set_modified(later));
                tracing::info!(root = root.name.as_str(), path = %path, "the peer's copy replaced a newer change made here while it was in flight; put the newer one back")
            }
            Err(e) => {
                tracing::warn!(root = root.name.as_str(), path = %path, error = %e, "could not put back a newer change the peer's copy replaced (it is in the backup dir)")
            }
        }
    } else if conflict && root.conflict_copies {
        // A change made here lost to a newer one of the peer: a conflict. Its
        // copy beside the file is a new file here, and goes to the peer too.
        let copy = conflict_name(&here, SystemTime::now());
        match std::fs::hard_link(&kept, &copy) {
            Ok(()) => {
                tracing::info!(root = root.name.as_str(), path = %path, "a change made here lost to a newer one of the peer; kept it as a conflict copy")
            }
            Err(e) => {
                tracing::warn!(root = root.name.as_str(), path = %path, error = %e, "could not keep a conflict copy (the losing change is in the backup dir)")
            }
        }
        keep_version(&kept);
    } else {
        keep_version(&kept);
    }
}

/// The backup holds one copy per path, which the peer's next replace or delete of the
/// path would overwrite: the copy just made is renamed to a version of its own at once,
/// so a quick second replace does not lose the first loser.
fn keep_version(kept: &Path) {
    if std::fs::symlink_metadata(kept).is_err() {
        return;
    }
    let _ = std::fs::rename(kept, version_name(kept, SystemTime::now()));
}
