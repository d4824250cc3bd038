//! The batcher: everything a target still needs, merged per root, so that one rsync per
//! root covers whatever arrived while the previous one ran. Pure: no I/O, no clock.
//! What a root owes is a [`Work`], the shape owed work keeps through the retrier's
//! journal and back, merged by its one rule.

use std::collections::BTreeMap;

use protocol::wire::{Change, Op};
use protocol::work::{Touch, Work};
use protocol::PathBytes;

/// One batch: the work of every root that was ready when it was taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    pub roots: BTreeMap<String, Work>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Batcher {
    roots: BTreeMap<String, Work>,
    /// For a two-way target (see [`Work::keep_deletes`]).
    keep_deletes: bool,
}

impl Batcher {
    pub(crate) fn new() -> Self {
        Batcher::default()
    }

    /// The batcher of a two-way target: deletes are never absorbed by a compare.
    pub(crate) fn keeping_deletes() -> Self {
        Batcher {
            keep_deletes: true,
            ..Batcher::default()
        }
    }

    /// Records one change of `root`.
    pub(crate) fn push(&mut self, root: &str, change: &Change) {
        let work = self.work(root);
        work.since_us = protocol::earliest_us(work.since_us, change.since_us);
        match change.op {
            // A directory that appeared whole may replace one the target still has with
            // other content: compare it in full, `--delete` included (an `-r` entry in
            // an incremental run would leave the old files there).
            Op::Upsert if change.recursive => work.resync(change.path.clone()),
            Op::Upsert => work.touch(change.path.clone(), Touch::upsert(change.since_us)),
            Op::Delete => work.touch(change.path.clone(), Touch::delete(change.since_us)),
            Op::Move => {
                if let Some(from) = &change.from {
                    work.touch(from.clone(), Touch::delete(change.since_us));
                    work.moved(from.clone(), change.path.clone());
                }
                if change.dir || change.recursive {
                    work.resync(change.path.clone());
                } else {
                    work.touch(change.path.clone(), Touch::upsert(change.since_us));
                }
            }
            // The watcher (or filter) could not vouch for it.
            Op::Resync => resync(work, change.path.clone()),
        }
    }

    /// Asks for a full comparison of `subtree` of `root` (the root when empty).
    pub(crate) fn resync(&mut self, root: &str, subtree: PathBytes) {
        resync(self.work(root), subtree);
    }

    /// Holds the crash checkpoint back to `floor_us` while `root`'s work is pending.
    pub(crate) fn hold_back(&mut self, root: &str, floor_us: u64) {
        self.work(root).hold_back(Some(floor_us));
    }

    /// How far back the pending work holds the crash checkpoint ([`Work::floor_us`]).
    pub(crate) fn floor_us(&self) -> Option<u64> {
        self.roots
            .values()
            .filter(|w| !w.is_empty())
            .filter_map(|w| w.floor_us)
            .min()
    }

    /// Puts back work that failed, merged with whatever arrived since.
    pub(crate) fn merge(&mut self, root: &str, work: Work) {
        self.work(root).merge(work);
    }

    /// The pending work of `root`; its name is copied only the first time.
    fn work(&mut self, root: &str) -> &mut Work {
        if !self.roots.contains_key(root) {
            let work = Work::keeping_deletes(self.keep_deletes);
            self.roots.insert(root.to_string(), work);
        }
        self.roots.get_mut(root).expect("inserted above")
    }

    /// Roots that have pending work.
    pub(crate) fn pending_roots(&self) -> impl Iterator<Item = &str> {
        self.roots
            .iter()
            .filter(|(_, w)| !w.is_empty())
            .map(|(r, _)| r.as_str())
    }

    /// When the oldest pending change happened (µs; 0 when nothing known is pending).
    pub(crate) fn oldest_us(&self) -> u64 {
        self.roots
            .values()
            .filter(|w| !w.is_empty())
            .fold(0, |t, w| protocol::earliest_us(t, w.since_us))
    }

    /// `(paths, resyncs)` still pending, for the shutdown report and the status.
    pub(crate) fn pending_counts(&self) -> (usize, usize) {
        self.roots
            .values()
            .fold((0, 0), |(p, r), w| (p + w.paths.len(), r + w.resyncs.len()))
    }

    /// Everything pending, as one batch.
    pub(crate) fn take(&mut self) -> Option<Batch> {
        self.take_where(|_| true)
    }

    /// The pending work of the roots for which `ready` says yes (the others wait, e.g.
    /// for their retry backoff).
    pub(crate) fn take_where(&mut self, ready: impl Fn(&str) -> bool) -> Option<Batch> {
        let names: Vec<String> = self
            .roots
            .iter()
            .filter(|(r, w)| !w.is_empty() && ready(r))
            .map(|(r, _)| r.clone())
            .collect();
        let mut batch = Batch::default();
        for name in names {
            if let Some(work) = self.roots.remove(&name) {
                batch.roots.insert(name, work);
            }
        }
        (!batch.roots.is_empty()).then_some(batch)
    }
}

/// Owes a full comparison of `subtree`; a whole-root one vouches for nothing until it
/// is done ([`Work::floor_us`]).
fn resync(work: &mut Work, subtree: PathBytes) {
    if subtree.is_root() {
        work.hold_back(Some(0));
    }
    work.resync(subtree);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(op: Op, path: &str) -> Change {
        Change {
            op,
            path: path.into(),
            from: None,
            dir: false,
            recursive: false,
            since_us: 0,
        }
    }
    fn up(p: &str) -> Change {
        ch(Op::Upsert, p)
    }
    fn del(p: &str) -> Change {
        ch(Op::Delete, p)
    }
    fn rdir(p: &str) -> Change {
        Change {
            dir: true,
            recursive: true,
            ..ch(Op::Upsert, p)
        }
    }
    fn mv(from: &str, to: &str, dir: bool) -> Change {
        Change {
            from: Some(from.into()),
            dir,
            ..ch(Op::Move, to)
        }
    }
    fn resync(p: &str) -> Change {
        ch(Op::Resync, p)
    }

    /// (path, deleted)
    type Want<'a> = (&'a [(&'a str, bool)], &'a [&'a str]);

    #[test]
    fn a_two_way_batcher_keeps_deletes_beside_a_compare() {
        let mut dir = up("d");
        dir.recursive = true;
        for (keep, want) in [(false, vec![]), (true, vec!["d/gone"])] {
            let mut b = if keep {
                Batcher::keeping_deletes()
            } else {
                Batcher::new()
            };
            b.push("r", &ch(Op::Delete, "d/gone"));
            b.push("r", &dir);
            b.push("r", &up("d/new"));
            let work = b.take().unwrap().roots.remove("r").unwrap();
            let paths: Vec<String> = work.paths.keys().map(|p| p.to_string()).collect();
            assert_eq!(paths, want, "keep_deletes {keep}");
            assert!(work.resyncs.contains(&PathBytes::from("d")));
        }
    }

    #[test]
    fn merge_rules_table() {
        let cases: &[(&str, Vec<Change>, Want)] = &[
            (
                "upserts and deletes merge per path",
                vec![up("a"), up("a"), del("a"), up("b")],
                (&[("a", true), ("b", false)], &[]),
            ),
            (
                "a move touches both ends; a moved dir is compared in full",
                vec![mv("old", "new", true), mv("f1", "f2", false)],
                (&[("f1", true), ("f2", false), ("old", true)], &["new"]),
            ),
            (
                // The directory may replace one the target still has with other files.
                "a directory that appeared whole is a subtree resync covering its content",
                vec![up("d/x"), del("d/y"), rdir("d"), up("d/e/z"), up("dd/x")],
                (&[("dd/x", false)], &["d"]),
            ),
            (
                "a resync covers the paths within it, before and after",
                vec![
                    up("s/a"),
                    del("s"),
                    resync("s"),
                    up("s/b"),
                    up("sx"),
                    del("t"),
                ],
                (&[("sx", false), ("t", true)], &["s"]),
            ),
            (
                "a resync of the root covers everything",
                vec![up("a"), resync("x/y"), resync(""), mv("b", "c", true)],
                (&[], &[""]),
            ),
            (
                "nested resyncs keep only the outermost",
                vec![
                    resync("a/b"),
                    resync("a/c"),
                    resync("a"),
                    resync("a/d"),
                    resync("b"),
                ],
                (&[], &["a", "b"]),
            ),
        ];
        for (name, changes, (paths, resyncs)) in cases {
            let mut b = Batcher::new();
            for c in changes {
                b.push("r", c);
            }
            let batch = b.take().expect(name);
            assert!(b.take().is_none(), "{name}: take empties the batcher");
            let w = &batch.roots["r"];
            let got: Vec<(String, bool)> = w
                .paths
                .iter()
                .map(|(p, t)| (p.to_string(), t.deleted))
                .collect();
            let want: Vec<(String, bool)> =
                paths.iter().map(|&(p, d)| (p.to_string(), d)).collect();
            assert_eq!(got, want, "{name}: paths");
            let got: Vec<String> = w
                .resyncs
                .iter()
                .map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned())
                .collect();
            assert_eq!(got, *resyncs, "{name}: resyncs");
        }
    }

    #[test]
    fn roots_are_separate_and_failed_work_merges_back() {
        let mut b = Batcher::new();
        b.push("r1", &up("a"));
        b.push("r2", &up("a"));
        let batch = b.take_where(|r| r == "r1").unwrap();
        assert_eq!(batch.roots.keys().collect::<Vec<_>>(), ["r1"]);
        assert_eq!(b.pending_roots().collect::<Vec<_>>(), ["r2"]);
        // r1 failed; meanwhile a resync of r1 arrived: the failed paths merge under it.
        b.resync("r1", "".into());
        b.merge("r1", batch.roots["r1"].clone());
        assert_eq!(b.pending_counts(), (1, 1));
        let all = b.take().unwrap();
        assert!(all.roots["r1"].paths.is_empty());
        assert!(b.take().is_none(), "nothing left once taken");
    }

    #[test]
    fn work_keeps_the_time_of_its_oldest_change_and_can_forget_it() {
        let at = |p: &str, t| Change {
            since_us: t,
            ..up(p)
        };
        let mut b = Batcher::new();
        b.push("r", &at("a", 30));
        b.push("r", &at("b", 10));
        b.push("r", &at("c", 0)); // unknown never wins
        b.push("q", &at("x", 20));
        assert_eq!(b.oldest_us(), 10);
        let mut w = b
            .take_where(|r| r == "r")
            .unwrap()
            .roots
            .remove("r")
            .unwrap();
        assert_eq!((w.since_us, b.oldest_us()), (10, 20));
        w.forget_times();
        assert!(w.since_us == 0 && w.paths.values().all(|t| t.since_us == 0));
        b.merge("q", w);
        assert_eq!(b.oldest_us(), 20);
    }

    /// The crash checkpoint: pending work holds it back to the oldest floor it was
    /// given, through failures merged back; a whole-root compare holds it at 0 (it
    /// vouches for nothing until done), and work from the journal holds nothing back.
    #[test]
    fn pending_work_holds_the_crash_checkpoint_back_to_its_oldest_floor() {
        let mut b = Batcher::new();
        assert_eq!(b.floor_us(), None);
        b.push("r", &up("a"));
        b.hold_back("r", 300);
        b.push("q", &up("x"));
        b.hold_back("q", 200);
        assert_eq!(b.floor_us(), Some(200));
        let taken = b.take_where(|r| r == "q").unwrap();
        assert_eq!(
            b.floor_us(),
            Some(300),
            "a run's work is out of these books"
        );
        // The run failed and the retrier was unreachable: it comes back, floor and all.
        b.merge("q", taken.roots["q"].clone());
        assert_eq!(b.floor_us(), Some(200));
        b.take().unwrap();
        // From the journal: on disk already.
        let mut journalled = Work::default();
        journalled.touch("j".into(), Touch::upsert(5));
        b.merge("r", journalled);
        assert_eq!(b.floor_us(), None);
        b.resync("r", PathBytes::root());
        assert_eq!(b.floor_us(), Some(0));
        b.take().unwrap();
        b.push("r", &resync(""));
        assert_eq!(
            b.floor_us(),
            Some(0),
            "the watcher could not vouch for the root"
        );
    }
}
