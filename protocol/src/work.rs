//! Work owed to one target for one root: the one shape it has from the dispatcher's
//! batcher through the retrier's wire and journal and back, with its one merge rule.
//! Pure: no I/O, no clock.
//!
//! What holds:
//! - A path keeps whether it was deleted and when its first change was read, through
//!   every hop; a subtree to compare absorbs the paths within it, except the deletes
//!   of a work that keeps them (a two-way target's compares never delete).
//! - A cron full sync's own excludes hold only while it is all the work there is: any
//!   other work merged with it, or put into it, needs everything sent and drops them.
//! - A catch-up since a time is owed until a compare of the whole root covers it.
//!
//! On the wire (and in the journal) `paths` is a list of `{path, deleted, since_us}`.
//! Wire version 1 listed bare paths; such an entry reads as a path that may have been
//! deleted, with no known change time, so journals written by older builds resume.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{earliest_us, PathBytes};

/// How a path was touched since it was last sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touch {
    /// The path was deleted or moved away at some point.
    pub deleted: bool,
    /// When the first event behind it was read (µs since the Unix epoch; 0 unknown),
    /// for the delivery stream's lag.
    pub since_us: u64,
}

impl Touch {
    /// A path that exists now, changed at `since_us`.
    pub fn upsert(since_us: u64) -> Touch {
        Touch {
            deleted: false,
            since_us,
        }
    }

    /// A path deleted (or moved away) at `since_us`.
    pub fn delete(since_us: u64) -> Touch {
        Touch {
            deleted: true,
            since_us,
        }
    }

    fn merge(&mut self, other: Touch) {
        self.deleted |= other.deleted;
        self.since_us = earliest_us(self.since_us, other.since_us);
    }
}

/// The lower of two crash-checkpoint floors ([`Work::floor_us`]; `None` holds nothing
/// back).
pub fn lower_floor(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Work owed to one target for one root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Work {
    /// Subtrees to compare in full with `--delete` (the root when empty); none lies
    /// within another.
    #[serde(default)]
    pub resyncs: BTreeSet<PathBytes>,
    /// Paths to send as they are now (a missing one is deleted on the target); none
    /// lies within a resync subtree unless it is a kept delete.
    #[serde(default, with = "owed_paths")]
    pub paths: BTreeMap<PathBytes, Touch>,
    /// rsync-style globs left out of this work only (a cron full sync's own).
    #[serde(default)]
    pub excludes: Vec<String>,
    /// A catch-up is owed: compare what changed since this time (µs since the Unix
    /// epoch). A resync of the whole root covers it.
    #[serde(default, rename = "catch_up_us", with = "zero_is_none")]
    pub catch_up: Option<u64>,
    /// When the oldest change behind this work happened (µs since the Unix epoch; 0
    /// unknown): what `syncbus status` reports as the target's lag.
    #[serde(default)]
    pub since_us: u64,
    /// Moves, new place → old place: the target may still hold a new place's content
    /// at its old place, a basis to build it from instead of sending it again. A hint
    /// only: what is owed is in `paths` and `resyncs` (the old place as a delete).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", with = "moves")]
    pub moves: BTreeMap<PathBytes, PathBytes>,
    /// Deleted paths stay listed even within a resync subtree (a two-way target's
    /// compares make no deletes). A property of the target, set by whoever holds the
    /// work; not on the wire.
    #[serde(skip)]
    pub keep_deletes: bool,
    /// How far back this work holds the crash checkpoint (µs since the Unix epoch):
    /// every change it carries happened at or after this time, so while it is owed
    /// and not on disk, a checkpoint may not be later. `None`: it holds nothing back
    /// (it came from the journal, which is on disk, or it is a cron sync); `Some(0)`:
    /// nothing is vouched for until it is done (a whole-root compare). Set by the
    /// dispatcher; not on the wire.
    #[serde(skip)]
    pub floor_us: Option<u64>,
}

impl Work {
    /// Empty work for a target whose compares make no deletes when `keep_deletes`.
    pub fn keeping_deletes(keep_deletes: bool) -> Work {
        Work {
            keep_deletes,
            ..Work::default()
        }
    }

    /// Nothing is owed.
    pub fn is_empty(&self) -> bool {
        self.resyncs.is_empty() && self.paths.is_empty() && self.catch_up.is_none()
    }

    /// Number of paths and subtrees, for logs and bounds.
    pub fn len(&self) -> usize {
        self.resyncs.len() + self.paths.len()
    }

    /// Drops the change times (work sent once already, owed again only for safety).
    pub fn forget_times(&mut self) {
        self.since_us = 0;
        for t in self.paths.values_mut() {
            t.since_us = 0;
        }
    }

    /// Holds the crash checkpoint back to `floor_us` too (see [`Work::floor_us`]).
    pub fn hold_back(&mut self, floor_us: Option<u64>) {
        self.floor_us = lower_floor(self.floor_us, floor_us);
    }

    /// Asks for a catch-up since `since_us`, unless the whole root is compared anyway.
    pub fn catch_up(&mut self, since_us: u64) {
        self.excludes.clear();
        self.add_catch_up(since_us);
    }

    /// Owes `path`, merged with what is owed of it already.
    pub fn touch(&mut self, path: PathBytes, touch: Touch) {
        self.excludes.clear();
        self.add_touch(path, touch);
    }

    /// Notes that `to` was `from` before: a move following a move keeps the first old
    /// place (the one the target may hold).
    pub fn moved(&mut self, from: PathBytes, to: PathBytes) {
        let from = self.moves.remove(&from).unwrap_or(from);
        if from != to {
            self.moves.insert(to, from);
        }
    }

    /// Owes a full compare of `subtree` (the root when empty), which absorbs what is
    /// owed within it.
    pub fn resync(&mut self, subtree: PathBytes) {
        self.excludes.clear();
        self.add_resync(subtree);
    }

    /// Owes what `other` owes too. The rule of [`keep_deletes`](Work::keep_deletes) is
    /// this work's; excludes survive only if both owe the same cron full sync (or one
    /// owes nothing).
    pub fn merge(&mut self, other: Work) {
        let excludes = if self.is_empty() {
            other.excludes
        } else if other.is_empty() || other.excludes == self.excludes {
            std::mem::take(&mut self.excludes)
        } else {
            Vec::new()
        };
        self.since_us = earliest_us(self.since_us, other.since_us);
        self.hold_back(other.floor_us);
        if let Some(c) = other.catch_up {
            self.add_catch_up(c);
        }
        for s in other.resyncs {
            self.add_resync(s);
        }
        for (p, t) in other.paths {
            self.add_touch(p, t);
        }
        for (to, from) in other.moves {
            self.moved(from, to);
        }
        self.prune_moves();
        self.excludes = excludes;
    }

    /// Bounds the work: while it holds more than `max` paths and subtrees, the deepest
    /// ones are replaced by a resync of their directory ("this directory is dirty").
    /// The tree is the truth, so a compare of the directory covers whatever happened
    /// in it. Work that keeps deletes is left whole: its compares cannot carry them.
    pub fn collapse(mut self, max: usize) -> Work {
        if self.keep_deletes {
            return self;
        }
        let depth = |p: &PathBytes| p.as_bytes().iter().filter(|&&b| b == b'/').count();
        while self.len() > max.max(1) {
            let deepest = self
                .paths
                .keys()
                .chain(self.resyncs.iter())
                .filter(|p| !p.is_root())
                .map(depth)
                .max();
            let Some(d) = deepest else { break };
            let dirs: Vec<PathBytes> = self
                .paths
                .keys()
                .chain(self.resyncs.iter())
                .filter(|p| !p.is_root() && depth(p) == d)
                .map(|p| p.parent().unwrap_or_default())
                .collect();
            self.paths.retain(|p, _| depth(p) != d);
            self.resyncs.retain(|p| depth(p) != d);
            for dir in dirs {
                self.add_resync(dir);
            }
        }
        self.prune_moves();
        self
    }

    /// Keeps only the moves whose new place the work still sends (a path listed as
    /// existing, or one within a subtree compared), so they stay as bounded as what
    /// is owed.
    fn prune_moves(&mut self) {
        let (paths, resyncs) = (&self.paths, &self.resyncs);
        self.moves.retain(|to, _| {
            resyncs.iter().any(|s| to.is_within(s)) || paths.get(to).is_some_and(|t| !t.deleted)
        });
    }

    fn covered(&self, path: &PathBytes) -> bool {
        self.resyncs.iter().any(|s| path.is_within(s))
    }

    fn add_catch_up(&mut self, since_us: u64) {
        if !self.resyncs.contains(&PathBytes::root()) {
            self.catch_up = Some(self.catch_up.map_or(since_us, |c| c.min(since_us)));
        }
    }

    fn add_touch(&mut self, path: PathBytes, touch: Touch) {
        self.since_us = earliest_us(self.since_us, touch.since_us);
        if self.covered(&path) && !(self.keep_deletes && touch.deleted) {
            return;
        }
        self.paths.entry(path).or_default().merge(touch);
    }

    fn add_resync(&mut self, subtree: PathBytes) {
        if self.covered(&subtree) {
            return;
        }
        self.resyncs.retain(|s| !s.is_within(&subtree));
        let keep_deletes = self.keep_deletes;
        self.paths
            .retain(|p, t| !p.is_within(&subtree) || (keep_deletes && t.deleted));
        if subtree.is_root() {
            self.catch_up = None;
        }
        self.resyncs.insert(subtree);
    }
}

/// `paths` as a list of `{path, deleted, since_us}` records; a bare path (wire
/// version 1) reads as one that may have been deleted.
mod owed_paths {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Touch;
    use crate::PathBytes;

    #[derive(Serialize)]
    struct Record<'a> {
        path: &'a PathBytes,
        deleted: bool,
        since_us: u64,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Record {
            path: PathBytes,
            #[serde(default)]
            deleted: bool,
            #[serde(default)]
            since_us: u64,
        },
        Bare(PathBytes),
    }

    pub(super) fn serialize<S: Serializer>(
        paths: &BTreeMap<PathBytes, Touch>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(paths.iter().map(|(path, t)| Record {
            path,
            deleted: t.deleted,
            since_us: t.since_us,
        }))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<PathBytes, Touch>, D::Error> {
        let entries = Vec::<Entry>::deserialize(d)?;
        let mut out: BTreeMap<PathBytes, Touch> = BTreeMap::new();
        for e in entries {
            let (path, touch) = match e {
                Entry::Record {
                    path,
                    deleted,
                    since_us,
                } => (path, Touch { deleted, since_us }),
                Entry::Bare(path) => (path, Touch::delete(0)),
            };
            out.entry(path).or_default().merge(touch);
        }
        Ok(out)
    }
}

/// `moves` as a list of `{from, to}` records.
mod moves {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::PathBytes;

    #[derive(Serialize, Deserialize)]
    struct Move {
        from: PathBytes,
        to: PathBytes,
    }

    pub(super) fn serialize<S: Serializer>(
        moves: &BTreeMap<PathBytes, PathBytes>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(moves.iter().map(|(to, from)| Move {
            from: from.clone(),
            to: to.clone(),
        }))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<PathBytes, PathBytes>, D::Error> {
        let list = Vec::<Move>::deserialize(d)?;
        Ok(list.into_iter().map(|m| (m.to, m.from)).collect())
    }
}

/// An optional time as µs, 0 meaning none.
mod zero_is_none {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(t.unwrap_or(0))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(Some(u64::deserialize(d)?).filter(|&t| t != 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBytes {
        s.into()
    }

    fn paths(w: &Work) -> Vec<(String, bool, u64)> {
        w.paths
            .iter()
            .map(|(p, t)| (p.to_string(), t.deleted, t.since_us))
            .collect()
    }

    fn resyncs(w: &Work) -> Vec<String> {
        w.resyncs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn touches_of_one_path_keep_the_delete_and_the_earliest_time() {
        let mut w = Work::default();
        w.touch(p("a"), Touch::upsert(30));
        w.touch(p("a"), Touch::delete(20));
        w.touch(p("a"), Touch::upsert(0));
        assert_eq!(paths(&w), [("a".into(), true, 20)]);
        assert_eq!(w.since_us, 20);
    }

    /// One table of what a subtree compare absorbs, for targets that compare with
    /// deletes and for two-way targets, which do not.
    #[test]
    fn a_resync_absorbs_what_lies_within_it_except_kept_deletes() {
        let cases: [(bool, &[&str]); 2] = [(false, &["b/y"]), (true, &["a/gone", "b/y"])];
        for (keep, left) in cases {
            let mut w = Work::keeping_deletes(keep);
            w.touch(p("a/x"), Touch::upsert(1));
            w.touch(p("a/gone"), Touch::delete(2));
            w.touch(p("b/y"), Touch::upsert(3));
            w.resync(p("a/deep"));
            w.resync(p("a"));
            let got: Vec<String> = w.paths.keys().map(|p| p.to_string()).collect();
            assert_eq!(got, left, "keep_deletes = {keep}");
            assert_eq!(resyncs(&w), ["a"]);
            // What arrives later inside the subtree is absorbed the same way.
            w.touch(p("a/late"), Touch::upsert(4));
            w.touch(p("a/late-gone"), Touch::delete(5));
            assert!(!w.paths.contains_key(&p("a/late")));
            assert_eq!(w.paths.contains_key(&p("a/late-gone")), keep);
            assert_eq!(w.since_us, 1, "absorbed changes still date the work");
        }
    }

    #[test]
    fn a_whole_root_resync_covers_a_catch_up() {
        let mut w = Work::default();
        w.catch_up(50);
        w.catch_up(40);
        assert_eq!(w.catch_up, Some(40));
        w.resync(PathBytes::root());
        assert_eq!(w.catch_up, None);
        w.catch_up(10);
        assert_eq!(w.catch_up, None);
    }

    #[test]
    fn a_cron_syncs_excludes_hold_only_while_it_is_all_the_work() {
        let cron = |globs: &[&str]| Work {
            resyncs: [PathBytes::root()].into(),
            excludes: globs.iter().map(|g| g.to_string()).collect(),
            ..Work::default()
        };
        // (work before, work merged in, excludes after)
        let live = {
            let mut w = Work::default();
            w.touch(p("x.log"), Touch::upsert(1));
            w
        };
        let table = [
            (Work::default(), cron(&["*.log"]), vec!["*.log"]),
            (cron(&["*.log"]), cron(&["*.log"]), vec!["*.log"]),
            (cron(&["*.log"]), Work::default(), vec!["*.log"]),
            (cron(&["*.log"]), cron(&["*.tmp"]), vec![]),
            (cron(&["*.log"]), live.clone(), vec![]),
            (live.clone(), cron(&["*.log"]), vec![]),
        ];
        for (i, (mut before, other, want)) in table.into_iter().enumerate() {
            before.merge(other);
            assert_eq!(before.excludes, want, "case {i}");
        }
        // Work put into a cron sync by the other ways drops them too.
        for put in [
            |w: &mut Work| w.touch(p("a"), Touch::upsert(1)),
            |w: &mut Work| w.resync(p("a")),
            |w: &mut Work| w.catch_up(5),
        ] {
            let mut w = cron(&["*.log"]);
            put(&mut w);
            assert!(w.excludes.is_empty());
        }
    }

    #[test]
    fn merging_keeps_every_path_its_kind_and_time() {
        let mut a = Work::default();
        a.touch(p("x"), Touch::upsert(10));
        let mut b = Work::default();
        b.touch(p("x"), Touch::delete(5));
        b.touch(p("y"), Touch::delete(7));
        b.catch_up(3);
        a.merge(b);
        assert_eq!(paths(&a), [("x".into(), true, 5), ("y".into(), true, 7)]);
        assert_eq!(a.since_us, 5);
        assert_eq!(a.catch_up, Some(3));
    }

    #[test]
    fn collapse_bounds_a_backlog_by_dirtying_directories() {
        let mut w = Work::default();
        for i in 0..20 {
            w.touch(p(&format!("d/sub/f{i}")), Touch::upsert(100 + i));
        }
        w.touch(p("top"), Touch::delete(1));
        let mut two_way = Work::keeping_deletes(true);
        two_way.merge(w.clone());
        let w = w.collapse(5);
        assert!(w.len() <= 5);
        assert_eq!(resyncs(&w), ["d/sub"]);
        assert_eq!(paths(&w), [("top".into(), true, 1)]);
        assert_eq!(w.since_us, 1);
        // A two-way target's compares make no deletes: its work is never folded.
        assert_eq!(two_way.clone().collapse(5), two_way);
    }

    #[test]
    fn a_move_after_a_move_keeps_the_first_old_place() {
        let mut w = Work::default();
        w.moved(p("a"), p("b"));
        let mut later = Work::default();
        later.moved(p("b"), p("c"));
        later.moved(p("x"), p("y"));
        // Their new places are owed (a moved directory's compare, a renamed file).
        w.resync(p("c"));
        later.touch(p("y"), Touch::upsert(1));
        w.merge(later);
        let moves: Vec<(String, String)> = w
            .moves
            .iter()
            .map(|(to, from)| (to.to_string(), from.to_string()))
            .collect();
        assert_eq!(moves, [("c".into(), "a".into()), ("y".into(), "x".into())]);
        // Moved back where it was: nothing to build from.
        w.moved(p("c"), p("a"));
        assert!(!w.moves.contains_key(&p("a")));
    }

    #[test]
    fn the_wire_keeps_deletes_and_times_and_reads_version_1_paths() {
        let mut w = Work::default();
        w.moved(p("old"), p("kept"));
        w.touch(p("kept"), Touch::upsert(11));
        w.touch(p("gone"), Touch::delete(12));
        w.resync(p("dir"));
        w.catch_up(9);
        w.excludes = vec!["*.tmp".into()];
        let bytes = rmp_serde::to_vec_named(&w).unwrap();
        let back: Work = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, w);

        // Version 1: bare paths and a 0 for "no catch-up".
        #[derive(Serialize)]
        struct V1 {
            resyncs: Vec<PathBytes>,
            paths: Vec<PathBytes>,
            excludes: Vec<String>,
            catch_up_us: u64,
            since_us: u64,
        }
        let v1 = V1 {
            resyncs: vec![p("dir")],
            paths: vec![p("a"), p("b")],
            excludes: Vec::new(),
            catch_up_us: 0,
            since_us: 42,
        };
        let old: Work = rmp_serde::from_slice(&rmp_serde::to_vec_named(&v1).unwrap()).unwrap();
        assert_eq!(paths(&old), [("a".into(), true, 0), ("b".into(), true, 0)]);
        assert_eq!(resyncs(&old), ["dir"]);
        assert_eq!((old.catch_up, old.since_us), (None, 42));
    }
}
