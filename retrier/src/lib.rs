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

pub mod faillog;
pub mod journal;
pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::bus::{self, Endpoints, Shutdown};
use protocol::config::{Config, Endpoint};
use protocol::stage::StageError;
use protocol::status::{self, StageStatus, TargetStatus};
use protocol::wire::{self, JobKind, JobMsg, Report, ReportKind, Work};

use journal::{Journal, Record};

/// How long a job that was sent out may stay unanswered before it is sent again.
pub const IN_FLIGHT: Duration = Duration::from_secs(600);
const HEARTBEAT: Duration = Duration::from_secs(1);
const FAIL_LOG_EVERY: Duration = Duration::from_secs(1);

/// What the retrier knows of one journal job without reading it from disk.
struct Job {
    target: String,
    root: String,
    attempt: u32,
    /// Sent out and not yet answered, until this time.
    in_flight: Option<Instant>,
    /// When the oldest change behind it happened (µs), and how many paths and
    /// subtrees it holds: the target's lag and backlog in the status.
    since_us: u64,
    len: usize,
}

impl Job {
    fn of(rec: &Record) -> Job {
        Job {
            target: rec.target.clone(),
            root: rec.root.clone(),
            attempt: rec.attempt,
            in_flight: None,
            // The work's oldest change; a full sync request has none (not lag).
            since_us: rec.work.since_us,
            len: rec.work.len().max(1),
        }
    }
}

/// How to tell cheaply whether a target is reachable.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Probe {
    Tcp(String),
    Dir(PathBuf),
    /// Nothing to probe (a command target): the backoff alone decides.
    None,
}

fn probe_of(endpoint: &Endpoint) -> Probe {
    match (endpoint, endpoint.address()) {
        (_, Some(addr)) => Probe::Tcp(addr),
        (Endpoint::Local { path }, None) => Probe::Dir(
            path.parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_else(|| path.clone()),
        ),
        (_, None) => Probe::None,
    }
}

fn reachable(probe: &Probe) -> bool {
    match probe {
        Probe::Tcp(addr) => addr.to_socket_addrs().is_ok_and(|mut addrs| {
            addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
        }),
        Probe::Dir(p) => p.is_dir(),
        Probe::None => false,
    }
}

struct TargetState {
    /// Consecutive failed tries; 0 when the target is healthy.
    failures: u32,
    /// When its jobs may go out next.
    due: Instant,
    probe: Probe,
    probe_down: bool,
    next_probe: Instant,
    /// A probe runs on its own thread (a connect or a DNS lookup may block).
    probing: bool,
    seq: u64,
    next_beat: Instant,
    /// The error of the last failed try and when the target last took something.
    last_error: String,
    last_success_us: u64,
}

type ProbeTx = std::sync::mpsc::Sender<(String, bool)>;
type ProbeRx = std::sync::mpsc::Receiver<(String, bool)>;

struct Retrier<'a> {
    config: &'a Config,
    journal: Journal,
    jobs: BTreeMap<u64, Job>,
    targets: HashMap<String, TargetState>,
    epoch: u64,
    fail_log: PathBuf,
    fail_log_dirty: bool,
    fail_log_next: Instant,
    /// Probe results: (target, reachable).
    probes: (ProbeTx, ProbeRx),
    board: Arc<Mutex<StageStatus>>,
    /// The status is rebuilt at most once per [`status::EVERY`], not on every report.
    next_post: Instant,
    /// The last journal write failed (why, and when to reopen the journal): nothing is
    /// acknowledged meanwhile, so the reporters keep their work.
    journal_error: Option<(String, Instant)>,
}

/// How often a journal whose write failed is opened again.
const JOURNAL_RETRY: Duration = Duration::from_secs(1);

/// The file in the state dir that remembers which journal work is owed in.
const JOURNAL_ID_FILE: &str = "journal.id";

/// Opens the journal of `dir`. `Some(why)` beside it when work may have been lost: the
/// journal was missing, empty, replaced by another (its id is not the one the state dir
/// remembers) or unreadable (moved aside as `journal.redb.broken-<time>`, and a new one
/// made). Then only whole-root compares of every root to every target can make up for
/// it.
fn open_journal(dir: &Path) -> Result<(Journal, Option<String>), StageError> {
    let path = dir.join("journal.redb");
    let id_path = dir.join(JOURNAL_ID_FILE);
    let remembered: Option<u64> = std::fs::read_to_string(&id_path)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    // `syncbus fail-log` may hold the journal for a moment: wait a little before
    // calling it a second instance.
    let give_up = Instant::now() + Duration::from_secs(5);
    let mut lost = None;
    let journal = loop {
        match Journal::open(&path) {
            Ok(j) => break j,
            Err(e @ journal::JournalError::Open { .. }) if Instant::now() >= give_up => {
                return Err(StageError::Unavailable(e.to_string()))
            }
            Err(journal::JournalError::Open { .. }) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e @ journal::JournalError::Broken { .. }) => {
                let aside = dir.join(format!(
                    "journal.redb.broken-{}",
                    protocol::now_us() / 1_000_000
                ));
                std::fs::rename(&path, &aside).map_err(|r| {
                    StageError::Environment(format!(
                        "{e}; it cannot be moved aside either ({r}): move or remove `{}` by hand",
                        path.display()
                    ))
                })?;
                tracing::error!(error = %e, moved_to = %aside.display(), "the journal cannot be read; moved aside, starting a new one");
                lost = Some(format!("unreadable, moved to {}", aside.display()));
            }
            Err(e) => return Err(StageError::Failed(e.to_string())),
        }
    };
    if let Some(old) = remembered.filter(|old| *old != journal.id()) {
        lost.get_or_insert_with(|| {
            format!(
                "missing, emptied or replaced (it was journal {old:x}, this one is {:x})",
                journal.id()
            )
        });
    }
    if remembered != Some(journal.id()) {
        write_synced(&id_path, format!("{}\n", journal.id()).as_bytes()).map_err(|e| {
            StageError::Environment(format!("cannot write `{}`: {e}", id_path.display()))
        })?;
    }
    Ok((journal, lost))
}

/// Writes `path` whole and durably (a temp file, fsync, rename).
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Runs the retrier until `shutdown`.
pub fn run(config: &Config, shutdown: &Shutdown) -> Result<(), StageError> {
    let dir = &config.retry.state_dir;
    // Made or taken only when provably ours and private, like the runtime dir.
    bus::private_dir(dir).map_err(|e| {
        StageError::Config(format!("cannot use the state dir `{}`: {e}", dir.display()))
    })?;
    // `syncbus fail-log` may hold the journal for a moment: wait a little before
    // calling it a second instance.
    let (journal, lost) = open_journal(dir)?;
    let now = Instant::now();
    let mut r = Retrier {
        probes: std::sync::mpsc::channel(),
        config,
        journal,
        jobs: BTreeMap::new(),
        targets: config
            .targets
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TargetState {
                        failures: 0,
                        due: now,
                        probe: probe_of(&t.endpoint),
                        probe_down: false,
                        next_probe: now,
                        probing: false,
                        seq: 0,
                        next_beat: now,
                        last_error: String::new(),
                        last_success_us: 0,
                    },
                )
            })
            .collect(),
        epoch: bus::new_epoch(),
        fail_log: dir.join("rsync_fail_log.sh"),
        fail_log_dirty: true,
        fail_log_next: now,
        board: Arc::new(Mutex::new(StageStatus::new("retrier", protocol::now_us()))),
        next_post: now,
        journal_error: None,
    };
    let _status = status::Writer::shared(&config.runtime_dir, "retrier", &r.board);
    r.load()?;
    if let Some(why) = lost {
        r.compare_everything(&why)?;
    }
    // At once, so `syncbus fail-log` finds a current copy while this retrier holds
    // the journal.
    r.write_fail_log();
    r.fail_log_next = now + FAIL_LOG_EVERY;

    let ctx = zmq::Context::new();
    let eps = Endpoints::new(config);
    let pull = bus::socket(&ctx, zmq::PULL)?;
    bus::bind(&pull, &eps.reports)?;
    let publisher = bus::socket(&ctx, zmq::PUB)?;
    bus::bind(&publisher, &eps.jobs)?;
    // The public delivery stream: what dispatchers report, relayed as it came.
    let deliveries = bus::socket(&ctx, zmq::PUB)?;
    bus::bind(&deliveries, &eps.deliveries)?;
    if let Some(tcp) = &config.tcp_deliveries {
        bus::bind_public(&deliveries, tcp, "delivery stream");
    }
    tracing::info!(
        reports = %eps.reports,
        jobs = %eps.jobs,
        journal = %dir.join("journal.redb").display(),
        pending = r.jobs.len(),
        "retrier listening"
    );
    loop {
        if shutdown.requested() {
            break;
        }
        let now = Instant::now();
        r.tick(now, &publisher)?;
        r.post_status(now);
        let wait = r.next_wake(now).saturating_duration_since(Instant::now());
        let mut items = [
            pull.as_poll_item(zmq::POLLIN),
            zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
        ];
        match zmq::poll(&mut items, wait.as_millis().clamp(1, 1000) as i64) {
            Ok(_) => {}
            Err(zmq::Error::EINTR) => continue,
            Err(e) => return Err(StageError::Failed(format!("zmq poll: {e}"))),
        }
        if items[1].is_readable() {
            shutdown.drain();
            let _ = shutdown.take_hup();
        }
        if items[0].is_readable() {
            while let Some((topic, payload)) = bus::try_recv(&pull)? {
                if topic.starts_with(wire::DELIVERIES_TOPIC.as_bytes()) {
                    // A subscriber that stalls makes the PUB drop (seen as a gap in
                    // the dispatcher's seq), never this loop wait.
                    let _ = deliveries.send_multipart([&topic[..], &payload[..]], zmq::DONTWAIT);
                    continue;
                }
                match wire::decode::<Report>(&payload) {
                    Ok(rep) => r.handle(rep, &publisher)?,
                    Err(e) => tracing::warn!(error = %e, "undecodable report ignored"),
                }
            }
        }
    }
    r.write_fail_log();
    tracing::info!(
        pending = r.jobs.len(),
        "retrier stopping; the journal keeps the pending jobs"
    );
    Ok(())
}

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

impl Retrier<'_> {
    fn owed_to(&self, root: &str, target: &str) -> String {
        self.config.owed_to(root, target).unwrap_or_default()
    }

    /// Takes in the journal. Work owed to another identity (the root's path or the
    /// target's place changed under the same names, or a journal from before identities
    /// were recorded) is not replayed: it is dropped, and replaced by a whole-root
    /// compare of that root to that target, since the tree is the truth.
    fn load(&mut self) -> Result<(), StageError> {
        let all = self.journal.load()?;
        let mut per_target: BTreeMap<String, usize> = BTreeMap::new();
        let mut dropped = Vec::new();
        let mut compares: Vec<Record> = Vec::new();
        for (id, rec) in all {
            if !self.targets.contains_key(&rec.target) {
                tracing::warn!(job_id = id, target = %rec.target, "journal job for a target no longer configured; kept, not sent");
            } else if let Some(now) = self.config.owed_to(&rec.root, &rec.target) {
                if rec.owed_to != now {
                    tracing::warn!(
                        job_id = id,
                        target = %rec.target,
                        root = %rec.root,
                        owed_to = %rec.owed_to,
                        now = %now,
                        "journalled work was owed to another root path or target place; dropped, comparing the root in full instead"
                    );
                    dropped.push(id);
                    if !compares
                        .iter()
                        .any(|c| c.root == rec.root && c.target == rec.target)
                    {
                        compares.push(Record {
                            target: rec.target.clone(),
                            root: rec.root.clone(),
                            work: Work {
                                resyncs: [protocol::PathBytes::root()].into(),
                                ..Default::default()
                            },
                            attempt: 0,
                            since_us: protocol::now_us(),
                            error: String::new(),
                            owed_to: now,
                        });
                    }
                    continue;
                }
            }
            *per_target.entry(rec.target.clone()).or_default() += 1;
            self.jobs.insert(id, Job::of(&rec));
        }
        if !dropped.is_empty() {
            let ids = self.journal.replace(&dropped, &compares)?;
            for (id, rec) in ids.into_iter().zip(&compares) {
                *per_target.entry(rec.target.clone()).or_default() += 1;
                self.jobs.insert(id, Job::of(rec));
            }
        }
        for (target, jobs) in per_target {
            tracing::info!(target = %target, jobs, "resuming pending jobs from the journal");
        }
        Ok(())
    }

    /// The journal was lost (`why`): what it owed is unknown, so every root is compared
    /// in full with every target bound to it, through the journal like any other work.
    fn compare_everything(&mut self, why: &str) -> Result<(), StageError> {
        let recs: Vec<Record> = self
            .config
            .targets
            .iter()
            .flat_map(|t| t.roots.iter().map(move |r| (t, r)))
            .map(|(t, r)| Record {
                target: t.name.clone(),
                root: r.clone(),
                work: Work {
                    resyncs: [protocol::PathBytes::root()].into(),
                    ..Default::default()
                },
                attempt: 0,
                since_us: protocol::now_us(),
                error: String::new(),
                owed_to: self.owed_to(r, &t.name),
            })
            .collect();
        tracing::warn!(
            why,
            compares = recs.len(),
            "the journal was lost: comparing every root with every target in full"
        );
        let ids = self.journal.replace(&[], &recs)?;
        for (id, rec) in ids.into_iter().zip(&recs) {
            self.jobs.insert(id, Job::of(rec));
        }
        self.fail_log_dirty = true;
        Ok(())
    }

    fn send(&mut self, publisher: &zmq::Socket, mut msg: JobMsg) -> Result<(), StageError> {
        let Some(t) = self.targets.get_mut(&msg.target) else {
            return Ok(());
        };
        t.seq += 1;
        t.next_beat = Instant::now() + HEARTBEAT;
        msg.seq = t.seq;
        bus::send(publisher, &wire::jobs_topic(&msg.target), &msg)?;
        Ok(())
    }

    fn msg(&self, kind: JobKind, target: &str) -> JobMsg {
        JobMsg {
            version: wire::WORK_VERSION,
            epoch: self.epoch,
            seq: 0,
            kind,
            target: target.to_string(),
            report_id: 0,
            root: String::new(),
            job_ids: Vec::new(),
            attempt: 0,
            work: Work::default(),
            time_us: protocol::now_us(),
        }
    }

    fn handle(&mut self, rep: Report, publisher: &zmq::Socket) -> Result<(), StageError> {
        let now = Instant::now();
        match rep.kind {
            ReportKind::Failed => {
                let attempt = rep
                    .covers
                    .iter()
                    .filter_map(|id| self.jobs.get(id))
                    .map(|j| j.attempt)
                    .max()
                    .unwrap_or(0)
                    + u32::from(!rep.error.is_empty());
                // A two-way target's compares make no deletes: its work keeps them.
                let two_way = self.config.target(&rep.target).is_some_and(|t| t.two_way);
                let work = policy::collapse(
                    policy::merge([rep.work], two_way),
                    self.config.retry.max_paths,
                );
                let rec = Record {
                    target: rep.target.clone(),
                    root: rep.root.clone(),
                    work,
                    attempt,
                    since_us: rep.time_us,
                    error: rep.error.clone(),
                    owed_to: self.owed_to(&rep.root, &rep.target),
                };
                let new = if rec.work.is_empty() {
                    vec![]
                } else {
                    vec![rec]
                };
                let Some(ids) = self.store(&rep.covers, &new) else {
                    return Ok(()); // not acknowledged: the dispatcher keeps the work
                };
                for (id, rec) in ids.into_iter().zip(&new) {
                    self.jobs.insert(id, Job::of(rec));
                }
                let mut ack = self.msg(JobKind::Ack, &rep.target);
                ack.report_id = rep.report_id;
                self.send(publisher, ack)?;
                let policy = &self.config.retry;
                if let Some(t) = self.targets.get_mut(&rep.target) {
                    let tried = !rep.error.is_empty();
                    if tried {
                        t.last_error = rep.error.clone();
                    }
                    if tried && (!rep.covers.is_empty() || t.failures == 0) {
                        t.failures += 1;
                        let delay = policy::next_attempt(policy, t.failures, rand::random());
                        t.due = now + delay;
                        tracing::warn!(target = %rep.target, root = %rep.root, attempt = t.failures, retry_in_ms = delay.as_millis() as u64, error = %rep.error, "delivery failed; journalled, will retry");
                    }
                }
            }
            ReportKind::Delivered => {
                // Without covers it only says the target works again.
                if !rep.covers.is_empty() && self.store(&rep.covers, &[]).is_none() {
                    return Ok(());
                }
                if let Some(t) = self.targets.get_mut(&rep.target) {
                    if t.failures > 0 {
                        tracing::info!(target = %rep.target, attempts = t.failures, "target recovered");
                    }
                    t.failures = 0;
                    t.due = now;
                    t.probe_down = false;
                    t.last_success_us = rep.time_us;
                }
            }
            ReportKind::Request => {
                let targets: Vec<String> = self
                    .config
                    .targets
                    .iter()
                    .filter(|t| t.roots.contains(&rep.root))
                    .filter(|t| rep.target.is_empty() || t.name == rep.target)
                    .map(|t| t.name.clone())
                    .collect();
                let recs: Vec<Record> = targets
                    .iter()
                    .map(|t| Record {
                        target: t.clone(),
                        root: rep.root.clone(),
                        work: rep.work.clone(),
                        attempt: 0,
                        since_us: rep.time_us,
                        error: String::new(),
                        owed_to: self.owed_to(&rep.root, t),
                    })
                    .collect();
                if let Some(ids) = self.store(&[], &recs) {
                    for (id, rec) in ids.into_iter().zip(&recs) {
                        tracing::info!(target = %rec.target, root = %rep.root, job_id = id, "full sync requested");
                        self.jobs.insert(id, Job::of(rec));
                    }
                }
            }
            ReportKind::Ready => {
                let mut resent = 0;
                for j in self.jobs.values_mut().filter(|j| j.target == rep.target) {
                    resent += usize::from(j.in_flight.take().is_some());
                }
                if let Some(t) = self.targets.get_mut(&rep.target) {
                    if t.failures == 0 {
                        t.due = now;
                    }
                }
                tracing::debug!(target = %rep.target, resent, "dispatcher ready");
            }
        }
        Ok(())
    }

    /// One journal transaction; `None` (logged) when it failed, so nothing is acked.
    fn store(&mut self, covers: &[u64], new: &[Record]) -> Option<Vec<u64>> {
        match self.journal.replace(covers, new) {
            Ok(ids) => {
                for id in covers {
                    self.jobs.remove(id);
                }
                self.fail_log_dirty = true;
                Some(ids)
            }
            Err(e) => {
                let why = format!(
                    "cannot write the journal `{}`: {e}",
                    self.journal.path().display()
                );
                if self.journal_error.is_none() {
                    tracing::error!(error = %why, "nothing is acknowledged until it can; the reporters keep their work");
                }
                self.journal_error = Some((why, Instant::now() + JOURNAL_RETRY));
                None
            }
        }
    }

    /// After a failed write, redb takes no other until the file is opened again: that
    /// is tried every [`JOURNAL_RETRY`]. A journal that cannot be read any more ends
    /// the stage, whose next start moves it aside.
    fn heal_journal(&mut self, now: Instant) -> Result<(), StageError> {
        let Some((why, due)) = &self.journal_error else {
            return Ok(());
        };
        if now < *due {
            return Ok(());
        }
        match self.journal.reopen() {
            Ok(()) => {
                tracing::info!(was = %why, "the journal is open again");
                self.journal_error = None;
                self.fail_log_dirty = true;
                Ok(())
            }
            Err(e @ journal::JournalError::Broken { .. }) => Err(StageError::Failed(e.to_string())),
            Err(e) => {
                tracing::debug!(error = %e, "the journal cannot be opened again yet");
                self.journal_error = Some((why.clone(), now + JOURNAL_RETRY));
                Ok(())
            }
        }
    }

    /// Heartbeats, probes, due jobs and the fail log.
    fn tick(&mut self, now: Instant, publisher: &zmq::Socket) -> Result<(), StageError> {
        self.heal_journal(now)?;
        while let Ok((name, up)) = self.probes.1.try_recv() {
            if let Some(t) = self.targets.get_mut(&name) {
                t.probing = false;
                if up && t.probe_down && t.failures > 0 {
                    tracing::info!(target = %name, "target reachable again; retrying now");
                    t.due = now;
                }
                t.probe_down = !up;
            }
        }
        let names: Vec<String> = self.targets.keys().cloned().collect();
        for name in names {
            let pending = self.jobs.values().any(|j| j.target == name);
            let t = self.targets.get_mut(&name).expect("listed above");
            if pending
                && t.failures > 0
                && now >= t.next_probe
                && !t.probing
                && t.probe != Probe::None
            {
                t.next_probe = now + self.config.retry.probe;
                t.probing = true;
                let (probe, tx, who) = (t.probe.clone(), self.probes.0.clone(), name.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("probe-{name}"))
                    .spawn(move || {
                        let _ = tx.send((who, reachable(&probe)));
                    });
                if spawned.is_err() {
                    t.probing = false;
                }
            }
            // A journal that cannot be written cannot record what a run did.
            if pending && now >= t.due && self.journal_error.is_none() {
                self.send_due(&name, now, publisher)?;
            }
            let t = self.targets.get_mut(&name).expect("listed above");
            if now >= t.next_beat {
                let beat = self.msg(JobKind::Heartbeat, &name);
                self.send(publisher, beat)?;
            }
        }
        if self.fail_log_dirty && now >= self.fail_log_next && self.journal_error.is_none() {
            self.write_fail_log();
            self.fail_log_next = now + FAIL_LOG_EVERY;
        }
        Ok(())
    }

    /// Sends every job of `target` that is not out, one `run` per root.
    fn send_due(
        &mut self,
        target: &str,
        now: Instant,
        publisher: &zmq::Socket,
    ) -> Result<(), StageError> {
        let mut per_root: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (id, j) in &self.jobs {
            if j.target == target && j.in_flight.is_none_or(|t| t <= now) {
                per_root.entry(j.root.clone()).or_default().push(*id);
            }
        }
        for (root, ids) in per_root {
            let mut parts = Vec::new();
            let mut attempt = 0;
            for id in &ids {
                match self.journal.get(*id)? {
                    Some(rec) => {
                        attempt = attempt.max(rec.attempt);
                        parts.push(rec.work);
                    }
                    None => tracing::error!(job_id = id, "job missing from the journal"),
                }
            }
            let mut msg = self.msg(JobKind::Run, target);
            msg.root = root.clone();
            msg.job_ids = ids.clone();
            msg.attempt = attempt;
            let two_way = self.config.target(target).is_some_and(|t| t.two_way);
            msg.work = policy::merge(parts, two_way);
            tracing::debug!(target, root = %root, jobs = ids.len(), paths = msg.work.len(), attempt, "sending jobs");
            self.send(publisher, msg)?;
            for id in ids {
                if let Some(j) = self.jobs.get_mut(&id) {
                    j.in_flight = Some(now + IN_FLIGHT);
                }
            }
        }
        let policy = &self.config.retry;
        if let Some(t) = self.targets.get_mut(target) {
            // A failing target gets new jobs no sooner than its backoff allows.
            if t.failures > 0 {
                t.due = now + policy::next_attempt(policy, t.failures, rand::random());
            }
        }
        Ok(())
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + HEARTBEAT;
        for (name, t) in &self.targets {
            wake = wake.min(t.next_beat);
            if t.probing {
                // Its answer comes on a channel, not a socket: look again soon.
                wake = wake.min(now + Duration::from_millis(20));
            }
            if self.journal_error.is_none()
                && self
                    .jobs
                    .values()
                    .any(|j| &j.target == name && j.in_flight.is_none())
            {
                wake = wake.min(t.due.max(now));
                if t.failures > 0 {
                    wake = wake.min(t.next_probe.max(now));
                }
            }
        }
        if self.fail_log_dirty && self.journal_error.is_none() {
            wake = wake.min(self.fail_log_next.max(now));
        }
        if let Some((_, due)) = &self.journal_error {
            wake = wake.min((*due).max(now));
        }
        wake
    }

    /// Per target: the journalled backlog, its oldest change, the failures in a row
    /// and when the next try is due.
    fn post_status(&mut self, now: Instant) {
        if now < self.next_post {
            return;
        }
        self.next_post = now + status::EVERY;
        let now_us = protocol::now_us();
        let mut targets: BTreeMap<String, TargetStatus> = self
            .targets
            .iter()
            .map(|(name, t)| {
                let waiting = t.failures > 0 && t.due > now;
                let st = TargetStatus {
                    failures: t.failures,
                    last_error: if t.failures > 0 {
                        t.last_error.clone()
                    } else {
                        String::new()
                    },
                    last_success_us: t.last_success_us,
                    next_retry_us: if waiting {
                        now_us + t.due.duration_since(now).as_micros() as u64
                    } else {
                        0
                    },
                    ..Default::default()
                };
                (name.clone(), st)
            })
            .collect();
        for j in self.jobs.values() {
            if let Some(st) = targets.get_mut(&j.target) {
                // Out with a dispatcher, it counts in the dispatcher's backlog.
                if j.in_flight.is_none() {
                    st.backlog += j.len as u64;
                }
                st.oldest_us = protocol::earliest_us(st.oldest_us, j.since_us);
            }
        }
        if let Ok(mut b) = self.board.lock() {
            b.targets = targets;
            b.problem = self
                .journal_error
                .as_ref()
                .map(|(why, _)| why.clone())
                .unwrap_or_default();
            // The loop's heartbeat: it went round, at least once a second.
            b.alive_us = now_us;
        }
    }

    fn write_fail_log(&mut self) {
        let all = match self.journal.load() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the journal for the fail log");
                return;
            }
        };
        let text = faillog::render(self.config, &all);
        match faillog::write(&self.fail_log, &text) {
            Ok(()) => self.fail_log_dirty = false,
            Err(e) => {
                tracing::warn!(path = %self.fail_log.display(), error = %e, "cannot write the fail log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_address_the_daemon_or_ssh_port() {
        let rsync = |url: &str| Endpoint::Rsync {
            url: url.into(),
            password_file: None,
        };
        assert_eq!(
            probe_of(&rsync("rsync://127.0.0.1:8873/m/")),
            Probe::Tcp("127.0.0.1:8873".into())
        );
        assert_eq!(
            probe_of(&rsync("rsync://u@backup/m/sub/")),
            Probe::Tcp("backup:873".into())
        );
        assert_eq!(
            probe_of(&rsync("rsync://[::1]:9/m/")),
            Probe::Tcp("[::1]:9".into())
        );
        let ssh = Endpoint::Ssh {
            dest: "me@web2:/srv/www/".into(),
            port: Some(2222),
            identity_file: None,
            options: vec![],
        };
        assert_eq!(probe_of(&ssh), Probe::Tcp("web2:2222".into()));
        let local = Endpoint::Local {
            path: "/mnt/backup/www".into(),
        };
        assert_eq!(probe_of(&local), Probe::Dir("/mnt/backup".into()));
        let tcp = Endpoint::Tcp {
            addr: "192.168.138.20:8009".into(),
            framing: protocol::config::Framing::Sersync,
            include: vec![],
            exclude: vec![],
            after: vec![],
        };
        assert_eq!(probe_of(&tcp), Probe::Tcp("192.168.138.20:8009".into()));
    }
}
