//! The filter stage: decides what is worth syncing and publishes the change stream.
//!
//! In: `RawBatch`es from watchers (PULL, bound on the `raw` endpoint). Out: `ChangeBatch`es
//! on the public change stream (PUB, bound on the `changes` endpoint, topic
//! `changes/<root>/`), one batch per root per flush, plus an empty batch per root every
//! [`protocol::bus::HEARTBEAT`] so subscribers notice trailing losses.
//!
//! Per event: the root's event toggles, then its exclude rules (a path is excluded when
//! it or a directory above it matches), then the [`Coalescer`].
//!
//! # Invariants
//! - `seq` is gap-free per topic for one `epoch`; the epoch is new at every start, so a
//!   subscriber knows that what this process held in memory is gone.
//! - A loss on the raw stream (a gap in a watcher's `seq`, or joining a watcher
//!   mid-stream) becomes a resync of every root: the tree is the truth.
//! - The PUB never blocks: a subscriber that falls behind by [`HWM`](protocol::bus::HWM)
//!   messages loses messages and sees the gap.
//!
//! # Known problems
//! - ZeroMQ's high-water mark counts messages, not bytes: a subscriber that stops
//!   reading can make the PUB hold up to `HWM` (100k) messages of up to
//!   `MAX_CHANGES_PER_MESSAGE` changes each before it drops. That is bounded, but can
//!   reach gigabytes in a long burst; issue #3's slow-subscriber test should bound it in
//!   bytes (smaller messages for the public topic, or a lower HWM).
//! - Every directory is watched and every event decoded even under an excluded
//!   directory; exclusion saves rsync work, not inotify work.

mod coalesce;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::bus::{self, Endpoints, Shutdown, HEARTBEAT};
use protocol::config::{Config, Events, Root};
use protocol::seq::{Seen, SeqTracker};
use protocol::stage::StageError;
use protocol::status::{self, StageStatus};
use protocol::wire::{self, Change, ChangeBatch, Op, RawBatch, RawEvent, RawKind};
use protocol::PathBytes;

pub use coalesce::{Coalescer, Timing};

/// Changes per published message (keeps single messages small for slow subscribers).
const MAX_CHANGES_PER_MESSAGE: usize = 1000;
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

/// The pure part of the stage: raw events in, changes out.
pub struct Filter {
    roots: HashMap<String, RootState>,
    coalescer: Coalescer,
    watchers: Vec<(u64, SeqTracker)>,
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
                        quiet: r.quiet,
                        max_hold: r.max_hold,
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
        if !wanted(&state.root.events, ev) {
            return;
        }
        if ev.kind != RawKind::Resync && state.excluded(ev) {
            return;
        }
        self.coalescer.push(ev, since_us, now);
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.coalescer.next_deadline()
    }

    /// Ready changes grouped by root, in first-seen order within a root.
    pub fn ready(&mut self, now: Instant) -> Vec<(String, Vec<Change>)> {
        group(self.coalescer.pop_ready(now))
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

/// Publishes change batches with a gap-free `seq` per topic.
struct Publisher {
    socket: zmq::Socket,
    epoch: u64,
    seq: HashMap<String, u64>,
    /// Changes published per root, for the status file.
    board: Arc<Mutex<StageStatus>>,
}

impl Publisher {
    fn publish(&mut self, root: &str, changes: Vec<Change>) -> Result<(), StageError> {
        let chunks: Vec<Vec<Change>> = if changes.is_empty() {
            vec![Vec::new()]
        } else {
            changes
                .chunks(MAX_CHANGES_PER_MESSAGE)
                .map(|c| c.to_vec())
                .collect()
        };
        if !changes.is_empty() {
            if let Ok(mut b) = self.board.lock() {
                let n = b.roots.entry(root.to_string()).or_default();
                n.changes = Some(n.changes.unwrap_or(0) + changes.len() as u64);
            }
        }
        for chunk in chunks {
            let seq = self.seq.entry(root.to_string()).or_insert(0);
            *seq += 1;
            if !chunk.is_empty() {
                let resyncs = chunk.iter().filter(|c| c.op == Op::Resync).count();
                tracing::debug!(
                    root,
                    seq = *seq,
                    changes = chunk.len(),
                    resyncs,
                    "publishing changes"
                );
            }
            let msg = ChangeBatch {
                version: wire::VERSION,
                epoch: self.epoch,
                seq: *seq,
                root: root.to_string(),
                time_us: protocol::now_us(),
                changes: chunk,
            };
            bus::send(&self.socket, &wire::changes_topic(root), &msg)?;
        }
        Ok(())
    }
}

/// Runs the filter stage until SIGTERM/SIGINT, then publishes what it holds and returns.
pub fn run(config: &Config, shutdown: &Shutdown) -> Result<(), StageError> {
    let endpoints = Endpoints::new(config);
    let ctx = zmq::Context::new();
    let pull = bus::socket(&ctx, zmq::PULL)?;
    bus::bind(&pull, &endpoints.raw)?;
    let publisher = bus::socket(&ctx, zmq::PUB)?;
    bus::bind(&publisher, &endpoints.changes)?;
    if let Some(tcp) = &config.tcp_changes {
        bus::bind_public(&publisher, tcp, "change stream");
    }
    let mut out = Publisher {
        socket: publisher,
        epoch: bus::new_epoch(),
        seq: HashMap::new(),
        board: Arc::new(Mutex::new(StageStatus::new("filter", protocol::now_us()))),
    };
    let _status = status::Writer::shared(&config.runtime_dir, "filter", &out.board);
    let mut filter = Filter::new(config);
    tracing::info!(
        epoch = out.epoch,
        raw = %endpoints.raw,
        changes = %endpoints.changes,
        roots = filter.roots.len(),
        "filter ready"
    );
    let mut next_heartbeat = Instant::now();
    loop {
        status::beat(&out.board);
        let now = Instant::now();
        if now >= next_heartbeat {
            for root in filter.root_names() {
                out.publish(&root, Vec::new())?;
            }
            next_heartbeat = now + HEARTBEAT;
        }
        let wake = filter
            .next_deadline()
            .map_or(next_heartbeat, |d| d.min(next_heartbeat));
        let timeout = wake.saturating_duration_since(Instant::now());
        let mut items = [
            pull.as_poll_item(zmq::POLLIN),
            zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
        ];
        match zmq::poll(&mut items, poll_ms(timeout)) {
            // A signal interrupted the wait: the loop looks at it below.
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => return Err(StageError::Failed(format!("zmq poll: {e}"))),
        }
        if items[1].is_readable() {
            shutdown.drain();
        }
        if shutdown.requested() {
            break;
        }
        // Drain what is queued, then publish what is ready: one pass per wake-up.
        for _ in 0..1024 {
            let Some((_, payload)) = bus::try_recv(&pull)? else {
                break;
            };
            match wire::decode::<RawBatch>(&payload) {
                Ok(batch) => filter.push_batch(&batch, Instant::now()),
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable raw message; resyncing every root");
                    filter.resync_all(Instant::now());
                }
            }
        }
        for (root, changes) in filter.ready(Instant::now()) {
            out.publish(&root, changes)?;
        }
    }
    // What the watcher sent before it stopped may still be queued here: take it in
    // (without waiting for more), so the drain publishes it too.
    while let Some((_, payload)) = bus::try_recv(&pull)? {
        match wire::decode::<RawBatch>(&payload) {
            Ok(batch) => filter.push_batch(&batch, Instant::now()),
            Err(_) => filter.resync_all(Instant::now()),
        }
    }
    let held = filter.flush_all();
    let n: usize = held.iter().map(|(_, c)| c.len()).sum();
    for (root, changes) in held {
        out.publish(&root, changes)?;
    }
    tracing::info!(flushed = n, "filter draining: published every held change");
    Ok(())
}

/// zmq::poll takes milliseconds; round up so a deadline is never polled early forever.
fn poll_ms(d: Duration) -> i64 {
    (d.as_micros().div_ceil(1000)) as i64
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

    #[test]
    fn poll_timeout_rounds_up() {
        assert_eq!(poll_ms(Duration::from_micros(1)), 1);
        assert_eq!(poll_ms(Duration::ZERO), 0);
    }
}
