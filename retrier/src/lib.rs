//! The retrier stage: the durable memory of work a target still owes.
//!
//! **In:** `Report`s on the `reports` PULL socket — `failed` work from dispatchers
//! (tried and failed, or handed over untried while its target is failing or the
//! dispatcher stops), `delivered` when a job got through, `request` from the scheduler
//! (a cron full sync), `ready` when a dispatcher (re)joins. **Out:** `JobMsg`s on the
//! `jobs` PUB socket, topic `jobs/<target>/`: an `ack` once a report is on disk, `run`
//! when a target's jobs are due, a `heartbeat` every second. Dispatchers' `Delivery`
//! messages (topic `deliveries/<target>/`) are relayed as they came on the public
//! `deliveries` PUB socket.
//!
//! Backoff is per target (`retry.initial_ms` doubling to `retry.max_s`, with jitter),
//! and a failing target is probed cheaply (a TCP connect to its daemon or ssh port, a
//! look at a local target's parent) every `retry.probe_ms`: when a probe that failed
//! succeeds again, the target's jobs go out at once instead of at the end of the backoff.
//!
//! # Invariants
//! - A report is acknowledged only after the journal transaction holding it is
//!   committed and fsync'd; a dispatcher keeps the work until the ack arrives.
//! - A job leaves the journal only when a `delivered` report names it, or when a
//!   `failed` report replaces it with the work still owed (one transaction).
//! - Never gives up: a job is retried until delivered, at worst every `retry.max_s`.
//! - A target's backlog is bounded: more than `retry.max_paths` paths collapse to
//!   resyncs of their directories (`policy::collapse`).
//! - A restart loses nothing: the journal is loaded and every job goes out again.
//!
//! # Known problems
//! - A job that is out (`run` sent) is sent again only when its dispatcher says
//!   `ready` (it restarted, or saw a gap in the job stream) or after `IN_FLIGHT`; a
//!   dispatcher that silently drops one would delay it that long.
//! - The fail log is rewritten whole (at most once a second) whenever the journal
//!   changes; with a very large backlog that is a large file.

#![warn(unreachable_pub)]

//!
//! # Where things are
//! - `stage/mod.rs`: [`run`], the loop (one `match` over why it woke up), the journal
//!   transaction of each report, the status and the fail log's copy.
//! - `stage/start.rs`: the journal opened (or moved aside when unreadable) and taken in.
//! - `stage/reports.rs`: what each kind of report does to the journal and the targets.
//! - `stage/due.rs`: heartbeats, probes started, due jobs sent.
//! - `target.rs`: one target's backoff state: failures in a row, when it is due.
//! - `probe.rs`: whether a failing target answers again, on a thread of its own.
//! - `journal.rs`, `policy.rs`, `faillog.rs`: the journal, the pure backoff and merge
//!   rules, the fail log.

mod faillog;
mod journal;
mod policy;
mod probe;
mod stage;
mod target;

use std::time::{Duration, Instant};

use protocol::config::Config;

use journal::Journal;

pub use stage::run;

/// How long a job that was sent out may stay unanswered before it is sent again.
pub const IN_FLIGHT: Duration = Duration::from_secs(600);

/// The fail log of `config`'s journal: rendered from the journal when no retrier holds
/// it, else the copy the running retrier keeps current (at most a second old).
pub fn fail_log(config: &Config) -> Result<Vec<u8>, String> {
    let dir = &config.retry.state_dir;
    let path = dir.join("journal.redb");
    if !path.exists() {
        return Ok(faillog::render(config, &[]));
    }
    match Journal::open(&path) {
        Ok(j) => {
            let jobs = j.load().map_err(|e| e.to_string())?;
            Ok(faillog::render(config, &jobs))
        }
        Err(journal::JournalError::Open { .. }) => {
            // A retrier holds the journal; a starting one writes its copy right after
            // loading the journal, so give it a moment.
            let kept = dir.join("rsync_fail_log.sh");
            let give_up = Instant::now() + Duration::from_secs(5);
            loop {
                match std::fs::read(&kept) {
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < give_up =>
                    {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    r => break r.map_err(|e| format!("cannot read `{}`: {e}", kept.display())),
                }
            }
        }
        Err(e) => Err(e.to_string()),
    }
}
