//! The stage around the journal: the sockets, the loop (one `match` over why it woke
//! up), one journal transaction per report, the status and the fail log's copy.

mod due;
mod reports;
mod start;

use start::open_journal;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::bus::{self, BusError, Endpoints, Shutdown};
use protocol::config::Config;
use protocol::stage::StageError;
use protocol::status::{self, StageStatus, TargetStatus};
use protocol::wire::{self, JobKind, JobMsg, Report, Work};

use crate::faillog;
use crate::journal::{Journal, JournalError, Record};
use crate::probe::{ProbeRx, ProbeTx};
use crate::target::{TargetState, HEARTBEAT};

const FAIL_LOG_EVERY: Duration = Duration::from_secs(1);

/// How often a journal whose write failed is opened again.
const JOURNAL_RETRY: Duration = Duration::from_secs(1);

/// Why the loop woke up. A wake-up can bring both; they are handled in this order. A
/// deadline (a heartbeat, a due target, a probe's answer) needs no arm of its own:
/// every round starts with the tick that does what is due.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// Reports or deliveries are queued on the PULL.
    Reports,
    /// SIGTERM or SIGINT: write the fail log, return (the journal keeps the jobs).
    Stop,
}

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

struct Retrier<'a> {
    config: &'a Config,
    journal: Journal,
    jobs: BTreeMap<u64, Job>,
    targets: HashMap<String, TargetState>,
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
    let epoch = bus::new_epoch();
    let mut r = Retrier {
        probes: std::sync::mpsc::channel(),
        config,
        journal,
        jobs: BTreeMap::new(),
        targets: config
            .targets
            .iter()
            .map(|t| (t.name.clone(), TargetState::new(&t.endpoint, now, epoch)))
            .collect(),
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
    'run: loop {
        if shutdown.requested() {
            break;
        }
        let now = Instant::now();
        r.tick(now, &publisher)?;
        r.post_status(now);
        for event in wait(&pull, &eps.reports, shutdown, r.next_wake(now))? {
            match event {
                Event::Reports => r.take_reports(&pull, &publisher, &deliveries)?,
                Event::Stop => break 'run,
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

/// Waits until something is readable or `wake` comes, and says why it woke up: the
/// reports (when queued), then a stop (when asked for). Nothing when a signal
/// interrupted the wait or a deadline came.
fn wait(
    pull: &zmq::Socket,
    endpoint: &str,
    shutdown: &Shutdown,
    wake: Instant,
) -> Result<Vec<Event>, BusError> {
    let timeout = wake.saturating_duration_since(Instant::now());
    let mut items = [
        pull.as_poll_item(zmq::POLLIN),
        zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
    ];
    match zmq::poll(&mut items, timeout.as_millis().clamp(1, 1000) as i64) {
        Ok(_) => {}
        Err(zmq::Error::EINTR) => return Ok(Vec::new()),
        Err(source) => {
            return Err(BusError::Zmq {
                op: "poll",
                endpoint: endpoint.to_string(),
                source,
            })
        }
    }
    let [reports, signal] = &items;
    if signal.is_readable() {
        shutdown.drain();
        let _ = shutdown.take_hup();
    }
    let mut events = Vec::with_capacity(2);
    if reports.is_readable() {
        events.push(Event::Reports);
    }
    if shutdown.requested() {
        events.push(Event::Stop);
    }
    Ok(events)
}

impl Retrier<'_> {
    /// Takes in everything queued on the PULL: deliveries are relayed as they came,
    /// reports handled.
    fn take_reports(
        &mut self,
        pull: &zmq::Socket,
        publisher: &zmq::Socket,
        deliveries: &zmq::Socket,
    ) -> Result<(), StageError> {
        while let Some((topic, payload)) = bus::try_recv(pull)? {
            if topic.starts_with(wire::DELIVERIES_TOPIC.as_bytes()) {
                // A subscriber that stalls makes the PUB drop (seen as a gap in
                // the dispatcher's seq), never this loop wait.
                let _ = deliveries.send_multipart([&topic[..], &payload[..]], zmq::DONTWAIT);
                continue;
            }
            match wire::decode::<Report>(&payload) {
                Ok(rep) => self.handle(rep, publisher)?,
                Err(e) => tracing::warn!(error = %e, "undecodable report ignored"),
            }
        }
        Ok(())
    }

    fn send(&mut self, publisher: &zmq::Socket, mut msg: JobMsg) -> Result<(), StageError> {
        let Some(t) = self.targets.get_mut(&msg.target) else {
            return Ok(());
        };
        (msg.epoch, msg.seq) = t.next_stamp();
        bus::send(publisher, &wire::jobs_topic(&msg.target), &msg)?;
        Ok(())
    }

    fn msg(&self, kind: JobKind, target: &str) -> JobMsg {
        JobMsg {
            version: wire::WORK_VERSION,
            // Stamped as it is sent, on the target's topic.
            epoch: 0,
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
            Err(e @ JournalError::Broken { .. }) => Err(e.into()),
            Err(e) => {
                tracing::debug!(error = %e, "the journal cannot be opened again yet");
                self.journal_error = Some((why.clone(), now + JOURNAL_RETRY));
                Ok(())
            }
        }
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + HEARTBEAT;
        for (name, t) in &self.targets {
            let waiting = self.journal_error.is_none()
                && self
                    .jobs
                    .values()
                    .any(|j| &j.target == name && j.in_flight.is_none());
            wake = wake.min(t.next_wake(now, waiting));
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
            .map(|(name, t)| (name.clone(), t.status(now, now_us)))
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
