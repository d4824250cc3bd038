//! Moves at the cost of the change: before a batch's own runs, each moved file or
//! directory is built on the target from what the target still holds at its old
//! place (`rsync::Mode::Seed`: copied there, never linked), so its data is not sent
//! again over the network. The batch's runs then
//! find it there and delete the old place as usual.
//!
//! What holds:
//! - A seed is an optimisation only. The work still owes the new place (a moved
//!   directory's compare with `--delete`, which finds the seeded files up to date) and
//!   the old place's delete; a seed that fails, or finds no old copy, costs one run and
//!   changes nothing that is owed. Only a moved file that its seed did send (with the
//!   same `--ignore-times` as an incremental run) is taken off the batch's list.
//! - Seeds run before the old place is deleted: first in the batch.
//! - A seed's transfer starts at the new place (or its parent), so it gets the root's
//!   exclude rules rebased there: regex-excluded paths below it as literals, and the
//!   globs as written, which mean the same from there only when none names a
//!   directory path (`a/b`, `/top`, `**`): with such a glob, moves are sent plainly.
//! - At most [`MAX_SEEDS`] per batch, and none after one that found the target down:
//!   a seed saves bytes, it must not hold the batch up.
//! - Not for two-way targets (their runs write through the peer's own temp and backup
//!   directories) nor for command and webhook targets, which take paths, not data.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ::rsync::Mode;
use protocol::rules::Rules;
use protocol::work::Work;
use protocol::PathBytes;

use super::*;

/// The most seed runs before one batch; the other moves are sent plainly.
pub(super) const MAX_SEEDS: usize = 32;

/// One seed run: the transfer from `dir` (root-relative) on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seed {
    pub(super) dir: PathBytes,
    /// `--copy-dest`, relative to `dir` on the target.
    pub(super) basis: Option<String>,
    /// Moved files: their names in `dir`. Empty: `dir` is a moved directory, whole.
    pub(super) names: Vec<PathBytes>,
}

/// The seeds of `work`: one per moved directory, and one per pair of new and old
/// parent for moved files. Only moves whose new place the work sends: a file listed
/// as existing, a directory compared as a subtree of its own, or either within a
/// subtree compared (`is_dir` tells which, from the source).
pub(super) fn seeds(work: &Work, is_dir: impl Fn(&PathBytes) -> bool) -> Vec<Seed> {
    let mut out = Vec::new();
    let mut files: BTreeMap<(PathBytes, PathBytes), Vec<PathBytes>> = BTreeMap::new();
    for (to, from) in &work.moves {
        if to.is_root() || from.is_root() {
            continue;
        }
        let covered = work.resyncs.iter().any(|s| to.is_within(s));
        let listed = work.paths.get(to).is_some_and(|t| !t.deleted);
        // A directory moved into one made just before it is compared with that one.
        if work.resyncs.contains(to) || (covered && !listed && is_dir(to)) {
            if let Some(basis) = relative(to, from) {
                out.push(Seed {
                    dir: to.clone(),
                    basis: Some(basis),
                    names: Vec::new(),
                });
            }
        } else if listed || covered {
            let key = (
                to.parent().unwrap_or_default(),
                from.parent().unwrap_or_default(),
            );
            files
                .entry(key)
                .or_default()
                .push(PathBytes::new(to.file_name().to_vec()));
        }
    }
    for ((dir, old_dir), names) in files {
        // In the same directory `--fuzzy` finds the old name by itself.
        let basis = if dir == old_dir {
            None
        } else {
            match relative(&dir, &old_dir) {
                Some(b) => Some(b),
                None => continue,
            }
        };
        out.push(Seed { dir, basis, names });
    }
    out
}

/// `to` as seen from the directory `from` (both root-relative): up to the root, then
/// down. `None` when it is not UTF-8 (an argument rsync would read differently).
fn relative(from: &PathBytes, to: &PathBytes) -> Option<String> {
    let ups = if from.is_root() {
        0
    } else {
        from.as_bytes().iter().filter(|&&b| b == b'/').count() + 1
    };
    let mut s = "../".repeat(ups);
    s.push_str(std::str::from_utf8(to.as_bytes()).ok()?);
    if s.is_empty() {
        s.push('.');
    }
    Some(s)
}

/// Whether every glob means the same seen from any directory of the root: a bare name
/// pattern (a trailing `/` allowed), not a path.
fn globs_rebase(rules: &Rules) -> bool {
    rules.rsync_globs().iter().all(|g| {
        let g = g.strip_suffix('/').unwrap_or(g);
        !g.contains('/') && !g.contains("**")
    })
}

impl Runner {
    /// Runs the seeds of `work` for `root`; returns the moved files that went over (the
    /// batch need not send them again).
    pub(super) fn seed_moves(
        &self,
        root: &str,
        info: &RootInfo,
        work: &Work,
        tick: &mut dyn FnMut(Duration),
    ) -> BTreeSet<PathBytes> {
        let mut sent = BTreeSet::new();
        if work.moves.is_empty() || self.is_hook() || self.target.two_way {
            return sent;
        }
        if !globs_rebase(&info.rules) {
            tracing::debug!(target = %self.target.name, root, "moves sent plainly: a glob names a path");
            return sent;
        }
        let dest = self.target.destination(root);
        let is_dir = |p: &PathBytes| p.under(&info.path).is_dir();
        for seed in seeds(work, is_dir).into_iter().take(MAX_SEEDS) {
            let Ok(dir) = std::str::from_utf8(seed.dir.as_bytes()) else {
                continue;
            };
            let dest = if seed.dir.is_root() {
                dest.clone()
            } else {
                format!("{}/{dir}/", dest.trim_end_matches('/'))
            };
            let src = seed.dir.under(&info.path);
            // A moved directory is sent whole: the regex-excluded paths below it stay
            // behind, as in any compare of it.
            let excluded: BTreeSet<PathBytes> = if seed.names.is_empty() {
                info.rules
                    .excluded_below(&info.path, &seed.dir)
                    .into_iter()
                    .collect()
            } else {
                BTreeSet::new()
            };
            let rules = ::rsync::exclude_rules(&info.rules, &excluded);
            let list = crate::plan::files_from(&seed.names);
            let mode = Mode::Seed {
                basis: seed.basis.clone(),
                list: !seed.names.is_empty(),
            };
            let started = std::time::Instant::now();
            let result = self.rsync(mode, &rules, &src, &dest, &list, tick, None);
            tracing::debug!(target = %self.target.name, root, dir = %seed.dir, basis = ?seed.basis, files = seed.names.len(), outcome = ?result.outcome, duration_ms = started.elapsed().as_millis() as u64, "move seeded");
            match result.outcome {
                Outcome::Success => {
                    sent.extend(seed.names.iter().map(|n| seed.dir.join(n.as_bytes())))
                }
                Outcome::Partial => {}
                // The target is down or refuses: the batch's own run finds out.
                Outcome::Retry | Outcome::Fatal => break,
            }
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use protocol::work::Touch;

    use super::*;

    fn names(seed: &Seed) -> Vec<String> {
        seed.names.iter().map(|n| n.to_string()).collect()
    }

    fn p(s: &str) -> PathBytes {
        s.into()
    }

    #[test]
    fn relative_paths_climb_to_the_root_then_descend() {
        let table = [
            ("new/dir", "old/dir", "../../old/dir"),
            ("dir2", "dir", "../dir"),
            ("", "a/b", "a/b"),
            ("a/b", "", "../../"),
            ("", "", "."),
        ];
        for (from, to, want) in table {
            assert_eq!(relative(&p(from), &p(to)).unwrap(), want, "{from} → {to}");
        }
        assert_eq!(relative(&p("a"), &PathBytes::new(b"\xff".to_vec())), None);
    }

    #[test]
    fn a_moved_directory_gets_its_own_seed_and_moved_files_one_per_pair_of_parents() {
        let mut w = Work::default();
        // A directory moved (its new place compared as a subtree of its own).
        w.resync(p("new/photos"));
        w.moved(p("old/photos"), p("new/photos"));
        // Files renamed in place, and moved to another directory.
        for (from, to) in [("big.bin", "big2.bin"), ("a/x", "b/x"), ("a/y", "b/z")] {
            w.touch(p(from), Touch::delete(1));
            w.touch(p(to), Touch::upsert(1));
            w.moved(p(from), p(to));
        }
        // A move whose new place is gone again is not seeded.
        w.touch(p("gone-again"), Touch::delete(1));
        w.moved(p("was"), p("gone-again"));
        // A directory and a file moved into a directory made just before.
        w.resync(p("fresh"));
        w.moved(p("albums"), p("fresh/albums"));
        w.moved(p("notes.txt"), p("fresh/notes.txt"));
        let got = seeds(&w, |d| d.as_bytes() == b"fresh/albums");
        // (dir, basis, names), directories first.
        let got: Vec<(String, Option<String>, Vec<String>)> = got
            .iter()
            .map(|s| (s.dir.to_string(), s.basis.clone(), names(s)))
            .collect();
        let seed = |dir: &str, basis: Option<&str>, names: &[&str]| {
            let names = names.iter().map(|n| n.to_string()).collect();
            (dir.to_string(), basis.map(String::from), names)
        };
        assert_eq!(
            got,
            [
                seed("fresh/albums", Some("../../albums"), &[]),
                seed("new/photos", Some("../../old/photos"), &[]),
                // The same directory: --fuzzy finds the old name by itself.
                seed(".", None, &["big2.bin"]),
                seed("b", Some("../a"), &["x", "z"]),
                seed("fresh", Some("../"), &["notes.txt"]),
            ]
        );
    }

    #[test]
    fn only_globs_that_name_no_path_are_rebased() {
        let rules = |globs: &[&str]| {
            let globs: Vec<String> = globs.iter().map(|g| g.to_string()).collect();
            Rules::new(&[], &globs, false).unwrap()
        };
        assert!(globs_rebase(&rules(&["*.tmp", "cache/", ".git"])));
        assert!(!globs_rebase(&rules(&["/top"])));
        assert!(!globs_rebase(&rules(&["a/b"])));
        assert!(!globs_rebase(&rules(&["**/x"])));
        let builtin = Rules::new(&[], &[], true).unwrap();
        assert!(globs_rebase(&builtin), "{:?}", builtin.rsync_globs());
    }
}
