//! Two-way roots: telling the peer's writes and deletes from this side's own.
//!
//! The peer's rsync writes a file in `.syncbus/incoming/` and renames it into place;
//! what it replaces or deletes it moves (or hard-links) into `.syncbus/backup/`. Such
//! events are the peer's doing: they are never sent back, and some of them mean that
//! a change made here must win over the peer's.
//!
//! Three parts, each with one job:
//! - [`classify_peer`] (here, pure): an event and what is [`Known`] about its path →
//!   a [`PeerVerdict`]. Time is a parameter; it reads nothing else.
//! - [`TwoWay`] (here): what the filter remembers between events, and the state
//!   changes a verdict brings (to itself, the coalescer, the stability snapshots).
//! - [`repair`]: the only code in the filter that writes the tree, carrying out a
//!   verdict.

mod names;
mod repair;
#[cfg(test)]
mod table;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use protocol::config::{Root, TWO_WAY_BACKUP, TWO_WAY_INCOMING};
use protocol::wire::{self, Change, Op, RawEvent, RawKind};
use protocol::PathBytes;

use crate::coalesce::Coalescer;
use crate::filter::{stat_of, Stability, Stat};
use names::{below, is_version, own_dir_part};

/// How long the two-way bookkeeping keeps a rename half or a path found in the backup
/// waiting for its other half.
pub(crate) const RACE_WINDOW: Duration = Duration::from_secs(2);
/// A local change of a two-way root not yet reported delivered to the peer is
/// forgotten after this (its delivery went unseen: a gap, a restarted retrier).
const UNDELIVERED_FOR: Duration = Duration::from_secs(600);
/// How long a copy the peer wrote, and a delete made here, are remembered to tell a
/// stale repeat of the copy from a new one.
const STALE_FOR: Duration = Duration::from_secs(30);
/// At most this many undelivered paths are remembered (the oldest go first).
const MAX_UNDELIVERED: usize = 100_000;

type Key = (String, PathBytes);

/// What an event of a two-way root is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerVerdict {
    /// This side's own event: filtered and coalesced as on any root.
    NotPeer,
    /// Inside `.syncbus/`, and telling nothing: dropped.
    OwnDir,
    /// The peer's rsync renamed a finished file out of `.syncbus/incoming/`: the
    /// `moved_to` with the same cookie is its write.
    IncomingLeft,
    /// Something was moved into `.syncbus/backup/` as this path (tree-relative): the
    /// peer deleted it here. Which path left is the coalescer's to say (by cookie, or
    /// by the path when its `moved_to` went unseen).
    IntoBackup(PathBytes),
    /// The peer's rsync made this directory of the backup (tree-relative) and may have
    /// moved deleted files in before this side watched it: each file in it that is
    /// gone from the tree is a delete of the peer's.
    BackupDirMade(PathBytes),
    /// The peer's copy landed on the path. `conflict`: it replaced a change made here
    /// that had not reached the peer (held here, published and not delivered, or
    /// delivered only after the peer made its copy). `copy`: its size and mtime.
    PeerWrote { conflict: bool, copy: Option<Stat> },
    /// The peer's copy landed again, the same as its last, on a path deleted here
    /// since (two of its runs carried it): the delete made here stands.
    StaleRepeat,
    /// The peer deleted the path. `raced`: this side's change of it had not reached
    /// the peer yet (held here, or published and not delivered), so the changed file
    /// wins and goes back.
    PeerDeleted { raced: bool },
}

/// What [`classify_peer`] reads about the event's path (in the event's root): the
/// two-way state, the coalescer, and the tree. Reads only.
pub(crate) trait Known {
    /// The root and time of a rename out of `.syncbus/incoming/` with this cookie.
    fn incoming(&self, cookie: u32) -> Option<(&str, Instant)>;
    /// When the path was found in the backup before its `moved_from` was read.
    fn backed_up(&self, path: &PathBytes) -> Option<Instant>;
    /// The coalescer holds a change of the path other than a delete.
    fn holds_change(&self, path: &PathBytes) -> bool;
    /// The coalescer holds a delete of the path.
    fn pending_delete(&self, path: &PathBytes) -> bool;
    /// A delete of the path was published lately.
    fn deleted_here(&self, path: &PathBytes) -> bool;
    /// The peer's last copy of the path lately, and when it landed.
    fn received(&self, path: &PathBytes) -> Option<(Option<Stat>, Instant)>;
    /// A change of the path was published and not reported delivered yet.
    fn undelivered(&self, path: &PathBytes) -> bool;
    /// When the run that delivered a change of the path lately ended (µs since the
    /// Unix epoch).
    fn delivered_at(&self, path: &PathBytes) -> Option<u64>;
    /// Size and mtime of the file in the tree now.
    fn stat(&self, path: &PathBytes) -> Option<Stat>;
    /// The mtime of whatever is at the path in the tree now (µs since the Unix epoch).
    fn mtime_us(&self, path: &PathBytes) -> Option<u64>;
}

/// Decides what `ev` (of a two-way root, not a resync) is. Pure: `known` is read only.
pub(crate) fn classify_peer(ev: &RawEvent, known: &impl Known, now: Instant) -> PeerVerdict {
    if let Some(own) = own_dir_part(&ev.path) {
        let incoming = below(own, TWO_WAY_INCOMING);
        let backup = below(own, TWO_WAY_BACKUP);
        return match (ev.kind, incoming, backup) {
            (RawKind::MovedFrom, Some(_), _) => PeerVerdict::IncomingLeft,
            // A version kept by `repair` is renamed within the backup: not a delete.
            (RawKind::MovedTo, _, Some(path)) if !is_version(path) => {
                PeerVerdict::IntoBackup(PathBytes::new(path.to_vec()))
            }
            (RawKind::Create, _, Some(path)) if ev.dir => {
                PeerVerdict::BackupDirMade(PathBytes::new(path.to_vec()))
            }
            _ => PeerVerdict::OwnDir,
        };
    }
    let fresh = |t: Instant| now.duration_since(t) < RACE_WINDOW;
    match ev.kind {
        RawKind::MovedTo => match known.incoming(ev.cookie) {
            Some((root, t)) if fresh(t) && root == ev.root => landed(&ev.path, known, now),
            _ => PeerVerdict::NotPeer,
        },
        // Already found in the backup (its `moved_to` went unseen).
        RawKind::MovedFrom if known.backed_up(&ev.path).is_some_and(fresh) => {
            peer_deleted(known.holds_change(&ev.path), known.undelivered(&ev.path))
        }
        _ => PeerVerdict::NotPeer,
    }
}

/// The peer's copy of `path` just landed.
fn landed(path: &PathBytes, known: &impl Known, now: Instant) -> PeerVerdict {
    let copy = known.stat(path);
    // Deleted here and not written again since: a change held here, or one published
    // (which clears `deleted_here`), means the path was written here after its delete.
    let deleted_since =
        known.pending_delete(path) || (known.deleted_here(path) && !known.holds_change(path));
    let same = known.received(path).is_some_and(|(last, t)| {
        copy.is_some() && last == copy && now.duration_since(t) < STALE_FOR
    });
    if deleted_since && same {
        return PeerVerdict::StaleRepeat;
    }
    // Delivered, but after the peer made its copy: the peer had not seen it (a
    // conflict), unlike an edit made over it there.
    let crossed = known
        .delivered_at(path)
        .is_some_and(|at_us| known.mtime_us(path).is_some_and(|m| m < at_us));
    let conflict = known.holds_change(path) || known.undelivered(path) || crossed;
    PeerVerdict::PeerWrote { conflict, copy }
}

/// The peer deleted a path; `held`: a change of it was held here; `undelivered`: one
/// was published and not delivered.
fn peer_deleted(held: bool, undelivered: bool) -> PeerVerdict {
    PeerVerdict::PeerDeleted {
        raced: held || undelivered,
    }
}

/// What a two-way root's filter remembers to tell the peer's writes from local ones.
#[derive(Default)]
pub(crate) struct TwoWay {
    /// Cookies of renames out of `.syncbus/incoming/` (the peer's rsync finishing a
    /// file), waiting for their `moved_to`.
    incoming: HashMap<u32, (String, Instant)>,
    /// Local changes published and not yet reported delivered to the peer (the
    /// delivery stream): a delete from the peer that reaches one of them raced it,
    /// and the changed file wins.
    /// With when they were published (monotonic, and µs since the Unix epoch to
    /// compare with a run's start).
    undelivered: HashMap<Key, (Instant, u64)>,
    next_prune: Option<Instant>,
    /// The last copy the peer wrote of each path lately (size and mtime), and the paths
    /// deleted here lately: a copy the peer sends again after this side deleted it is
    /// a stale repeat (two of its runs carried it), and the delete stands.
    received: HashMap<Key, (Option<Stat>, Instant)>,
    deleted_here: HashMap<Key, Instant>,
    /// Local changes reported delivered lately: when the run ended (µs since the Unix
    /// epoch), to tell a copy the peer made before it from one made after.
    delivered_at: HashMap<Key, (u64, Instant)>,
    /// Paths found in the backup before their `moved_from` was read (the peer's
    /// rsync moved them into a backup directory this side did not watch yet).
    backed_up: HashMap<Key, Instant>,
    /// Echoes recognised since the last `take_echoes`, per root.
    echoes: HashMap<String, u64>,
}

/// The live [`Known`]: one root's view of the two-way state, the coalescer and the tree.
struct Live<'a> {
    root: &'a Root,
    tw: &'a TwoWay,
    coalescer: &'a Coalescer,
}

impl Live<'_> {
    fn key(&self, path: &PathBytes) -> Key {
        (self.root.name.clone(), path.clone())
    }
}

impl Known for Live<'_> {
    fn incoming(&self, cookie: u32) -> Option<(&str, Instant)> {
        self.tw.incoming.get(&cookie).map(|(r, t)| (r.as_str(), *t))
    }
    fn backed_up(&self, path: &PathBytes) -> Option<Instant> {
        self.tw.backed_up.get(&self.key(path)).copied()
    }
    fn holds_change(&self, path: &PathBytes) -> bool {
        self.coalescer.holds_change(&self.root.name, path)
    }
    fn pending_delete(&self, path: &PathBytes) -> bool {
        self.coalescer.pending_delete(&self.root.name, path)
    }
    fn deleted_here(&self, path: &PathBytes) -> bool {
        self.tw.deleted_here.contains_key(&self.key(path))
    }
    fn received(&self, path: &PathBytes) -> Option<(Option<Stat>, Instant)> {
        self.tw.received.get(&self.key(path)).copied()
    }
    fn undelivered(&self, path: &PathBytes) -> bool {
        self.tw.undelivered.contains_key(&self.key(path))
    }
    fn delivered_at(&self, path: &PathBytes) -> Option<u64> {
        self.tw.delivered_at.get(&self.key(path)).map(|(at, _)| *at)
    }
    fn stat(&self, path: &PathBytes) -> Option<Stat> {
        stat_of(&path.under(&self.root.path))
    }
    fn mtime_us(&self, path: &PathBytes) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path.under(&self.root.path)).ok()?;
        Some(m.mtime().max(0) as u64 * 1_000_000 + m.mtime_nsec() as u64 / 1000)
    }
}

impl TwoWay {
    /// Takes `ev`, an event of the two-way `root` (not a resync): true when it is the
    /// peer's doing or syncbus's own dir, handled here and never sent back.
    pub(crate) fn peer_event(
        &mut self,
        ev: &RawEvent,
        root: &Root,
        coalescer: &mut Coalescer,
        stability: &mut Stability,
        now: Instant,
    ) -> bool {
        let live = Live {
            root,
            tw: self,
            coalescer,
        };
        let verdict = classify_peer(ev, &live, now);
        let key = (ev.root.clone(), ev.path.clone());
        // A rename half in the tree uses up what waited for it, whatever it was.
        if own_dir_part(&ev.path).is_none() {
            match ev.kind {
                RawKind::MovedTo => {
                    self.incoming.remove(&ev.cookie);
                }
                RawKind::MovedFrom => {
                    self.backed_up.remove(&key);
                }
                _ => {}
            }
        }
        match verdict {
            PeerVerdict::NotPeer => return false,
            PeerVerdict::OwnDir => {}
            PeerVerdict::IncomingLeft => {
                self.incoming.insert(ev.cookie, (ev.root.clone(), now));
            }
            PeerVerdict::IntoBackup(path) => match coalescer.undo_move(&ev.root, ev.cookie) {
                Some((from, held)) => self.deleted(root, &from, held, coalescer, stability),
                None => self.moved_to_backup(root, path, coalescer, stability, now),
            },
            PeerVerdict::BackupDirMade(dir) => {
                // What the peer's rsync replaces it hard-links there: that path is
                // still in the tree, and not a delete.
                let mut found = Vec::new();
                files_below(
                    &root.path.join(TWO_WAY_BACKUP),
                    dir.as_bytes().to_vec(),
                    &mut found,
                );
                for p in found {
                    let p = PathBytes::new(p);
                    if std::fs::symlink_metadata(p.under(&root.path)).is_err() {
                        self.moved_to_backup(root, p, coalescer, stability, now);
                    }
                }
            }
            PeerVerdict::PeerWrote { copy, .. } => {
                self.deleted_here.remove(&key);
                self.received.insert(key.clone(), (copy, now));
                coalescer.take_held(&ev.root, &ev.path, now);
                self.undelivered.remove(&key);
                self.delivered_at.remove(&key);
                stability.forget(&key);
                self.echo(&ev.root);
                repair::execute(root, &ev.path, &verdict);
            }
            PeerVerdict::StaleRepeat => {
                self.echo(&ev.root);
                repair::execute(root, &ev.path, &verdict);
            }
            PeerVerdict::PeerDeleted { .. } => {
                coalescer.take_held(&ev.root, &ev.path, now);
                self.executed_delete(root, &ev.path, &verdict, stability);
            }
        }
        true
    }

    /// `path` (tree-relative) just appeared in the backup: the peer deleted it here.
    /// Its `moved_from` came first (a delete is held) or is still to come.
    fn moved_to_backup(
        &mut self,
        root: &Root,
        path: PathBytes,
        coalescer: &mut Coalescer,
        stability: &mut Stability,
        now: Instant,
    ) {
        match coalescer.undo_move_from(&root.name, &path) {
            Some(held) => self.deleted(root, &path, held, coalescer, stability),
            None => {
                self.backed_up.insert((root.name.clone(), path), now);
            }
        }
    }

    /// The peer deleted `path`, whose `moved_from` the coalescer has given back;
    /// `held`: it held a change of this side's own then.
    fn deleted(
        &mut self,
        root: &Root,
        path: &PathBytes,
        held: bool,
        coalescer: &Coalescer,
        stability: &mut Stability,
    ) {
        let live = Live {
            root,
            tw: self,
            coalescer,
        };
        let verdict = peer_deleted(held, live.undelivered(path));
        self.executed_delete(root, path, &verdict, stability);
    }

    /// A delete of the peer's: not sent back; the repair puts a raced change back.
    fn executed_delete(
        &mut self,
        root: &Root,
        path: &PathBytes,
        verdict: &PeerVerdict,
        stability: &mut Stability,
    ) {
        let key = (root.name.clone(), path.clone());
        self.echo(&root.name);
        self.undelivered.remove(&key);
        stability.forget(&key);
        repair::execute(root, path, verdict);
    }

    fn echo(&mut self, root: &str) {
        *self.echoes.entry(root.to_string()).or_default() += 1;
    }

    /// Echoes recognised since the last call, per root.
    pub(crate) fn take_echoes(&mut self) -> HashMap<String, u64> {
        std::mem::take(&mut self.echoes)
    }

    /// Forgets what has waited too long (at most once per [`RACE_WINDOW`]).
    pub(crate) fn prune(&mut self, now: Instant) {
        if self.next_prune.is_some_and(|t| now < t) {
            return;
        }
        self.undelivered
            .retain(|_, (t, _)| now.duration_since(*t) < UNDELIVERED_FOR);
        self.incoming
            .retain(|_, (_, t)| now.duration_since(*t) < RACE_WINDOW);
        self.backed_up
            .retain(|_, t| now.duration_since(*t) < RACE_WINDOW);
        self.received
            .retain(|_, (_, t)| now.duration_since(*t) < STALE_FOR);
        self.deleted_here
            .retain(|_, t| now.duration_since(*t) < STALE_FOR);
        self.delivered_at
            .retain(|_, (_, t)| now.duration_since(*t) < STALE_FOR);
        self.next_prune = Some(now + RACE_WINDOW);
    }

    /// `c` of a two-way root is being published: remember it until the peer has it.
    pub(crate) fn published(&mut self, root: &str, c: &Change, now: Instant) {
        let key = (root.to_string(), c.path.clone());
        if c.op == Op::Delete {
            self.deleted_here.insert(key.clone(), now);
        } else {
            self.deleted_here.remove(&key);
        }
        if matches!(c.op, Op::Upsert | Op::Move) {
            if self.undelivered.len() >= MAX_UNDELIVERED {
                // The older half goes at once: one pass per MAX/2 publishes, not one
                // per publish. Exactly half: many share one `Instant` (one `ready`
                // call).
                let mut by_time: Vec<(Instant, Key)> = self
                    .undelivered
                    .iter()
                    .map(|(k, (t, _))| (*t, k.clone()))
                    .collect();
                let mid = by_time.len() / 2;
                by_time.select_nth_unstable_by_key(mid, |(t, _)| *t);
                for (_, k) in by_time.drain(..mid) {
                    self.undelivered.remove(&k);
                }
            }
            self.undelivered.insert(key, (now, protocol::now_us()));
        }
    }

    /// What a run of a two-way root brought to the peer is no longer racing a delete.
    pub(crate) fn delivered(&mut self, d: &wire::Delivery) {
        // A change published after the run began went with a later run: the delivery
        // of one version does not cover the next.
        let carried = |published_us: u64| d.started_us == 0 || published_us <= d.started_us;
        for p in &d.paths {
            let key = (d.root.clone(), p.path.clone());
            if self
                .undelivered
                .get(&key)
                .is_some_and(|(_, us)| carried(*us))
            {
                self.undelivered.remove(&key);
                self.delivered_at.insert(key, (d.time_us, Instant::now()));
            }
        }
        for sub in &d.resyncs {
            self.undelivered
                .retain(|(root, p), (_, us)| root != &d.root || !p.is_within(sub) || !carried(*us));
        }
    }
}

/// Every non-directory below `base/rel`, as paths relative to `base`.
fn files_below(base: &std::path::Path, rel: Vec<u8>, out: &mut Vec<Vec<u8>>) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(entries) = std::fs::read_dir(base.join(std::ffi::OsStr::from_bytes(&rel))) else {
        return;
    };
    for e in entries.flatten() {
        let mut p = rel.clone();
        p.push(b'/');
        p.extend_from_slice(e.file_name().as_bytes());
        match e.file_type() {
            Ok(t) if t.is_dir() => files_below(base, p, out),
            Ok(_) => out.push(p),
            Err(_) => {}
        }
    }
}
