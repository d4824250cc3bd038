//! Per-path coalescing of raw events into changes, with time as a parameter.
//!
//! Each path collects its events until it has been quiet for the root's `quiet` window
//! or has been held for `max_hold` (so a file written forever still syncs). The net
//! effect is what is published: create+modify+close_write is one upsert, a path created
//! and deleted inside the window is nothing, a `moved_from`/`moved_to` pair with the same
//! cookie is one move (an unpaired half is a delete or an upsert; a `moved_from` waits
//! [`MOVE_HOLD`] for its partner).
//!
//! Hot files: a file whose content changes again soon after it was published is held
//! until a delay after that publication, and the delay triples each time it comes back
//! soon ([`HOT_FIRST`] up to [`HOT_MAX`]), so a file written for seconds goes out a
//! handful of times instead of once per quiet window, and the copies sent before the
//! last one add up to about half of what was written by then (a file appended to for
//! 4 s: 5 copies, 1.7 times its size). A writer that closes it and stays
//! away [`HOT_FIRST`] has it sent then. A path that rests [`HOT_SOON`] (or twice its
//! delay) is cold again; deletes, moves and directories are never held for heat.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use protocol::wire::{Change, Op, RawEvent, RawKind};
use protocol::PathBytes;

/// How long a closed file waits for more events (a rename) before it is published,
/// when that is shorter than the quiet window.
const CLOSED_SETTLE: Duration = Duration::from_millis(2);

/// A move half waits this long for its partner (they normally arrive in the same read).
const MOVE_PAIRING: Duration = Duration::from_secs(1);
/// The delete a `moved_from` leaves is not published before this, whatever the quiet
/// window: a `moved_to` read a little later (a busy machine, a read that split the
/// pair) still makes it a move, which the targets build from the old place instead of
/// receiving the data again. A move out of the root goes this much later.
pub(crate) const MOVE_HOLD: Duration = Duration::from_millis(100);

/// A file whose name has a usually transient shape ([`protocol::rules::transient_name`]:
/// `name~`, `4913`, `#name#`, rsync's `.name.XXXXXX`) is held until it has rested this
/// long, so one its program renames or deletes within moments never goes out…
pub(crate) const TRANSIENT_REST: Duration = Duration::from_secs(1);
/// …and at most this long, so one written without pause still goes.
pub(crate) const TRANSIENT_MAX_HOLD: Duration = Duration::from_secs(30);

/// The first hold of a file changed again soon after it was published; also how long a
/// hot file must rest after its writer closed it before it goes.
pub(crate) const HOT_FIRST: Duration = Duration::from_millis(50);
/// The longest hold of a hot file: the targets lag a file being written at most this
/// much behind its previous publication.
pub(crate) const HOT_MAX: Duration = Duration::from_secs(4);
/// Each hold of a file that stays hot is this many times the one before.
const HOT_GROWTH: u32 = 3;
/// A change this soon after a publication (or within twice the path's delay, if longer)
/// makes the path hotter; a later one finds it cold.
pub(crate) const HOT_SOON: Duration = Duration::from_secs(1);
/// At most this many publications are remembered (a burst of new files would fill it
/// with cold paths); beyond it a path not remembered is treated as cold.
const HEAT_CAP: usize = 16_384;
/// Forgotten publications are swept at most this often.
const HEAT_SWEEP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub quiet: Duration,
    pub max_hold: Duration,
    /// A closed file goes after [`CLOSED_SETTLE`] instead of the quiet window (off for
    /// roots whose files must rest first: an upload may close and open again).
    pub closed_settle: bool,
    /// A path created and removed again inside the window is nothing to the targets
    /// (off for two-way roots: the peer may have fetched it meanwhile).
    pub forget_created: bool,
    /// A file changed again soon after its publication is held longer (off for roots
    /// whose files must rest: `stable_ms` is the stricter rule).
    pub heat: bool,
}

/// The last publication of a file's content and the delay it was held for (zero when
/// it was cold).
#[derive(Debug, Clone, Copy)]
struct Heat {
    at: Instant,
    delay: Duration,
}

impl Heat {
    /// A change at `now` finds the path still hot.
    fn soon(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.at) < HOT_SOON.max(self.delay * 2)
    }

    /// The hold of the next change, if it comes soon.
    fn next_delay(&self) -> Duration {
        (self.delay * HOT_GROWTH).clamp(HOT_FIRST, HOT_MAX)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Net {
    Upsert,
    Delete,
    Move(PathBytes),
}

#[derive(Debug, Clone)]
struct Entry {
    net: Net,
    /// The path did not exist when its first event of this window arrived, so removing
    /// it again leaves nothing to tell the targets.
    created: bool,
    /// A recursive change of a directory above it went out while this was held: the
    /// targets may hold the path now, so removing it must reach them after all.
    carried: bool,
    dir: bool,
    recursive: bool,
    first: Instant,
    last: Instant,
    since_us: u64,
    /// Bumped on every event; a deadline in the heap is live only with the current gen.
    gen: u64,
    /// First-seen order, so a batch lists changes in the order they began.
    order: u64,
    /// Hot: not published before this (its last publication plus `delay`).
    hold_until: Option<Instant>,
    /// Left by a `moved_from`: as a delete, not published before this ([`MOVE_HOLD`]).
    pairing_until: Option<Instant>,
    /// The heat of this change was decided (at its first content event).
    heat_checked: bool,
    /// The hold chosen for this change (zero when cold), remembered at publication.
    delay: Duration,
}

struct PendingMove {
    root: String,
    from: PathBytes,
    existed: bool,
    /// The source had a change of its own waiting here (an upsert or a move) when it
    /// was moved away.
    prior_upsert: bool,
    /// Gen of the delete entry the `moved_from` left behind (None if it left nothing).
    delete_gen: Option<u64>,
    /// First-seen order of the source, which the destination inherits.
    order: Option<u64>,
    at: Instant,
}

impl Entry {
    /// Quiet for the root's window since the last event, or held for its maximum; a
    /// hot file not before its hold ends.
    fn deadline(&self, timing: Timing) -> Instant {
        let d = (self.last + timing.quiet).min(self.first + timing.max_hold);
        match (&self.net, self.hold_until, self.pairing_until) {
            (Net::Upsert, Some(h), _) | (Net::Delete, _, Some(h)) => d.max(h),
            _ => d,
        }
    }
}

type Key = (String, PathBytes);

#[derive(Default)]
pub(crate) struct Coalescer {
    timing: HashMap<String, Timing>,
    entries: BTreeMap<Key, Entry>,
    deadlines: BinaryHeap<Reverse<(Instant, u64, Key)>>,
    moves: HashMap<u32, PendingMove>,
    resyncs: Vec<(String, Change)>,
    counter: u64,
    /// Recent publications of file contents, by path (bounded by [`HEAT_CAP`]).
    heat: HashMap<Key, Heat>,
    next_sweep: Option<Instant>,
}

impl Coalescer {
    pub(crate) fn new(timing: HashMap<String, Timing>) -> Self {
        Coalescer {
            timing,
            ..Default::default()
        }
    }

    /// Number of paths held back.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.entries.len()
    }

    /// Takes one raw event (already filtered by rules and event toggles) seen at `now`,
    /// read by the watcher at `since_us`.
    pub(crate) fn push(&mut self, ev: &RawEvent, since_us: u64, now: Instant) {
        let key = (ev.root.clone(), ev.path.clone());
        match ev.kind {
            RawKind::Resync => {
                self.mark_carried(&ev.root, &ev.path);
                self.resyncs.push((
                    ev.root.clone(),
                    Change {
                        op: Op::Resync,
                        path: ev.path.clone(),
                        from: None,
                        dir: true,
                        recursive: true,
                        since_us,
                    },
                ))
            }
            RawKind::Create => {
                let e = self.touch(key, since_us, now, true, ev.dir, !ev.dir);
                if e.net == Net::Delete {
                    e.net = Net::Upsert;
                }
                e.dir = ev.dir;
                e.recursive |= ev.dir;
            }
            RawKind::Modify | RawKind::CloseWrite | RawKind::Attrib => {
                let timing = self.timing_for(&key, ev.dir);
                let max_hold = timing.max_hold;
                let e = self.touch(key.clone(), since_us, now, false, ev.dir, !ev.dir);
                if e.net == Net::Delete {
                    e.net = Net::Upsert;
                }
                e.dir = ev.dir;
                if ev.kind == RawKind::CloseWrite && timing.closed_settle {
                    // A writer closed the file: it is whole. Wait only for a rename
                    // that follows at once (editors and `sed -i` close a temp file
                    // and rename it over the original), not for the quiet window.
                    // A hot file goes once it stayed closed for HOT_FIRST (a writer
                    // that opens it again at once is still writing), or at its hold.
                    let at = match e.hold_until {
                        Some(_) => (now + HOT_FIRST).min(e.deadline(timing)),
                        None => (now + CLOSED_SETTLE).min(e.first + max_hold),
                    };
                    let gen = e.gen;
                    self.deadlines.push(Reverse((at, gen, key)));
                }
            }
            RawKind::Delete => {
                // A usually transient name deleted: the delete goes even if the path was
                // created in this window (cheap; a full sync run meanwhile may have
                // copied it). Renamed away, it is forgotten unless carried.
                let keep = !ev.dir && protocol::rules::transient_name(ev.path.file_name());
                if keep {
                    if let Some(e) = self.entries.get_mut(&key) {
                        e.carried = true;
                    }
                }
                self.delete(key, ev.dir, since_us, now)
            }
            RawKind::MovedFrom => {
                let existed = self.entries.get(&key).map(|e| !e.created).unwrap_or(true);
                let prior_upsert = self.entries.get(&key).is_some_and(|e| e.net != Net::Delete);
                let order = self.entries.get(&key).map(|e| e.order);
                self.delete(key.clone(), ev.dir, since_us, now);
                // A new generation: the deadline the delete pushed is stale.
                self.counter += 1;
                let gen = self.counter;
                let timing = self.timing_for(&key, ev.dir);
                if let Some(e) = self.entries.get_mut(&key) {
                    e.pairing_until = Some(now + MOVE_HOLD);
                    e.gen = gen;
                    let at = e.deadline(timing);
                    self.deadlines.push(Reverse((at, gen, key.clone())));
                }
                let delete_gen = self.entries.get(&key).map(|e| e.gen);
                self.moves.insert(
                    ev.cookie,
                    PendingMove {
                        root: ev.root.clone(),
                        from: ev.path.clone(),
                        existed,
                        prior_upsert,
                        delete_gen,
                        order,
                        at: now,
                    },
                );
            }
            RawKind::MovedTo => {
                let pair = self.moves.remove(&ev.cookie).filter(|m| m.root == ev.root);
                let mut net = Net::Upsert;
                if let Some(m) = &pair {
                    let from_key = (m.root.clone(), m.from.clone());
                    let ours = m.delete_gen.is_some()
                        && self.entries.get(&from_key).map(|e| e.gen) == m.delete_gen;
                    if ev.dir {
                        self.rekey_below(&m.root, &m.from, &ev.path);
                    }
                    if m.existed && ours {
                        self.entries.remove(&from_key);
                        net = Net::Move(m.from.clone());
                    }
                }
                // Renamed over the destination of a move still held: the earlier
                // source is gone all the same.
                if let Some(Net::Move(earlier)) = self.entries.get(&key).map(|e| e.net.clone()) {
                    if net != Net::Move(earlier.clone()) {
                        let from_key = (key.0.clone(), earlier);
                        self.source_gone(from_key, false, since_us, now);
                    }
                }
                // Never `created`: a rename over an existing file (or one from an
                // excluded temp name) arrives as a lone `moved_to`, and deleting it
                // again must still reach the targets.
                let e = self.touch(key, since_us, now, false, ev.dir, false);
                if let Some(order) = pair.as_ref().and_then(|m| m.order) {
                    e.order = e.order.min(order);
                }
                e.net = net;
                e.dir = ev.dir;
                e.recursive |= ev.dir;
            }
        }
    }

    /// A move's source, no longer carried by the move, is owed to the targets as a
    /// delete. If something new is held there already, that path still existed on the
    /// targets: it is not `created`, so deleting it again must reach them.
    fn source_gone(&mut self, from_key: Key, dir: bool, since_us: u64, now: Instant) {
        match self.entries.get_mut(&from_key) {
            Some(e) => e.created = false,
            None => {
                let d = self.touch(from_key, since_us, now, false, dir, false);
                d.net = Net::Delete;
                d.dir = dir;
            }
        }
    }

    /// Removes `key`'s entry; if it was a move, its source is still gone (a delete).
    fn remove_keeping_sources(&mut self, key: &Key, now: Instant) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        if let Net::Move(from) = &e.net {
            let from_key = (key.0.clone(), from.clone());
            self.source_gone(from_key, e.dir, e.since_us, now);
        }
        Some(e)
    }

    /// The peer moved a path away (into a two-way root's backup dir): takes back the
    /// delete its `moved_from` left. Returns the path and whether it had a change of
    /// this side's own waiting when it went.
    pub(crate) fn undo_move(&mut self, root: &str, cookie: u32) -> Option<(PathBytes, bool)> {
        let m = self.moves.remove(&cookie).filter(|m| m.root == root)?;
        let key = (m.root.clone(), m.from.clone());
        if m.delete_gen.is_some() && self.entries.get(&key).map(|e| e.gen) == m.delete_gen {
            self.entries.remove(&key);
        }
        Some((m.from, m.prior_upsert))
    }

    /// `undo_move` for a move whose `moved_to` went unseen, found by its source path.
    pub(crate) fn undo_move_from(&mut self, root: &str, from: &PathBytes) -> Option<bool> {
        let cookie = self
            .moves
            .iter()
            .find(|(_, m)| m.root == root && &m.from == from)
            .map(|(c, _)| *c)?;
        self.undo_move(root, cookie).map(|(_, held)| held)
    }

    /// A change of `path` other than a delete is held.
    pub(crate) fn holds_change(&self, root: &str, path: &PathBytes) -> bool {
        self.entries
            .get(&(root.to_string(), path.clone()))
            .is_some_and(|e| e.net != Net::Delete)
    }

    /// A delete of `path` is held.
    pub(crate) fn pending_delete(&self, root: &str, path: &PathBytes) -> bool {
        self.entries
            .get(&(root.to_string(), path.clone()))
            .is_some_and(|e| e.net == Net::Delete)
    }

    /// Drops what is held for `path`; true when it was a change of its own (not a
    /// delete).
    pub(crate) fn take_held(&mut self, root: &str, path: &PathBytes, now: Instant) -> bool {
        self.remove_keeping_sources(&(root.to_string(), path.clone()), now)
            .is_some_and(|e| e.net != Net::Delete)
    }

    /// The entry for `key`, created if absent (then `created` says whether the path is
    /// known not to have existed before), with its deadline refreshed. `content`: the
    /// event changes a file's content or attributes, so a hot file is held (any other
    /// event drops the hold: deletes and moves are never held for heat).
    fn touch(
        &mut self,
        key: Key,
        since_us: u64,
        now: Instant,
        created: bool,
        dir: bool,
        content: bool,
    ) -> &mut Entry {
        self.counter += 1;
        let gen = self.counter;
        let timing = self.timing_for(&key, dir);
        let created = created && timing.forget_created;
        let checked = self.entries.get(&key).is_some_and(|e| e.heat_checked);
        let hot = if content && timing.heat && !checked {
            self.heat
                .get(&key)
                .filter(|h| h.soon(now))
                .map(|h| (h.at + h.next_delay(), h.next_delay()))
        } else {
            None
        };
        let e = self.entries.entry(key.clone()).or_insert_with(|| Entry {
            net: Net::Upsert,
            created,
            carried: false,
            dir: false,
            recursive: false,
            first: now,
            last: now,
            since_us,
            gen,
            order: gen,
            hold_until: None,
            pairing_until: None,
            heat_checked: false,
            delay: Duration::ZERO,
        });
        e.last = now;
        e.gen = gen;
        if !content {
            e.hold_until = None;
        } else if timing.heat && !e.heat_checked {
            e.heat_checked = true;
            if let Some((until, delay)) = hot {
                e.hold_until = Some(until);
                e.delay = delay;
            }
        }
        self.deadlines.push(Reverse((e.deadline(timing), gen, key)));
        e
    }

    fn delete(&mut self, key: Key, dir: bool, since_us: u64, now: Instant) {
        match self
            .entries
            .get(&key)
            .map(|e| (e.created && !e.carried, e.net.clone()))
        {
            Some((true, Net::Upsert)) => {
                self.entries.remove(&key);
            }
            Some((_, Net::Move(from))) => {
                // The move's destination is gone again: the source is gone as well.
                let from_key = (key.0.clone(), from);
                self.source_gone(from_key, dir, since_us, now);
                let e = self.touch(key, since_us, now, false, dir, false);
                e.net = Net::Delete;
                e.recursive = false;
            }
            _ => {
                let e = self.touch(key, since_us, now, false, dir, false);
                e.net = Net::Delete;
                e.dir = dir;
                e.recursive = false;
            }
        }
    }

    /// Everything held below `dir` (all of the root for the root) may have reached the
    /// targets with a recursive send of `dir`.
    fn mark_carried(&mut self, root: &str, dir: &PathBytes) {
        if dir.is_root() {
            for ((r, _), e) in self.entries.iter_mut() {
                if r == root {
                    e.carried = true;
                }
            }
            return;
        }
        let lo = (root.to_string(), dir.join(b""));
        let mut hi_bytes = dir.as_bytes().to_vec();
        hi_bytes.push(b'/' + 1);
        let hi = (root.to_string(), PathBytes::new(hi_bytes));
        for (_, e) in self.entries.range_mut(lo..hi) {
            e.carried = true;
        }
    }

    /// A directory moved: what was pending below its old path is now below the new one.
    fn rekey_below(&mut self, root: &str, from: &PathBytes, to: &PathBytes) {
        // Every key in [`from/`, `from0`) lies strictly below `from` (`0` follows `/`).
        let lo = (root.to_string(), from.join(b""));
        let mut hi_bytes = from.as_bytes().to_vec();
        hi_bytes.push(b'/' + 1);
        let hi = (root.to_string(), PathBytes::new(hi_bytes));
        let keys: Vec<Key> = self.entries.range(lo..hi).map(|(k, _)| k.clone()).collect();
        for k in keys {
            let mut e = self.entries.remove(&k).expect("key from range");
            let new_key = (k.0.clone(), k.1.rebase(from, to));
            let timing = self.timing_for(&new_key, e.dir);
            self.counter += 1;
            e.gen = self.counter;
            // A deadline already past pops at the next `pop_ready`, as it would have.
            self.deadlines
                .push(Reverse((e.deadline(timing), e.gen, new_key.clone())));
            self.entries.insert(new_key, e);
        }
    }

    /// The root's timing, longer for a file with a usually transient name: it waits
    /// for [`TRANSIENT_REST`] of quiet and not for a close (the file is whole, but its
    /// rename or delete may be a moment away).
    fn timing_for(&self, key: &Key, dir: bool) -> Timing {
        let t = self.timing_of(&key.0);
        if dir || !protocol::rules::transient_name(key.1.file_name()) {
            return t;
        }
        Timing {
            quiet: t.quiet.max(TRANSIENT_REST),
            max_hold: t.max_hold.max(TRANSIENT_MAX_HOLD),
            closed_settle: false,
            ..t
        }
    }

    fn timing_of(&self, root: &str) -> Timing {
        self.timing.get(root).copied().unwrap_or(Timing {
            quiet: Duration::from_millis(protocol::config::DEFAULT_QUIET_MS),
            max_hold: Duration::from_millis(protocol::config::DEFAULT_MAX_HOLD_MS),
            closed_settle: true,
            forget_created: true,
            heat: true,
        })
    }

    /// The `since_us` of the oldest change held, per root holding any (the filter's
    /// part of the crash checkpoint, `watermark.rs`).
    pub(crate) fn oldest_held(&self) -> HashMap<&str, u64> {
        let mut out: HashMap<&str, u64> = HashMap::new();
        let held = self
            .entries
            .iter()
            .map(|((root, _), e)| (root.as_str(), e.since_us))
            .chain(
                self.resyncs
                    .iter()
                    .map(|(root, c)| (root.as_str(), c.since_us)),
            );
        for (root, since) in held {
            let t = out.entry(root).or_insert(since);
            *t = (*t).min(since);
        }
        out
    }

    /// When `pop_ready` will next have something to return.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if !self.resyncs.is_empty() {
            return Some(Instant::now());
        }
        self.deadlines.peek().map(|Reverse((d, _, _))| *d)
    }

    /// Every change whose path has been quiet long enough (or held too long), resyncs
    /// first, then in first-seen order.
    pub(crate) fn pop_ready(&mut self, now: Instant) -> Vec<(String, Change)> {
        let mut out: Vec<(String, Change)> = std::mem::take(&mut self.resyncs);
        let mut ready: Vec<(u64, Key, Entry)> = Vec::new();
        while let Some(Reverse((deadline, gen, _))) = self.deadlines.peek() {
            if *deadline > now {
                break;
            }
            let gen = *gen;
            let Some(Reverse((_, _, key))) = self.deadlines.pop() else {
                break;
            };
            if self.entries.get(&key).is_some_and(|e| e.gen == gen) {
                let e = self.entries.remove(&key).expect("checked above");
                ready.push((e.order, key, e));
            }
        }
        ready.sort_by_key(|(order, _, _)| *order);
        for (_, key, e) in &ready {
            if e.dir && e.recursive && e.net != Net::Delete {
                self.mark_carried(&key.0, &key.1);
            }
            self.remember(key, e, now);
        }
        self.sweep_heat(now);
        out.extend(
            ready
                .into_iter()
                .map(|(_, (root, path), e)| (root, to_change(path, e))),
        );
        self.moves
            .retain(|_, m| now.duration_since(m.at) < MOVE_PAIRING);
        out
    }

    /// Remembers the publication of a file's content, so a change soon after finds it
    /// hot; a delete or move forgets it.
    fn remember(&mut self, key: &Key, e: &Entry, now: Instant) {
        let content = e.net == Net::Upsert && !e.dir && e.heat_checked;
        if !content {
            self.heat.remove(key);
            return;
        }
        let heat = Heat {
            at: now,
            delay: e.delay,
        };
        if let Some(h) = self.heat.get_mut(key) {
            *h = heat;
        } else if self.heat.len() < HEAT_CAP {
            self.heat.insert(key.clone(), heat);
        }
    }

    /// Forgets publications no change can find hot any more (at most once per
    /// [`HEAT_SWEEP`]).
    fn sweep_heat(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|at| now < at) || self.heat.is_empty() {
            return;
        }
        self.heat.retain(|_, h| h.soon(now));
        self.next_sweep = Some(now + HEAT_SWEEP);
    }

    /// Paths whose publications are remembered.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.heat.len()
    }

    /// Everything still held, at once (shutdown).
    pub(crate) fn flush_all(&mut self) -> Vec<(String, Change)> {
        let mut out: Vec<(String, Change)> = std::mem::take(&mut self.resyncs);
        let mut all: Vec<(Key, Entry)> = std::mem::take(&mut self.entries).into_iter().collect();
        all.sort_by_key(|(_, e)| e.order);
        out.extend(
            all.into_iter()
                .map(|((root, path), e)| (root, to_change(path, e))),
        );
        self.deadlines.clear();
        self.moves.clear();
        out
    }
}

fn to_change(path: PathBytes, e: Entry) -> Change {
    let (op, from) = match e.net {
        Net::Upsert => (Op::Upsert, None),
        Net::Delete => (Op::Delete, None),
        Net::Move(from) => (Op::Move, Some(from)),
    };
    Change {
        op,
        path,
        from,
        dir: e.dir,
        recursive: e.recursive && op != Op::Delete,
        since_us: e.since_us,
    }
}

#[cfg(test)]
mod tests;
