//! The Filter: raw events in, changes out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use protocol::config::{Config, Events, Root};
use protocol::seq::{Seen, SeqTracker};
use protocol::wire::{self, Change, Op, RawBatch, RawEvent, RawKind};
use protocol::PathBytes;

use crate::coalesce::{Coalescer, Timing};

/// Watchers remembered for gap detection.
const MAX_WATCHERS: usize = 16;
/// Directory exclusion decisions remembered (then forgotten all at once).
const MAX_CACHED_DIRS: usize = 65_536;

/// True when the root's event toggles let this kind of event through.
pub fn wanted(events: &Events, ev: &RawEvent) -> bool {
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

/// How long the two-way bookkeeping keeps a rename half or a path found in the backup
/// waiting for its other half.
pub const RACE_WINDOW: Duration = Duration::from_secs(2);
/// A local change of a two-way root not yet reported delivered to the peer is
/// forgotten after this (its delivery went unseen: a gap, a restarted retrier).
const UNDELIVERED_FOR: Duration = Duration::from_secs(600);
/// How long a copy the peer wrote, and a delete made here, are remembered to tell a
/// stale repeat of the copy from a new one.
const STALE_FOR: Duration = Duration::from_secs(30);
/// At most this many undelivered paths are remembered (the oldest go first).
const MAX_UNDELIVERED: usize = 100_000;

/// The pure part of the stage: raw events in, changes out.
pub struct Filter {
    roots: HashMap<String, RootState>,
    coalescer: Coalescer,
    watchers: Vec<(u64, SeqTracker)>,
    two_way: TwoWay,
}

/// What a two-way root's filter remembers to tell the peer's writes from local ones.
#[derive(Default)]
struct TwoWay {
    /// Cookies of renames out of `.syncbus/incoming/` (the peer's rsync finishing a
    /// file), waiting for their `moved_to`.
    incoming: HashMap<u32, (String, Instant)>,
    /// Local changes published and not yet reported delivered to the peer (the
    /// delivery stream): a delete from the peer that reaches one of them raced it,
    /// and the changed file wins.
    /// With when they were published (monotonic, and µs since the Unix epoch to
    /// compare with a run's start).
    undelivered: HashMap<(String, PathBytes), (Instant, u64)>,
    next_prune: Option<Instant>,
    /// Size and mtime at the last event, for roots whose files must rest (`stable`).
    snapshots: HashMap<(String, PathBytes), Option<Stat>>,
    /// The last copy the peer wrote of each path lately (size and mtime), and the paths
    /// deleted here lately: a copy the peer sends again after this side deleted it is
    /// a stale repeat (two of its runs carried it), and the delete stands.
    received: HashMap<(String, PathBytes), (Option<Stat>, Instant)>,
    deleted_here: HashMap<(String, PathBytes), Instant>,
    /// Local changes reported delivered lately: when the run ended (µs since the Unix
    /// epoch), to tell a copy the peer made before it from one made after.
    delivered_at: HashMap<(String, PathBytes), (u64, Instant)>,
    /// Paths found in the backup before their `moved_from` was read (the peer's
    /// rsync moved them into a backup directory this side did not watch yet).
    backed_up: HashMap<(String, PathBytes), Instant>,
    /// Echoes recognised since the last `take_echoes`, per root.
    echoes: HashMap<String, u64>,
}

/// Where `path` lies below a two-way root's own dir: `Some("")` for the dir itself.
fn own_dir_part(path: &PathBytes) -> Option<&[u8]> {
    let p = path.as_bytes();
    let own = protocol::config::TWO_WAY_DIR.as_bytes();
    let rest = p.strip_prefix(own)?;
    match rest {
        [] => Some(rest),
        [b'/', tail @ ..] => Some(tail),
        _ => None,
    }
}

/// The part of `own` (a path below [`protocol::config::TWO_WAY_DIR`]) below `dir`, one
/// of its subdirectories; `None` for `dir` itself and anything outside it.
fn below<'a>(own: &'a [u8], dir: &str) -> Option<&'a [u8]> {
    let dir = &dir.as_bytes()[protocol::config::TWO_WAY_DIR.len() + 1..];
    match own.strip_prefix(dir)? {
        [b'/', rest @ ..] if !rest.is_empty() => Some(rest),
        _ => None,
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

/// `DIR/NAME.conflict-<UTC time>` for `DIR/NAME` (bytes kept as they are).
fn conflict_name(file: &std::path::Path, at: std::time::SystemTime) -> std::path::PathBuf {
    let stamp = chrono::DateTime::<chrono::Utc>::from(at).format("%Y%m%dT%H%M%SZ");
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".conflict-{stamp}"));
    file.with_file_name(name)
}

/// The backup holds one copy per path, which the peer's next replace or delete of
/// the path would overwrite: the copy just made is renamed `NAME~<ns since the epoch>`
/// at once (found in review of a CI run: a quick second replace lost a loser).
fn keep_version(kept: &std::path::Path) {
    if std::fs::symlink_metadata(kept).is_err() {
        return;
    }
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut name = kept.file_name().unwrap_or_default().to_os_string();
    name.push(format!("~{ns}"));
    let _ = std::fs::rename(kept, kept.with_file_name(name));
}

/// A backup version made by [`keep_version`]: `~` and digits at the end.
fn is_version(path: &[u8]) -> bool {
    let digits = path.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && path.len() > digits && path[path.len() - digits - 1] == b'~'
}

/// A file's mtime in µs since the Unix epoch.
fn mtime_us(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some(m.mtime().max(0) as u64 * 1_000_000 + m.mtime_nsec() as u64 / 1000)
}

/// Size, mtime seconds and nanoseconds of a file.
type Stat = (u64, i64, i64);

/// Size and mtime of a file (`None` when it is gone or not a file).
fn stat_of(path: &std::path::Path) -> Option<Stat> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    m.is_file().then(|| (m.size(), m.mtime(), m.mtime_nsec()))
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
    pub fn new(config: &Config) -> Self {
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
            two_way: TwoWay::default(),
        }
    }

    /// Takes one batch from a watcher.
    pub fn push_batch(&mut self, batch: &RawBatch, now: Instant) {
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

    pub fn resync_all(&mut self, now: Instant) {
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

    pub fn push_event(&mut self, ev: &RawEvent, since_us: u64, now: Instant) {
        let Some(state) = self.roots.get_mut(&ev.root) else {
            tracing::warn!(root = %ev.root, "event for a root this filter does not know; dropped");
            return;
        };
        if state.root.two_way && ev.kind != RawKind::Resync && self.peer_event(ev, now) {
            return;
        }
        let Some(state) = self.roots.get_mut(&ev.root) else {
            return;
        };
        if !wanted(&state.root.events, ev) {
            return;
        }
        if ev.kind != RawKind::Resync && state.excluded(ev) {
            return;
        }
        if !state.root.stable.is_zero() {
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
                let snap = stat_of(&ev.path.under(&state.root.path));
                self.two_way.snapshots.insert(key, snap);
            } else if matches!(ev.kind, RawKind::Delete | RawKind::MovedFrom) {
                self.two_way.snapshots.remove(&key);
            }
        }
        self.coalescer.push(ev, since_us, now);
    }

    /// A two-way root's event that is the peer's doing, or syncbus's own dir: handled
    /// here (true) and never sent back. The peer's rsync writes a file in
    /// `.syncbus/incoming/` and renames it into place; what it replaces or deletes it
    /// moves into `.syncbus/backup/`.
    fn peer_event(&mut self, ev: &RawEvent, now: Instant) -> bool {
        let tw = &mut self.two_way;
        if let Some(own) = own_dir_part(&ev.path) {
            let incoming = below(own, protocol::config::TWO_WAY_INCOMING);
            let backup = below(own, protocol::config::TWO_WAY_BACKUP);
            match (ev.kind, incoming, backup) {
                (RawKind::MovedFrom, Some(_), _) => {
                    tw.incoming.insert(ev.cookie, (ev.root.clone(), now));
                }
                (RawKind::MovedTo, _, Some(path)) if !is_version(path) => {
                    let path = PathBytes::new(path.to_vec());
                    match self.coalescer.undo_move(&ev.root, ev.cookie) {
                        Some((from, held)) => self.peer_deleted(&ev.root, &from, held),
                        None => self.moved_to_backup(&ev.root, path, now),
                    }
                }
                // The peer's rsync makes the backup's directories as it needs them, and
                // moves deleted files in before this side watches them. (What it
                // replaces it hard-links there: that path is still in the tree.)
                (RawKind::Create, _, Some(path)) if ev.dir => {
                    let Some(state) = self.roots.get(&ev.root) else {
                        return true;
                    };
                    let tree = state.root.path.clone();
                    let backup_root = tree.join(protocol::config::TWO_WAY_BACKUP);
                    let mut found = Vec::new();
                    files_below(&backup_root, path.to_vec(), &mut found);
                    for p in found {
                        let p = PathBytes::new(p);
                        if std::fs::symlink_metadata(p.under(&tree)).is_err() {
                            self.moved_to_backup(&ev.root, p, now);
                        }
                    }
                }
                _ => {}
            }
            return true;
        }
        match ev.kind {
            RawKind::MovedTo => {
                let fresh = |t: &Instant| now.duration_since(*t) < RACE_WINDOW;
                if let Some((root, _)) = tw.incoming.remove(&ev.cookie).filter(|(_, t)| fresh(t)) {
                    if root == ev.root && self.stale_repeat(&ev.root, &ev.path, now) {
                        return true;
                    }
                    let tw = &mut self.two_way;
                    if root == ev.root {
                        // The peer's version, which it has. rsync's `--update` kept
                        // anything newer here when the run began; a change made here
                        // while the file was in flight is newer, and goes back.
                        let key = (ev.root.clone(), ev.path.clone());
                        let held = self.coalescer.take_held(&ev.root, &ev.path, now);
                        let undelivered = tw.undelivered.remove(&key).is_some();
                        // Delivered, but after the peer made its copy: the peer had not
                        // seen it (a conflict), unlike an edit made over it there.
                        let crossed = tw.delivered_at.remove(&key).is_some_and(|(at_us, _)| {
                            self.roots.get(&ev.root).is_some_and(|r| {
                                mtime_us(&ev.path.under(&r.root.path)).is_some_and(|m| m < at_us)
                            })
                        });
                        tw.snapshots.remove(&key);
                        *tw.echoes.entry(ev.root.clone()).or_default() += 1;
                        self.keep_newer(&ev.root, &ev.path, held || undelivered || crossed);
                        return true;
                    }
                }
            }
            RawKind::MovedFrom => {
                // Already found in the backup (its `moved_to` went unseen).
                let key = (ev.root.clone(), ev.path.clone());
                let fresh = |t: Instant| now.duration_since(t) < RACE_WINDOW;
                if tw.backed_up.remove(&key).is_some_and(fresh) {
                    let held = self.coalescer.take_held(&ev.root, &ev.path, now);
                    self.peer_deleted(&ev.root, &ev.path, held);
                    return true;
                }
            }
            _ => {}
        }
        false
    }

    /// The peer's copy of `path` just landed: true (and the copy is deleted again) when
    /// it is the same copy as the peer's last, which this side has deleted since.
    fn stale_repeat(&mut self, root: &str, path: &PathBytes, now: Instant) -> bool {
        let Some(state) = self.roots.get(root) else {
            return false;
        };
        let file = path.under(&state.root.path);
        let current = stat_of(&file);
        let key = (root.to_string(), path.clone());
        let tw = &mut self.two_way;
        // Deleted here and not written again since (a change held here, or published:
        // that one clears `deleted_here`, found in review).
        let deleted_since = self.coalescer.pending_delete(root, path)
            || (tw.deleted_here.contains_key(&key) && !self.coalescer.holds_change(root, path));
        let same = tw.received.get(&key).is_some_and(|(s, t)| {
            current.is_some() && *s == current && now.duration_since(*t) < STALE_FOR
        });
        if deleted_since && same {
            *tw.echoes.entry(root.to_string()).or_default() += 1;
            // The unlink is this side's delete once more, and goes to the peer.
            if let Err(e) = std::fs::remove_file(&file) {
                tracing::warn!(root, path = %path, error = %e, "cannot delete again a copy the peer sent twice");
            }
            return true;
        }
        tw.deleted_here.remove(&key);
        tw.received.insert(key, (current, now));
        false
    }

    /// `path` (tree-relative) just appeared in the backup: the peer deleted it here.
    /// Its `moved_from` came first (a delete is pending) or is still to come.
    fn moved_to_backup(&mut self, root: &str, path: PathBytes, now: Instant) {
        match self.coalescer.undo_move_from(root, &path) {
            Some(held) => self.peer_deleted(root, &path, held),
            None => {
                self.two_way.backed_up.insert((root.to_string(), path), now);
            }
        }
    }

    /// The peer deleted `path` here (moved it into the backup). Not sent back; and if
    /// this side's change of it had not reached the peer yet (`held`: still waiting
    /// here; or published and not reported delivered), the delete raced it: the
    /// changed file wins and goes back.
    fn peer_deleted(&mut self, root: &str, path: &PathBytes, held: bool) {
        let tw = &mut self.two_way;
        *tw.echoes.entry(root.to_string()).or_default() += 1;
        let key = (root.to_string(), path.clone());
        let racing = tw.undelivered.remove(&key).is_some();
        tw.snapshots.remove(&key);
        if held || racing {
            self.keep_changed(root, path);
        }
        if let Some(state) = self.roots.get(root) {
            let kept = path.under(&state.root.path.join(protocol::config::TWO_WAY_BACKUP));
            keep_version(&kept);
        }
    }

    /// A delete from the peer raced a change made here: the changed file goes back
    /// where it was (from the backup the peer's rsync moved it to), and that rename is
    /// an ordinary change that goes to the peer.
    fn keep_changed(&self, root: &str, path: &PathBytes) {
        let Some(state) = self.roots.get(root) else {
            return;
        };
        let to = path.under(&state.root.path);
        let from = path.under(&state.root.path.join(protocol::config::TWO_WAY_BACKUP));
        if std::fs::symlink_metadata(&to).is_ok() {
            return; // something is there again already
        }
        if let Some(parent) = to.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        match std::fs::rename(&from, &to) {
            Ok(()) => {
                tracing::info!(root, path = %path, "a delete from the peer raced a change made here; kept the changed file")
            }
            Err(e) => {
                tracing::warn!(root, path = %path, error = %e, "a delete from the peer raced a change made here; could not put the file back (it is in the backup dir)")
            }
        }
    }

    /// The peer's copy of `path` just replaced the one here (which rsync hard-linked
    /// into the backup). If the replaced copy is the newer, it goes back in place, and
    /// from there to the peer: rsync's `--update` compares whole seconds, and checks
    /// when its run begins, so an edit made here within the same second, or while the
    /// copy was in flight, would lose. `conflict`: the replaced copy was a change made
    /// here that had not reached the peer.
    fn keep_newer(&self, root: &str, path: &PathBytes, conflict: bool) {
        use std::os::unix::fs::MetadataExt;
        let Some(state) = self.roots.get(root) else {
            return;
        };
        let here = path.under(&state.root.path);
        let kept = path.under(&state.root.path.join(protocol::config::TWO_WAY_BACKUP));
        let times = |p: &std::path::Path| {
            std::fs::symlink_metadata(p)
                .ok()
                .map(|m| ((m.mtime(), m.mtime_nsec()), (m.ctime(), m.ctime_nsec())))
        };
        let Some(((theirs, _), (ours, linked))) = times(&here).zip(times(&kept)) else {
            return;
        };
        // Only a backup this run made (linked just now): an older one is of another
        // replace or delete, long ago.
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if now_s - linked.0 > 5 {
            return;
        }
        if ours > theirs {
            match std::fs::rename(&kept, &here) {
                Ok(()) => {
                    // A microsecond later: a run of ours may have sent the peer's
                    // copy's bytes under this file's size and mtime (it was replaced
                    // under rsync's feet), and the quick check must not take that for
                    // this. Still the newer of the two (not "now": clocks may differ).
                    let later = std::time::UNIX_EPOCH
                        + Duration::new(ours.0.max(0) as u64, ours.1.clamp(0, 999_999_999) as u32)
                        + Duration::from_micros(1);
                    let _ = std::fs::File::options()
                        .write(true)
                        .open(&here)
                        .and_then(|f| f.set_modified(later));
                    tracing::info!(root, path = %path, "the peer's copy replaced a newer change made here while it was in flight; put the newer one back")
                }
                Err(e) => {
                    tracing::warn!(root, path = %path, error = %e, "could not put back a newer change the peer's copy replaced (it is in the backup dir)")
                }
            }
        } else if conflict && state.root.conflict_copies {
            // A change made here lost to a newer one of the peer: a conflict. Its
            // copy beside the file is a new file here, and goes to the peer too.
            let copy = conflict_name(&here, std::time::SystemTime::now());
            match std::fs::hard_link(&kept, &copy) {
                Ok(()) => {
                    tracing::info!(root, path = %path, "a change made here lost to a newer one of the peer; kept it as a conflict copy")
                }
                Err(e) => {
                    tracing::warn!(root, path = %path, error = %e, "could not keep a conflict copy (the losing change is in the backup dir)")
                }
            }
            keep_version(&kept);
        } else {
            keep_version(&kept);
        }
    }

    /// Two-way roots: echoes recognised since the last call, per root.
    pub fn take_echoes(&mut self) -> HashMap<String, u64> {
        std::mem::take(&mut self.two_way.echoes)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.coalescer.next_deadline()
    }

    /// Ready changes grouped by root, in first-seen order within a root.
    pub fn ready(&mut self, now: Instant) -> Vec<(String, Vec<Change>)> {
        let tw = &mut self.two_way;
        if tw.next_prune.is_none_or(|t| now >= t) {
            tw.undelivered
                .retain(|_, (t, _)| now.duration_since(*t) < UNDELIVERED_FOR);
            tw.incoming
                .retain(|_, (_, t)| now.duration_since(*t) < RACE_WINDOW);
            tw.backed_up
                .retain(|_, t| now.duration_since(*t) < RACE_WINDOW);
            tw.received
                .retain(|_, (_, t)| now.duration_since(*t) < STALE_FOR);
            tw.deleted_here
                .retain(|_, t| now.duration_since(*t) < STALE_FOR);
            tw.delivered_at
                .retain(|_, (_, t)| now.duration_since(*t) < STALE_FOR);
            tw.next_prune = Some(now + RACE_WINDOW);
        }
        let mut out = self.coalescer.pop_ready(now);
        if !self.two_way.snapshots.is_empty() || self.roots.values().any(|r| r.root.two_way) {
            out.retain(|(root, c)| self.settled(root, c, now));
        }
        group(out)
    }

    /// For roots whose files must rest: a file whose size or mtime moved since its
    /// last event (a write inotify did not report, through mmap) is held once more.
    /// Two-way roots also remember what they publish, for [`RACE_WINDOW`].
    fn settled(&mut self, root: &str, c: &Change, now: Instant) -> bool {
        let Some(state) = self.roots.get(root) else {
            return true;
        };
        let key = (root.to_string(), c.path.clone());
        if c.op == Op::Upsert && !c.dir {
            if let Some(snap) = self.two_way.snapshots.remove(&key) {
                let current = stat_of(&c.path.under(&state.root.path));
                if current != snap {
                    self.two_way.snapshots.insert(key.clone(), current);
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
            }
        }
        if c.op == Op::Move {
            self.two_way.snapshots.remove(&key);
        }
        if state.root.two_way {
            if c.op == Op::Delete {
                self.two_way.deleted_here.insert(key.clone(), now);
            } else {
                self.two_way.deleted_here.remove(&key);
            }
        }
        if state.root.two_way && matches!(c.op, Op::Upsert | Op::Move) {
            let tw = &mut self.two_way;
            if tw.undelivered.len() >= MAX_UNDELIVERED {
                // The older half goes at once (one pass per MAX/2 publishes, not one
                // per publish: found in review).
                // Exactly half: many share one `Instant` (one `ready` call).
                let mut by_time: Vec<(Instant, (String, PathBytes))> = tw
                    .undelivered
                    .iter()
                    .map(|(k, (t, _))| (*t, k.clone()))
                    .collect();
                let mid = by_time.len() / 2;
                by_time.select_nth_unstable_by_key(mid, |(t, _)| *t);
                for (_, k) in by_time.drain(..mid) {
                    tw.undelivered.remove(&k);
                }
            }
            tw.undelivered.insert(key, (now, protocol::now_us()));
        }
        true
    }

    /// Two-way roots: what a run brought to the peer is no longer racing a delete.
    pub fn delivered(&mut self, d: &wire::Delivery) {
        if !d.ok || !self.roots.get(&d.root).is_some_and(|r| r.root.two_way) {
            return;
        }
        // A change published after the run began went with a later run (found in
        // review: the delivery of v1 must not clear v2).
        let carried = |published_us: u64| d.started_us == 0 || published_us <= d.started_us;
        let tw = &mut self.two_way;
        for p in &d.paths {
            let key = (d.root.clone(), p.path.clone());
            if tw.undelivered.get(&key).is_some_and(|(_, us)| carried(*us)) {
                tw.undelivered.remove(&key);
                tw.delivered_at.insert(key, (d.time_us, Instant::now()));
            }
        }
        for sub in &d.resyncs {
            tw.undelivered
                .retain(|(root, p), (_, us)| root != &d.root || !p.is_within(sub) || !carried(*us));
        }
    }

    /// The targets whose deliveries [`Filter::delivered`] wants: the two-way ones.
    pub fn two_way_targets(config: &Config) -> Vec<String> {
        config
            .targets
            .iter()
            .filter(|t| t.two_way)
            .map(|t| t.name.clone())
            .collect()
    }

    pub fn flush_all(&mut self) -> Vec<(String, Vec<Change>)> {
        group(self.coalescer.flush_all())
    }

    pub fn root_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.roots.keys().cloned().collect();
        v.sort();
        v
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
mod tests {
    use super::*;

    fn config(extra: &str) -> (tempfile::TempDir, Config) {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("src")).unwrap();
        let file = t.path().join("c.toml");
        let text = format!("[[root]]\nname = \"r\"\npath = \"src\"\n{extra}");
        let c = Config::parse(&text, &file).unwrap();
        (t, c)
    }

    fn raw(seq: u64, events: Vec<RawEvent>) -> RawBatch {
        RawBatch {
            version: wire::VERSION,
            epoch: 42,
            seq,
            time_us: 0,
            events,
        }
    }

    fn ev(kind: RawKind, path: &str) -> RawEvent {
        RawEvent {
            root: "r".into(),
            path: path.into(),
            kind,
            dir: false,
            cookie: 0,
        }
    }

    fn paths(out: &[(String, Vec<Change>)]) -> Vec<String> {
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

    const PEER: &str =
        "[[target]]\nname = \"peer\"\nurl = \"rsync://127.0.0.1:9/m/\"\ntwo_way = true\n";

    /// A filter for a two-way root (no rest time), its dir, and the root's path.
    fn two_way() -> (tempfile::TempDir, Filter, std::path::PathBuf) {
        let (t, c) = config(&format!("stable_ms = 0\n{PEER}"));
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join(".syncbus/backup")).unwrap();
        (t, Filter::new(&c), src)
    }

    /// The peer's report that `path` reached it, by a run that began at `started_us`.
    fn delivery(path: &str, started_us: u64) -> wire::Delivery {
        wire::Delivery {
            version: wire::VERSION,
            epoch: 1,
            seq: 1,
            target: "peer".into(),
            root: "r".into(),
            ok: true,
            time_us: 0,
            paths: vec![wire::Delivered {
                path: path.into(),
                since_us: 0,
            }],
            resyncs: Vec::new(),
            attempt: 0,
            error: String::new(),
            started_us,
        }
    }

    fn mv(kind: RawKind, path: &str, cookie: u32) -> RawEvent {
        RawEvent {
            cookie,
            ..ev(kind, path)
        }
    }

    #[test]
    fn the_peers_writes_and_deletes_are_not_sent_back() {
        let (_t, mut f, _) = two_way();
        let t0 = Instant::now();
        f.push_batch(
            &raw(
                1,
                vec![
                    // The peer's rsync: a new file, a replaced one, a deleted one.
                    ev(RawKind::Create, ".syncbus/incoming/new.Ab12Cd"),
                    ev(RawKind::CloseWrite, ".syncbus/incoming/new.Ab12Cd"),
                    mv(RawKind::MovedFrom, ".syncbus/incoming/new.Ab12Cd", 1),
                    mv(RawKind::MovedTo, "d/new", 1),
                    ev(RawKind::Modify, "old"), // a local change, then the peer's newer one
                    mv(RawKind::MovedFrom, ".syncbus/incoming/old.Xy34Zw", 2),
                    mv(RawKind::MovedTo, "old", 2),
                    mv(RawKind::MovedFrom, "gone", 3),
                    mv(RawKind::MovedTo, ".syncbus/backup/gone", 3),
                    // A user's own rename out of an unrelated hidden dir still counts.
                    mv(RawKind::MovedFrom, ".cache/x", 4),
                    mv(RawKind::MovedTo, "x", 4),
                    ev(RawKind::CloseWrite, "mine"),
                ],
            ),
            t0,
        );
        let out = f.ready(t0 + Duration::from_secs(2));
        assert_eq!(paths(&out), vec!["x", "mine"]);
        assert_eq!(f.take_echoes().get("r"), Some(&3));
    }

    #[test]
    fn a_file_made_and_removed_inside_the_window_is_still_a_delete_on_a_two_way_root() {
        // The peer may have fetched it meanwhile (a fetch-back of its own).
        let (_t, mut f, _) = two_way();
        let t0 = Instant::now();
        f.push_batch(
            &raw(
                1,
                vec![
                    ev(RawKind::Create, "brief"),
                    ev(RawKind::CloseWrite, "brief"),
                    ev(RawKind::Delete, "brief"),
                ],
            ),
            t0,
        );
        let out = f.ready(t0 + Duration::from_secs(1));
        assert_eq!(paths(&out), vec!["brief"]);
        assert_eq!(out[0].1[0].op, Op::Delete);
    }

    #[test]
    fn a_delete_into_a_backup_dir_not_watched_yet_is_still_the_peers() {
        let (_t, mut f, src) = two_way();
        let backup = src.join(".syncbus/backup");
        std::fs::create_dir_all(backup.join("d/e")).unwrap();
        std::fs::write(backup.join("d/e/g"), "g").unwrap();
        std::fs::write(backup.join("d/h"), "h").unwrap();
        let t0 = Instant::now();
        let mut dir = ev(RawKind::Create, ".syncbus/backup/d");
        dir.dir = true;
        f.push_batch(
            &raw(
                1,
                vec![
                    // The `moved_to` into the new, unwatched dir is never seen: one
                    // `moved_from` is read before the directory is, one after.
                    mv(RawKind::MovedFrom, "d/e/g", 11),
                    dir,
                    mv(RawKind::MovedFrom, "d/h", 12),
                ],
            ),
            t0,
        );
        assert!(paths(&f.ready(t0 + Duration::from_secs(2))).is_empty());
        assert_eq!(f.take_echoes().get("r"), Some(&2));
    }

    #[test]
    fn a_replaced_file_in_a_new_backup_dir_is_not_a_delete() {
        // rsync hard-links what it replaces into the backup: the path stays in the
        // tree, and a later move of it here is the user's (found in review).
        let (_t, mut f, src) = two_way();
        std::fs::create_dir_all(src.join(".syncbus/backup/d")).unwrap();
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join(".syncbus/backup/d/f"), "old").unwrap();
        std::fs::write(src.join("d/f"), "new").unwrap();
        let t0 = Instant::now();
        let mut dir = ev(RawKind::Create, ".syncbus/backup/d");
        dir.dir = true;
        f.push_batch(&raw(1, vec![dir]), t0);
        f.push_batch(
            &raw(
                2,
                vec![
                    mv(RawKind::MovedFrom, "d/f", 21),
                    mv(RawKind::MovedTo, "d/g", 21),
                ],
            ),
            t0 + Duration::from_millis(10),
        );
        let out = f.ready(t0 + Duration::from_secs(1));
        assert_eq!(out[0].1.len(), 1, "{out:?}");
        assert_eq!(out[0].1[0].op, Op::Move);
        assert_eq!(out[0].1[0].from, Some("d/f".into()));
    }

    #[test]
    fn a_change_made_while_the_peers_copy_was_in_flight_goes_back_if_newer() {
        let (_t, mut f, src) = two_way();
        let at = |secs| std::time::UNIX_EPOCH + Duration::from_secs(secs);
        // The peer's copy (older) replaced this side's edit (newer), which rsync
        // hard-linked into the backup.
        std::fs::write(src.join("f"), "theirs").unwrap();
        std::fs::File::options()
            .write(true)
            .open(src.join("f"))
            .unwrap()
            .set_modified(at(1_000_000))
            .unwrap();
        std::fs::write(src.join(".syncbus/backup/f"), "ours").unwrap();
        let t0 = Instant::now();
        f.push_batch(
            &raw(
                1,
                vec![
                    ev(RawKind::CloseWrite, "f"),
                    mv(RawKind::MovedFrom, ".syncbus/incoming/f.Ab12Cd", 31),
                    mv(RawKind::MovedTo, "f", 31),
                ],
            ),
            t0,
        );
        assert_eq!(std::fs::read(src.join("f")).unwrap(), b"ours");
    }

    #[test]
    fn a_copy_the_peer_sends_again_after_a_delete_here_is_deleted_again() {
        let (_t, mut f, src) = two_way();
        let file = src.join("twice");
        let land = |f: &mut Filter, seq: u64, cookie: u32, at: Instant| {
            std::fs::write(&file, "the peer's copy").unwrap();
            std::fs::File::options()
                .write(true)
                .open(&file)
                .unwrap()
                .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000))
                .unwrap();
            f.push_batch(
                &raw(
                    seq,
                    vec![
                        mv(RawKind::MovedFrom, ".syncbus/incoming/twice.Ab12Cd", cookie),
                        mv(RawKind::MovedTo, "twice", cookie),
                    ],
                ),
                at,
            );
        };
        let t0 = Instant::now();
        land(&mut f, 1, 51, t0);
        assert!(f.ready(t0 + Duration::from_millis(50)).is_empty());
        // Deleted here; the peer's second run brings the same copy again.
        std::fs::remove_file(&file).unwrap();
        f.push_batch(&raw(2, vec![ev(RawKind::Delete, "twice")]), t0);
        land(&mut f, 3, 52, t0 + Duration::from_millis(5));
        assert!(!file.exists(), "the delete made here stands");
        let out = f.ready(t0 + Duration::from_millis(100));
        assert_eq!(out[0].1[0].op, Op::Delete);
        // Written here again (and published) before a third repeat lands: no longer
        // deleted here, so the copy is the peer's and the file stays (found in review).
        std::fs::write(&file, "mine again").unwrap();
        f.push_batch(&raw(4, vec![ev(RawKind::CloseWrite, "twice")]), t0);
        assert_eq!(
            paths(&f.ready(t0 + Duration::from_millis(150))),
            vec!["twice"]
        );
        land(&mut f, 5, 54, t0 + Duration::from_millis(160));
        assert!(file.exists(), "a file written here again is not deleted");
        // A new copy from the peer (another mtime) is a change of its own: it stays.
        std::fs::write(&file, "new").unwrap();
        f.push_batch(
            &raw(
                6,
                vec![
                    mv(RawKind::MovedFrom, ".syncbus/incoming/twice.Zz99Yy", 53),
                    mv(RawKind::MovedTo, "twice", 53),
                ],
            ),
            t0 + Duration::from_millis(200),
        );
        assert!(file.exists());
    }

    #[test]
    fn the_delivery_of_an_earlier_version_does_not_cover_a_later_one() {
        let (_t, mut f, src) = two_way();
        let t0 = Instant::now();
        f.push_batch(&raw(1, vec![ev(RawKind::CloseWrite, "v")]), t0);
        assert_eq!(paths(&f.ready(t0 + Duration::from_millis(50))), vec!["v"]);
        let started_us = protocol::now_us();
        while protocol::now_us() <= started_us {}
        let t1 = t0 + Duration::from_millis(100);
        f.push_batch(&raw(2, vec![ev(RawKind::CloseWrite, "v")]), t1);
        assert_eq!(paths(&f.ready(t1 + Duration::from_millis(50))), vec!["v"]);
        // The run that began before the second version was published reports.
        f.delivered(&delivery("v", started_us));
        std::fs::write(src.join(".syncbus/backup/v"), "second").unwrap();
        let t2 = t1 + Duration::from_millis(200);
        f.push_batch(
            &raw(
                3,
                vec![
                    mv(RawKind::MovedFrom, "v", 41),
                    mv(RawKind::MovedTo, ".syncbus/backup/v", 41),
                ],
            ),
            t2,
        );
        assert_eq!(std::fs::read(src.join("v")).unwrap(), b"second");
    }

    #[test]
    fn a_delete_from_the_peer_that_races_a_local_change_is_taken_back() {
        let (_t, mut f, src) = two_way();
        let t0 = Instant::now();
        // Changed here and published: then the peer's delete arrives (its rsync moved
        // the file into the backup dir).
        f.push_batch(&raw(1, vec![ev(RawKind::CloseWrite, "edited")]), t0);
        assert_eq!(
            paths(&f.ready(t0 + Duration::from_millis(50))),
            vec!["edited"]
        );
        std::fs::write(src.join(".syncbus/backup/edited"), "mine").unwrap();
        let t1 = t0 + Duration::from_millis(100);
        f.push_batch(
            &raw(
                2,
                vec![
                    mv(RawKind::MovedFrom, "edited", 7),
                    mv(RawKind::MovedTo, ".syncbus/backup/edited", 7),
                ],
            ),
            t1,
        );
        assert_eq!(std::fs::read(src.join("edited")).unwrap(), b"mine");
        // A delete of a change the peer already had is the peer's to make.
        f.push_batch(&raw(3, vec![ev(RawKind::CloseWrite, "old")]), t1);
        assert_eq!(paths(&f.ready(t1 + Duration::from_millis(50))), vec!["old"]);
        f.delivered(&delivery("old", 0));
        std::fs::write(src.join(".syncbus/backup/old"), "old").unwrap();
        let late = t1 + Duration::from_millis(100);
        f.push_batch(
            &raw(
                4,
                vec![
                    mv(RawKind::MovedFrom, "old", 8),
                    mv(RawKind::MovedTo, ".syncbus/backup/old", 8),
                ],
            ),
            late,
        );
        assert!(!src.join("old").exists());
        assert!(paths(&f.ready(late + Duration::from_secs(1))).is_empty());
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
