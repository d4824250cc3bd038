//! One worker per target: takes in jobs, batches them, runs rsync, and hands what
//! failed to the retrier's journal. Its own thread, so a slow or dead target delays
//! nobody; whole-root resyncs run on a second thread (the *full lane*), so live changes
//! keep flowing while a big tree is compared.
//!
//! Here: the jobs, the worker loop and what it does with a batch. Beside it:
//! `intake` (jobs taken in, and the journal jobs they settle), `retrier_link` (reports
//! and the hand-over of failed work, with its ack wait), `full_lane` (whole-root
//! compares on their own thread), `narrow` (a partly failed run cut down to the paths
//! that fail), and the transports behind `runner::Runner`: `rsync`, `program`
//! (command targets), `webhook`, and `two_way` (the fetch-back and pull of a two-way
//! target).

mod full_lane;
mod intake;
#[cfg(test)]
mod machine_tests;
mod moves;
mod narrow;
mod program;
mod retrier_link;
mod rsync;
mod runner;
mod tcp;
mod two_way;
mod webhook;

use full_lane::*;
use intake::*;
use narrow::*;
use program::*;
pub(crate) use retrier_link::Reporter;
use runner::*;
use two_way::*;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use protocol::config::{OnFailure, Target};
use protocol::rules::Rules;
use protocol::status::{StageStatus, TargetStatus};
use protocol::wire::{Change, ReportKind, Work};
use protocol::PathBytes;

use crate::batch::Batcher;
use crate::command::RunResult;
use crate::guard;
use ::rsync::Outcome;
use protocol::work::Touch;

/// Work for every worker serving `root`, and what the retrier and the full lane say.
#[derive(Debug, Clone)]
pub(crate) enum Job {
    /// A message of the change stream (a heartbeat when `changes` is empty).
    Changes {
        root: Arc<str>,
        changes: Arc<Vec<Change>>,
        /// What the root's message before said in `safe_us`: these changes happened
        /// at or after it ([`Work::floor_us`]).
        floor_us: u64,
        /// What this message says in `safe_us` (0 until the root's start compare was
        /// asked for).
        safe_us: u64,
    },
    /// The dispatcher cannot vouch for `root`: compare all of it.
    Resync { root: Arc<str> },
    /// syncbus stopped cleanly at a checkpoint: compare what changed since.
    CatchUp { root: Arc<str>, since_us: u64 },
    /// The retrier's journal jobs `job_ids`: run `work` and report on them.
    Run {
        root: Arc<str>,
        job_ids: Vec<u64>,
        work: Work,
    },
    /// The retrier has report `0` on disk.
    Ack(u64),
    /// The full lane finished a whole-root resync.
    FullDone(Arc<FullDone>),
    /// Stop taking in work: finish what runs, hand the rest to the retrier.
    Stop,
}

/// Shared between the SUB loop and the workers: shutdown, and the status they post.
#[derive(Debug, Default)]
pub(crate) struct Control {
    /// Set when the drain starts: runs still going then are killed.
    pub deadline: OnceLock<Instant>,
    /// A second signal: kill runs now, run nothing more.
    pub abort: AtomicBool,
    /// The dispatcher's status file; each worker and lane fills in its target.
    pub board: Arc<Mutex<StageStatus>>,
    /// Deletes seen live on two-way roots: a whole-root pull must not bring them back
    /// from a peer they have not reached yet.
    pub(crate) local_deletes: two_way::LocalDeletes,
    /// Where runs to ssh targets share their connection ([`crate::ssh`]); `None`: each
    /// run logs in.
    pub ssh_dir: Option<PathBuf>,
}

impl Control {
    /// Updates what the status file says of `target`.
    fn post(&self, target: &str, f: impl FnOnce(&mut TargetStatus)) {
        if let Ok(mut b) = self.board.lock() {
            if !b.targets.contains_key(target) {
                b.targets
                    .insert(target.to_string(), TargetStatus::default());
            }
            f(b.targets.get_mut(target).expect("inserted above"));
        }
    }

    fn must_stop(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
            || self.deadline.get().is_some_and(|d| Instant::now() >= *d)
    }
}

/// A root as this worker sees it.
#[derive(Clone)]
pub(crate) struct RootInfo {
    pub path: PathBuf,
    pub rules: Rules,
    /// Whole-root compares may delete also from an empty root or one on another file
    /// system (`allow_wipe` of the root or the target; see [`crate::guard`]).
    pub allow_wipe: bool,
    /// Where the last clean stop left this root's two-way manifest, if it did
    /// (`protocol::manifest`; read by a two-way target's catch-up only).
    pub manifest: PathBuf,
}

pub(crate) const BACKOFF_START: Duration = Duration::from_secs(1);

pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Delay before attempt `attempt + 1` after `attempt` failures (1-based), with `jitter`
/// in `[0, 1)` adding up to a quarter. Fatal failures wait the cap every time. Used
/// only when the retrier cannot be reached.
pub(crate) fn backoff(attempt: u32, outcome: Outcome, jitter: f64) -> Duration {
    let start = match outcome {
        Outcome::Fatal => BACKOFF_CAP,
        _ => BACKOFF_START,
    };
    protocol::backoff::delay(start, BACKOFF_CAP, attempt, 0.25, jitter)
}

/// A root whose last run failed.
struct Failing {
    attempt: u32,
    /// `None`: the retrier holds the work and decides when to try again; new work is
    /// handed to it untried. `Some`: the retrier was unreachable, the worker retries
    /// from memory at this time.
    until: Option<Instant>,
}

pub(crate) struct Worker {
    target: Target,
    roots: HashMap<String, RootInfo>,
    live: Runner,
    full_tx: Option<Sender<FullReq>>,
    full_thread: Option<std::thread::JoinHandle<()>>,
    full: HashMap<String, FullState>,
    failing: HashMap<String, Failing>,
    reporter: Reporter,
    control: Arc<Control>,
    /// For the status: the last failure's error, the last success (µs).
    last_error: String,
    last_success_us: u64,
    /// Paths that could not be sent even alone, per root, with the reason: not
    /// retried until they change again or a compare takes them.
    unsendable: BTreeMap<(String, PathBytes), String>,
}

/// Never rsync from a missing root: `--delete` would wipe the target.
fn check_source(src: &Path) -> Result<(), RunResult> {
    match std::fs::metadata(src) {
        Ok(m) if m.is_dir() => Ok(()),
        other => {
            let why = match other {
                Ok(_) => "is not a directory".to_string(),
                Err(e) => e.to_string(),
            };
            Err(RunResult {
                outcome: Outcome::Retry,
                error: format!(
                    "source root `{}` unusable ({why}); not running rsync, which could delete the mirror",
                    src.display()
                ),
            })
        }
    }
}

impl Worker {
    /// `tx` is the sending side of the worker's own job channel (the full lane reports
    /// through it).
    pub(crate) fn new(
        target: Target,
        roots: HashMap<String, RootInfo>,
        runtime_dir: &Path,
        guard: guard::Store,
        control: Arc<Control>,
        reporter: Reporter,
        tx: Sender<Job>,
    ) -> std::io::Result<Self> {
        let live = Runner::new(target.clone(), runtime_dir, "live", control.clone())?;
        let mut full = Runner::new(target.clone(), runtime_dir, "full", control.clone())?;
        full.progress = Some(Arc::new(AtomicU64::new(0)));
        let (full_tx, full_rx) = std::sync::mpsc::channel();
        let full_roots = roots.clone();
        let full_thread = std::thread::Builder::new()
            .name(format!("full-{}", target.name))
            .spawn(move || full_lane(full, full_roots, guard, full_rx, tx))?;
        Ok(Worker {
            target,
            roots,
            live,
            full_tx: Some(full_tx),
            full_thread: Some(full_thread),
            full: HashMap::new(),
            failing: HashMap::new(),
            reporter,
            control,
            last_error: String::new(),
            last_success_us: 0,
            unsendable: BTreeMap::new(),
        })
    }

    /// Runs until told to stop (drain) or the control says abort. True when it
    /// stopped clean: everything it was given is on the target or in the journal.
    pub(crate) fn run(mut self, rx: Receiver<Job>) -> bool {
        let name = self.target.name.clone();
        tracing::info!(target = %name, roots = self.roots.len(), "worker started");
        let mut intake = Intake {
            rx,
            batcher: if self.target.two_way {
                Batcher::keeping_deletes()
            } else {
                Batcher::new()
            },
            covers: HashMap::new(),
            held: HashSet::new(),
            acked: HashSet::new(),
            full_done: Vec::new(),
            stopping: false,
            closed: false,
            deletes: self.target.two_way.then(|| self.control.clone()),
            safe: HashMap::new(),
        };
        let mut final_pass_done = false;
        loop {
            for done in std::mem::take(&mut intake.full_done) {
                self.full_finished(&done, &mut intake);
            }
            self.post_status(&intake);
            if self.control.abort.load(Ordering::SeqCst) {
                break;
            }
            if intake.stopping || intake.closed {
                // One more pass of everything pending unless the grace is over; then
                // wait for the full lane (killed at the deadline) and hand over the rest.
                if !final_pass_done && !self.control.must_stop() {
                    final_pass_done = true;
                    if let Some(batch) = intake.batcher.take() {
                        self.run_batch(batch, &mut intake);
                    }
                }
                if !self.full.is_empty() {
                    intake.wait(Some(Duration::from_millis(50)));
                    continue;
                }
                break;
            }
            let now = Instant::now();
            let ready = |r: &str| {
                self.failing
                    .get(r)
                    .and_then(|f| f.until)
                    .is_none_or(|t| t <= now)
            };
            if let Some(batch) = intake.batcher.take_where(ready) {
                self.run_batch(batch, &mut intake);
                continue;
            }
            // Nothing ready: block for work, or until the next local retry is due.
            let next_retry = intake
                .batcher
                .pending_roots()
                .filter_map(|r| self.failing.get(r).and_then(|f| f.until))
                .min();
            intake.wait(next_retry.map(|t| t.saturating_duration_since(now)));
        }
        // Whatever is left goes to the journal, untried, so a restart resumes it.
        let mut left = 0;
        let mut clean = !self.control.abort.load(Ordering::SeqCst) && self.full.is_empty();
        if let Some(batch) = intake.batcher.take() {
            for (root, work) in batch.roots {
                let covers = intake.take_covers(&root);
                left += work.paths.len() + work.resyncs.len();
                if !self.hand_over(&root, &work, covers, "", &mut intake) {
                    clean = false;
                    tracing::warn!(target = %name, root = %root, paths = work.paths.len(), resyncs = work.resyncs.len(), "work abandoned at shutdown: the retrier did not answer (a resync at the next start covers it)");
                }
            }
        }
        drop(self.full_tx.take());
        if let Some(t) = self.full_thread.take() {
            if !self.control.abort.load(Ordering::SeqCst) {
                let _ = t.join();
            }
        }
        tracing::info!(target = %name, handed_over = left, clean, "worker stopped");
        clean
    }

    /// What the status file says of this target: refreshed before each batch, so a
    /// long run shows the state it started from (its lag keeps growing meanwhile).
    fn post_status(&self, intake: &Intake) {
        let (paths, resyncs) = intake.batcher.pending_counts();
        let oldest = self.full.values().fold(intake.batcher.oldest_us(), |t, f| {
            protocol::earliest_us(protocol::earliest_us(t, f.since_us), f.again_since_us)
        });
        let failures = self.failing.values().map(|f| f.attempt).max().unwrap_or(0);
        let safe_us = self.safe_us(intake);
        self.control.post(&self.target.name, |t| {
            t.safe_us = safe_us;
            t.backlog = (paths + resyncs + self.full.len()) as u64;
            t.oldest_us = oldest;
            t.failures = failures;
            t.last_error = if failures > 0 {
                self.last_error.clone()
            } else {
                String::new()
            };
            t.last_success_us = self.last_success_us;
            t.unsendable = self
                .unsendable
                .iter()
                .map(|((root, p), why)| (format!("{root}/{p}"), why.clone()))
                .collect();
        });
    }

    /// Every change before this time (µs) is on the target or in the journal: the
    /// oldest of what each root's change stream vouched for last and what the work
    /// still held here holds back ([`Work::floor_us`]); 0 for a root never heard from.
    /// Read between runs only, when no work is out of these books (a run's work is
    /// back in the batcher, delivered, or acknowledged by the journal). Jobs not yet
    /// taken in cannot move it wrongly: each root's say comes in order with them, and
    /// what they carry happened at or after the say before.
    fn safe_us(&self, intake: &Intake) -> u64 {
        let said = self
            .roots
            .keys()
            .map(|r| intake.safe.get(r).copied().unwrap_or(0))
            .min()
            .unwrap_or(0);
        let held = self
            .full
            .values()
            .flat_map(|f| [f.floor_us, f.again_floor_us, f.replay.floor_us])
            .chain([intake.batcher.floor_us()])
            .flatten()
            .min();
        held.map_or(said, |h| h.min(said))
    }

    fn run_batch(&mut self, batch: crate::batch::Batch, intake: &mut Intake) {
        for (root, work) in batch.roots {
            let covers = intake.take_covers(&root);
            let owned_by_retrier = self.failing.get(&root).is_some_and(|f| f.until.is_none());
            if owned_by_retrier && covers.is_empty() {
                // The target is failing and the retrier decides when to try again:
                // new work joins its journal untried (no rsync storm during an outage).
                if !self.hand_over(&root, &work, Vec::new(), "", intake) {
                    self.keep(&root, work, Vec::new(), intake, Outcome::Retry);
                }
                continue;
            }
            let mut work = work;
            let mut covers = covers;
            if self.target.hard_links && !work.resyncs.contains(&PathBytes::root()) {
                // rsync keeps links only among the names one run sees: work that may
                // touch a linked file (or a catch-up, which cannot tell) compares the
                // whole root, where rsync sees every name.
                let linked = self.roots.get(&root).and_then(|i| linked(&i.path, &work));
                if work.catch_up.is_some() || linked.is_some() {
                    tracing::debug!(target = %self.target.name, root = %root, path = ?linked.map(|p| p.to_string()), "hard links kept: comparing the root");
                    work.resync(PathBytes::root());
                }
            }
            if work.resyncs.contains(&PathBytes::root()) {
                // A whole-root resync absorbed everything else of the root, except a
                // two-way target's deletes (its compares make none): those go live.
                let excludes = std::mem::take(&mut work.excludes);
                let covers = std::mem::take(&mut covers);
                self.start_full(&root, FullKind::Full { excludes }, covers, &work);
                if !work.keep_deletes || work.paths.is_empty() {
                    continue;
                }
                work.resyncs.clear();
                work.catch_up = None;
            }
            if let Some(since_us) = work.catch_up.take() {
                // The catch-up walks the tree: the full lane's. The journal jobs go
                // with the live part when there is one (a failure of either is
                // journalled again, so settling them with the first is safe).
                let live_empty = work.is_empty();
                let with = if live_empty {
                    std::mem::take(&mut covers)
                } else {
                    Vec::new()
                };
                self.start_full(&root, FullKind::CatchUp { since_us }, with, &work);
                if live_empty {
                    continue;
                }
            }
            let sent = work.clone();
            self.reporter.run_started_us = protocol::now_us();
            match self.sync_root(&root, work, intake) {
                None => {
                    let resyncs: Vec<PathBytes> = sent.resyncs.iter().cloned().collect();
                    self.reporter.deliver(&root, &sent.paths, &resyncs, None);
                    self.delivered(&root, covers, intake);
                    if let Some(full) = self.full.get_mut(&root) {
                        full.replay.merge(sent);
                    }
                }
                Some((rest, result)) => {
                    tracing::debug!(target = %self.target.name, root = %root, error = %result.error, "rsync failed; handing the work to the retrier");
                    self.last_error = result.error.clone();
                    // Subtrees compared before the failure did reach the target.
                    let done: Vec<PathBytes> =
                        sent.resyncs.difference(&rest.resyncs).cloned().collect();
                    // So did the paths a hook ran for before or beside a failed one.
                    let done_paths: BTreeMap<PathBytes, Touch> = sent
                        .paths
                        .iter()
                        .filter(|(p, _)| !rest.paths.contains_key(*p))
                        .map(|(p, t)| (p.clone(), *t))
                        .collect();
                    if !done.is_empty() || !done_paths.is_empty() {
                        self.reporter.deliver(&root, &done_paths, &done, None);
                    }
                    let attempt = self.failing.get(&root).map_or(1, |f| f.attempt + 1);
                    let resyncs: Vec<PathBytes> = rest.resyncs.iter().cloned().collect();
                    self.reporter.deliver(
                        &root,
                        &rest.paths,
                        &resyncs,
                        Some((attempt, &result.error)),
                    );
                    if self.target.on_failure == OnFailure::Log && self.live.is_hook() {
                        // `on_failure = "log"`: logged and counted, never retried; the
                        // journal jobs it covered are settled.
                        tracing::warn!(target = %self.target.name, root = %root, paths = rest.paths.len(), error = %result.error, "hook failed; not retried (on_failure = \"log\")");
                        self.control
                            .post(&self.target.name, |t| t.ignored_failures += 1);
                        self.settle(&root, covers, intake);
                        continue;
                    }
                    if self.hand_over(&root, &rest, covers.clone(), &result.error, intake) {
                        let attempt = self.failing.get(&root).map_or(1, |f| f.attempt + 1);
                        self.failing.insert(
                            root,
                            Failing {
                                attempt,
                                until: None,
                            },
                        );
                    } else {
                        tracing::warn!(target = %self.target.name, root = %root, error = %result.error, "rsync failed and the retrier did not answer; retrying from memory");
                        self.keep(&root, rest, covers, intake, result.outcome);
                    }
                }
            }
        }
    }

    /// A run of `root` succeeded: the journal jobs it covered are done, and a target
    /// that was failing is back (the retrier hears of it too, so the rest of its
    /// journal goes out now rather than at the end of the backoff).
    fn delivered(&mut self, root: &str, covers: Vec<u64>, intake: &mut Intake) {
        self.last_success_us = protocol::now_us();
        for id in &covers {
            intake.held.remove(id);
        }
        let was_failing = self.failing.remove(root);
        if let Some(f) = &was_failing {
            tracing::info!(target = %self.target.name, root, attempt = f.attempt, "target recovered");
        }
        if !covers.is_empty() || was_failing.is_some() {
            self.reporter
                .send(ReportKind::Delivered, root, covers, Work::default(), "");
        }
    }

    /// An `on_failure = "log"` hook's failed run: what it covered is done with, as
    /// after a success, but it is no success (`last_success_us` stays).
    fn settle(&mut self, root: &str, covers: Vec<u64>, intake: &mut Intake) {
        for id in &covers {
            intake.held.remove(id);
        }
        let was_failing = self.failing.remove(root);
        if !covers.is_empty() || was_failing.is_some() {
            self.reporter
                .send(ReportKind::Delivered, root, covers, Work::default(), "");
        }
    }

    /// Keeps failed work in memory with a local backoff (the retrier is unreachable).
    fn keep(
        &mut self,
        root: &str,
        mut work: Work,
        covers: Vec<u64>,
        intake: &mut Intake,
        outcome: Outcome,
    ) {
        // Retried from memory, a cron sync sends everything.
        work.excludes.clear();
        let attempt = self.failing.get(root).map_or(1, |f| f.attempt + 1);
        let delay = backoff(attempt, outcome, rand::random::<f64>());
        self.failing.insert(
            root.to_string(),
            Failing {
                attempt,
                until: Some(Instant::now() + delay),
            },
        );
        intake
            .covers
            .entry(root.to_string())
            .or_default()
            .extend(covers);
        intake.batcher.merge(root, work);
    }

    /// Brings one root's work (no whole-root resync) to the target. On failure returns
    /// what is still owed.
    fn sync_root(
        &mut self,
        root: &str,
        work: Work,
        intake: &mut Intake,
    ) -> Option<(Work, RunResult)> {
        let Some(info) = self.roots.get(root) else {
            // Not bound to this target (cannot happen: jobs are routed by binding).
            return None;
        };
        if let Err(r) = check_source(&info.path) {
            return Some((work, r));
        }
        let mut tick = |wait: Duration| intake.wait(Some(wait));
        let mut work = work;
        // A change within a subtree the target could not take whole: compare that
        // subtree again, not only the changed path.
        let retake: Vec<PathBytes> = self
            .unsendable
            .keys()
            .filter(|(r, s)| r == root && !s.is_root())
            .filter(|(_, s)| work.paths.keys().any(|p| p != s && p.is_within(s)))
            .map(|(_, s)| s.clone())
            .collect();
        for s in retake {
            work.resync(s);
        }
        // Moves first, while the target still holds the old places.
        let seeded = self.live.seed_moves(root, info, &work, &mut tick);
        work.paths.retain(|p, _| !seeded.contains(p));
        for p in seeded {
            self.unsendable.remove(&(root.to_string(), p));
        }
        if !work.resyncs.is_empty() {
            let subtrees: Vec<PathBytes> = work.resyncs.iter().cloned().collect();
            let started = Instant::now();
            tracing::debug!(target = %self.target.name, root, paths = ?subtrees.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "subtree resync started");
            let result = self.live.resync(root, info, &subtrees, &[], &mut tick);
            // Some paths could not be taken (rsync's 23): each subtree is compared alone,
            // and one that still cannot be taken whole (a read-only directory on the
            // target) is named in the status instead of failing the target for ever;
            // the rest of it went, and it is compared again when it changes.
            let mut partial: BTreeMap<PathBytes, String> = BTreeMap::new();
            if result.outcome == Outcome::Partial && !self.live.is_hook() {
                for s in &subtrees {
                    let alone =
                        self.live
                            .resync(root, info, std::slice::from_ref(s), &[], &mut tick);
                    match alone.outcome {
                        Outcome::Success => {}
                        Outcome::Partial => {
                            partial.insert(s.clone(), alone.error);
                        }
                        Outcome::Retry | Outcome::Fatal => return Some((work, alone)),
                    }
                }
            } else if result.outcome != Outcome::Success {
                return Some((work, result));
            }
            self.unsendable.retain(|(r, p), _| {
                r != root
                    || !subtrees
                        .iter()
                        .any(|s| s == p || p.ancestors().any(|a| a == s.as_bytes()))
            });
            for (s, why) in partial {
                tracing::warn!(target = %self.target.name, root, path = %s, error = %why, "cannot take all of this subtree, even alone; the rest went, and it is compared again when it changes");
                self.unsendable.insert((root.to_string(), s), why);
            }
            tracing::debug!(target = %self.target.name, root, duration_ms = started.elapsed().as_millis() as u64, "subtree resync finished");
        }
        if !work.paths.is_empty() {
            let started = Instant::now();
            let (mut result, failed) = if self.live.is_hook() {
                self.live.hook_paths(root, info, &work.paths, &mut tick)
            } else {
                let r = self.live.incremental(root, info, &work.paths, &mut tick);
                (r, None)
            };
            let mut unsendable = BTreeMap::new();
            if result.outcome == Outcome::Partial && !self.live.is_hook() {
                (result, unsendable) = narrow(
                    &self.live,
                    root,
                    info,
                    work.paths.clone(),
                    result,
                    &mut tick,
                );
            }
            if result.outcome == Outcome::Success {
                for p in work.paths.keys() {
                    let key = (root.to_string(), p.clone());
                    match unsendable.remove(p) {
                        None => {
                            self.unsendable.remove(&key);
                        }
                        Some(why) => {
                            if !self.unsendable.contains_key(&key) {
                                tracing::warn!(target = %self.target.name, root, path = %p, error = %why, "cannot send this path, even alone; the rest went, and it is tried again when it changes");
                            }
                            self.unsendable.insert(key, why);
                        }
                    }
                }
            }
            if result.outcome != Outcome::Success {
                let mut paths = work.paths;
                if let Some(failed) = failed {
                    let failed: BTreeSet<PathBytes> = failed.into_iter().collect();
                    paths.retain(|p, _| failed.contains(p));
                }
                let rest = Work {
                    paths,
                    since_us: work.since_us,
                    keep_deletes: work.keep_deletes,
                    floor_us: work.floor_us,
                    ..Work::default()
                };
                return Some((rest, result));
            }
            tracing::debug!(target = %self.target.name, root, paths = work.paths.len(), duration_ms = started.elapsed().as_millis() as u64, "batch sent");
            if tracing::enabled!(tracing::Level::TRACE) {
                for (p, t) in &work.paths {
                    tracing::trace!(target = %self.target.name, root, path = %p, deleted = t.deleted, "sent");
                }
            }
        }
        None
    }
}

/// A path of `work` that is, or a subtree of it that holds, a file with more than one
/// name in the source tree at `root` (its other names may lie outside what the work
/// sends).
fn linked(root: &Path, work: &Work) -> Option<PathBytes> {
    use std::os::unix::fs::MetadataExt;
    let multi = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.nlink() > 1);
    fn walk(dir: &Path, multi: &dyn Fn(&Path) -> bool) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&p, multi),
                Ok(t) if t.is_file() => multi(&p),
                _ => false,
            }
        })
    }
    // Deleted or not: a path deleted and made again (`rm b; ln a b`) is still flagged
    // deleted, and a missing one has no links.
    let file = work.paths.keys().find(|p| multi(&p.under(root)));
    file.or_else(|| work.resyncs.iter().find(|s| walk(&s.under(root), &multi)))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let s = |a, o, j| backoff(a, o, j).as_millis();
        assert_eq!(s(1, Outcome::Retry, 0.0), 1000);
        assert_eq!(s(2, Outcome::Retry, 0.0), 2000);
        assert_eq!(s(4, Outcome::Retry, 0.0), 8000);
        assert_eq!(s(7, Outcome::Retry, 0.0), 60_000);
        assert_eq!(s(100, Outcome::Retry, 0.0), 60_000);
        assert_eq!(s(1, Outcome::Retry, 0.999_999), 1249);
        assert_eq!(s(1, Outcome::Fatal, 0.0), 60_000);
    }
}
