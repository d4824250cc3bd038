//! The watcher stage: recursive inotify on every root, raw events to the filter.
//!
//! In: the kernel's inotify events for every directory under each `[[root]]` of the
//! config (one inotify instance, a 64 KiB read buffer). Out: [`RawBatch`](protocol::wire::RawBatch)es on a PUSH
//! socket connected to the `raw` endpoint, one batch per inotify read (split at
//! [`MAX_BATCH`] events; while events stream in, one read per millisecond unless a read
//! nearly filled the buffer, see `pace.rs`), paths relative to their root as bytes. The
//! watcher decides nothing about what to sync: every directory is watched and every
//! event is passed on; exclusion and coalescing are the filter's job.
//!
//! [`run`] is the one seam; `main.rs`, `syncbus watcher` and the tests all call it.
//!
//! # Where things are
//! - `stage/mod.rs`: [`run`], the loop (one `match` over why it woke up), batches sent
//!   with a gap-free `seq`, the status, the drain at a stop.
//! - `stage/read.rs`: one inotify read (with the wait for a directory move's second
//!   half) and each event translated or acted on (`kind_of`: mask → wire kind).
//! - `stage/watches.rs`: the walk that watches a subtree, the rebuild of every root at
//!   start and after an overflow, roots gone and back.
//! - `stage/limit.rs`: the watch limit reached: a root watched in part, walked again.
//! - `pace.rs`: `Pacer`, pure: while events stream in, one read per millisecond
//!   instead of one per wake-up.
//! - `watch_map.rs`: `WatchMap`, pure: which wd is which directory, kept right across
//!   renames.
//! - `manifest.rs`: each two-way root's manifest at a clean stop.
//! - `error.rs`: [`WatcherError`], and which of them a restart cannot fix.
//!
//! # Invariants
//! - A root's `Resync ""` is sent only after every directory of that root is watched, and
//!   only for a root that exists: at start, after a queue overflow, when a root comes back.
//! - A new directory (created, or moved in from outside) is watched and walked — watches
//!   added to every directory below it — *before* its `Create`/`MovedTo` is sent, so a
//!   recursive sync of it started on that event covers everything not reported by events.
//!   Files found during such a walk are not reported.
//! - After a directory moves inside a root, every watch below it reports the new path;
//!   a directory moved out of the tree is unwatched and reports nothing more.
//! - Symlinks are never followed; paths are never decoded as UTF-8.
//! - `seq` starts at 1 and has no gaps for one `epoch` (one epoch per process); `time_us`
//!   rises with it.
//! - A batch's `read_to_us` (the crash checkpoint's start) is a time the kernel queue was
//!   found empty at (by `FIONREAD` after a read, or by a wait that had inotify in it and
//!   found nothing), said only by the last batch of what was read by then; it never goes
//!   back, and stays put while a root is missing or not watched whole.
//! - The instance limit (`EMFILE`) ends the stage with [`StageError::Environment`](protocol::stage::StageError)
//!   naming the sysctl; sysctls are never written.
//! - The watch limit (`ENOSPC`) ends nothing: the root it hit is watched in part, says
//!   so in the status file (`unwatched`, which makes `syncbus status` CRITICAL), and is
//!   walked again every [`LIMIT_RETRY`]; once every directory is watched, it is resynced
//!   (changes in the unwatched part went unseen). The other roots carry on.
//!
//! # Known problems
//! - Mounting a filesystem over a watched directory is not noticed (inotify says nothing
//!   about mounts): changes inside the new mount go unseen until the next resync.
//!   Unmounting one below a root is handled: the directory underneath is watched and
//!   resynced.
//! - A root is noticed gone only when its own directory is deleted, moved or unmounted;
//!   renaming one of the root's *ancestors* goes unseen (inotify cannot tell).
//! - A directory moved out and back in between two reads, or moved within the tree while
//!   the move pair straddles a read and the wait for the second half (10 ms) runs out, is
//!   handled as moved out then moved in: correct, but re-walked.
//! - Events queued before a `Resync` from an overflow may carry paths that the re-walk has
//!   since changed; the resync that follows makes them harmless.
//! - A rename pair split across a `MAX_BATCH` boundary lands in two batches (the filter
//!   pairs by cookie).
//! - Roots that overlap would share inodes (one wd per inode); config validation refuses
//!   them, but a bind mount or a symlinked root can still make two roots meet.
//! - A chmod of a subdirectory arrives twice (`Attrib` from its parent and from its own
//!   watch); the filter's coalescing makes that one change.
//! - A root that is missing when the config is loaded is refused by `Config::load`, so the
//!   "missing at start" path of [`run`] is reached only when a root vanishes between
//!   loading and watching.

#![warn(unreachable_pub)]

mod error;
mod manifest;
mod pace;
mod stage;
mod watch_map;

use std::time::Duration;

pub use error::WatcherError;
pub use stage::run;

/// Size of the inotify read buffer.
pub const READ_BUFFER: usize = 64 * 1024;
/// Most events in one batch; a larger read is split.
pub const MAX_BATCH: usize = 4096;
/// How long to wait for the `MOVED_TO` of a directory whose `MOVED_FROM` ended a read.
pub const MOVE_PAIR_WAIT: Duration = Duration::from_millis(10);
/// How often a missing root is looked for.
pub const ROOT_POLL: Duration = Duration::from_secs(1);
/// How often a root that hit the watch limit is walked again.
pub const LIMIT_RETRY: Duration = Duration::from_secs(5);

/// Where a cleanly stopped watcher records the time up to which it read every change
/// (µs since the Unix epoch), in the runtime dir.
pub const STOPPED_FILE: &str = "watcher.stopped";
