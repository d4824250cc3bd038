//! One worker per target: takes in jobs, batches them, runs rsync, and hands what
//! failed to the retrier's journal. Its own thread, so a slow or dead target delays
//! nobody; whole-root resyncs run on a second thread (the *full lane*), so live changes
//! keep flowing while a big tree is compared.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use protocol::config::{Endpoint, OnFailure, Target};
use protocol::rules::Rules;
use protocol::status::{FullStatus, StageStatus, TargetStatus};
use protocol::wire::{self, Change, Report, ReportKind, Work};
use protocol::PathBytes;

use crate::batch::{Batcher, RootWork, Touch};
use crate::command::{self, Mode, Outcome, RunResult};
use crate::{guard, plan};

/// Work for every worker serving `root`, and what the retrier and the full lane say.
#[derive(Debug, Clone)]
pub enum Job {
    Changes {
        root: Arc<str>,
        changes: Arc<Vec<Change>>,
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

#[derive(Debug)]
pub struct FullDone {
    root: String,
    kind: FullKind,
    job_ids: Vec<u64>,
    result: RunResult,
    /// When the run began (µs since the Unix epoch; 0 when it never ran).
    started_us: u64,
    /// False when nothing ran: the root guard refused the whole compare (not a
    /// failure: the target is not failing; the refusal is in the status).
    ran: bool,
}

/// What the full lane does for a root.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FullKind {
    /// Compare all of it, leaving out these globs too (a cron full sync's own).
    Full { excludes: Vec<String> },
    /// Compare what changed since this time (µs).
    CatchUp { since_us: u64 },
}

impl FullKind {
    /// One run that does what both ask: a full compare covers a catch-up.
    fn merge(self, other: FullKind) -> FullKind {
        match (self, other) {
            (FullKind::CatchUp { since_us: a }, FullKind::CatchUp { since_us: b }) => {
                FullKind::CatchUp { since_us: a.min(b) }
            }
            (FullKind::Full { excludes: a }, FullKind::Full { excludes: b }) => FullKind::Full {
                excludes: if a == b { a } else { Vec::new() },
            },
            // A catch-up must send everything changed: a cron sync's own excludes go.
            (FullKind::Full { .. }, FullKind::CatchUp { .. })
            | (FullKind::CatchUp { .. }, FullKind::Full { .. }) => FullKind::Full {
                excludes: Vec::new(),
            },
        }
    }

    /// The work still owed when this failed, for the journal.
    fn owed(&self) -> (RootWork, Vec<String>) {
        let mut w = RootWork::default();
        match self {
            FullKind::Full { excludes } => {
                w.resync(PathBytes::root());
                (w, excludes.clone())
            }
            FullKind::CatchUp { since_us } => {
                w.catch_up(*since_us);
                (w, Vec::new())
            }
        }
    }
}

/// Shared between the SUB loop and the workers: shutdown, and the status they post.
#[derive(Debug, Default)]
pub struct Control {
    /// Set when the drain starts: runs still going then are killed.
    pub deadline: OnceLock<Instant>,
    /// A second signal: kill runs now, run nothing more.
    pub abort: AtomicBool,
    /// The dispatcher's status file; each worker and lane fills in its target.
    pub board: Arc<Mutex<StageStatus>>,
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

/// How long a whole-root pull from a two-way peer waits between its two dry runs: what
/// changed in between is still being written there.
pub const PULL_SETTLE: Duration = Duration::from_secs(1);

/// The entries two dry runs of a pull (`%i %l %M %n` lines) both list alike: files,
/// links and directories the peer holds newer or this side lacks, and that did not
/// change between the runs.
fn settled_pulls(first: &[u8], second: &[u8]) -> BTreeMap<PathBytes, Touch> {
    let lines = |b: &[u8]| -> BTreeSet<Vec<u8>> {
        b.split(|&c| c == b'\n')
            .filter(|l| l.len() > 12 && l[11] == b' ' && matches!(l[0], b'>' | b'c'))
            .map(|l| l.to_vec())
            .collect()
    };
    let first = lines(first);
    let mut out = BTreeMap::new();
    for line in lines(second).intersection(&first) {
        // `%i %l %M %n`: the name is what follows the third space after the flags.
        let Some(name) = line[12..].splitn(3, |&c| c == b' ').nth(2) else {
            continue;
        };
        let name = crate::catchup::unescape(name.strip_suffix(b"/").unwrap_or(name));
        if name.is_empty() || name == b"." {
            continue;
        }
        out.insert(PathBytes::new(name), Touch::default());
    }
    out
}

/// A root as this worker sees it.
#[derive(Clone)]
pub struct RootInfo {
    pub path: PathBuf,
    pub rules: Rules,
    /// Whole-root compares may delete also from an empty root or one on another file
    /// system (`allow_wipe` of the root or the target; see [`crate::guard`]).
    pub allow_wipe: bool,
    /// Where the last clean stop left this root's two-way manifest, if it did
    /// (`protocol::manifest`; read by a two-way target's catch-up only).
    pub manifest: PathBuf,
}

pub const BACKOFF_START: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// How long a hand-over to the retrier may wait for its acknowledgement before the
/// worker keeps the work itself.
pub const ACK_WAIT: Duration = Duration::from_secs(2);
/// How often a running full sync says so in the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Delay before attempt `attempt + 1` after `attempt` failures (1-based), with `jitter`
/// in `[0, 1)` adding up to a quarter. Fatal failures wait the cap every time. Used
/// only when the retrier cannot be reached.
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

/// The byte count of rsync's summary line `sent 1,234 bytes  received …` (digit
/// grouping as rsync prints it; `None` for any other line).
fn sent_bytes(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"sent ")?;
    let end = rest.iter().position(|&b| b == b' ')?;
    if !rest[end..].starts_with(b" bytes") {
        return None;
    }
    let digits: Vec<u8> = rest[..end]
        .iter()
        .copied()
        .filter(|b| !matches!(b, b',' | b'.' | b'\''))
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// The files among `paths` whose mtime is older than the change that sent them, by
/// more than clocks and rsync's rounding can explain: a file renamed or restored
/// here, which the peer may hold newer.
fn old_dated(root: &Path, paths: &BTreeMap<PathBytes, Touch>) -> BTreeMap<PathBytes, Touch> {
    use std::os::unix::fs::MetadataExt;
    const SLACK_US: u64 = 2_000_000;
    let now = protocol::now_us();
    paths
        .iter()
        .filter(|(p, t)| {
            let Ok(m) = std::fs::symlink_metadata(p.under(root)) else {
                return false;
            };
            let seen = if t.since_us == 0 { now } else { t.since_us };
            let mtime_us = (m.mtime().max(0) as u64) * 1_000_000 + m.mtime_nsec() as u64 / 1000;
            m.is_file() && mtime_us + SLACK_US < seen
        })
        .map(|(p, t)| (p.clone(), *t))
        .collect()
}

/// A root whose last run failed.
struct Failing {
    attempt: u32,
    /// `None`: the retrier holds the work and decides when to try again; new work is
    /// handed to it untried. `Some`: the retrier was unreachable, the worker retries
    /// from memory at this time.
    until: Option<Instant>,
}

/// Sends reports to the retrier (one PUSH socket per thread: zmq sockets are not shared).
pub struct Reporter {
    push: zmq::Socket,
    epoch: u64,
    seq: u64,
    /// The delivery stream's own gap-free counter.
    delivery_seq: u64,
    target: String,
    /// When the run being reported began (0: unknown, as for the full lane's).
    pub run_started_us: u64,
}

impl Reporter {
    pub fn new(push: zmq::Socket, target: &str) -> Self {
        Reporter {
            push,
            epoch: protocol::bus::new_epoch(),
            seq: 0,
            delivery_seq: 0,
            target: target.to_string(),
            run_started_us: 0,
        }
    }

    /// Tells the delivery stream what one run brought to the target, or failed to
    /// (relayed by the retrier; dropped, and seen as a gap, if it is gone for long).
    pub fn deliver(
        &mut self,
        root: &str,
        paths: &BTreeMap<PathBytes, Touch>,
        resyncs: &[PathBytes],
        failed: Option<(u32, &str)>,
    ) {
        self.delivery_seq += 1;
        let msg = wire::Delivery {
            version: wire::VERSION,
            epoch: self.epoch,
            seq: self.delivery_seq,
            target: self.target.clone(),
            root: root.to_string(),
            ok: failed.is_none(),
            time_us: protocol::now_us(),
            paths: paths
                .iter()
                .map(|(p, t)| wire::Delivered {
                    path: p.clone(),
                    since_us: t.since_us,
                })
                .collect(),
            resyncs: resyncs.to_vec(),
            attempt: failed.map_or(0, |f| f.0),
            error: failed.map_or(String::new(), |f| f.1.to_string()),
            started_us: self.run_started_us,
        };
        let topic = wire::deliveries_topic(&self.target);
        let payload = wire::encode(&msg);
        if let Err(e) = self
            .push
            .send_multipart([topic.as_bytes(), &payload[..]], zmq::DONTWAIT)
        {
            tracing::debug!(target = %self.target, error = %e, "delivery report dropped");
        }
    }

    /// Sends one report; returns its id (for the ack). A send that fails is logged:
    /// the caller waits for an ack that will not come and keeps the work.
    pub fn send(
        &mut self,
        kind: ReportKind,
        root: &str,
        covers: Vec<u64>,
        work: Work,
        error: &str,
    ) -> u64 {
        self.seq += 1;
        let report = Report {
            version: wire::VERSION,
            epoch: self.epoch,
            seq: self.seq,
            report_id: rand::random::<u64>() | 1,
            kind,
            target: self.target.clone(),
            root: root.to_string(),
            covers,
            work,
            error: error.to_string(),
            time_us: protocol::now_us(),
        };
        let payload = wire::encode(&report);
        if let Err(e) = self
            .push
            .send_multipart([wire::REPORT_TOPIC.as_bytes(), &payload[..]], zmq::DONTWAIT)
        {
            tracing::warn!(target = %self.target, error = %e, "cannot queue a report for the retrier");
        }
        report.report_id
    }
}

fn to_wire(work: &RootWork) -> Work {
    Work {
        resyncs: work.resyncs.iter().cloned().collect(),
        paths: work.paths.keys().cloned().collect(),
        excludes: Vec::new(),
        catch_up_us: work.catch_up.unwrap_or(0),
        since_us: work.since_us,
    }
}

fn from_wire(work: &Work) -> RootWork {
    // The wire does not say which paths were deletes: each may have been (what that
    // changes is only whether a two-way target's batcher keeps it beside a compare).
    let mut out = RootWork {
        keep_deletes: true,
        ..RootWork::default()
    };
    for r in &work.resyncs {
        out.resync(r.clone());
    }
    out.merge(RootWork {
        resyncs: BTreeSet::new(),
        paths: work
            .paths
            .iter()
            .map(|p| {
                let t = Touch {
                    deleted: true,
                    since_us: 0,
                };
                (p.clone(), t)
            })
            .collect(),
        catch_up: None,
        since_us: work.since_us,
        keep_deletes: true,
    });
    if work.catch_up_us != 0 {
        out.catch_up(work.catch_up_us);
    }
    out
}

/// The receiving side: new jobs go straight into the batcher, also while rsync runs.
struct Intake {
    rx: Receiver<Job>,
    batcher: Batcher,
    /// Journal jobs whose work is in the batcher, per root.
    covers: HashMap<String, Vec<u64>>,
    /// Every journal job this worker holds (batcher or full lane): a job sent again
    /// by the retrier is not run twice.
    held: HashSet<u64>,
    /// The own excludes of a pending cron full sync, per root.
    cron_excludes: HashMap<String, Vec<String>>,
    acked: HashSet<u64>,
    full_done: Vec<Arc<FullDone>>,
    stopping: bool,
    closed: bool,
}

impl Intake {
    fn accept(&mut self, job: Job) {
        match job {
            Job::Changes { root, changes } => {
                // A cron sync's own excludes must not hide a live change it absorbs.
                self.cron_excludes.remove(&*root);
                for c in changes.iter() {
                    self.batcher.push(&root, c);
                }
            }
            // Start compares carry no change time: they are not lag (the status
            // shows them as the initial sync) however long they take.
            Job::Resync { root } => {
                self.cron_excludes.remove(&*root);
                self.batcher.resync(&root, PathBytes::root());
            }
            Job::CatchUp { root, since_us } => {
                self.cron_excludes.remove(&*root);
                let mut w = RootWork::default();
                w.catch_up(since_us);
                self.batcher.merge(&root, w);
            }
            Job::Run {
                root,
                job_ids,
                work,
            } => {
                let new: Vec<u64> = job_ids
                    .into_iter()
                    .filter(|id| !self.held.contains(id))
                    .collect();
                if new.is_empty() {
                    return;
                }
                self.held.extend(new.iter().copied());
                self.covers.entry(root.to_string()).or_default().extend(new);
                // A cron sync's own excludes hold only while the root owes nothing
                // else: anything merged with it must reach the target in full.
                let cron = work.resyncs.iter().any(PathBytes::is_root) && !work.excludes.is_empty();
                let alone = !self.batcher.has_work(&root)
                    || self.cron_excludes.get(&*root) == Some(&work.excludes);
                if cron && alone {
                    self.cron_excludes
                        .insert(root.to_string(), work.excludes.clone());
                } else {
                    self.cron_excludes.remove(&*root);
                }
                self.batcher.merge(&root, from_wire(&work));
            }
            Job::Ack(id) => {
                self.acked.insert(id);
            }
            Job::FullDone(d) => self.full_done.push(d),
            Job::Stop => self.stopping = true,
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

    /// Takes the journal jobs covering `root`'s work out of the books.
    fn take_covers(&mut self, root: &str) -> Vec<u64> {
        self.covers.remove(root).unwrap_or_default()
    }
}

/// A whole-root resync in the full lane.
struct FullState {
    /// What the live lane sent meanwhile: sent again once the full sync is over, since
    /// the full sync may have copied an older version over it.
    replay: RootWork,
    /// When the oldest change it brings over happened (µs), for the status; the
    /// same for the run asked for meanwhile.
    since_us: u64,
    again_since_us: u64,
    /// Another run asked for while this one ran, and the jobs it covers.
    again: Option<(FullKind, Vec<u64>)>,
}

/// What the full lane is asked to do.
struct FullReq {
    root: String,
    kind: FullKind,
    job_ids: Vec<u64>,
}

/// Runs rsync for one target; one per thread (its rules file is its own).
struct Runner {
    target: Target,
    tmp: tempfile::TempDir,
    control: Arc<Control>,
    /// The full lane counts the entries its runs list (`--out-format=%n`), for the
    /// progress lines in the log.
    progress: Option<Arc<AtomicU64>>,
    /// A command or webhook target's include/exclude globs, compiled once.
    globs: Option<(GlobPair, GlobPair)>,
    /// Options the root guard adds to every run for a while (`--dry-run` for its
    /// probe, `--max-delete=0` for a compare that must not delete).
    guard_args: Mutex<Vec<&'static str>>,
    /// A webhook target's HTTP client, kept so connections are reused across batches.
    agent: Option<ureq::Agent>,
}

impl Runner {
    fn new(
        target: Target,
        runtime_dir: &Path,
        lane: &str,
        control: Arc<Control>,
    ) -> std::io::Result<Self> {
        // Private (0700) scratch for rules files, inside the private runtime dir. Its
        // name is fixed per target and lane, so the one a killed dispatcher left behind
        // is removed here rather than piling up, one pair per crash.
        let name = format!("dispatcher-{}-{lane}.tmp", target.name);
        match std::fs::remove_dir_all(runtime_dir.join(&name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let tmp = tempfile::Builder::new()
            .prefix(&name)
            .rand_bytes(0)
            .tempdir_in(runtime_dir)?;
        let globs = match &target.endpoint {
            Endpoint::Command {
                include, exclude, ..
            }
            | Endpoint::Http {
                include, exclude, ..
            } => Some((GlobPair::new(include), GlobPair::new(exclude))),
            _ => None,
        };
        let agent = matches!(target.endpoint, Endpoint::Http { .. }).then(|| {
            let timeout = (target.timeout > 0).then(|| Duration::from_secs(target.timeout));
            ureq::Agent::config_builder()
                .timeout_global(timeout)
                .http_status_as_error(false)
                .allow_non_standard_methods(true)
                .build()
                .into()
        });
        Ok(Runner {
            target,
            tmp,
            control,
            progress: None,
            globs,
            agent,
            guard_args: Default::default(),
        })
    }

    /// Compares `subtrees` of `root` in full (`--delete`), leaving out `extra` globs
    /// too. Regex-excluded paths that went over in a race are deleted again.
    fn resync(
        &self,
        root: &str,
        info: &RootInfo,
        subtrees: &[PathBytes],
        extra: &[String],
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
        if self.is_hook() {
            let entries = subtrees
                .iter()
                .flat_map(|s| command_entries(info, s))
                .collect();
            return self.run_hook(root, info, entries, tick);
        }
        let src = &info.path;
        let dest = self.target.destination(root);
        let subtrees = plan::resync_subtrees(src, subtrees);
        let excluded = plan::regex_excluded(&info.rules, src, &subtrees);
        let mut excludes = plan::exclude_rules(&info.rules, &excluded);
        for g in extra {
            excludes.extend_from_slice(b"- ");
            excludes.extend_from_slice(g.as_bytes());
            excludes.push(0);
        }
        let rules = plan::resync_rules(&excludes, &subtrees);
        let result = self.rsync(Mode::Resync, &rules, src, &dest, b"", tick, None);
        if result.outcome != Outcome::Success {
            return result;
        }
        if self.target.two_way && subtrees.iter().any(|s| s.is_root()) {
            // A two-way compare never deletes: what the peer holds and this side does
            // not (a file deleted here while syncbus was stopped and not proven so by
            // the manifest, or one the peer made) comes here, where the peer's is newer
            // or missing, so both sides agree once it is done.
            let pulled = self.pull_all(root, &rules, src, &dest, tick);
            if pulled.outcome != Outcome::Success {
                return pulled;
            }
        }
        // A regex-excluded path created between the walk and the run went over:
        // take it off the target again.
        let late: Vec<PathBytes> = plan::regex_excluded(&info.rules, src, &subtrees)
            .difference(&excluded)
            .cloned()
            .collect();
        if !late.is_empty() {
            return self.delete_on_target(&late, &dest, tick);
        }
        result
    }

    fn set_guard_args(&self, args: &[&'static str]) {
        if let Ok(mut g) = self.guard_args.lock() {
            *g = args.to_vec();
        }
    }

    /// Whether the whole-root compare of `root` would delete on the target, and how
    /// many entries (a dry run of it, its itemized `*deleting` lines counted: rsync
    /// reports deletes a daemon makes this way reliably, unlike the warning of
    /// `--max-delete`).
    fn would_delete(
        &self,
        root: &str,
        info: &RootInfo,
        extra: &[String],
        tick: &mut dyn FnMut(Duration),
    ) -> Result<usize, RunResult> {
        let src = &info.path;
        let dest = self.target.destination(root);
        let whole = [PathBytes::root()];
        let excluded = plan::regex_excluded(&info.rules, src, &whole);
        let mut excludes = plan::exclude_rules(&info.rules, &excluded);
        for g in extra {
            excludes.extend_from_slice(b"- ");
            excludes.extend_from_slice(g.as_bytes());
            excludes.push(0);
        }
        let rules = plan::resync_rules(&excludes, &whole);
        self.set_guard_args(&["--dry-run"]);
        let mut itemized = Vec::new();
        let r = self.rsync(
            Mode::Resync,
            &rules,
            src,
            &dest,
            b"",
            tick,
            Some(&mut itemized),
        );
        self.set_guard_args(&[]);
        if r.outcome != Outcome::Success {
            return Err(r);
        }
        Ok(itemized
            .split(|&b| b == b'\n')
            .filter(|l| l.starts_with(b"*deleting"))
            .count())
    }

    /// A whole-root compare that deletes nothing (`--max-delete=0`); rsync's exit
    /// 25 (deletes skipped) is success here: the caller already knows what was kept.
    fn resync_without_deletes(
        &self,
        root: &str,
        info: &RootInfo,
        extra: &[String],
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
        self.set_guard_args(&["--max-delete=0"]);
        let mut r = self.resync(root, info, &[PathBytes::root()], extra, tick);
        self.set_guard_args(&[]);
        if r.outcome == Outcome::Fatal && r.error.contains("max-delete") {
            r = RunResult {
                outcome: Outcome::Success,
                error: String::new(),
            };
        }
        r
    }

    /// Brings the target up to what changed since `since_us` (see [`crate::catchup`]):
    /// a listing run for changed directories, the changed files, then a subtree
    /// resync of each directory the listing run found new or different on the target.
    /// On failure, `.1` tells whether the listing run already changed the target: then
    /// a retry must compare in full (a child directory it created would now look the
    /// same on both sides and never be followed up).
    fn catch_up(
        &self,
        root: &str,
        info: &RootInfo,
        since_us: u64,
        tick: &mut dyn FnMut(Duration),
    ) -> (RunResult, bool) {
        if self.is_hook() {
            // A program cannot be asked what it missed: it gets the whole root.
            return (
                self.resync(root, info, &[PathBytes::root()], &[], tick),
                false,
            );
        }
        if self.target.two_way {
            return self.two_way_catch_up(root, info, tick);
        }
        let src = &info.path;
        let scan = match crate::catchup::scan(src, &info.rules, since_us) {
            Ok(s) => s,
            Err(e) => {
                let r = RunResult {
                    outcome: Outcome::Retry,
                    error: format!("cannot scan `{}` for the catch-up: {e}", src.display()),
                };
                return (r, false);
            }
        };
        // A changed directory inside a changed directory may have been renamed over
        // another one (a deploy swap): its children could match by name and time and
        // still differ, so it is compared in full.
        let mut follow_ups: Vec<PathBytes> = scan
            .dirs
            .iter()
            .filter(|d| d.parent().is_some_and(|p| scan.dirs.contains(&p)))
            .cloned()
            .collect();
        if !scan.dirs.is_empty() {
            let excludes = plan::exclude_rules(&info.rules, &Default::default());
            let rules = crate::catchup::listing_rules(&excludes, &scan);
            let dest = self.target.destination(root);
            let mut itemized = Vec::new();
            let list = crate::catchup::listing_entries(&scan);
            let r = self.rsync(
                Mode::Listing,
                &rules,
                src,
                &dest,
                &list,
                tick,
                Some(&mut itemized),
            );
            if r.outcome != Outcome::Success {
                return (r, !itemized.is_empty());
            }
            follow_ups.extend(crate::catchup::follow_ups(&itemized, &scan));
        }
        if !scan.files.is_empty() {
            let r = self.incremental(root, info, &scan.files, tick);
            if r.outcome != Outcome::Success {
                return (r, true);
            }
        }
        follow_ups.extend(scan.mounts.iter().cloned());
        if !follow_ups.is_empty() {
            let r = self.resync(root, info, &follow_ups, &[], tick);
            if r.outcome != Outcome::Success {
                return (r, true);
            }
        }
        tracing::info!(
            target = %self.target.name,
            root = %root,
            entries = scan.seen,
            changed_files = scan.files.len(),
            changed_dirs = scan.dirs.len(),
            subtree_resyncs = follow_ups.len(),
            "catch-up compared what changed since the checkpoint"
        );
        let ok = RunResult {
            outcome: Outcome::Success,
            error: String::new(),
        };
        (ok, true)
    }

    /// Brings here what the peer holds newer or this side lacks (never deleting), but
    /// only what rests there: two dry runs [`PULL_SETTLE`] apart, and the entries they
    /// list alike (size, mtime, name) are fetched by name. A file the peer is still
    /// writing is left to the peer's own syncbus, which sends it once it rests.
    fn pull_all(
        &self,
        root: &str,
        rules: &[u8],
        src: &Path,
        dest: &str,
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
        let mut listings = Vec::new();
        for i in 0..2 {
            if i > 0 {
                tick(PULL_SETTLE);
                if self.control.must_stop() {
                    return RunResult {
                        outcome: Outcome::Retry,
                        error: "stopped during the pull from the peer".into(),
                    };
                }
            }
            let mut out = Vec::new();
            let r = self.rsync(Mode::PullList, rules, src, dest, b"", tick, Some(&mut out));
            if r.outcome != Outcome::Success {
                return r;
            }
            listings.push(out);
        }
        let wanted = settled_pulls(&listings[0], &listings[1]);
        if wanted.is_empty() {
            return RunResult {
                outcome: Outcome::Success,
                error: String::new(),
            };
        }
        tracing::debug!(target = %self.target.name, root, entries = wanted.len(), "fetching what the peer holds and this side lacks");
        self.rsync(
            Mode::Pull,
            rules,
            src,
            dest,
            &plan::files_from(&wanted),
            tick,
            None,
        )
    }

    /// A two-way target's catch-up: what the manifest of the last clean stop lists and
    /// is gone now was deleted here while syncbus was stopped, and those deletes go to
    /// the peer by name; then a whole-root compare both ways (push, then pull) brings
    /// everything else into agreement, the files missing here included. A failure
    /// before the compare leaves nothing done that a retry of the catch-up would not
    /// do again (`.1` false).
    fn two_way_catch_up(
        &self,
        root: &str,
        info: &RootInfo,
        tick: &mut dyn FnMut(Duration),
    ) -> (RunResult, bool) {
        let gone = crate::catchup::deleted_while_stopped(&info.path, &info.rules, &info.manifest);
        if !gone.is_empty() {
            tracing::info!(target = %self.target.name, root, paths = gone.len(), "deleting on the peer what was deleted here while stopped");
            if tracing::enabled!(tracing::Level::TRACE) {
                for p in gone.keys() {
                    tracing::trace!(target = %self.target.name, root, path = %p, "deleted while stopped");
                }
            }
            let r = self.incremental(root, info, &gone, tick);
            if r.outcome != Outcome::Success {
                return (r, false);
            }
        }
        (
            self.resync(root, info, &[PathBytes::root()], &[], tick),
            true,
        )
    }

    fn incremental(
        &self,
        root: &str,
        info: &RootInfo,
        paths: &BTreeMap<PathBytes, Touch>,
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
        if self.is_hook() {
            return self.hook_paths(root, info, paths, tick).0;
        }
        let entries = plan::incremental_entries(&info.path, paths);
        // Nothing is sent whole here (new directories are subtree resyncs), so the
        // globs are all the rules an incremental run needs.
        let rules = plan::exclude_rules(&info.rules, &Default::default());
        let list = plan::files_from(&entries);
        let dest = self.target.destination(root);
        let pushed = self.rsync(
            Mode::Incremental,
            &rules,
            &info.path,
            &dest,
            &list,
            tick,
            None,
        );
        if !self.target.two_way || pushed.outcome != Outcome::Success {
            return pushed;
        }
        // `--update` kept the peer's copy of a file dated older here than there (a
        // rename or a restore of an old file): newest wins here too, so fetch it.
        let old = old_dated(&info.path, paths);
        if tracing::enabled!(tracing::Level::TRACE) {
            for (p, t) in paths {
                tracing::trace!(target = %self.target.name, root, path = %p, since_us = t.since_us, old_dated = old.contains_key(p), "fetch-back check");
            }
        }
        if old.is_empty() {
            return pushed;
        }
        tracing::debug!(target = %self.target.name, root, files = old.len(), "fetching what may be newer on the peer");
        let list = plan::files_from(&old);
        self.rsync(Mode::Pull, &rules, &info.path, &dest, &list, tick, None)
    }

    /// One rsync run. With `capture`, its itemized output (`%i %n` lines) lands there.
    #[allow(clippy::too_many_arguments)]
    fn rsync(
        &self,
        mode: Mode,
        rules: &[u8],
        src: &Path,
        dest: &str,
        stdin: &[u8],
        tick: &mut dyn FnMut(Duration),
        capture: Option<&mut Vec<u8>>,
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
        let mut args = args;
        // Before the source and destination, which are the last two. rsync's summary
        // ("sent N bytes …") feeds the status; it is taken out of what the caller sees.
        let at = args.len() - 2;
        args.insert(at, "--info=stats1".into());
        // After the user's `extra_args`: plain digits even if they ask for `-h`.
        args.insert(at, "--no-human-readable".into());
        let guard_args = self
            .guard_args
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        for a in &guard_args {
            args.insert(at, (*a).into());
        }
        let dry_run = guard_args.contains(&"--dry-run");
        let keep = capture.is_some();
        let count = !keep && self.progress.is_some() && mode == Mode::Resync;
        if keep && mode == Mode::PullList {
            args.insert(at, "--out-format=%i %l %M %n".into());
        } else if keep {
            args.insert(at, "--out-format=%i %n".into());
        } else if count {
            args.insert(at, "--out-format=%n".into());
        }
        #[derive(Default)]
        struct Out {
            partial: Vec<u8>,
            kept: Vec<u8>,
            sent: u64,
        }
        let out: std::sync::Mutex<Out> = Default::default();
        let sink = |chunk: &[u8]| {
            let Ok(mut o) = out.lock() else { return };
            o.partial.extend_from_slice(chunk);
            while let Some(end) = o.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = o.partial.drain(..=end).collect();
                let line = &line[..end];
                if let Some(n) = sent_bytes(line) {
                    o.sent = n;
                } else if line.is_empty() || line.starts_with(b"total size is ") {
                } else if keep {
                    o.kept.extend_from_slice(line);
                    o.kept.push(b'\n');
                } else if let (true, Some(p)) = (count, &self.progress) {
                    p.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let control = self.control.clone();
        let idle = (self.target.timeout > 0).then(|| Duration::from_secs(self.target.timeout));
        let result = command::run(
            &command::rsync_program(),
            &args,
            stdin,
            idle,
            Some(&sink),
            &|_| {},
            |wait| {
                tick(wait);
                control.must_stop()
            },
        );
        let out = out.into_inner().unwrap_or_default();
        let mut result = result;
        if self.target.two_way
            && result.outcome == Outcome::Fatal
            && result.error.contains("temp-dir does not exist")
        {
            // The peer's syncbus makes its `.syncbus/incoming` when it starts: not a
            // usage error, a peer not ready yet (found when both sides start at once).
            result.outcome = Outcome::Retry;
        }
        if !dry_run {
            self.count_run(&result, out.sent);
        }
        if let Some(c) = capture {
            *c = out.kept;
        }
        result
    }

    /// Counts a run for the status: runs, failed runs, bytes sent.
    fn count_run(&self, result: &RunResult, sent: u64) {
        self.control.post(&self.target.name, |t| {
            t.runs += 1;
            t.failed_runs += u64::from(result.outcome != Outcome::Success);
            t.bytes_sent += sent;
        });
    }

    /// A command or webhook target: given the paths, no rsync.
    fn is_hook(&self) -> bool {
        matches!(
            self.target.endpoint,
            Endpoint::Command { .. } | Endpoint::Http { .. }
        )
    }

    /// The entries that pass the target's include/exclude globs, read the way rsync
    /// reads its own: a pattern without `/` matches a name at any depth, one with `/`
    /// the path from the root. A path is excluded when it or a directory above it
    /// matches an `exclude`; `include` is checked on the path itself, and never holds
    /// back a directory entry or a path that is gone (a delete must reach the hook).
    fn filtered(&self, info: &RootInfo, entries: Vec<HookEntry>) -> Vec<HookEntry> {
        let Some((inc, exc)) = &self.globs else {
            return entries;
        };
        let keep: Vec<bool> = entries
            .iter()
            .map(|(p, _, all_below)| {
                if p.is_root() {
                    return true;
                }
                let excluded = std::iter::once(p.as_bytes())
                    .chain(p.ancestors().filter(|a| !a.is_empty()))
                    .any(|a| exc.matches(&PathBytes::new(a.to_vec())));
                if excluded {
                    return false;
                }
                inc.is_empty()
                    || *all_below
                    || std::fs::symlink_metadata(p.under(&info.path)).is_err()
                    || inc.matches(p)
            })
            .collect();
        entries
            .into_iter()
            .zip(keep)
            .filter_map(|(e, k)| k.then_some(e))
            .collect()
    }

    /// A hook run on changed paths. On failure, `.1` names the paths that failed when
    /// the hook could tell them apart (`paths = "each"`, argument chunks, per-path
    /// webhooks): only those are owed again, and a hook that succeeded for a path is
    /// never run again for it (issue #11: `hook1.sh` ran 3 times in 4 s).
    fn hook_paths(
        &self,
        root: &str,
        info: &RootInfo,
        paths: &BTreeMap<PathBytes, Touch>,
        tick: &mut dyn FnMut(Duration),
    ) -> (RunResult, Option<Vec<PathBytes>>) {
        let entries = paths
            .keys()
            .map(|p| {
                let mut e = b"./".to_vec();
                e.extend_from_slice(p.as_bytes());
                (p.clone(), e, false)
            })
            .collect();
        self.run_hook_paths(root, info, entries, tick)
    }

    fn run_hook(
        &self,
        root: &str,
        info: &RootInfo,
        entries: Vec<HookEntry>,
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
        self.run_hook_paths(root, info, entries, tick).0
    }

    fn run_hook_paths(
        &self,
        root: &str,
        info: &RootInfo,
        entries: Vec<HookEntry>,
        tick: &mut dyn FnMut(Duration),
    ) -> (RunResult, Option<Vec<PathBytes>>) {
        let entries = self.filtered(info, entries);
        if entries.is_empty() {
            let ok = RunResult {
                outcome: Outcome::Success,
                error: String::new(),
            };
            return (ok, None);
        }
        let (result, failed) = match &self.target.endpoint {
            Endpoint::Http { .. } => self.post(root, &entries),
            _ => self.run_command(root, info, entries, tick),
        };
        self.count_run(&result, 0);
        (result, failed)
    }

    /// A webhook target's run: the batch as one JSON POST (paths as `./path`, with
    /// `\xNN` for bytes that are not UTF-8 and `utf8: false`), headers from its
    /// `header_file`; a 2xx answer is success, anything else is retried.
    fn post(&self, root: &str, entries: &[HookEntry]) -> (RunResult, Option<Vec<PathBytes>>) {
        let Endpoint::Http {
            url,
            method,
            base_url,
            header_file,
            ..
        } = &self.target.endpoint
        else {
            unreachable!("only called for webhook targets")
        };
        let fail = |error: String| RunResult {
            outcome: Outcome::Retry,
            error,
        };
        // A path's public URL: the base plus the path, each byte but `/` and the
        // unreserved ones percent-encoded.
        let public = |e: &[u8]| {
            base_url
                .as_ref()
                .map(|b| format!("{b}{}", percent(e.strip_prefix(b"./").unwrap_or(e), true)))
        };
        let paths: Vec<serde_json::Value> = entries
            .iter()
            .map(|(_, e, _)| {
                let utf8 = std::str::from_utf8(e).is_ok();
                let shown = protocol::path::escape_invalid_utf8(e);
                let mut v = serde_json::json!({"path": shown, "utf8": utf8});
                if let Some(u) = public(e) {
                    v["url"] = u.into();
                }
                v
            })
            .collect();
        let body = serde_json::json!({
            "version": 1,
            "target": self.target.name,
            "root": root,
            "time_us": protocol::now_us(),
            "paths": paths,
        })
        .to_string();
        let headers = match header_file
            .as_deref()
            .map(std::fs::read_to_string)
            .transpose()
        {
            Ok(h) => h.unwrap_or_default(),
            Err(e) => return (fail(format!("cannot read the header file: {e}")), None),
        };
        let Some(agent) = &self.agent else {
            unreachable!("webhook runners have an agent")
        };
        let send = |to: &str, body: Option<String>| -> Result<(), String> {
            if self.control.must_stop() {
                return Err("stopped by the shutdown deadline".into());
            }
            let mut req = ureq::http::Request::builder()
                .method(method.as_str())
                .uri(to)
                .header("User-Agent", "syncbus");
            if body.is_some() {
                req = req.header("Content-Type", "application/json");
            }
            for line in headers.lines().filter(|l| !l.trim().is_empty()) {
                if let Some((name, value)) = line.split_once(':') {
                    req = req.header(name.trim(), value.trim());
                }
            }
            let answer = match body {
                Some(b) => req
                    .body(b)
                    .map_err(|e| e.to_string())
                    .and_then(|r| agent.run(r).map_err(|e| e.to_string())),
                None => req
                    .body(ureq::SendBody::none())
                    .map_err(|e| e.to_string())
                    .and_then(|r| agent.run(r).map_err(|e| e.to_string())),
            };
            // The URL is the config's; headers (credentials) never go in errors.
            match answer {
                Ok(resp) if resp.status().is_success() => Ok(()),
                Ok(resp) => Err(format!("webhook answered HTTP {}", resp.status().as_u16())),
                Err(e) => Err(format!("webhook: {e}")),
            }
        };
        let per_path = url.contains("{url}") || url.contains("{path}");
        let mut failed = None;
        let result = if per_path {
            // A CDN refresh: one request per path, the placeholders filled in. What
            // was refreshed before a failure is not owed again.
            entries.iter().enumerate().try_for_each(|(i, (_, e, _))| {
                let rel = e.strip_prefix(b"./").unwrap_or(e);
                let to = url.replace("{path}", &percent(rel, true)).replace(
                    "{url}",
                    &percent(public(e).unwrap_or_default().as_bytes(), false),
                );
                send(&to, None).inspect_err(|_| {
                    failed = Some(entries[i..].iter().map(|(p, _, _)| p.clone()).collect());
                })
            })
        } else {
            send(url, Some(body))
        };
        match result {
            Ok(()) => (
                RunResult {
                    outcome: Outcome::Success,
                    error: String::new(),
                },
                None,
            ),
            Err(e) => (fail(e), failed),
        }
    }

    /// A command target's run: its program with the entries (`./path`, `./dir/` for
    /// everything below) that pass its include/exclude globs, as NUL-separated stdin or
    /// as arguments; never a shell. It runs in the root with `SYNCBUS_TARGET`,
    /// `SYNCBUS_ROOT` and `SYNCBUS_ROOT_PATH` set; exit 0 is success, anything else is
    /// retried like a failed rsync (only the paths whose run failed, where known).
    fn run_command(
        &self,
        root: &str,
        info: &RootInfo,
        entries: Vec<HookEntry>,
        tick: &mut dyn FnMut(Duration),
    ) -> (RunResult, Option<Vec<PathBytes>>) {
        let Endpoint::Command {
            argv,
            as_args,
            each,
            ..
        } = &self.target.endpoint
        else {
            unreachable!("only called for command targets")
        };
        let keys: Vec<PathBytes> = entries.iter().map(|(p, _, _)| p.clone()).collect();
        let entries: Vec<Vec<u8>> = entries.into_iter().map(|(_, e, _)| e).collect();
        use std::os::unix::ffi::OsStrExt;
        let program: std::ffi::OsString = argv[0].clone().into();
        let (target, root_path) = (self.target.name.clone(), info.path.clone());
        let setup = |cmd: &mut std::process::Command| {
            cmd.current_dir(&root_path)
                .env("SYNCBUS_TARGET", &target)
                .env("SYNCBUS_ROOT", root)
                .env("SYNCBUS_ROOT_PATH", &root_path);
        };
        // As arguments, a batch goes in runs of at most ARGS_BYTES (the kernel refuses
        // an argument list beyond about 2 MiB, environment included).
        let chunks: Vec<&[Vec<u8>]> = if *each {
            entries.chunks(1).collect()
        } else if *as_args {
            let mut out = Vec::new();
            let (mut start, mut bytes) = (0, 0);
            for (i, e) in entries.iter().enumerate() {
                if bytes + e.len() + 1 > ARGS_BYTES && i > start {
                    out.push(&entries[start..i]);
                    (start, bytes) = (i, 0);
                }
                bytes += e.len() + 1;
            }
            out.push(&entries[start..]);
            out
        } else {
            vec![&entries[..]]
        };
        let control = self.control.clone();
        // The target's timeout is a wall clock here: a program's I/O may happen in
        // children the I/O watchdog cannot see.
        let limit = (self.target.timeout > 0).then(|| Duration::from_secs(self.target.timeout));
        let mut first_failure: Option<RunResult> = None;
        let mut failed: Vec<PathBytes> = Vec::new();
        let mut start = 0;
        for chunk in chunks {
            let range = start..start + chunk.len();
            start = range.end;
            if control.must_stop() && first_failure.is_some() {
                failed.extend_from_slice(&keys[range]);
                continue;
            }
            let mut args: Vec<std::ffi::OsString> = argv[1..].iter().map(Into::into).collect();
            let mut stdin = Vec::new();
            for e in chunk {
                if *as_args {
                    args.push(std::ffi::OsStr::from_bytes(e).to_os_string());
                } else {
                    stdin.extend_from_slice(e);
                    stdin.push(0);
                }
            }
            let started = Instant::now();
            let mut timed_out = false;
            let mut r = command::run_user_program(&program, &args, &stdin, &setup, |wait| {
                tick(wait);
                timed_out = limit.is_some_and(|l| started.elapsed() >= l);
                timed_out || control.must_stop()
            });
            if timed_out {
                r.error = format!(
                    "still running after {} s (the target's timeout): killed",
                    self.target.timeout
                );
            }
            if r.outcome != Outcome::Success {
                if !*each {
                    // Chunks already run succeeded; this one and the rest are owed.
                    return (r, Some(keys[range.start..].to_vec()));
                }
                tracing::debug!(target = %self.target.name, root, path = %keys[range.start], error = %r.error, "hook failed for a path");
                failed.extend_from_slice(&keys[range]);
                first_failure.get_or_insert(r);
            }
        }
        match first_failure {
            Some(mut r) => {
                if failed.len() > 1 {
                    r.error = format!("{} (and {} more paths failed)", r.error, failed.len() - 1);
                }
                (r, Some(failed))
            }
            None => (
                RunResult {
                    outcome: Outcome::Success,
                    error: String::new(),
                },
                None,
            ),
        }
    }

    /// Deletes `paths` (root-relative) on the target, whatever the source holds.
    fn delete_on_target(
        &self,
        paths: &[PathBytes],
        dest: &str,
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
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
            .map(|p| {
                (
                    p.clone(),
                    Touch {
                        deleted: true,
                        since_us: 0,
                    },
                )
            })
            .collect();
        tracing::debug!(target = %self.target.name, paths = paths.len(), "deleting regex-excluded paths that raced a resync");
        self.rsync(
            Mode::DeleteOnly,
            b"",
            scratch.path(),
            dest,
            &plan::files_from(&entries),
            tick,
            None,
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

/// Hook globs, rsync-style: names (no `/`) match the last component, the others the
/// path from the root (a leading `/` anchors nothing more).
struct GlobPair {
    names: globset::GlobSet,
    paths: globset::GlobSet,
    /// How many patterns the config gave (none: an `include` lets everything through).
    given: usize,
}

impl GlobPair {
    fn is_empty(&self) -> bool {
        self.given == 0
    }
}

impl GlobPair {
    fn new(globs: &[String]) -> Self {
        let (mut names, mut paths) = (
            globset::GlobSetBuilder::new(),
            globset::GlobSetBuilder::new(),
        );
        for g in globs {
            let anchored = g.contains('/');
            let pattern = g.trim_start_matches('/').trim_end_matches('/');
            let Ok(glob) = globset::GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
            else {
                continue;
            };
            if anchored {
                paths.add(glob);
            } else {
                names.add(glob);
            }
        }
        let empty = globset::GlobSet::empty;
        GlobPair {
            names: names.build().unwrap_or_else(|_| empty()),
            paths: paths.build().unwrap_or_else(|_| empty()),
            given: globs.len(),
        }
    }

    fn matches(&self, p: &PathBytes) -> bool {
        use std::os::unix::ffi::OsStrExt;
        self.paths.is_match(p.as_os_str())
            || self
                .names
                .is_match(std::ffi::OsStr::from_bytes(p.file_name()))
    }
}

/// One path for a command or webhook target: the path, what the program is given
/// (`./path`, `./dir/`), and whether it stands for everything below it (the root, or a
/// subtree too large to list), which an `include` glob never holds back.
type HookEntry = (PathBytes, Vec<u8>, bool);

/// Percent-encodes `bytes` for a URL: unreserved characters stay, `/` too when
/// `keep_slash` (a path), everything else (non-UTF-8 bytes included) becomes `%XX`.
fn percent(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Most bytes of paths given as arguments to one run of a command target.
const ARGS_BYTES: usize = 64 * 1024;

/// Above this many entries, a command target gets a subtree as `./dir/` rather than
/// every path in it.
const COMMAND_EXPAND_MAX: usize = 100_000;

/// What a command target is given for a subtree that changed as a whole (a new or
/// moved-in directory): the directory and every path in it (`./dir/`, `./dir/file`…),
/// or just `./dir/` — "everything below" — for the root or a very large subtree.
fn command_entries(info: &RootInfo, sub: &PathBytes) -> Vec<HookEntry> {
    let entry = |p: &PathBytes, dir: bool| {
        let mut e = b"./".to_vec();
        if !p.is_root() {
            e.extend_from_slice(p.as_bytes());
            if dir {
                e.push(b'/');
            }
        }
        (p.clone(), e, false)
    };
    // The root, or a subtree too large to list: "everything below".
    let mut whole = entry(sub, true);
    whole.2 = true;
    if sub.is_root() {
        return vec![whole];
    }
    let mut out = vec![entry(sub, true)];
    let mut stack = vec![sub.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(list) = std::fs::read_dir(dir.under(&info.path)) else {
            continue;
        };
        for e in list.flatten() {
            use std::os::unix::ffi::OsStrExt;
            let path = dir.join(e.file_name().as_bytes());
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if info.rules.excludes(&path, is_dir) {
                continue;
            }
            out.push(entry(&path, is_dir));
            if out.len() > COMMAND_EXPAND_MAX {
                return vec![whole];
            }
            if is_dir {
                stack.push(path);
            }
        }
    }
    out
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

/// After a guarded compare that did not fail: remembers a refusal (status and record)
/// or clears one, and records the root's file system when the compare proved it (it
/// ran with deletes, or needed none, from a root that is not empty).
fn settle_guard(
    runner: &Runner,
    store: &guard::Store,
    root: &str,
    now: &guard::Seen,
    refused: Option<&str>,
) {
    let target = &runner.target.name;
    let old = store.load(root).filter(|r| r.path == now.path);
    let mut record = old.clone().unwrap_or_else(|| guard::Record {
        path: now.path.clone(),
        ..Default::default()
    });
    match refused {
        Some(why) => {
            tracing::warn!(target = %target, root, reason = why, "whole-root compare refused by the root guard (live changes keep flowing)");
            record.refused = Some(why.to_string());
        }
        None => {
            if record.refused.take().is_some() {
                tracing::info!(target = %target, root, "whole-root compare succeeded; the root guard's refusal is cleared");
            }
            if !now.empty && now.mount.is_some() {
                record.mount = now.mount.clone();
            }
        }
    }
    runner.control.post(target, |t| match refused {
        Some(why) => {
            t.refused.insert(root.to_string(), why.to_string());
        }
        None => {
            t.refused.remove(root);
        }
    });
    if old.as_ref() != Some(&record) {
        if let Err(e) = store.save(root, &record) {
            tracing::warn!(target = %target, root, file = %store.file(root).display(), error = %e, "cannot write the root guard's record");
        }
    }
}

/// The full lane: whole-root resyncs, one at a time, beside the live lane.
fn full_lane(
    runner: Runner,
    roots: HashMap<String, RootInfo>,
    guard: guard::Store,
    rx: Receiver<FullReq>,
    tx: Sender<Job>,
) {
    let name = runner.target.name.clone();
    for req in rx {
        let Some(info) = roots.get(&req.root) else {
            // A journal job for a root this target no longer mirrors: settle it.
            let done = FullDone {
                root: req.root,
                kind: req.kind,
                job_ids: req.job_ids,
                result: RunResult {
                    outcome: Outcome::Success,
                    error: String::new(),
                },
                started_us: 0,
                ran: false,
            };
            if tx.send(Job::FullDone(Arc::new(done))).is_err() {
                break;
            }
            continue;
        };
        let started = Instant::now();
        let what = match &req.kind {
            FullKind::Full { .. } => "full sync",
            FullKind::CatchUp { .. } => "catch-up",
        };
        tracing::info!(target = %name, root = %req.root, kind = ?req.kind, "{what} started (live changes keep flowing)");
        let post = |f: &dyn Fn(&mut FullStatus)| {
            runner
                .control
                .post(&name, |t| f(t.full.entry(req.root.clone()).or_default()))
        };
        let started_us = protocol::now_us();
        post(&|f| {
            f.running_since_us = started_us;
            f.entries = 0;
        });
        let mut kind = req.kind.clone();
        let mut refused = None;
        let mut ran = true;
        // Compares that delete on an rsync target are guarded (two-way ones never
        // delete; programs and webhooks get paths, not deletes).
        let guarded = runner.target.runs_rsync() && !runner.target.two_way;
        let mut seen = None;
        let result = match check_source(&info.path) {
            Err(r) => r,
            Ok(()) => {
                let mut next_report = started + PROGRESS_EVERY;
                let sent = runner.progress.clone().unwrap_or_default();
                sent.store(0, Ordering::Relaxed);
                let mut tick = |wait: Duration| {
                    std::thread::sleep(wait);
                    let entries = sent.load(Ordering::Relaxed);
                    post(&|f| f.entries = entries);
                    if Instant::now() >= next_report {
                        next_report += PROGRESS_EVERY;
                        tracing::info!(target = %name, root = %req.root, elapsed_s = started.elapsed().as_secs(), entries_sent = sent.load(Ordering::Relaxed), "{what} in progress");
                    }
                };
                let record = guarded.then(|| guard.load(&req.root)).flatten();
                let verdict = if guarded {
                    let now = guard::Seen {
                        path: info.path.to_string_lossy().into_owned(),
                        mount: guard::mount_of(&info.path),
                        // Unreadable: not known to be empty; rsync will say more.
                        empty: guard::is_empty(&info.path, &info.rules).unwrap_or(false),
                    };
                    let v = guard::decide(&req.root, &name, info.allow_wipe, record.as_ref(), &now);
                    seen = Some(now);
                    v
                } else {
                    guard::Verdict::Plain
                };
                match verdict {
                    guard::Verdict::Refuse(why) => {
                        ran = false;
                        refused = Some(why);
                        RunResult {
                            outcome: Outcome::Success,
                            error: String::new(),
                        }
                    }
                    guard::Verdict::NoDeletes(why) => {
                        // A catch-up would not look at what the target holds: the
                        // guarded compare is a full one.
                        let excludes = match &req.kind {
                            FullKind::Full { excludes } => excludes.clone(),
                            FullKind::CatchUp { .. } => Vec::new(),
                        };
                        kind = FullKind::Full {
                            excludes: excludes.clone(),
                        };
                        match runner.would_delete(&req.root, info, &excludes, &mut tick) {
                            Err(r) => r,
                            Ok(n) => {
                                if n > 0 {
                                    refused = Some(format!("{why} ({n} entries kept)"));
                                }
                                runner.resync_without_deletes(&req.root, info, &excludes, &mut tick)
                            }
                        }
                    }
                    // After a refusal, a catch-up would not see what went wrong
                    // (files sent from the wrong tree, deletes held back): compare all.
                    guard::Verdict::Plain
                        if record.as_ref().is_some_and(|r| r.refused.is_some())
                            && matches!(req.kind, FullKind::CatchUp { .. }) =>
                    {
                        kind = FullKind::Full {
                            excludes: Vec::new(),
                        };
                        runner.resync(&req.root, info, &[PathBytes::root()], &[], &mut tick)
                    }
                    guard::Verdict::Plain => match &req.kind {
                        FullKind::Full { excludes } => runner.resync(
                            &req.root,
                            info,
                            &[PathBytes::root()],
                            excludes,
                            &mut tick,
                        ),
                        FullKind::CatchUp { since_us } => {
                            let (r, touched) =
                                runner.catch_up(&req.root, info, *since_us, &mut tick);
                            if r.outcome != Outcome::Success && touched {
                                // What is owed now is a full compare (see `catch_up`).
                                kind = FullKind::Full {
                                    excludes: Vec::new(),
                                };
                            }
                            r
                        }
                    },
                }
            }
        };
        if let (Some(now), true) = (&seen, result.outcome == Outcome::Success) {
            settle_guard(&runner, &guard, &req.root, now, refused.as_deref());
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        let entries_sent = runner
            .progress
            .as_ref()
            .map_or(0, |p| p.load(Ordering::Relaxed));
        let ok = result.outcome == Outcome::Success;
        post(&|f| {
            f.running_since_us = 0;
            f.entries = entries_sent;
            f.last_done_us = protocol::now_us();
            f.last_duration_ms = duration_ms;
            f.initial_done |= ok;
        });
        if ok {
            tracing::info!(target = %name, root = %req.root, duration_ms, entries_sent, "{what} finished");
        } else {
            tracing::warn!(target = %name, root = %req.root, duration_ms, error = %result.error, "{what} failed");
        }
        let done = FullDone {
            root: req.root,
            kind,
            job_ids: req.job_ids,
            result,
            started_us,
            ran,
        };
        if tx.send(Job::FullDone(Arc::new(done))).is_err() {
            break;
        }
    }
}

pub struct Worker {
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

impl Worker {
    /// `tx` is the sending side of the worker's own job channel (the full lane reports
    /// through it).
    pub fn new(
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
    pub fn run(mut self, rx: Receiver<Job>) -> bool {
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
            cron_excludes: HashMap::new(),
            acked: HashSet::new(),
            full_done: Vec::new(),
            stopping: false,
            closed: false,
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
                let excludes = intake.cron_excludes.remove(&root).unwrap_or_default();
                if !self.hand_over(&root, &work, excludes, covers, "", &mut intake) {
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
        self.control.post(&self.target.name, |t| {
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

    fn run_batch(&mut self, batch: crate::batch::Batch, intake: &mut Intake) {
        for (root, work) in batch.roots {
            let covers = intake.take_covers(&root);
            let owned_by_retrier = self.failing.get(&root).is_some_and(|f| f.until.is_none());
            if owned_by_retrier && covers.is_empty() {
                // The target is failing and the retrier decides when to try again:
                // new work joins its journal untried (no rsync storm during an outage).
                let excludes = intake.cron_excludes.remove(&root).unwrap_or_default();
                if !self.hand_over(&root, &work, excludes, Vec::new(), "", intake) {
                    self.keep(&root, work, Vec::new(), intake, Outcome::Retry);
                }
                continue;
            }
            let mut work = work;
            let mut covers = covers;
            if work.resyncs.contains(&PathBytes::root()) {
                // A whole-root resync absorbed everything else of the root, except a
                // two-way target's deletes (its compares make none): those go live.
                let excludes = intake.cron_excludes.remove(&root).unwrap_or_default();
                let covers = std::mem::take(&mut covers);
                self.start_full(&root, FullKind::Full { excludes }, covers, work.since_us);
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
                self.start_full(&root, FullKind::CatchUp { since_us }, with, work.since_us);
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
                    if self.hand_over(
                        &root,
                        &rest,
                        Vec::new(),
                        covers.clone(),
                        &result.error,
                        intake,
                    ) {
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
        work: RootWork,
        covers: Vec<u64>,
        intake: &mut Intake,
        outcome: Outcome,
    ) {
        intake.cron_excludes.remove(root);
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

    /// Hands `work` to the retrier's journal and waits for the ack. `false` when the
    /// retrier did not answer in time: the caller keeps the work.
    fn hand_over(
        &mut self,
        root: &str,
        work: &RootWork,
        excludes: Vec<String>,
        covers: Vec<u64>,
        error: &str,
        intake: &mut Intake,
    ) -> bool {
        let mut w = to_wire(work);
        w.excludes = excludes;
        if w.is_empty() && covers.is_empty() {
            return true;
        }
        let id = self
            .reporter
            .send(ReportKind::Failed, root, covers.clone(), w, error);
        let deadline = Instant::now() + ACK_WAIT;
        loop {
            if intake.acked.remove(&id) {
                for c in &covers {
                    intake.held.remove(c);
                }
                return true;
            }
            let now = Instant::now();
            if now >= deadline || self.control.abort.load(Ordering::SeqCst) {
                return false;
            }
            intake.wait(Some(deadline - now));
        }
    }

    fn start_full(&mut self, root: &str, kind: FullKind, covers: Vec<u64>, since_us: u64) {
        if let Some(running) = self.full.get_mut(root) {
            running.again_since_us = protocol::earliest_us(running.again_since_us, since_us);
            // This request may have come after the running one passed the part that
            // was lost: run once more when it is over. Live work keeps flowing.
            running.again = Some(match running.again.take() {
                None => (kind, covers),
                Some((k, mut c)) => {
                    c.extend(covers);
                    (k.merge(kind), c)
                }
            });
            return;
        }
        let Some(tx) = &self.full_tx else { return };
        let req = FullReq {
            root: root.to_string(),
            kind,
            job_ids: covers,
        };
        if tx.send(req).is_ok() {
            self.full.insert(
                root.to_string(),
                FullState {
                    replay: RootWork::default(),
                    since_us,
                    again_since_us: 0,
                    again: None,
                },
            );
        }
    }

    fn full_finished(&mut self, done: &FullDone, intake: &mut Intake) {
        self.reporter.run_started_us = done.started_us;
        let state = self.full.remove(&done.root);
        let since_us = state.as_ref().map_or(0, |s| s.since_us);
        let whole = [PathBytes::root()];
        if done.result.outcome == Outcome::Success {
            if done.ran {
                self.reporter
                    .deliver(&done.root, &BTreeMap::new(), &whole, None);
                self.unsendable.retain(|(root, _), _| *root != done.root);
            }
            // A compare the root guard refused settles the jobs it covered too: the
            // refusal stands in the status and in the guard's record (which makes the
            // next compare a full one), and the target is not failing, so live
            // changes keep flowing.
            let last_success_us = self.last_success_us;
            self.delivered(&done.root, done.job_ids.clone(), intake);
            if !done.ran {
                self.last_success_us = last_success_us;
            }
        } else {
            self.last_error = done.result.error.clone();
            let attempt = self.failing.get(&done.root).map_or(1, |f| f.attempt + 1);
            self.reporter.deliver(
                &done.root,
                &BTreeMap::new(),
                &whole,
                Some((attempt, &done.result.error)),
            );
            let (mut owed, excludes) = done.kind.owed();
            owed.since_us = since_us;
            if self.hand_over(
                &done.root,
                &owed,
                excludes,
                done.job_ids.clone(),
                &done.result.error,
                intake,
            ) {
                let attempt = self.failing.get(&done.root).map_or(1, |f| f.attempt + 1);
                self.failing.insert(
                    done.root.clone(),
                    Failing {
                        attempt,
                        until: None,
                    },
                );
            } else {
                tracing::warn!(target = %self.target.name, root = %done.root, error = %done.result.error, "full-lane run failed and the retrier did not answer; retrying from memory");
                self.keep(
                    &done.root,
                    owed,
                    done.job_ids.clone(),
                    intake,
                    done.result.outcome,
                );
            }
        }
        let Some(state) = state else { return };
        // Sent during the full sync: send again, the full sync may have overtaken it.
        // It did reach the target once, so it is no lag.
        if !state.replay.is_empty() {
            let mut replay = state.replay;
            replay.forget_times();
            intake.cron_excludes.remove(&done.root);
            intake.batcher.merge(&done.root, replay);
        }
        if let Some((kind, covers)) = state.again {
            let (mut owed, excludes) = kind.owed();
            owed.since_us = state.again_since_us;
            // A cron sync's own excludes only when it owes nothing else (see accept).
            if !excludes.is_empty() && !intake.batcher.has_work(&done.root) {
                intake.cron_excludes.insert(done.root.clone(), excludes);
            } else {
                intake.cron_excludes.remove(&done.root);
            }
            intake
                .covers
                .entry(done.root.clone())
                .or_default()
                .extend(covers);
            intake.batcher.merge(&done.root, owed);
        }
    }

    /// Brings one root's work (no whole-root resync) to the target. On failure returns
    /// what is still owed.
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
        if let Err(r) = check_source(&info.path) {
            return Some((work, r));
        }
        let mut tick = |wait: Duration| intake.wait(Some(wait));
        if !work.resyncs.is_empty() {
            let subtrees: Vec<PathBytes> = work.resyncs.iter().cloned().collect();
            let started = Instant::now();
            tracing::debug!(target = %self.target.name, root, paths = ?subtrees.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "subtree resync started");
            let result = self.live.resync(root, info, &subtrees, &[], &mut tick);
            if result.outcome != Outcome::Success {
                return Some((work, result));
            }
            self.unsendable.retain(|(r, p), _| {
                r != root
                    || !subtrees
                        .iter()
                        .any(|s| s == p || p.ancestors().any(|a| a == s.as_bytes()))
            });
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
                let rest = RootWork {
                    resyncs: Default::default(),
                    paths,
                    catch_up: None,
                    since_us: work.since_us,
                    keep_deletes: work.keep_deletes,
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

/// An incremental run that sent all but some paths (rsync's 23), narrowed: the list is
/// halved until each path that fails stands alone, and each of those is replaced by a
/// compare of the nearest directory above it that exists here (which also clears what
/// a changed type left in the way on the target). A path that fails even then cannot
/// be sent: it is returned with rsync's reason, and the run is a success for the rest,
/// so one such path neither keeps the target failing nor delays its other work. Any
/// other failure (the target gone meanwhile) ends the narrowing with it.
fn narrow(
    runner: &Runner,
    root: &str,
    info: &RootInfo,
    paths: BTreeMap<PathBytes, Touch>,
    failed: RunResult,
    tick: &mut dyn FnMut(Duration),
) -> (RunResult, BTreeMap<PathBytes, String>) {
    let mut alone: Vec<(PathBytes, String)> = Vec::new();
    let mut parts = vec![(paths, failed)];
    while let Some((mut part, failed)) = parts.pop() {
        if part.len() == 1 {
            let (p, _) = part.pop_first().expect("one path");
            alone.push((p, failed.error));
            continue;
        }
        let half = part
            .keys()
            .nth(part.len() / 2)
            .cloned()
            .expect("two or more");
        let upper = part.split_off(&half);
        for piece in [part, upper] {
            let r = runner.incremental(root, info, &piece, tick);
            match r.outcome {
                Outcome::Success => {}
                Outcome::Partial => parts.push((piece, r)),
                _ => return (r, BTreeMap::new()),
            }
        }
    }
    let mut compared: BTreeMap<PathBytes, Option<String>> = BTreeMap::new();
    let mut unsendable = BTreeMap::new();
    for (p, error) in alone {
        let dir = plan::nearest_dir(&info.path, &p);
        // The whole root is the full lane's, behind the root guard: not compared here.
        let failure = if dir.is_root() {
            Some(error)
        } else if let Some(f) = compared.get(&dir) {
            f.clone()
        } else {
            let r = runner.resync(root, info, std::slice::from_ref(&dir), &[], tick);
            let f = match r.outcome {
                Outcome::Success => None,
                Outcome::Partial => Some(r.error),
                _ => return (r, BTreeMap::new()),
            };
            compared.insert(dir, f.clone());
            f
        };
        if let Some(e) = failure {
            unsendable.insert(p, reason(&e));
        }
    }
    let ok = RunResult {
        outcome: Outcome::Success,
        error: String::new(),
    };
    (ok, unsendable)
}

/// The line of rsync's stderr that says what failed (`rsync: …`), else its first.
fn reason(error: &str) -> String {
    let lines = || error.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find(|l| l.starts_with("rsync: ") && !l.starts_with("rsync error:"))
        .or_else(|| lines().next())
        .unwrap_or("")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsyncs_summary_gives_the_bytes_sent() {
        let cases: [(&[u8], Option<u64>); 6] = [
            (
                b"sent 100,134 bytes  received 35 bytes  200,338.00 bytes/sec",
                Some(100_134),
            ),
            (
                b"sent 67 bytes  received 12 bytes  158.00 bytes/sec",
                Some(67),
            ),
            (b"sent 1.234.567 bytes  received 1 bytes", Some(1_234_567)),
            (b"total size is 100,000  speedup is 1.00", None),
            (b">f+++++++++ sent 5 bytes", None),
            (b"sent 3.00M bytes  received 1 bytes", None),
        ];
        for (line, want) in cases {
            assert_eq!(sent_bytes(line), want, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn a_pull_takes_only_what_rested_between_its_two_listings() {
        let first = b".d..t...... 4096 2026/12/04-09:41:45 ./\n\
                      cL+++++++++ 1 2026/12/04-09:41:45 lnk\n\
                      >f+++++++++ 2 2026/12/04-09:41:45 odd name\n\
                      >f+++++++++ 100 2026/12/04-09:41:45 growing\n\
                      cd+++++++++ 4096 2026/12/04-09:41:45 d/\n\
                      >f.st...... 3 2026/12/04-09:41:40 d/new\\#012line\n";
        let second = b".d..t...... 4096 2026/12/04-09:41:46 ./\n\
                       cL+++++++++ 1 2026/12/04-09:41:45 lnk\n\
                       >f+++++++++ 2 2026/12/04-09:41:45 odd name\n\
                       >f+++++++++ 200 2026/12/04-09:41:46 growing\n\
                       cd+++++++++ 4096 2026/12/04-09:41:45 d/\n\
                       >f.st...... 3 2026/12/04-09:41:40 d/new\\#012line\n\
                       >f+++++++++ 1 2026/12/04-09:41:46 just-made\n";
        let got: Vec<Vec<u8>> = settled_pulls(first, second)
            .into_keys()
            .map(|p| p.as_bytes().to_vec())
            .collect();
        let want: Vec<&[u8]> = vec![b"d", b"d/new\nline", b"lnk", b"odd name"];
        assert_eq!(got, want);
    }

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

    /// A catch-up of `src` into the local directory `dst` since `since`.
    fn catch_up_locally(work: &Path, src: &Path, dst: &Path, since: u64) -> RunResult {
        let text = format!(
            "[[root]]\nname = \"r\"\npath = {:?}\n[[target]]\nname = \"t\"\nurl = {:?}\n",
            src.display().to_string(),
            dst.display().to_string(),
        );
        let config = protocol::config::Config::parse(&text, &work.join("c.toml")).unwrap();
        let runner = Runner::new(
            config.targets[0].clone(),
            work,
            "test",
            Arc::new(Control::default()),
        )
        .unwrap();
        let info = RootInfo {
            path: config.roots[0].path.clone(),
            rules: config.roots[0].rules.clone(),
            allow_wipe: false,
            manifest: work.join("no-manifest"),
        };
        runner
            .catch_up("r", &info, since, &mut |w| std::thread::sleep(w))
            .0
    }

    fn ctime_us(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(p).unwrap();
        m.ctime() as u64 * 1_000_000 + m.ctime_nsec() as u64 / 1000
    }

    /// Everything users do to a tree while syncbus is stopped reaches the target
    /// through the catch-up, and nothing it did not need to look at is compared (an
    /// extra file on the target in an untouched directory survives: no full compare).
    #[test]
    fn a_catch_up_brings_every_kind_of_change_since_the_checkpoint() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        let w = |rel: &str, text: &str| {
            let p = src.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        for (rel, text) in [
            ("a/f1", "one"),
            ("a/sub/deep/g", "g"),
            ("b/inner/keep", "b"),
            ("c/h", "h"),
            ("site/old/z", "old site"),
            ("site.new/x/y", "new site"),
            ("gone/inner/i", "i"),
            ("perm", "p"),
            ("swap/x/file", "v1"),
        ] {
            w(rel, text);
        }
        // A prepared copy whose child directory keeps the original's times (found in
        // review: swapped in while stopped, it matched the old one by name and time).
        let cp = std::process::Command::new("cp")
            .arg("-a")
            .arg(src.join("swap"))
            .arg(src.join("swap.new"))
            .status()
            .unwrap();
        assert!(cp.success());
        std::fs::write(src.join("swap.new/x/file"), "v2 prepared").unwrap();
        let copy = std::process::Command::new("rsync")
            .args(["-a", "--delete"])
            .arg(format!("{}/", src.display()))
            .arg(&dst)
            .status()
            .unwrap();
        assert!(copy.success());
        // Inside b/inner, so b's own attributes on the target stay those of the source (a
        // directory that differs on the target is compared in full, on purpose).
        std::fs::write(dst.join("b/inner/untouched-extra"), "only on the target").unwrap();
        // The checkpoint: a ctime later than every change above (ctime has the kernel's
        // coarse clock, so wait for it to move on rather than for a fixed time).
        let before = [
            "a",
            "a/sub",
            "b",
            "b/inner",
            "c",
            "site",
            "site.new",
            "gone",
            "perm",
            "swap",
            "swap.new",
            "swap.new/x",
            "swap.new/x/file",
            "",
        ]
        .iter()
        .map(|r| ctime_us(&src.join(r)))
        .max()
        .unwrap();
        let marker = d.path().join("marker");
        let since = loop {
            std::fs::write(&marker, "m").unwrap();
            let t = ctime_us(&marker);
            if t > before {
                break t;
            }
        };
        w("a/f1", "changed");
        std::fs::remove_file(src.join("c/h")).unwrap();
        std::fs::rename(src.join("site"), src.join("site.old")).unwrap();
        std::fs::rename(src.join("site.new"), src.join("site")).unwrap();
        std::fs::rename(src.join("swap"), src.join("swap.old")).unwrap();
        std::fs::rename(src.join("swap.new"), src.join("swap")).unwrap();
        w("n/new", "new dir");
        std::fs::rename(src.join("a/sub"), src.join("a/moved")).unwrap();
        std::fs::remove_dir_all(src.join("gone")).unwrap();
        std::fs::set_permissions(src.join("perm"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("a", src.join("link")).unwrap();
        let odd = src
            .join("a")
            .join(std::ffi::OsStr::from_bytes(b"odd\nname\xff"));
        std::fs::create_dir(&odd).unwrap();
        std::fs::write(odd.join("f"), "odd").unwrap();

        let r = catch_up_locally(d.path(), &src, &dst, since);
        assert_eq!(r.outcome, Outcome::Success, "{}", r.error);
        let diff = testkit::tree_diff(&src, &dst);
        assert_eq!(
            diff,
            vec!["only in mirror: b/inner/untouched-extra".to_string()]
        );
    }

    /// A filesystem mounted while syncbus was stopped keeps its files' old ctimes: the
    /// catch-up compares it in full.
    #[test]
    fn a_catch_up_compares_a_filesystem_mounted_since_the_checkpoint_in_full() {
        use std::process::{Command, Stdio};
        let d = tempfile::tempdir().unwrap();
        let (src, dst, stage) = (
            d.path().join("src"),
            d.path().join("dst"),
            d.path().join("stage"),
        );
        for p in [src.join("m"), dst.join("m"), stage.clone()] {
            std::fs::create_dir_all(p).unwrap();
        }
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
            .arg(&stage)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (mount(2) needs root)");
            return;
        }
        let unmount = |p: &Path| {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        };
        std::fs::write(stage.join("old"), "written before the checkpoint").unwrap();
        let before = ctime_us(&stage.join("old"))
            .max(ctime_us(&src))
            .max(ctime_us(&src.join("m")));
        let marker = d.path().join("marker");
        let since = loop {
            std::fs::write(&marker, "m").unwrap();
            let t = ctime_us(&marker);
            if t > before {
                break t;
            }
        };
        let moved = Command::new("mount")
            .arg("--move")
            .arg(&stage)
            .arg(src.join("m"))
            .status()
            .is_ok_and(|s| s.success());
        if !moved {
            unmount(&stage);
            eprintln!("skipped: cannot move a mount here");
            return;
        }
        let r = catch_up_locally(d.path(), &src, &dst, since);
        unmount(&src.join("m"));
        assert_eq!(r.outcome, Outcome::Success, "{}", r.error);
        assert_eq!(
            std::fs::read_to_string(dst.join("m/old")).unwrap(),
            "written before the checkpoint"
        );
    }

    fn intake() -> (Intake, std::sync::mpsc::Sender<Job>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let intake = Intake {
            rx,
            batcher: Batcher::new(),
            covers: HashMap::new(),
            held: HashSet::new(),
            cron_excludes: HashMap::new(),
            acked: HashSet::new(),
            full_done: Vec::new(),
            stopping: false,
            closed: false,
        };
        (intake, tx)
    }

    fn cron_run(id: u64) -> Job {
        Job::Run {
            root: "r".into(),
            job_ids: vec![id],
            work: Work {
                resyncs: vec![PathBytes::root()],
                excludes: vec!["*.log".into()],
                ..Default::default()
            },
        }
    }

    fn change(path: &str) -> Job {
        Job::Changes {
            root: "r".into(),
            changes: Arc::new(vec![Change {
                op: protocol::wire::Op::Upsert,
                path: path.into(),
                from: None,
                dir: false,
                recursive: false,
                since_us: 0,
            }]),
        }
    }

    /// Found in review: a cron full sync's own excludes hid a live change to an
    /// excluded name that its root resync absorbed, for ever.
    #[test]
    fn a_cron_syncs_excludes_never_hide_work_merged_with_it() {
        // Live change first, cron job second.
        let (mut i, _tx) = intake();
        i.accept(change("app.log"));
        i.accept(cron_run(1));
        assert!(!i.cron_excludes.contains_key("r"));
        // Cron job first, live change second.
        let (mut i, _tx) = intake();
        i.accept(cron_run(1));
        assert!(
            i.cron_excludes.contains_key("r"),
            "alone, it keeps its excludes"
        );
        i.accept(change("app.log"));
        assert!(!i.cron_excludes.contains_key("r"));
        // A catch-up merged in.
        let (mut i, _tx) = intake();
        i.accept(cron_run(1));
        i.accept(Job::CatchUp {
            root: "r".into(),
            since_us: 5,
        });
        assert!(!i.cron_excludes.contains_key("r"));
        // Two cron runs of the same schedule keep them.
        let (mut i, _tx) = intake();
        i.accept(cron_run(1));
        i.accept(cron_run(2));
        assert!(i.cron_excludes.contains_key("r"));
    }

    #[test]
    fn a_catch_up_merged_with_a_cron_sync_drops_its_excludes() {
        let full = FullKind::Full {
            excludes: vec!["*.log".into()],
        };
        let catch_up = FullKind::CatchUp { since_us: 5 };
        let plain = FullKind::Full { excludes: vec![] };
        assert_eq!(full.clone().merge(catch_up.clone()), plain);
        assert_eq!(catch_up.merge(full.clone()), plain);
        assert_eq!(full.clone().merge(full.clone()), full);
    }

    /// Found in review: hook globs matched one directory level only, and an excluded
    /// directory's content went through.
    #[test]
    fn hook_globs_read_like_rsync_globs() {
        let g = GlobPair::new(&["*.html".into(), "/cache/".into(), "docs/*.md".into()]);
        assert!(g.matches(&"index.html".into()));
        assert!(g.matches(&"sub/deep/a.html".into()));
        assert!(g.matches(&"cache".into()));
        assert!(
            !g.matches(&"x/cache".into()),
            "a leading / anchors at the root"
        );
        assert!(g.matches(&"docs/a.md".into()));
        assert!(!g.matches(&"docs/sub/a.md".into()));
        assert!(!g.matches(&"a.htm".into()));
    }
}

#[cfg(test)]
mod old_dated_tests {
    use super::*;

    #[test]
    fn a_file_dated_before_its_change_is_fetched_back() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("old"), "o").unwrap();
        std::fs::write(t.path().join("new"), "n").unwrap();
        let five_ago = std::time::SystemTime::now() - Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(t.path().join("old"))
            .unwrap()
            .set_modified(five_ago)
            .unwrap();
        let touch = Touch {
            deleted: false,
            since_us: protocol::now_us(),
        };
        let paths: BTreeMap<PathBytes, Touch> = [
            ("old".into(), touch),
            ("new".into(), touch),
            ("gone".into(), touch),
        ]
        .into_iter()
        .collect();
        let got: Vec<String> = old_dated(t.path(), &paths)
            .keys()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(got, vec!["old"]);
    }
}
