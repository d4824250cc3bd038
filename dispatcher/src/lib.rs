//! The dispatcher stage: turns the public change stream into rsync runs, one worker
//! per target.
//!
//! **In:** `ChangeBatch`es on the `changes` SUB socket (one topic per root, heartbeats
//! included); the retrier's `JobMsg`s on the `jobs` SUB socket (acks, journal jobs to
//! run). **Out:** `Report`s to the retrier (failed work, delivered jobs, `ready`); rsync
//! processes, one per root per batch per target
//! (`--files-from=- --from0` for touched paths, `--delete` with a filter for resyncs of
//! a root, and of every directory that appeared whole).
//!
//! The stage loop ([`run`], in `stage.rs`: one `match` over its events) only decodes,
//! checks sequence numbers (`starts.rs`) and hands jobs to the workers over unbounded
//! channels (`routing.rs`; after-sync hooks in `after_hooks.rs`); each worker ([`worker`]) merges whatever arrives
//! while its rsync runs into the next batch ([`batch::Batcher`]), so batching adapts to
//! the target's speed: one run when idle, bigger batches when busy. The command line
//! and the meaning of exit codes live in [`command`], the file lists and filter rules
//! in [`plan`].
//!
//! # Invariants
//! - The SUB loop never blocks on a worker; a slow or dead target delays no other.
//! - Anything but the next in-order message of a root (first sight, gap, new epoch,
//!   undecodable message) queues a resync of the whole root for every target bound
//!   to it. The first heartbeat after start is how the initial sync happens.
//! - Never one rsync per file: a worker runs at most one incremental and one resync
//!   rsync per root per batch.
//! - Nothing acknowledged is forgotten: failed work goes to the retrier's journal and
//!   stays in the worker until the retrier acknowledges it (else the worker retries it
//!   from memory with backoff); at shutdown what is left is handed over the same way.
//! - While a target is failing, new work goes to the journal untried: the retrier's
//!   `run` jobs are the only tries, so an outage costs no rsync storm.
//! - Whole-root resyncs run in the full lane, never in front of live changes; what the
//!   live lane sent meanwhile is sent again afterwards.
//! - Each worker's `safe_us` (status) never passes a change it holds that is neither
//!   delivered nor journalled, nor a root's `safe_us` from the filter, nor anything
//!   before the root's start compare was asked for; a whole-root compare holds it at 0
//!   until done. `syncbus run` keeps it as the checkpoint a crash catches up from.
//! - After a clean stop or a crash (`syncbus run` hands the checkpoint in `CATCH_UP_ENV`), each
//!   root's start compare is a catch-up ([`catchup`]), once; any later doubt, and any
//!   start without a checkpoint, is a full compare.
//! - The stage exits 0 only when its drain left nothing behind (all delivered or
//!   journalled): that is what lets `syncbus run` trust a stop as a checkpoint.
//! - rsync never runs from a missing source root (`--delete` would wipe the mirror),
//!   and a whole-root compare from an empty root, or from one on another file system
//!   than at its last compare, deletes nothing on the target unless allowed ([`guard`]).
//! - File names reach rsync as bytes on stdin, `./`-prefixed and NUL-separated; no
//!   shell anywhere ([`command`] is the only place that spawns processes).
//!
//! # Known problems
//! - Work queued in a worker but neither run nor handed over is lost when the process
//!   is killed; its restart resyncs every root it serves (first message), which covers
//!   it at the cost of a full compare. (When everything is killed at once, `syncbus
//!   run`'s next start catches up from the workers' last `safe_us` instead, which such
//!   work held back.)
//! - The resync for a first message waits up to `FIRST_RESYNC_WAIT` for a whole-root
//!   resync in the stream (the watcher's start resync covers it, so a `syncbus run`
//!   start compares each root once). A dispatcher restarted alone therefore repairs
//!   what it lost 10 s later; a watcher that needs longer than that to set its watches
//!   still costs a second compare.
//! - Regex excludes are listed by walking the source just before a resync (rsync has no
//!   regexes) and again after it; a path that became excluded in between and went over
//!   is deleted from the target by a delete-only run. A regex-excluded file that was
//!   copied that way and deleted from the source before the second walk stays.
//! - SIGHUP is ignored here; `syncbus run` applies a new config by restarting the stages.

#![warn(unreachable_pub)]

mod after_hooks;
mod batch;
mod catchup;
mod command;
mod guard;
mod plan;
mod routing;
mod ssh;
mod stage;
mod starts;
mod worker;

pub use command::find_rsync;
pub use stage::{run, GRACE};
pub use starts::{CATCH_UP_ENV, FIRST_RESYNC_WAIT};
