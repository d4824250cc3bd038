//! One worker per target: takes in jobs, batches them, runs rsync, keeps what failed
//! and retries it with backoff. Its own thread, so a slow or dead target delays nobody.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use protocol::config::Target;
use protocol::rules::Rules;
use protocol::wire::Change;
use protocol::PathBytes;

use crate::batch::{Batcher, RootWork, Touch};
use crate::command::{self, Mode, Outcome, RunResult};
use crate::plan;

/// Work for every worker serving `root`.
#[derive(Debug, Clone)]
pub enum Job {
    Changes {
        root: Arc<str>,
        changes: Arc<Vec<Change>>,
    },
    /// The dispatcher cannot vouch for `root`: compare all of it.
    Resync { root: Arc<str> },
}

/// Shared between the SUB loop and the workers for shutdown.
#[derive(Debug, Default)]
pub struct Control {
    /// Set when the drain starts: runs still going then are killed.
    pub deadline: OnceLock<Instant>,
    /// A second signal: kill runs now, run nothing more.
    pub abort: AtomicBool,
}

impl Control {
    fn must_stop(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
            || self.deadline.get().is_some_and(|d| Instant::now() >= *d)
    }
}

/// A root as this worker sees it.
pub struct RootInfo {
    pub path: PathBuf,
    pub rules: Rules,
}

pub const BACKOFF_START: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Delay before attempt `attempt + 1` after `attempt` failures (1-based), with `jitter`
/// in `[0, 1)` adding up to a quarter. Fatal failures wait the cap every time.
pub fn backoff(attempt: u32, outcome: Outcome, jitter: f64) -> Duration {
    let base = match outcome {
        Outcome::Fatal => BACKOFF_CAP,
        _ => {
            let exp = attempt.saturating_sub(1).min(16);
            (BACKOFF_START * (1u32 << exp)).min(BACKOFF_CAP)
        }
    };
    base + base.mul_f64(jitter.clamp(0.0, 1.0) / 4.0)
}

struct Failing {
    attempt: u32,
    until: Instant,
}

/// The receiving side: new jobs go straight into the batcher, also while rsync runs.
struct Intake {
    rx: Receiver<Job>,
    batcher: Batcher,
    closed: bool,
}

impl Intake {
    fn accept(&mut self, job: Job) {
        match job {
            Job::Changes { root, changes } => {
                for c in changes.iter() {
                    self.batcher.push(&root, c);
                }
            }
            Job::Resync { root } => self.batcher.resync(&root, PathBytes::root()),
        }
    }

    /// Takes in everything queued without blocking.
    fn drain(&mut self) {
        while !self.closed {
            match self.rx.try_recv() {
                Ok(j) => self.accept(j),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.closed = true,
            }
        }
    }

    /// Waits up to `wait` for a job (until `None`: for ever), then drains.
    fn wait(&mut self, wait: Option<Duration>) {
        if self.closed {
            if let Some(w) = wait {
                std::thread::sleep(w);
            }
            return;
        }
        let got = match wait {
            None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(w) => self.rx.recv_timeout(w),
        };
        match got {
            Ok(j) => self.accept(j),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => self.closed = true,
        }
        self.drain();
    }
}

pub struct Worker {
    target: Target,
    roots: HashMap<String, RootInfo>,
    tmp: tempfile::TempDir,
    failing: HashMap<String, Failing>,
    control: Arc<Control>,
}

impl Worker {
    pub fn new(
        target: Target,
        roots: HashMap<String, RootInfo>,
        runtime_dir: &Path,
        control: Arc<Control>,
    ) -> std::io::Result<Self> {
        // Private (0700) scratch for rules files, inside the private runtime dir.
        let tmp = tempfile::Builder::new()
            .prefix(&format!("dispatcher-{}-", target.name))
            .tempdir_in(runtime_dir)?;
        Ok(Worker {
            target,
            roots,
            tmp,
            failing: HashMap::new(),
            control,
        })
    }

    /// Runs until the job channel closes (drain) or the control says abort.
    pub fn run(mut self, rx: Receiver<Job>) {
        let name = self.target.name.clone();
        tracing::info!(target = %name, roots = self.roots.len(), "worker started");
        let mut intake = Intake {
            rx,
            batcher: Batcher::new(),
            closed: false,
        };
        loop {
            if self.control.abort.load(Ordering::SeqCst) {
                break;
            }
            if intake.closed {
                // One more pass of everything pending, backoff or not, then stop.
                if let Some(batch) = intake.batcher.take() {
                    if !self.control.must_stop() {
                        self.run_batch(batch, &mut intake);
                    } else {
                        for (root, work) in batch.roots {
                            intake.batcher.merge(&root, work);
                        }
                    }
                }
                break;
            }
            let now = Instant::now();
            let ready = |r: &str| self.failing.get(r).is_none_or(|f| f.until <= now);
            if let Some(batch) = intake.batcher.take_where(ready) {
                self.run_batch(batch, &mut intake);
                continue;
            }
            // Nothing ready: block for work, or until the next retry is due.
            let next_retry = intake
                .batcher
                .pending_roots()
                .filter_map(|r| self.failing.get(r).map(|f| f.until))
                .min();
            intake.wait(next_retry.map(|t| t.saturating_duration_since(now)));
        }
        let (paths, resyncs) = intake.batcher.pending_counts();
        if paths + resyncs > 0 {
            tracing::warn!(target = %name, paths, resyncs, "worker stopped with work abandoned (a resync at the next start covers it)");
        } else {
            tracing::info!(target = %name, "worker stopped");
        }
    }

    fn run_batch(&mut self, batch: crate::batch::Batch, intake: &mut Intake) {
        for (root, work) in batch.roots {
            if self.control.must_stop() && intake.closed {
                intake.batcher.merge(&root, work);
                continue;
            }
            let failed = self.sync_root(&root, work, intake);
            match failed {
                None => {
                    if let Some(f) = self.failing.remove(&root) {
                        tracing::info!(target = %self.target.name, root = %root, attempt = f.attempt, "target recovered");
                    }
                }
                Some((work, result)) => {
                    let attempt = self.failing.get(&root).map_or(1, |f| f.attempt + 1);
                    let delay = backoff(attempt, result.outcome, rand::random::<f64>());
                    let paths = work.paths.len() + work.resyncs.len();
                    if intake.closed {
                        tracing::warn!(target = %self.target.name, root = %root, attempt, paths, error = %result.error, "rsync failed during shutdown; its work is abandoned");
                    } else if result.outcome == Outcome::Fatal {
                        tracing::error!(target = %self.target.name, root = %root, attempt, paths, error = %result.error, retry_in_s = delay.as_secs(), "rsync failed and will not succeed until something changes; retrying rarely");
                    } else {
                        tracing::warn!(target = %self.target.name, root = %root, attempt, paths, error = %result.error, retry_in_ms = delay.as_millis() as u64, "rsync failed; will retry");
                    }
                    self.failing.insert(
                        root.clone(),
                        Failing {
                            attempt,
                            until: Instant::now() + delay,
                        },
                    );
                    intake.batcher.merge(&root, work);
                }
            }
        }
    }

    /// Brings one root's work to the target. On failure returns what is still owed.
    fn sync_root(
        &mut self,
        root: &str,
        work: RootWork,
        intake: &mut Intake,
    ) -> Option<(RootWork, RunResult)> {
        let Some(info) = self.roots.get(root) else {
            // Not bound to this target (cannot happen: jobs are routed by binding).
            return None;
        };
        let src = info.path.clone();
        // Never rsync from a missing root: `--delete` would wipe the target.
        match std::fs::metadata(&src) {
            Ok(m) if m.is_dir() => {}
            other => {
                let why = match other {
                    Ok(_) => "is not a directory".to_string(),
                    Err(e) => e.to_string(),
                };
                return Some((
                    work,
                    RunResult {
                        outcome: Outcome::Retry,
                        error: format!(
                            "source root `{}` unusable ({why}); not running rsync, which could delete the mirror",
                            src.display()
                        ),
                    },
                ));
            }
        }
        let dest = self.target.destination(root);
        if !work.resyncs.is_empty() {
            let subtrees = plan::resync_subtrees(&src, &work.resyncs);
            let excluded = plan::regex_excluded(&info.rules, &src, &subtrees);
            let excludes = plan::exclude_rules(&info.rules, &excluded);
            let rules = plan::resync_rules(&excludes, &subtrees);
            let shown: Vec<String> = subtrees.iter().map(|s| s.to_string()).collect();
            // A whole root is a lifecycle event; a new directory's subtree is not.
            let whole = subtrees.iter().any(PathBytes::is_root);
            if whole {
                tracing::info!(target = %self.target.name, root, paths = ?shown, "resync started");
            } else {
                tracing::debug!(target = %self.target.name, root, paths = ?shown, "subtree resync started");
            }
            let started = Instant::now();
            let result = self.rsync(Mode::Resync, &rules, &src, &dest, b"", intake);
            let duration_ms = started.elapsed().as_millis() as u64;
            if result.outcome != Outcome::Success {
                return Some((work, result));
            }
            // A regex-excluded path created between the walk and the run went over:
            // take it off the target again.
            let late: Vec<PathBytes> = plan::regex_excluded(&info.rules, &src, &subtrees)
                .difference(&excluded)
                .cloned()
                .collect();
            if !late.is_empty() {
                let result = self.delete_on_target(&late, &dest, intake);
                if result.outcome != Outcome::Success {
                    return Some((work, result));
                }
            }
            if whole {
                tracing::info!(target = %self.target.name, root, paths = ?shown, duration_ms, "resync finished");
            } else {
                tracing::debug!(target = %self.target.name, root, paths = ?shown, duration_ms, "subtree resync finished");
            }
        }
        if !work.paths.is_empty() {
            let entries = plan::incremental_entries(&src, &work.paths);
            // Nothing is sent whole here (new directories are subtree resyncs), so
            // the globs are all the rules an incremental run needs.
            let rules = plan::exclude_rules(&info.rules, &Default::default());
            let list = plan::files_from(&entries);
            let started = Instant::now();
            let mode = Mode::Incremental;
            let result = self.rsync(mode, &rules, &src, &dest, &list, intake);
            let duration_ms = started.elapsed().as_millis() as u64;
            if result.outcome != Outcome::Success {
                let rest = RootWork {
                    resyncs: Default::default(),
                    paths: work.paths,
                };
                return Some((rest, result));
            }
            tracing::debug!(target = %self.target.name, root, paths = entries.len(), duration_ms, "batch sent");
        }
        None
    }

    fn rsync(
        &self,
        mode: Mode,
        rules: &[u8],
        src: &Path,
        dest: &str,
        stdin: &[u8],
        intake: &mut Intake,
    ) -> RunResult {
        let rules_file = if rules.is_empty() {
            None
        } else {
            match self.write_rules(rules) {
                Ok(p) => Some(p),
                Err(e) => {
                    return RunResult {
                        outcome: Outcome::Retry,
                        error: format!("cannot write rules file: {e}"),
                    }
                }
            }
        };
        let args = match command::build_args(&self.target, &mode, rules_file.as_deref(), src, dest)
        {
            Ok(a) => a,
            Err(e) => {
                return RunResult {
                    outcome: Outcome::Retry,
                    error: e.to_string(),
                }
            }
        };
        let control = self.control.clone();
        let idle = (self.target.timeout > 0).then(|| Duration::from_secs(self.target.timeout));
        command::run(&command::rsync_program(), &args, stdin, idle, |wait| {
            intake.wait(Some(wait));
            control.must_stop()
        })
    }

    /// Deletes `paths` (root-relative) on the target, whatever the source holds.
    fn delete_on_target(&self, paths: &[PathBytes], dest: &str, intake: &mut Intake) -> RunResult {
        let scratch = tempfile::tempdir_in(self.tmp.path()).and_then(|d| {
            for p in paths {
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent.under(d.path()))?;
                }
            }
            Ok(d)
        });
        let scratch = match scratch {
            Ok(d) => d,
            Err(e) => {
                return RunResult {
                    outcome: Outcome::Retry,
                    error: format!("cannot prepare the scratch source for deletes: {e}"),
                }
            }
        };
        let entries: BTreeMap<PathBytes, Touch> = paths
            .iter()
            .map(|p| (p.clone(), Touch { deleted: true }))
            .collect();
        tracing::debug!(target = %self.target.name, paths = paths.len(), "deleting regex-excluded paths that raced a resync");
        self.rsync(
            Mode::DeleteOnly,
            b"",
            scratch.path(),
            dest,
            &plan::files_from(&entries),
            intake,
        )
    }

    fn write_rules(&self, rules: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.tmp.path().join("rules");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(rules)?;
        Ok(path)
    }
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
