//! The filter stage: decides what is worth syncing and publishes the change stream.
//!
//! In: `RawBatch`es from watchers (PULL, bound on the `raw` endpoint). Out: `ChangeBatch`es
//! on the public change stream (PUB, bound on the `changes` endpoint, topic
//! `changes/<root>/`), one batch per root per flush, plus an empty batch per root every
//! [`protocol::bus::HEARTBEAT`] so subscribers notice trailing losses.
//!
//! Per event: the root's event toggles, then its exclude rules (a path is excluded when
//! it or a directory above it matches), then the `Coalescer`.
//! A file with a usually transient name (`name~`, `4913`, rsync's `.name.XXXXXX`, …) is
//! not excluded: the coalescer holds it until it rests 1 s, so it goes out only if it
//! stays in the tree. On a two-way root the peer's writes and deletes are
//! told from local ones first, and never sent back.
//!
//! # Where things are
//! - `stage.rs`: [`run`], the loop around the `Filter` (one `match` over why it woke
//!   up), publishing with a gap-free `seq`, the drain at a stop.
//! - `filter.rs`: the `Filter` (toggles, rules and their cache, the raw stream's
//!   gaps) and `Stability`, the snapshots of `stable_ms` roots.
//! - `coalesce.rs`: the `Coalescer`, pure, time a parameter.
//! - `watermark.rs`: what the filter may vouch for in a batch's `safe_us` (the crash
//!   checkpoint): the watcher's read mark, held back by the changes held here.
//! - `two_way/`: `classify_peer` (pure: an event and what is known → a `PeerVerdict`),
//!   the state it reads (`TwoWay`), `names.rs` (own dir, versions, conflict copies) and
//!   `repair.rs`, which carries out a verdict on the tree.
//!
//! # Invariants
//! - `seq` is gap-free per topic for one `epoch`; the epoch is new at every start, so a
//!   subscriber knows that what this process held in memory is gone.
//! - A loss on the raw stream (a gap in a watcher's `seq`, or joining a watcher
//!   mid-stream) becomes a resync of every root: the tree is the truth.
//! - The PUB never blocks: a subscriber that falls behind by [`HWM`](protocol::bus::HWM)
//!   messages loses messages and sees the gap.
//! - Only `two_way/repair.rs` writes the tree (puts a file back, keeps a conflict copy or
//!   a version in the backup, re-dates, deletes again), and only on two-way roots; the
//!   rest of the crate reads it at most (sizes, mtimes, a backup directory's listing).
//!
//! # Known problems
//! - ZeroMQ's high-water mark counts messages, not bytes: a subscriber that stops
//!   reading can make the PUB hold up to `HWM` (100k) messages of up to
//!   `MAX_CHANGES_PER_MESSAGE` changes each before it drops. That is bounded, but can
//!   reach gigabytes in a long burst; the slow-subscriber test should bound it in
//!   bytes (smaller messages for the public topic, or a lower HWM).
//! - Every directory is watched and every event decoded even under an excluded
//!   directory; exclusion saves rsync work, not inotify work.

#![warn(unreachable_pub)]

mod coalesce;
mod filter;
mod stage;
mod two_way;
mod watermark;

pub use stage::run;
