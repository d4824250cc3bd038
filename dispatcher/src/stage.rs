//! The stage loop: every reason the dispatcher wakes up is one [`Event`], handled in
//! one `match`; then the drain, which hands what is left to the retrier.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::bus::{self, Endpoints, Shutdown};
use protocol::config::Config;
use protocol::seq::SeqTracker;
use protocol::stage::StageError;
use protocol::status::{self, StageStatus};
use protocol::wire;

use crate::after_hooks::{forward_deliveries, HOOK_SETTLE};
use crate::command;
use crate::routing::{dispatch, forward_jobs, select, Routing};
use crate::ssh;
use crate::starts::{catch_up_since, handle, Starts};
use crate::worker::{Control, Job};

/// How long a drain may take after the first SIGTERM/SIGINT.
pub const GRACE: Duration = Duration::from_secs(10);

/// Why the loop woke up.
enum Event {
    /// A root's start compare waited for the watcher's start resync long enough.
    StartDue(String),
    /// Stop: take in what the filter already published, then drain.
    Stop,
    /// A signal arrived (a stop is seen as [`Event::Stop`] next round).
    Signal,
    /// The filter's changes.
    Changes,
    /// The retrier's acks and journal jobs.
    Jobs,
    /// Deliveries to targets that after-sync hooks follow.
    Deliveries,
}

/// The sockets the loop reads.
struct Sockets {
    changes: zmq::Socket,
    jobs: zmq::Socket,
    delivered: zmq::Socket,
    /// Changes topic → root.
    topics: HashMap<Vec<u8>, String>,
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
        ssh_dir: ssh::prepare(config, &targets),
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
    let ctx = zmq::Context::new();
    let eps = Endpoints::new(config);
    let mut routing = Routing::start(config, &targets, &control, &ctx, &eps)?;
    let sockets = connect(&ctx, &eps, &routing)?;
    tracing::info!(endpoint = %eps.changes, targets = routing.workers, roots = routing.routes.len(), "dispatcher listening");

    let mut trackers: HashMap<String, SeqTracker> = HashMap::new();
    let mut hook_trackers: HashMap<String, SeqTracker> = HashMap::new();
    let mut starts = Starts::new(
        catch_up_since()
            .map(|t| routing.routes.keys().map(|r| (r.clone(), t)).collect())
            .unwrap_or_default(),
    );
    if let Some(t) = catch_up_since() {
        tracing::info!(
            since_us = t,
            "checkpoint handed over: the start compares only what changed since"
        );
    }
    // An error ends the loop but not the stage's duty: the drain below still runs.
    let result = 'run: loop {
        status::beat(&control.board);
        let events = match next_events(&sockets, shutdown, &mut starts) {
            Ok(events) => events,
            Err(e) => break Err(e),
        };
        for event in events {
            let handled = match event {
                Event::StartDue(root) => {
                    tracing::info!(root = %root, "no start resync from the watcher came; resyncing the root");
                    let job = starts.start_job(&root);
                    dispatch(&root, job, &routing.routes)
                }
                Event::Stop => {
                    // What the filter published before it stopped is still queued.
                    while let Ok(Some((topic, payload))) = bus::try_recv(&sockets.changes) {
                        let _ = handle(
                            &topic,
                            &payload,
                            &sockets.topics,
                            &mut trackers,
                            &mut starts,
                            &routing.routes,
                        );
                    }
                    // A root whose start compare has not run yet (never heard from, or
                    // still waiting for the watcher's) gets it now: a stop must not
                    // pass for clean with it owed.
                    let waiting: Vec<String> = routing
                        .routes
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
                        let _ = dispatch(&root, job, &routing.routes);
                    }
                    break 'run Ok(());
                }
                Event::Signal => {
                    shutdown.drain();
                    if shutdown.take_hup() {
                        tracing::info!("SIGHUP ignored (no config reload yet)");
                    }
                    Ok(())
                }
                Event::Jobs => forward_jobs(&sockets.jobs, &mut routing.streams),
                Event::Deliveries => {
                    forward_deliveries(&sockets.delivered, &routing.hooks, &mut hook_trackers)
                }
                Event::Changes => {
                    take_changes(&sockets, &mut trackers, &mut starts, &routing.routes)
                }
            };
            if let Err(e) = handled {
                break 'run Err(e);
            }
        }
    };
    let result = drain(routing, sockets, hook_trackers, &control, shutdown, result);
    if let Some(dir) = &control.ssh_dir {
        ssh::close(dir, &targets);
    }
    result
}

/// The sockets to the filter's change stream (a topic per root served), the
/// retrier's job stream and, for after-sync hooks, the delivery stream.
fn connect(ctx: &zmq::Context, eps: &Endpoints, routing: &Routing) -> Result<Sockets, StageError> {
    let jobs = bus::socket(ctx, zmq::SUB)?;
    for topic in routing.streams.keys() {
        jobs.set_subscribe(topic)
            .map_err(|e| StageError::Failed(format!("cannot subscribe to the job stream: {e}")))?;
    }
    bus::connect(&jobs, &eps.jobs)?;
    // Subscribed to nothing without hooks.
    let delivered = bus::deliveries_of(
        ctx,
        &eps.deliveries,
        routing.hooks.keys().map(String::as_str),
    )?;
    let changes = bus::socket(ctx, zmq::SUB)?;
    let mut topics: HashMap<Vec<u8>, String> = HashMap::new();
    for root in routing.routes.keys() {
        let topic = wire::changes_topic(root);
        changes
            .set_subscribe(topic.as_bytes())
            .map_err(|e| StageError::Failed(format!("cannot subscribe to `{topic}`: {e}")))?;
        topics.insert(topic.into_bytes(), root.clone());
    }
    bus::connect(&changes, &eps.changes)?;
    Ok(Sockets {
        changes,
        jobs,
        delivered,
        topics,
    })
}

/// Waits for something to do (at most a second, or until a start compare is due).
fn next_events(
    sockets: &Sockets,
    shutdown: &Shutdown,
    starts: &mut Starts,
) -> Result<Vec<Event>, StageError> {
    let now = Instant::now();
    let mut events: Vec<Event> = starts.due(now).into_iter().map(Event::StartDue).collect();
    if shutdown.requested() {
        events.push(Event::Stop);
        return Ok(events);
    }
    if !events.is_empty() {
        return Ok(events);
    }
    let mut items = [
        sockets.changes.as_poll_item(zmq::POLLIN),
        zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
        sockets.jobs.as_poll_item(zmq::POLLIN),
        sockets.delivered.as_poll_item(zmq::POLLIN),
    ];
    let wait = starts.deferred.values().min().map_or(1000, |t| {
        t.saturating_duration_since(now).as_millis().clamp(1, 1000) as i64
    });
    match zmq::poll(&mut items, wait) {
        Ok(_) => {}
        Err(zmq::Error::EINTR) => return Ok(events),
        Err(e) => return Err(StageError::Failed(format!("zmq poll: {e}"))),
    }
    let ready = |i: usize| items[i].is_readable();
    for (i, event) in [
        (1, Event::Signal),
        (2, Event::Jobs),
        (3, Event::Deliveries),
        (0, Event::Changes),
    ] {
        if ready(i) {
            events.push(event);
        }
    }
    Ok(events)
}

/// Everything the filter has published, taken in.
fn take_changes(
    sockets: &Sockets,
    trackers: &mut HashMap<String, SeqTracker>,
    starts: &mut Starts,
    routes: &HashMap<String, Vec<crate::routing::Served>>,
) -> Result<(), StageError> {
    while let Some((topic, payload)) = bus::try_recv(&sockets.changes)? {
        handle(&topic, &payload, &sockets.topics, trackers, starts, routes)?;
    }
    Ok(())
}

/// Stops intake, lets each worker finish its run and one more pass, and hands what is
/// left to the retrier (its acks still need forwarding meanwhile). After-sync hooks
/// stop last: what the other workers deliver while they drain still reaches them
/// (through the retrier's relay, which stops after us). The stage exits 0 only when
/// nothing was left behind: that is what lets `syncbus run` trust a stop. The hooks'
/// place in the delivery stream goes on from the loop's (`hook_trackers`): a fresh one
/// would take the next delivery for a first one and resync the roots instead of
/// passing its paths on.
fn drain(
    routing: Routing,
    sockets: Sockets,
    mut hook_trackers: HashMap<String, SeqTracker>,
    control: &Control,
    shutdown: &Shutdown,
    result: Result<(), StageError>,
) -> Result<(), StageError> {
    let deadline = Instant::now() + GRACE;
    let _ = control.deadline.set(deadline);
    let Routing {
        routes,
        hooks,
        mut streams,
        mut stops,
        workers,
        done_rx,
    } = routing;
    let Sockets {
        changes,
        jobs,
        delivered,
        ..
    } = sockets;
    drop(routes);
    drop(changes);
    let hook_stops: Vec<mpsc::Sender<Job>> = stops
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
