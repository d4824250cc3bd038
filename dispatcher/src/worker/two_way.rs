//! Two-way targets in the dispatcher: the fetch-back of files dated older here than
//! on the peer, the whole-root pull that takes only what rested, and the catch-up that
//! deletes on the peer what the last clean stop's manifest proves was deleted here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use protocol::PathBytes;

use crate::command::RunResult;
use crate::plan;
use ::rsync::{Mode, Outcome};
use protocol::work::Touch;

use super::*;

/// How long a live delete keeps a whole-root pull from fetching the path back: long
/// enough for it to reach the peer, also through the journal after a short outage.
pub(crate) const LOCAL_DELETE_MEMORY: Duration = Duration::from_secs(600);
/// Most live deletes remembered; beyond, the oldest are forgotten.
const LOCAL_DELETES_MAX: usize = 100_000;

/// Deletes seen live on two-way roots, per root, with when. A peer that still holds
/// such a path has not taken the delete yet: a pull would bring it back and both sides
/// would keep it.
#[derive(Debug, Default)]
pub(crate) struct LocalDeletes(std::sync::Mutex<BTreeMap<(String, PathBytes), std::time::Instant>>);

impl LocalDeletes {
    /// Notes the deletes (and the old places of moves) among `changes` of `root`.
    pub(super) fn note(&self, root: &str, changes: &[protocol::wire::Change]) {
        use protocol::wire::Op;
        let Ok(mut seen) = self.0.lock() else { return };
        let now = std::time::Instant::now();
        for c in changes {
            let gone = match c.op {
                Op::Delete => Some(&c.path),
                Op::Move => c.from.as_ref(),
                Op::Upsert | Op::Resync => None,
            };
            if let Some(p) = gone {
                seen.insert((root.to_string(), p.clone()), now);
            }
        }
        seen.retain(|_, t| now.duration_since(*t) < LOCAL_DELETE_MEMORY);
        while seen.len() > LOCAL_DELETES_MAX {
            let oldest = seen.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => seen.remove(&k),
                None => break,
            };
        }
    }

    /// True when `path` of `root`, or a directory above it, was deleted here lately.
    pub(super) fn recent(&self, root: &str, path: &PathBytes) -> bool {
        let Ok(seen) = self.0.lock() else {
            return false;
        };
        let now = std::time::Instant::now();
        let hit = |p: &[u8]| {
            seen.get(&(root.to_string(), PathBytes::new(p.to_vec())))
                .is_some_and(|t| now.duration_since(*t) < LOCAL_DELETE_MEMORY)
        };
        hit(path.as_bytes()) || path.ancestors().any(hit)
    }
}

/// How long a whole-root pull from a two-way peer waits between its two dry runs: what
/// changed in between is still being written there.
pub(crate) const PULL_SETTLE: Duration = Duration::from_secs(1);

/// The entries two dry runs of a pull (`%i %l %M %n` lines) both list alike: files,
/// links and directories the peer holds newer or this side lacks, and that did not
/// change between the runs.
pub(super) fn settled_pulls(first: &[u8], second: &[u8]) -> BTreeMap<PathBytes, Touch> {
    let lines = |b: &[u8]| -> BTreeSet<Vec<u8>> {
        b.split(|&c| c == b'\n')
            .filter(|l| l.len() > 12 && l[11] == b' ' && matches!(l[0], b'>' | b'c'))
            .map(|l| l.to_vec())
            .collect()
    };
    let first = lines(first);
    let mut out = BTreeMap::new();
    for line in lines(second).intersection(&first) {
        // `%i %l %M %n`: the name is what follows the third space after the flags.
        let Some(name) = line[12..].splitn(3, |&c| c == b' ').nth(2) else {
            continue;
        };
        let name = crate::catchup::unescape(name.strip_suffix(b"/").unwrap_or(name));
        if name.is_empty() || name == b"." {
            continue;
        }
        out.insert(PathBytes::new(name), Touch::default());
    }
    out
}

/// The files among `paths` whose mtime is older than the change that sent them, by
/// more than clocks and rsync's rounding can explain: a file renamed or restored
/// here, which the peer may hold newer.
pub(super) fn old_dated(
    root: &Path,
    paths: &BTreeMap<PathBytes, Touch>,
) -> BTreeMap<PathBytes, Touch> {
    use std::os::unix::fs::MetadataExt;
    pub(super) const SLACK_US: u64 = 2_000_000;
    let now = protocol::now_us();
    paths
        .iter()
        .filter(|(p, t)| {
            let Ok(m) = std::fs::symlink_metadata(p.under(root)) else {
                return false;
            };
            let seen = if t.since_us == 0 { now } else { t.since_us };
            let mtime_us = (m.mtime().max(0) as u64) * 1_000_000 + m.mtime_nsec() as u64 / 1000;
            m.is_file() && mtime_us + SLACK_US < seen
        })
        .map(|(p, t)| (p.clone(), *t))
        .collect()
}

#[cfg(test)]
mod old_dated_tests {
    use super::*;

    #[test]
    fn a_file_dated_before_its_change_is_fetched_back() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("old"), "o").unwrap();
        std::fs::write(t.path().join("new"), "n").unwrap();
        let five_ago = std::time::SystemTime::now() - Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(t.path().join("old"))
            .unwrap()
            .set_modified(five_ago)
            .unwrap();
        let touch = Touch {
            deleted: false,
            since_us: protocol::now_us(),
        };
        let paths: BTreeMap<PathBytes, Touch> = [
            ("old".into(), touch),
            ("new".into(), touch),
            ("gone".into(), touch),
        ]
        .into_iter()
        .collect();
        let got: Vec<String> = old_dated(t.path(), &paths)
            .keys()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(got, vec!["old"]);
    }
}

impl Runner {
    /// Brings here what the peer holds newer or this side lacks (never deleting), but
    /// only what rests there: two dry runs [`PULL_SETTLE`] apart, and the entries they
    /// list alike (size, mtime, name) are fetched by name. A file the peer is still
    /// writing is left to the peer's own syncbus, which sends it once it rests.
    pub(super) fn pull_all(
        &self,
        root: &str,
        rules: &[u8],
        src: &Path,
        dest: &str,
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
        let mut listings = Vec::new();
        for i in 0..2 {
            if i > 0 {
                tick(PULL_SETTLE);
                if self.control.must_stop() {
                    return RunResult {
                        outcome: Outcome::Retry,
                        error: "stopped during the pull from the peer".into(),
                    };
                }
            }
            let mut out = Vec::new();
            let r = self.rsync(Mode::PullList, rules, src, dest, b"", tick, Some(&mut out));
            if r.outcome != Outcome::Success {
                return r;
            }
            listings.push(out);
        }
        let mut wanted = settled_pulls(&listings[0], &listings[1]);
        let before = wanted.len();
        wanted.retain(|p, _| !self.control.local_deletes.recent(root, p));
        if wanted.len() < before {
            tracing::debug!(target = %self.target.name, root, paths = before - wanted.len(), "not fetching back what was deleted here lately");
        }
        if wanted.is_empty() {
            return RunResult {
                outcome: Outcome::Success,
                error: String::new(),
            };
        }
        tracing::debug!(target = %self.target.name, root, entries = wanted.len(), "fetching what the peer holds and this side lacks");
        self.rsync(
            Mode::Pull,
            rules,
            src,
            dest,
            &plan::files_from(wanted.keys()),
            tick,
            None,
        )
    }

    /// A two-way target's catch-up: what the manifest of the last clean stop lists and
    /// is gone now was deleted here while syncbus was stopped, and those deletes go to
    /// the peer by name; then a whole-root compare both ways (push, then pull) brings
    /// everything else into agreement, the files missing here included. A failure
    /// before the compare leaves nothing done that a retry of the catch-up would not
    /// do again (`.1` false).
    pub(super) fn two_way_catch_up(
        &self,
        root: &str,
        info: &RootInfo,
        tick: &mut dyn FnMut(Duration),
    ) -> (RunResult, bool) {
        let gone = crate::catchup::deleted_while_stopped(&info.path, &info.rules, &info.manifest);
        if !gone.is_empty() {
            tracing::info!(target = %self.target.name, root, paths = gone.len(), "deleting on the peer what was deleted here while stopped");
            if tracing::enabled!(tracing::Level::TRACE) {
                for p in gone.keys() {
                    tracing::trace!(target = %self.target.name, root, path = %p, "deleted while stopped");
                }
            }
            let r = self.incremental(root, info, &gone, tick);
            if r.outcome != Outcome::Success {
                return (r, false);
            }
        }
        (
            self.resync(root, info, &[PathBytes::root()], &[], tick),
            true,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_deletes_keep_their_paths_and_what_was_below_from_being_pulled_back() {
        use protocol::wire::{Change, Op};
        let change = |op, path: &str, from: Option<&str>| Change {
            op,
            path: path.into(),
            from: from.map(Into::into),
            dir: false,
            recursive: false,
            since_us: 0,
        };
        let d = LocalDeletes::default();
        d.note(
            "r",
            &[
                change(Op::Delete, "gone", None),
                change(Op::Delete, "dir", None),
                change(Op::Move, "new-place", Some("old-place")),
                change(Op::Upsert, "kept", None),
            ],
        );
        for p in ["gone", "dir", "dir/below/f", "old-place"] {
            assert!(d.recent("r", &p.into()), "{p}");
        }
        for p in ["kept", "new-place", "gone-not", "directory"] {
            assert!(!d.recent("r", &p.into()), "{p}");
        }
        assert!(!d.recent("other-root", &"gone".into()));
    }

    #[test]
    fn a_pull_takes_only_what_rested_between_its_two_listings() {
        let first = b".d..t...... 4096 2026/12/04-09:41:45 ./\n\
                      cL+++++++++ 1 2026/12/04-09:41:45 lnk\n\
                      >f+++++++++ 2 2026/12/04-09:41:45 odd name\n\
                      >f+++++++++ 100 2026/12/04-09:41:45 growing\n\
                      cd+++++++++ 4096 2026/12/04-09:41:45 d/\n\
                      >f.st...... 3 2026/12/04-09:41:40 d/new\\#012line\n";
        let second = b".d..t...... 4096 2026/12/04-09:41:46 ./\n\
                       cL+++++++++ 1 2026/12/04-09:41:45 lnk\n\
                       >f+++++++++ 2 2026/12/04-09:41:45 odd name\n\
                       >f+++++++++ 200 2026/12/04-09:41:46 growing\n\
                       cd+++++++++ 4096 2026/12/04-09:41:45 d/\n\
                       >f.st...... 3 2026/12/04-09:41:40 d/new\\#012line\n\
                       >f+++++++++ 1 2026/12/04-09:41:46 just-made\n";
        let got: Vec<Vec<u8>> = settled_pulls(first, second)
            .into_keys()
            .map(|p| p.as_bytes().to_vec())
            .collect();
        let want: Vec<&[u8]> = vec![b"d", b"d/new\nline", b"lnk", b"odd name"];
        assert_eq!(got, want);
    }
}
