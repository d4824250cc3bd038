//! What each running stage says about itself, for `syncbus status` and `/metrics`.
//!
//! Every stage keeps a small JSON file, `<runtime_dir>/status/<name>.json`, rewritten
//! once a second by a thread of its own ([`Writer`]) and removed when the stage stops
//! clean. Readers never talk to a stage: a stage that hangs or dies cannot hang a
//! probe, and a file that stopped changing (or names a pid that is gone) says so.
//!
//! # Invariants
//! - A file is replaced whole (written beside it, then renamed): a reader never sees
//!   half of one.
//! - Times are absolute (µs since the Unix epoch); readers compute ages, so a snapshot
//!   read late still gives the right lag.
//! - Liveness is the main loop's own heartbeat (`alive_us`, stamped at least once a
//!   second), never the writer thread's: a stage stuck in its loop goes silent.
//! - Only counts and times: no file names, so the files leak nothing of the tree.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Version of the status files' layout.
pub const VERSION: u16 = 1;
/// How often a stage rewrites its file.
pub const EVERY: Duration = Duration::from_secs(1);
/// A file older than this belongs to a stage that is hung or gone.
pub const STALE: Duration = Duration::from_secs(10);

/// One stage's file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageStatus {
    /// The format's version ([`VERSION`]).
    pub version: u16,
    /// `watcher`, `filter`, `dispatcher`, `retrier`, `scheduler` or `supervisor`.
    pub stage: String,
    /// The stage's process id (a dead pid means the stage is down).
    pub pid: u32,
    /// When the stage started (µs).
    pub started_us: u64,
    /// When this file was written (µs).
    pub updated_us: u64,
    /// When the stage's main loop last went round ([`beat`]); the file's writer is a
    /// thread of its own, so a stage whose loop is stuck shows here, not in
    /// `updated_us`.
    #[serde(default)]
    pub alive_us: u64,
    /// What the stage cannot do now and why (the retrier: its journal cannot be
    /// written); empty when all is well.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub problem: String,
    /// Per root (watcher, filter).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub roots: BTreeMap<String, RootStatus>,
    /// Per target (dispatcher, retrier).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, TargetStatus>,
    /// The stages a supervisor runs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stages: BTreeMap<String, ChildStatus>,
    /// Where `/metrics` is served (the metrics stage), e.g. `127.0.0.1:9477`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub listen: String,
    /// Next run of each schedule (scheduler), µs; keyed by the cron line.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub schedules: BTreeMap<String, u64>,
}

/// What the watcher (watches, events, overflows) and the filter (changes) know of a root.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RootStatus {
    /// Directories watched (watcher).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watches: Option<u64>,
    /// Raw inotify events read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
    /// Kernel queue overflows (each one healed by a resync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overflows: Option<u64>,
    /// Coalesced changes published on the change stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<u64>,
    /// Two-way roots: writes and deletes of the peer, recognised and not sent back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echoes: Option<u64>,
    /// Why some directories of the root are not watched (the inotify watch limit), so
    /// that changes in them go unseen; empty when all are.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unwatched: String,
}

/// What the dispatcher (live work, runs) or the retrier (journal) knows of a target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// Paths and subtrees owed (dispatcher: queued and running; retrier: journalled).
    pub backlog: u64,
    /// When the oldest change not yet delivered happened (µs; 0 when none is owed).
    pub oldest_us: u64,
    /// Runs that failed in a row (0 once one succeeds).
    pub failures: u32,
    /// When a run last succeeded (µs; 0: never).
    #[serde(default)]
    pub last_success_us: u64,
    /// Why the last run failed; empty after a success.
    #[serde(default)]
    pub last_error: String,
    /// Runs (rsync, command, webhook) and the failed ones among them (dispatcher).
    #[serde(default)]
    pub runs: u64,
    /// Failed runs, of `runs`.
    #[serde(default)]
    pub failed_runs: u64,
    /// Failed runs of an `on_failure = "log"` target: logged, not retried.
    #[serde(default)]
    pub ignored_failures: u64,
    /// What rsync reported as sent, all runs summed (dispatcher, rsync targets).
    #[serde(default)]
    pub bytes_sent: u64,
    /// Whole-root compares per root, the initial one first (dispatcher).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub full: BTreeMap<String, FullStatus>,
    /// When the retrier tries again (µs; 0: not waiting).
    #[serde(default)]
    pub next_retry_us: u64,
    /// Roots whose whole-root compare the root guard refused (an empty root, or one
    /// on another file system), with the reason; cleared by a compare that succeeds.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<String, String>,
    /// Paths (`root/path`) that could not be sent even alone, with rsync's reason;
    /// the rest of the target's work goes on. Cleared when the path is sent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unsendable: BTreeMap<String, String>,
    /// Every change before this time (µs) is on the target or in the journal
    /// (dispatcher; 0: it cannot vouch for any time yet). `syncbus run` records the
    /// oldest of its targets' as the crash checkpoint.
    #[serde(default)]
    pub safe_us: u64,
}

/// The whole-root compares of one root on one target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FullStatus {
    /// The first compare since the dispatcher started (the initial sync) finished.
    pub initial_done: bool,
    /// Running now: since when (µs; 0 when not running) and entries sent so far.
    pub running_since_us: u64,
    /// Entries sent so far by the running one.
    pub entries: u64,
    /// The last one that finished: when and how long it took.
    #[serde(default)]
    pub last_done_us: u64,
    /// How long the last one took (ms).
    #[serde(default)]
    pub last_duration_ms: u64,
}

/// One stage as its supervisor sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChildStatus {
    /// Whether it runs now.
    pub up: bool,
    /// Its process id, as last started.
    pub pid: u32,
    /// How many times it was started again after dying.
    pub restarts: u32,
    /// When it was last started (µs).
    pub since_us: u64,
}

impl StageStatus {
    /// The file of `stage`, started at `started_us`, with nothing counted yet.
    pub fn new(stage: &str, started_us: u64) -> Self {
        StageStatus {
            version: VERSION,
            stage: stage.to_string(),
            pid: std::process::id(),
            started_us,
            ..Default::default()
        }
    }
}

/// Stamps the main loop's heartbeat into a stage's shared status.
pub fn beat(board: &std::sync::Mutex<StageStatus>) {
    if let Ok(mut b) = board.lock() {
        b.alive_us = crate::now_us();
    }
}

/// Where the status files of an instance live.
pub fn dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("status")
}

/// Replaces `<dir>/<name>.json` whole. Only `dir` itself is made (0700): a runtime dir
/// that is gone is an error, not made again with the wrong mode. The temp file is
/// created anew (`O_EXCL`: never through a symlink left in its place).
pub fn write(dir: &Path, name: &str, status: &StageStatus) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let tmp = dir.join(format!(".{name}.json.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(status).map_err(std::io::Error::other)?)?;
    drop(f);
    std::fs::rename(&tmp, dir.join(format!("{name}.json")))
}

/// Every readable status file of an instance, by file name (`dispatcher`, …). Files
/// that cannot be parsed are skipped: one is being replaced right now, or comes from
/// a build with another layout.
pub fn read_all(dir: &Path) -> std::io::Result<BTreeMap<String, StageStatus>> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        r => r?,
    };
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .filter(|n| !n.starts_with('.'))
        else {
            continue;
        };
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        if let Ok(s) = serde_json::from_slice::<StageStatus>(&bytes) {
            if s.version == VERSION {
                out.insert(name.to_string(), s);
            }
        }
    }
    Ok(out)
}

/// Removes the files of an earlier run (a killed stage leaves its own behind), so that
/// only stages of this run are reported; `syncbus run` calls it under its lock.
pub fn clear(runtime_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir(runtime_dir)) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Keeps a stage's file current from a thread of its own: `snapshot` is called once a
/// second. Dropping the writer (a clean stop) removes the file.
pub struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl Writer {
    /// Starts the thread that writes `<runtime_dir>/status/<name>.json` from `snapshot`.
    pub fn spawn(
        runtime_dir: &Path,
        name: &str,
        snapshot: impl Fn() -> StageStatus + Send + 'static,
    ) -> Writer {
        let dir = dir(runtime_dir);
        let path = dir.join(format!("{name}.json"));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let file = name.to_string();
        let thread = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || {
                let mut warned = false;
                let mut systemd = crate::notify::stage_alone().then(StageNotifier::default);
                while !flag.load(Ordering::Relaxed) {
                    let mut s = snapshot();
                    s.updated_us = crate::now_us();
                    if let Some(n) = systemd.as_mut() {
                        n.tell(&s);
                    }
                    if let Err(e) = write(&dir, &file, &s) {
                        if !warned {
                            tracing::warn!(path = %dir.display(), error = %e, "cannot write the status file");
                            warned = true;
                        }
                    }
                    std::thread::park_timeout(EVERY);
                }
            })
            .ok();
        Writer { stop, thread, path }
    }
}

/// What a stage run alone (its own unit, `Type=notify`) tells systemd, from the same
/// snapshot its status file gets: `READY=1` at its main loop's first heartbeat (the
/// watcher's loop starts once its watches are live), `WATCHDOG=1` while the heartbeat
/// is fresh (a loop that is stuck stops the pings, and systemd restarts the stage), and
/// its problem, if any, as `STATUS=`.
#[derive(Default)]
struct StageNotifier {
    ready: bool,
    status: String,
}

impl StageNotifier {
    fn tell(&mut self, s: &StageStatus) {
        let mut msg = Vec::new();
        if s.alive_us == 0 {
            // Starting (the watcher walks its roots first): systemd's start timeout
            // guards this, not the watchdog.
            if crate::notify::watchdog().is_some() {
                let _ = crate::notify::notify("WATCHDOG=1");
            }
            return;
        }
        if !self.ready {
            self.ready = true;
            msg.push("READY=1".to_string());
        }
        let status = if s.problem.is_empty() {
            "running"
        } else {
            s.problem.as_str()
        };
        if status != self.status {
            self.status = status.to_string();
            msg.push(format!("STATUS={}", crate::notify::status_line(status)));
        }
        if let Some(every) = crate::notify::watchdog() {
            // Fresh: beaten within half the watchdog interval (the loop beats at least
            // once a second).
            let age = crate::now_us().saturating_sub(s.alive_us);
            if age < every.as_micros() as u64 / 2 {
                msg.push("WATCHDOG=1".into());
            }
        }
        if !msg.is_empty() {
            if let Err(e) = crate::notify::notify(&msg.join("\n")) {
                tracing::debug!(error = %e, "cannot notify systemd");
            }
        }
    }
}

impl Writer {
    /// [`Writer::spawn`] for a stage that keeps its status in one shared value.
    pub fn shared(
        runtime_dir: &Path,
        name: &str,
        board: &Arc<std::sync::Mutex<StageStatus>>,
    ) -> Writer {
        let board = board.clone();
        Writer::spawn(runtime_dir, name, move || {
            board.lock().map(|b| b.clone()).unwrap_or_default()
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_and_half_written_ones_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let mut s = StageStatus::new("dispatcher", 5);
        s.targets.insert(
            "t".into(),
            TargetStatus {
                backlog: 3,
                oldest_us: 7,
                ..Default::default()
            },
        );
        write(d.path(), "dispatcher", &s).unwrap();
        std::fs::write(d.path().join("watcher.json"), b"{\"version\":1,").unwrap();
        std::fs::write(d.path().join(".filter.json.tmp"), b"{}").unwrap();
        let all = read_all(d.path()).unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["dispatcher"]);
        assert_eq!(all["dispatcher"], s);
    }

    #[test]
    fn the_writer_keeps_the_file_current_and_removes_it_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let w = Writer::spawn(d.path(), "retrier", || StageStatus::new("retrier", 1));
        let file = dir(d.path()).join("retrier.json");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            assert!(std::time::Instant::now() < deadline, "no status file");
            std::thread::sleep(Duration::from_millis(10));
        }
        let s = &read_all(&dir(d.path())).unwrap()["retrier"];
        assert_eq!((s.stage.as_str(), s.pid), ("retrier", std::process::id()));
        assert!(s.updated_us > 0);
        drop(w);
        assert!(!file.exists());
    }
}
