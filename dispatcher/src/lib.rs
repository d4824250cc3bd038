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
//! The SUB loop ([`run`]) only decodes, checks sequence numbers and hands jobs to the
//! workers over unbounded channels; each worker ([`worker`]) merges whatever arrives
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
//! - After a clean stop (`syncbus run` hands the checkpoint in `CATCH_UP_ENV`), each
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
//!   it at the cost of a full compare.
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

pub mod batch;
pub mod catchup;
pub mod command;
pub mod guard;
pub mod plan;
pub mod worker;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::bus::{self, Endpoints, Shutdown};
use protocol::config::{Config, Target};
use protocol::seq::{Seen, SeqTracker};
use protocol::stage::StageError;
use protocol::status::{self, StageStatus};
use protocol::wire::{self, ChangeBatch, JobKind, JobMsg, ReportKind};

use worker::{Control, Job, Reporter, RootInfo, Worker};

/// How long stopping hooks wait for the last deliveries of the targets they follow.
const HOOK_SETTLE: Duration = Duration::from_millis(300);

/// How long a drain may take after the first SIGTERM/SIGINT.
pub const GRACE: Duration = Duration::from_secs(10);
/// How long the resync for a first message waits for the watcher's own start resync,
/// which covers it: at `syncbus run` start both come, and one full compare is enough.
pub const FIRST_RESYNC_WAIT: Duration = Duration::from_secs(10);

struct Served {
    target: String,
    tx: Sender<Job>,
}

/// The retrier's job stream as this dispatcher follows it, per target.
struct JobStream {
    tx: Sender<Job>,
    tracker: SeqTracker,
    /// Says `ready` when the stream cannot be vouched for (start, gap, new retrier).
    reporter: Reporter,
}

/// Selects the targets to serve: all of them, or the ones named.
fn select<'a>(config: &'a Config, only: &[String]) -> Result<Vec<&'a Target>, StageError> {
    if only.is_empty() {
        if config.targets.is_empty() {
            return Err(StageError::Failed(
                "no `[[target]]` in the config: nothing to dispatch to".into(),
            ));
        }
        return Ok(config.targets.iter().collect());
    }
    let known: Vec<&str> = config.targets.iter().map(|t| t.name.as_str()).collect();
    only.iter()
        .map(|n| {
            config.target(n).ok_or_else(|| {
                StageError::Failed(format!(
                    "unknown target `{n}` (configured: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })
        })
        .collect()
}

/// Runs the dispatcher until `shutdown`: serves `only_targets` (all when empty).
pub fn run(
    config: &Config,
    only_targets: &[String],
    shutdown: &Shutdown,
) -> Result<(), StageError> {
    let targets = select(config, only_targets)?;
    if targets.iter().any(|t| t.runs_rsync()) {
        command::find_rsync().map_err(StageError::Unavailable)?;
    }
    let control = Arc::new(Control {
        board: Arc::new(Mutex::new(StageStatus::new(
            "dispatcher",
            protocol::now_us(),
        ))),
        ..Default::default()
    });
    // One file per dispatcher process: `dispatcher`, or with the targets it serves.
    let file = if only_targets.is_empty() {
        "dispatcher".to_string()
    } else {
        format!("dispatcher@{}", only_targets.join(","))
    };
    // Every target it serves is in its first file, so a probe right after the start
    // does not read "no dispatcher serves it".
    if let Ok(mut b) = control.board.lock() {
        for t in &targets {
            b.targets.entry(t.name.clone()).or_default();
        }
    }
    let _status = status::Writer::shared(&config.runtime_dir, &file, &control.board);
    // root name → the workers bound to it
    let mut routes: HashMap<String, Vec<Served>> = HashMap::new();
    // After-sync hooks: target they follow → (hook's roots, hook's worker).
    let mut hooks: HashMap<String, Vec<(Vec<String>, Served)>> = HashMap::new();
    let (done_tx, done_rx) = mpsc::channel::<(bool, bool)>();
    let mut workers = 0usize;
    let ctx = zmq::Context::new();
    let eps = Endpoints::new(config);
    let reporter = |name: &str| -> Result<Reporter, StageError> {
        let push = bus::socket(&ctx, zmq::PUSH)?;
        bus::connect(&push, &eps.reports)?;
        Ok(Reporter::new(push, name))
    };
    // topic `jobs/<target>/` → that worker
    let mut streams: HashMap<Vec<u8>, JobStream> = HashMap::new();
    // (is an after-sync hook, its worker)
    let mut stops: Vec<(bool, Sender<Job>)> = Vec::new();
    for t in &targets {
        let mut roots = HashMap::new();
        for r in &t.roots {
            let root = config.root(r).ok_or_else(|| {
                StageError::Failed(format!("target `{}` names unknown root `{r}`", t.name))
            })?;
            roots.insert(
                r.clone(),
                RootInfo {
                    path: root.path.clone(),
                    rules: root.rules.clone(),
                    allow_wipe: root.allow_wipe || t.allow_wipe,
                    manifest: config
                        .retry
                        .state_dir
                        .join(protocol::manifest::file_name(r)),
                },
            );
        }
        let (tx, rx) = mpsc::channel();
        let w = Worker::new(
            (*t).clone(),
            roots,
            &config.runtime_dir,
            guard::Store::new(&config.retry.state_dir, &t.name),
            control.clone(),
            reporter(&t.name)?,
            tx.clone(),
        )
        .map_err(|e| {
            StageError::Failed(format!(
                "cannot start the worker of `{}` (scratch dir in `{}`): {e}",
                t.name,
                config.runtime_dir.display()
            ))
        })?;
        streams.insert(
            wire::jobs_topic(&t.name).into_bytes(),
            JobStream {
                tx: tx.clone(),
                tracker: SeqTracker::default(),
                reporter: reporter(&t.name)?,
            },
        );
        let is_hook = matches!(
            &t.endpoint,
            protocol::config::Endpoint::Command { after, .. }
            | protocol::config::Endpoint::Http { after, .. }
            | protocol::config::Endpoint::Tcp { after, .. } if !after.is_empty()
        );
        stops.push((is_hook, tx.clone()));
        let after = match &t.endpoint {
            protocol::config::Endpoint::Command { after, .. }
            | protocol::config::Endpoint::Http { after, .. }
            | protocol::config::Endpoint::Tcp { after, .. } => after.clone(),
            _ => Vec::new(),
        };
        if after.is_empty() {
            for r in &t.roots {
                routes.entry(r.clone()).or_default().push(Served {
                    target: t.name.clone(),
                    tx: tx.clone(),
                });
            }
        }
        for a in after {
            hooks.entry(a).or_default().push((
                t.roots.clone(),
                Served {
                    target: t.name.clone(),
                    tx: tx.clone(),
                },
            ));
        }
        let done = done_tx.clone();
        std::thread::Builder::new()
            .name(format!("target-{}", t.name))
            .spawn(move || {
                let _ = done.send((is_hook, w.run(rx)));
            })
            .map_err(|e| StageError::Failed(format!("cannot start a worker thread: {e}")))?;
        workers += 1;
    }
    drop(done_tx);

    let jobs = bus::socket(&ctx, zmq::SUB)?;
    for topic in streams.keys() {
        jobs.set_subscribe(topic)
            .map_err(|e| StageError::Failed(format!("cannot subscribe to the job stream: {e}")))?;
    }
    bus::connect(&jobs, &eps.jobs)?;
    // The delivery stream, for after-sync hooks (subscribed to nothing without them).
    let delivered = bus::deliveries_of(&ctx, &eps.deliveries, hooks.keys().map(String::as_str))?;
    let mut hook_trackers: HashMap<String, SeqTracker> = HashMap::new();
    let sub = bus::socket(&ctx, zmq::SUB)?;
    let endpoint = eps.changes.clone();
    let mut topics: HashMap<Vec<u8>, String> = HashMap::new();
    for root in routes.keys() {
        let topic = wire::changes_topic(root);
        sub.set_subscribe(topic.as_bytes())
            .map_err(|e| StageError::Failed(format!("cannot subscribe to `{topic}`: {e}")))?;
        topics.insert(topic.into_bytes(), root.clone());
    }
    bus::connect(&sub, &endpoint)?;
    tracing::info!(endpoint = %endpoint, targets = workers, roots = routes.len(), "dispatcher listening");

    let mut trackers: HashMap<String, SeqTracker> = HashMap::new();
    let mut starts = Starts {
        deferred: HashMap::new(),
        catch_up: catch_up_since()
            .map(|t| routes.keys().map(|r| (r.clone(), t)).collect())
            .unwrap_or_default(),
    };
    if let Some(t) = catch_up_since() {
        tracing::info!(
            since_us = t,
            "syncbus stopped cleanly before: the start compares only what changed since"
        );
    }
    let result = loop {
        status::beat(&control.board);
        let now = Instant::now();
        let due: Vec<String> = starts
            .deferred
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(r, _)| r.clone())
            .collect();
        let mut failed = None;
        for root in due {
            starts.deferred.remove(&root);
            tracing::info!(root = %root, "no start resync from the watcher came; resyncing the root");
            let job = starts.start_job(&root);
            if let Err(e) = dispatch(&root, job, &routes) {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if shutdown.requested() {
            // What the filter published before it stopped is still queued: take it in.
            while let Ok(Some((topic, payload))) = bus::try_recv(&sub) {
                let _ = handle(
                    &topic,
                    &payload,
                    &topics,
                    &mut trackers,
                    &mut starts,
                    &routes,
                );
            }
            // A root whose start compare has not run yet (never heard from, or still
            // waiting for the watcher's) gets it now: a stop must not pass for clean
            // with it owed (found in review).
            let waiting: Vec<String> = routes
                .keys()
                .filter(|r| {
                    starts.deferred.contains_key(*r)
                        || starts.catch_up.contains_key(*r)
                        || !trackers.contains_key(*r)
                })
                .cloned()
                .collect();
            for root in waiting {
                let job = starts.start_job(&root);
                let _ = dispatch(&root, job, &routes);
            }
            break Ok(());
        }
        let mut items = [
            sub.as_poll_item(zmq::POLLIN),
            zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
            jobs.as_poll_item(zmq::POLLIN),
            delivered.as_poll_item(zmq::POLLIN),
        ];
        let wait = starts.deferred.values().min().map_or(1000, |t| {
            t.saturating_duration_since(now).as_millis().clamp(1, 1000) as i64
        });
        if let Err(e) = zmq::poll(&mut items, wait) {
            if e == zmq::Error::EINTR {
                continue;
            }
            break Err(StageError::Failed(format!("zmq poll: {e}")));
        }
        if items[1].is_readable() {
            shutdown.drain();
            if shutdown.take_hup() {
                tracing::info!("SIGHUP ignored (no config reload yet)");
            }
        }
        if items[2].is_readable() {
            if let Err(e) = forward_jobs(&jobs, &mut streams) {
                break Err(e);
            }
        }
        if items[3].is_readable() {
            if let Err(e) = forward_deliveries(&delivered, &hooks, &mut hook_trackers) {
                break Err(e);
            }
        }
        if !items[0].is_readable() {
            continue;
        }
        // An error ends the loop but not the stage's duty: the drain below still runs.
        let mut failed = None;
        loop {
            match bus::try_recv(&sub) {
                Ok(Some((topic, payload))) => {
                    if let Err(e) = handle(
                        &topic,
                        &payload,
                        &topics,
                        &mut trackers,
                        &mut starts,
                        &routes,
                    ) {
                        failed = Some(e);
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e.into());
                    break;
                }
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
    };

    // Drain: stop intake, let each worker finish its run and one more pass, and hand
    // what is left to the retrier (its acks still need forwarding meanwhile).
    let deadline = Instant::now() + GRACE;
    let _ = control.deadline.set(deadline);
    drop(routes);
    drop(sub);
    // Hooks stop last: what the other workers deliver while they drain still reaches
    // them (through the retrier's relay, which stops after us).
    let hook_stops: Vec<Sender<Job>> = stops
        .iter()
        .filter(|(hook, _)| *hook)
        .map(|(_, tx)| tx.clone())
        .collect();
    let mut plain_left = stops.iter().filter(|(hook, _)| !*hook).count();
    for (hook, tx) in stops.drain(..) {
        if !hook {
            let _ = tx.send(Job::Stop);
        }
    }
    let mut hooks_stopped: Option<Instant> = None;
    let mut settle: Option<Instant> = None;
    if result.is_ok() {
        tracing::info!(grace_s = GRACE.as_secs(), "draining workers");
    }
    let mut left = workers;
    let mut clean = true;
    while left > 0 {
        if shutdown.urgent() {
            control.abort.store(true, Ordering::SeqCst);
            tracing::warn!(workers = left, "second signal: stopping now");
            clean = false;
            break;
        }
        if jobs.poll(zmq::POLLIN, 0).unwrap_or(0) > 0 {
            let _ = forward_jobs(&jobs, &mut streams);
        }
        if delivered.poll(zmq::POLLIN, 0).unwrap_or(0) > 0 {
            let _ = forward_deliveries(&delivered, &hooks, &mut hook_trackers);
        }
        // Once the others are done, give their last deliveries a moment to come
        // round through the relay, then stop the hooks.
        if plain_left == 0 && hooks_stopped.is_none() {
            let since = *settle.get_or_insert_with(Instant::now);
            if since.elapsed() >= HOOK_SETTLE {
                for tx in &hook_stops {
                    let _ = tx.send(Job::Stop);
                }
                hooks_stopped = Some(Instant::now());
            }
        }
        match done_rx.recv_timeout(Duration::from_millis(20)) {
            Ok((hook, worker_clean)) => {
                left -= 1;
                if !hook {
                    plain_left -= 1;
                }
                clean &= worker_clean;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Workers kill their rsync at the deadline; allow them a moment to say so.
                if Instant::now() > deadline + Duration::from_secs(3) {
                    tracing::warn!(
                        workers = left,
                        "workers did not stop within the grace period"
                    );
                    control.abort.store(true, Ordering::SeqCst);
                    clean = false;
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // A non-zero exit tells `syncbus run` not to trust this stop as a checkpoint.
    if result.is_ok() && !clean {
        return Err(StageError::Failed(
            "work was left behind at shutdown (see above); the next start compares in full".into(),
        ));
    }
    result
}

/// After-sync hooks: what reached a target they follow becomes their work (paths as
/// upserts, compared subtrees as resyncs). A delivery the hook cannot vouch for having
/// seen (first message, gap, restarted dispatcher) makes it resync the root: `./`.
fn forward_deliveries(
    delivered: &zmq::Socket,
    hooks: &HashMap<String, Vec<(Vec<String>, Served)>>,
    trackers: &mut HashMap<String, SeqTracker>,
) -> Result<(), StageError> {
    use protocol::wire::{Change, Delivery, Op};
    while let Some((_, payload)) = bus::try_recv(delivered)? {
        let Ok(d) = wire::decode::<Delivery>(&payload) else {
            tracing::warn!("undecodable delivery message ignored");
            continue;
        };
        let Some(list) = hooks.get(&d.target) else {
            continue;
        };
        let seen = trackers
            .entry(d.target.clone())
            .or_default()
            .observe(d.epoch, d.seq);
        let root: Arc<str> = d.root.as_str().into();
        let served = list.iter().filter(|(roots, _)| roots.contains(&d.root));
        if seen != Seen::InOrder {
            // What was missed may have been about any root the hook shares with the
            // target it follows, not only this message's.
            tracing::info!(target = %d.target, "delivery stream (re)joined; hooks after it resync their roots");
            for (roots, s) in list {
                for r in roots {
                    let _ = s.tx.send(Job::Resync {
                        root: r.as_str().into(),
                    });
                }
            }
        }
        if !d.ok {
            continue;
        }
        let change = |op, path: protocol::PathBytes, since_us| Change {
            op,
            path,
            from: None,
            dir: false,
            recursive: false,
            since_us,
        };
        let mut changes: Vec<Change> = d
            .paths
            .into_iter()
            .map(|p| change(Op::Upsert, p.path, p.since_us))
            .collect();
        changes.extend(d.resyncs.into_iter().map(|r| change(Op::Resync, r, 0)));
        let changes = Arc::new(changes);
        for (_, s) in served {
            let _ = s.tx.send(Job::Changes {
                root: root.clone(),
                changes: changes.clone(),
            });
        }
    }
    Ok(())
}

/// Hands the retrier's acks and jobs to the workers; says `ready` for a target whose
/// job stream was joined, broken or restarted, so the retrier sends its jobs again.
fn forward_jobs(
    jobs: &zmq::Socket,
    streams: &mut HashMap<Vec<u8>, JobStream>,
) -> Result<(), StageError> {
    while let Some((topic, payload)) = bus::try_recv(jobs)? {
        let Some(s) = streams.get_mut(&topic) else {
            continue;
        };
        let msg = match wire::decode::<JobMsg>(&payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable job message; asking the retrier again");
                s.reporter
                    .send(ReportKind::Ready, "", Vec::new(), Default::default(), "");
                continue;
            }
        };
        if s.tracker.observe(msg.epoch, msg.seq) != Seen::InOrder {
            tracing::debug!(target = %msg.target, epoch = msg.epoch, seq = msg.seq, "job stream (re)joined; telling the retrier we are ready");
            s.reporter
                .send(ReportKind::Ready, "", Vec::new(), Default::default(), "");
        }
        let job = match msg.kind {
            JobKind::Ack => Job::Ack(msg.report_id),
            JobKind::Run => Job::Run {
                root: msg.root.as_str().into(),
                job_ids: msg.job_ids,
                work: msg.work,
            },
            JobKind::Heartbeat => continue,
        };
        // A closed channel: the worker is gone (its drain is over).
        let _ = s.tx.send(job);
    }
    Ok(())
}

/// One message from the SUB socket.
fn handle(
    topic: &[u8],
    payload: &[u8],
    topics: &HashMap<Vec<u8>, String>,
    trackers: &mut HashMap<String, SeqTracker>,
    starts: &mut Starts,
    routes: &HashMap<String, Vec<Served>>,
) -> Result<(), StageError> {
    let Some(root) = topics.get(topic) else {
        tracing::warn!(topic = %String::from_utf8_lossy(topic), "message on an unexpected topic ignored");
        return Ok(());
    };
    let batch = match wire::decode::<ChangeBatch>(payload) {
        Ok(b) if &b.root == root => b,
        Ok(b) => {
            tracing::warn!(root = %root, claimed = %b.root, "message names another root than its topic; resyncing");
            return dispatch(
                root,
                Job::Resync {
                    root: root.as_str().into(),
                },
                routes,
            );
        }
        Err(e) => {
            // Whatever it said is lost to us: answer with a resync.
            tracing::warn!(root = %root, error = %e, "undecodable message; resyncing the root");
            return dispatch(
                root,
                Job::Resync {
                    root: root.as_str().into(),
                },
                routes,
            );
        }
    };
    let seen = trackers
        .entry(root.clone())
        .or_default()
        .observe(batch.epoch, batch.seq);
    match seen {
        Seen::InOrder => {}
        Seen::First { seq } => {
            tracing::info!(root = %root, epoch = batch.epoch, seq, wait_s = FIRST_RESYNC_WAIT.as_secs(), "first message from the filter; resyncing the root (or with the watcher's start resync if it comes first)")
        }
        Seen::Gap { missed } => {
            tracing::warn!(root = %root, epoch = batch.epoch, seq = batch.seq, missed, "messages lost; resyncing the root")
        }
        Seen::NewEpoch => {
            tracing::warn!(root = %root, epoch = batch.epoch, seq = batch.seq, "the filter restarted; resyncing the root")
        }
    }
    let shared: Arc<str> = root.as_str().into();
    let whole = |c: &protocol::wire::Change| c.op == protocol::wire::Op::Resync && c.path.is_root();
    match seen {
        // Everything since the filter started is in view: the watcher's start resync
        // will come in the stream (or, if only we restarted, the wait runs out).
        Seen::First { seq: 1 } => {
            starts
                .deferred
                .insert(root.clone(), Instant::now() + FIRST_RESYNC_WAIT);
        }
        // Joined late (the usual race at start): the watcher's start resync may be
        // among what we missed, so compare now. If it was not, it still comes and is
        // still needed (this compare may have begun before the watches were live), so
        // it keeps its right to be a catch-up.
        Seen::First { .. } => {
            dispatch(root, starts.peek_job(root), routes)?;
        }
        _ => {}
    }
    let mut batch = batch;
    if batch.changes.iter().any(whole) {
        // A fresh compare of the whole root is on its way: it covers a waiting one.
        starts.deferred.remove(root);
        if starts.catch_up.contains_key(root) {
            // The watcher's start resync after a clean stop: a catch-up will do.
            batch.changes.retain(|c| !whole(c));
            dispatch(root, starts.start_job(root), routes)?;
        }
    } else if matches!(seen, Seen::Gap { .. } | Seen::NewEpoch) {
        starts.deferred.remove(root);
        dispatch(
            root,
            Job::Resync {
                root: shared.clone(),
            },
            routes,
        )?;
    }
    if !batch.changes.is_empty() {
        let job = Job::Changes {
            root: shared,
            changes: Arc::new(batch.changes),
        };
        dispatch(root, job, routes)?;
    }
    Ok(())
}

/// How each root's first compare after start is done.
struct Starts {
    /// Roots whose first-message resync waits for a whole-root resync in the stream.
    deferred: HashMap<String, Instant>,
    /// Roots whose first compare may be a catch-up: `syncbus run` stopped cleanly at
    /// this checkpoint before, with every change up to it delivered or journalled.
    catch_up: HashMap<String, u64>,
}

impl Starts {
    /// Like [`Starts::start_job`], without using up the catch-up.
    fn peek_job(&self, root: &str) -> Job {
        match self.catch_up.get(root) {
            Some(&since_us) => Job::CatchUp {
                root: root.into(),
                since_us,
            },
            None => Job::Resync { root: root.into() },
        }
    }

    /// The job of a root's start compare: a catch-up the first time when allowed,
    /// else a full resync.
    fn start_job(&mut self, root: &str) -> Job {
        let job = self.peek_job(root);
        self.catch_up.remove(root);
        job
    }
}

/// The checkpoint `syncbus run` hands the first dispatcher it starts after a clean stop.
pub const CATCH_UP_ENV: &str = "SYNCBUS_CATCH_UP_SINCE_US";

fn catch_up_since() -> Option<u64> {
    std::env::var(CATCH_UP_ENV).ok()?.parse().ok()
}

fn dispatch(root: &str, job: Job, routes: &HashMap<String, Vec<Served>>) -> Result<(), StageError> {
    for s in routes.get(root).into_iter().flatten() {
        // Unbounded: never blocks. A closed channel means the worker thread died.
        s.tx.send(job.clone()).map_err(|_| {
            StageError::Failed(format!(
                "the worker of target `{}` stopped unexpectedly",
                s.target
            ))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::wire::{Change, Op};

    fn batch(seq: u64, epoch: u64, changes: Vec<Change>) -> Vec<u8> {
        wire::encode(&ChangeBatch {
            version: wire::VERSION,
            epoch,
            seq,
            root: "r".into(),
            time_us: 0,
            changes,
        })
    }

    fn change(op: Op, path: &str) -> Change {
        Change {
            op,
            path: path.into(),
            from: None,
            dir: false,
            recursive: false,
            since_us: 0,
        }
    }

    /// At `syncbus run` start the dispatcher's first message and the watcher's start
    /// resync both ask for a full compare; one is enough. A gap never waits.
    #[test]
    fn a_first_message_resync_waits_for_the_watchers_and_a_gap_does_not() {
        let (tx, rx) = mpsc::channel();
        let mut routes = HashMap::new();
        routes.insert(
            "r".to_string(),
            vec![Served {
                target: "t".into(),
                tx,
            }],
        );
        let topics: HashMap<Vec<u8>, String> =
            [(wire::changes_topic("r").into_bytes(), "r".to_string())].into();
        let topic = wire::changes_topic("r").into_bytes();
        let mut trackers = HashMap::new();
        let mut starts = Starts {
            deferred: HashMap::new(),
            catch_up: HashMap::new(),
        };
        let mut feed = |payload: Vec<u8>| {
            handle(
                &topic,
                &payload,
                &topics,
                &mut trackers,
                &mut starts,
                &routes,
            )
            .unwrap();
            let jobs: Vec<Job> = rx.try_iter().collect();
            (jobs, starts.deferred.contains_key("r"))
        };
        let (jobs, waiting) = feed(batch(1, 1, vec![]));
        assert!(
            jobs.is_empty() && waiting,
            "first message: the resync waits"
        );
        let (jobs, waiting) = feed(batch(2, 1, vec![change(Op::Resync, "")]));
        assert!(!waiting, "the watcher's start resync covers it");
        assert!(matches!(&jobs[..], [Job::Changes { .. }]));
        let (jobs, waiting) = feed(batch(4, 1, vec![change(Op::Upsert, "f")]));
        assert!(!waiting);
        assert!(
            matches!(&jobs[..], [Job::Resync { .. }, Job::Changes { .. }]),
            "a gap resyncs at once: {jobs:?}"
        );
        // Joining late (first seq above 1): the start resync may have been missed.
        let mut trackers = HashMap::new();
        let mut starts = Starts {
            deferred: HashMap::new(),
            catch_up: HashMap::new(),
        };
        let payload = batch(3, 2, vec![]);
        handle(
            &topic,
            &payload,
            &topics,
            &mut trackers,
            &mut starts,
            &routes,
        )
        .unwrap();
        let jobs: Vec<Job> = rx.try_iter().collect();
        assert!(matches!(&jobs[..], [Job::Resync { .. }]), "{jobs:?}");
        assert!(starts.deferred.is_empty());
    }

    #[test]
    fn unknown_target_names_are_refused_with_the_known_ones() {
        let d = tempfile::tempdir().unwrap();
        let text = format!(
            "[[root]]\nname = \"r\"\npath = {:?}\n[[target]]\nname = \"a\"\nurl = {:?}\n",
            d.path().display().to_string(),
            d.path().join("../elsewhere").display().to_string(),
        );
        let config = Config::parse(&text, &d.path().join("c.toml")).unwrap();
        assert_eq!(select(&config, &[]).unwrap().len(), 1);
        assert_eq!(select(&config, &["a".into()]).unwrap()[0].name, "a");
        match select(&config, &["b".into()]) {
            Err(StageError::Failed(m)) => {
                assert!(m.contains("unknown target `b` (configured: a)"), "{m}")
            }
            other => panic!("{:?}", other.map(|v| v.len())),
        }
    }
}
