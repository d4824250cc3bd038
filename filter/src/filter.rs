//! The [`Filter`]: raw events in, changes out, time a parameter.
//!
//! Per event: a two-way root's peer events go to [`TwoWay`] first; then the root's
//! event toggles ([`wanted`]), its exclude rules (a path is excluded when it or a
//! directory above it matches), and the [`Coalescer`]. Roots whose files must rest
//! (`stable_ms`) keep a [`Stability`] snapshot per file and hold a file once more when
//! it moved since its last event.
//!
//! The Filter reads the tree (sizes and mtimes, a backup directory's listing) and
//! never writes it: on two-way roots the writes are `two_way::repair`'s.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use protocol::config::{Config, Events, Root};
use protocol::seq::{Seen, SeqTracker};
use protocol::wire::{self, Change, Op, RawBatch, RawEvent, RawKind};
use protocol::PathBytes;

use crate::coalesce::{Coalescer, Timing};
use crate::two_way::TwoWay;
use crate::watermark::Vouched;

/// Watchers remembered for gap detection.
const MAX_WATCHERS: usize = 16;
/// Directory exclusion decisions remembered (then forgotten all at once).
const MAX_CACHED_DIRS: usize = 65_536;

type Key = (String, PathBytes);

/// True when the root's event toggles let this kind of event through.
fn wanted(events: &Events, ev: &RawEvent) -> bool {
    match ev.kind {
        RawKind::Create if ev.dir => events.create_folder,
        RawKind::Create => events.create_file,
        RawKind::Modify => events.modify,
        RawKind::CloseWrite => events.close_write,
        RawKind::Attrib => events.attrib,
        RawKind::Delete => events.delete,
        RawKind::MovedFrom | RawKind::MovedTo => events.moves,
        RawKind::Resync => true,
    }
}

/// Size, mtime seconds and nanoseconds of a file.
pub(crate) type Stat = (u64, i64, i64);

/// Size and mtime of a file (`None` when it is gone or not a file).
pub(crate) fn stat_of(path: &Path) -> Option<Stat> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    m.is_file().then(|| (m.size(), m.mtime(), m.mtime_nsec()))
}

/// For roots whose files must rest (`stable_ms`): each file's size and mtime at its
/// last event. A file that moved since (written without an event, through mmap) is
/// not settled when its quiet window ends, and is held once more.
#[derive(Default)]
pub(crate) struct Stability {
    snapshots: HashMap<Key, Option<Stat>>,
}

impl Stability {
    /// Takes a passed event of a root whose files must rest (`tree`: the root's path).
    fn seen(&mut self, ev: &RawEvent, tree: &Path) {
        let file = !ev.dir
            && matches!(
                ev.kind,
                RawKind::Create
                    | RawKind::Modify
                    | RawKind::CloseWrite
                    | RawKind::Attrib
                    | RawKind::MovedTo
            );
        let key = (ev.root.clone(), ev.path.clone());
        if file {
            self.snapshots.insert(key, stat_of(&ev.path.under(tree)));
        } else if matches!(ev.kind, RawKind::Delete | RawKind::MovedFrom) {
            self.snapshots.remove(&key);
        }
    }

    /// The path is no longer this side's to watch (it moved, or the peer wrote or
    /// deleted it).
    pub(crate) fn forget(&mut self, key: &Key) {
        self.snapshots.remove(key);
    }

    /// False when `c`, a change about to go out, is a file that moved since its last
    /// event: then the snapshot is renewed and the file must be held once more.
    fn settled(&mut self, root: &str, c: &Change, tree: &Path) -> bool {
        let key = (root.to_string(), c.path.clone());
        if c.op == Op::Upsert && !c.dir {
            if let Some(snap) = self.snapshots.remove(&key) {
                let current = stat_of(&c.path.under(tree));
                if current != snap {
                    self.snapshots.insert(key, current);
                    return false;
                }
            }
        }
        if c.op == Op::Move {
            self.snapshots.remove(&key);
        }
        true
    }

    fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
    }
}

/// Raw events in, changes out; time is a parameter. Reads the tree, never writes it.
pub(crate) struct Filter {
    roots: HashMap<String, RootState>,
    coalescer: Coalescer,
    watchers: Vec<(u64, SeqTracker)>,
    stability: Stability,
    two_way: TwoWay,
    vouched: Vouched,
    /// The roots' names, sorted.
    names: Vec<String>,
}

/// One root's config and what the filter has learnt about its directories.
struct RootState {
    root: Root,
    /// Whether a directory is excluded by itself. Events share their ancestors, so this
    /// saves most of the pattern matching in a burst.
    dir_cache: HashMap<Vec<u8>, bool>,
}

impl RootState {
    /// `Rules::excludes`, with the decisions for ancestor directories cached.
    fn excluded(&mut self, ev: &RawEvent) -> bool {
        if ev.path.is_root() {
            return false;
        }
        let rules = &self.root.rules;
        if rules.matches(ev.path.as_bytes(), ev.dir) {
            return true;
        }
        if self.dir_cache.len() > MAX_CACHED_DIRS {
            self.dir_cache.clear();
        }
        for dir in ev.path.ancestors() {
            // Look up by reference: a hit allocates nothing.
            let hit = match self.dir_cache.get(dir) {
                Some(&hit) => hit,
                None => {
                    let hit = rules.matches(dir, true);
                    self.dir_cache.insert(dir.to_vec(), hit);
                    hit
                }
            };
            if hit {
                return true;
            }
        }
        false
    }
}

impl Filter {
    pub(crate) fn new(config: &Config) -> Self {
        let timing = config
            .roots
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    Timing {
                        quiet: r.quiet.max(r.stable),
                        max_hold: r.max_hold.max(r.stable),
                        closed_settle: r.stable.is_zero(),
                        forget_created: !r.two_way,
                        heat: r.stable.is_zero(),
                    },
                )
            })
            .collect();
        Filter {
            roots: config
                .roots
                .iter()
                .map(|r| {
                    let state = RootState {
                        root: r.clone(),
                        dir_cache: HashMap::new(),
                    };
                    (r.name.clone(), state)
                })
                .collect(),
            coalescer: Coalescer::new(timing),
            watchers: Vec::new(),
            stability: Stability::default(),
            two_way: TwoWay::default(),
            vouched: Vouched::default(),
            names: {
                let mut v: Vec<String> = config.roots.iter().map(|r| r.name.clone()).collect();
                v.sort();
                v
            },
        }
    }

    /// Takes one batch from a watcher.
    pub(crate) fn push_batch(&mut self, batch: &RawBatch, now: Instant) {
        let returning = self.watchers.iter().any(|(e, _)| *e == batch.epoch);
        self.vouched.take(batch, returning);
        let seen = self.observe(batch.epoch, batch.seq);
        if seen.lost_something() {
            tracing::warn!(
                epoch = batch.epoch,
                seq = batch.seq,
                ?seen,
                "raw events lost; resyncing every root"
            );
            self.resync_all(now);
        }
        tracing::debug!(
            epoch = batch.epoch,
            seq = batch.seq,
            events = batch.events.len(),
            "raw batch"
        );
        for ev in &batch.events {
            tracing::trace!(root = %ev.root, path = %ev.path, kind = ?ev.kind, dir = ev.dir, cookie = ev.cookie, "raw event");
            self.push_event(ev, batch.time_us, now);
        }
    }

    fn observe(&mut self, epoch: u64, seq: u64) -> Seen {
        if let Some(i) = self.watchers.iter().position(|(e, _)| *e == epoch) {
            let (_, mut t) = self.watchers.remove(i);
            let seen = t.observe(epoch, seq);
            self.watchers.push((epoch, t));
            return seen;
        }
        let mut t = SeqTracker::default();
        let seen = t.observe(epoch, seq);
        if self.watchers.len() >= MAX_WATCHERS {
            self.watchers.remove(0);
        }
        self.watchers.push((epoch, t));
        seen
    }

    /// A resync of every root (something was lost on the way in).
    pub(crate) fn resync_all(&mut self, now: Instant) {
        let names: Vec<String> = self.roots.keys().cloned().collect();
        for root in names {
            let ev = RawEvent {
                root,
                path: PathBytes::root(),
                kind: RawKind::Resync,
                dir: true,
                cookie: 0,
            };
            self.coalescer.push(&ev, protocol::now_us(), now);
        }
    }

    /// Takes one raw event, read by the watcher at `since_us`.
    pub(crate) fn push_event(&mut self, ev: &RawEvent, since_us: u64, now: Instant) {
        let Some(state) = self.roots.get_mut(&ev.root) else {
            tracing::warn!(root = %ev.root, "event for a root this filter does not know; dropped");
            return;
        };
        if state.root.two_way
            && ev.kind != RawKind::Resync
            && self.two_way.peer_event(
                ev,
                &state.root,
                &mut self.coalescer,
                &mut self.stability,
                now,
            )
        {
            return;
        }
        if !wanted(&state.root.events, ev) {
            return;
        }
        if ev.kind != RawKind::Resync && state.excluded(ev) {
            return;
        }
        if !state.root.stable.is_zero() {
            self.stability.seen(ev, &state.root.path);
        }
        self.coalescer.push(ev, since_us, now);
    }

    /// Two-way roots: echoes recognised since the last call, per root.
    pub(crate) fn take_echoes(&mut self) -> HashMap<String, u64> {
        self.two_way.take_echoes()
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.coalescer.next_deadline()
    }

    /// Ready changes grouped by root, in first-seen order within a root.
    pub(crate) fn ready(&mut self, now: Instant) -> Vec<(String, Vec<Change>)> {
        self.two_way.prune(now);
        let mut out = self.coalescer.pop_ready(now);
        if !self.stability.is_empty() || self.roots.values().any(|r| r.root.two_way) {
            out.retain(|(root, c)| self.settled(root, c, now));
        }
        group(out)
    }

    /// Whether `c` goes out now: a file that must rest and moved since its last event
    /// is held once more. Two-way roots also remember what they publish.
    fn settled(&mut self, root: &str, c: &Change, now: Instant) -> bool {
        let Some(state) = self.roots.get(root) else {
            return true;
        };
        if !self.stability.settled(root, c, &state.root.path) {
            let ev = RawEvent {
                root: root.to_string(),
                path: c.path.clone(),
                kind: RawKind::Modify,
                dir: false,
                cookie: 0,
            };
            self.coalescer.push(&ev, c.since_us, now);
            return false;
        }
        if state.root.two_way {
            self.two_way.published(root, c, now);
        }
        true
    }

    /// Two-way roots: what a run brought to the peer is no longer racing a delete.
    pub(crate) fn delivered(&mut self, d: &wire::Delivery) {
        if !d.ok || !self.roots.get(&d.root).is_some_and(|r| r.root.two_way) {
            return;
        }
        self.two_way.delivered(d);
    }

    /// The targets whose deliveries [`Filter::delivered`] wants: the two-way ones.
    pub(crate) fn two_way_targets(config: &Config) -> Vec<String> {
        config
            .targets
            .iter()
            .filter(|t| t.two_way)
            .map(|t| t.name.clone())
            .collect()
    }

    /// What each root's next message says in `safe_us`, at `now` (`watermark.rs`).
    pub(crate) fn safe_us(&mut self, now: Instant) -> HashMap<String, u64> {
        let coalescer = &self.coalescer;
        self.vouched
            .safe_us(now, &self.names, || coalescer.oldest_held())
    }

    /// Everything held, at once (the drain at a stop).
    pub(crate) fn flush_all(&mut self) -> Vec<(String, Vec<Change>)> {
        group(self.coalescer.flush_all())
    }

    pub(crate) fn root_names(&self) -> &[String] {
        &self.names
    }
}

fn group(changes: Vec<(String, Change)>) -> Vec<(String, Vec<Change>)> {
    let mut out: Vec<(String, Vec<Change>)> = Vec::new();
    for (root, c) in changes {
        match out.iter_mut().find(|(r, _)| *r == root) {
            Some((_, v)) => v.push(c),
            None => out.push((root, vec![c])),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    pub(crate) fn config(extra: &str) -> (tempfile::TempDir, Config) {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("src")).unwrap();
        let file = t.path().join("c.toml");
        let text = format!("[[root]]\nname = \"r\"\npath = \"src\"\n{extra}");
        let c = Config::parse(&text, &file).unwrap();
        (t, c)
    }

    pub(crate) fn raw(seq: u64, events: Vec<RawEvent>) -> RawBatch {
        RawBatch {
            version: wire::VERSION,
            epoch: 42,
            seq,
            time_us: 0,
            read_to_us: 0,
            events,
        }
    }

    pub(crate) fn ev(kind: RawKind, path: &str) -> RawEvent {
        RawEvent {
            root: "r".into(),
            path: path.into(),
            kind,
            dir: false,
            cookie: 0,
        }
    }

    pub(crate) fn paths(out: &[(String, Vec<Change>)]) -> Vec<String> {
        out.iter()
            .flat_map(|(_, v)| v.iter().map(|c| c.path.to_string()))
            .collect()
    }

    #[test]
    fn excluded_paths_and_disabled_events_never_leave_the_filter() {
        let (_t, c) = config("exclude = ['(.*)\\.svn']\n[root.events]\nattrib = false\n");
        let mut f = Filter::new(&c);
        let t0 = Instant::now();
        f.push_batch(
            &raw(
                1,
                vec![
                    ev(RawKind::CloseWrite, "a/.svn/entries"),
                    ev(RawKind::CloseWrite, ".doc.swp"),
                    ev(RawKind::Attrib, "chmodded"),
                    ev(RawKind::CloseWrite, "kept"),
                ],
            ),
            t0,
        );
        let out = f.ready(t0 + Duration::from_secs(2));
        assert_eq!(paths(&out), vec!["kept"]);
    }

    #[test]
    fn cached_directory_decisions_agree_with_the_rules() {
        let (_t, c) = config("exclude_glob = ['cache/']\n");
        let mut f = Filter::new(&c);
        let t0 = Instant::now();
        let written = [
            "a/cache/x",
            "a/cache/y",
            "a/b/x",
            "cache",
            "a/cachex/z",
            "a/cache",
        ];
        let events: Vec<RawEvent> = written.iter().map(|p| ev(RawKind::CloseWrite, p)).collect();
        f.push_batch(&raw(1, events.clone()), t0);
        f.push_batch(&raw(2, events), t0);
        let out = f.ready(t0 + Duration::from_secs(2));
        // `cache` and `a/cache` are files here (dir = false): only dirs match `cache/`.
        assert_eq!(paths(&out), vec!["a/b/x", "cache", "a/cachex/z", "a/cache"]);
    }

    #[test]
    fn a_gap_in_the_raw_stream_resyncs_every_root() {
        let (_t, c) = config("");
        let mut f = Filter::new(&c);
        let t0 = Instant::now();
        f.push_batch(&raw(1, vec![]), t0);
        assert!(f.ready(t0).is_empty(), "fresh watcher, nothing lost");
        f.push_batch(&raw(3, vec![]), t0);
        let out = f.ready(t0);
        assert_eq!(out[0].1[0].op, Op::Resync);
    }

    #[test]
    fn joining_a_watcher_mid_stream_resyncs() {
        let (_t, c) = config("");
        let mut f = Filter::new(&c);
        let t0 = Instant::now();
        f.push_batch(&raw(57, vec![]), t0);
        assert_eq!(f.ready(t0)[0].1[0].op, Op::Resync);
    }

    #[test]
    fn a_file_that_must_rest_waits_until_size_and_mtime_stop_moving() {
        let (t, c) = config("stable_ms = 500\n");
        let file = t.path().join("src/upload");
        std::fs::write(&file, "part").unwrap();
        let mut f = Filter::new(&c);
        let t0 = Instant::now();
        f.push_batch(&raw(1, vec![ev(RawKind::CloseWrite, "upload")]), t0);
        // Closed, but not rested: held for the whole window.
        assert!(f.ready(t0 + Duration::from_millis(400)).is_empty());
        // Written again without an event (as through mmap): held once more.
        std::fs::write(&file, "part and the rest").unwrap();
        assert!(f.ready(t0 + Duration::from_millis(600)).is_empty());
        let later = f.next_deadline().unwrap();
        assert_eq!(paths(&f.ready(later)), vec!["upload"]);
    }
}
