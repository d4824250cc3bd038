//! Each root's first compare after start, and the changes from the filter taken in:
//! sequence numbers checked, and anything but the next in-order message of a root
//! answered with a compare of that root.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::seq::{Seen, SeqTracker};
use protocol::stage::StageError;
use protocol::wire::{self, ChangeBatch};

use crate::routing::{dispatch, Served};
use crate::worker::Job;

/// How long the resync for a first message waits for the watcher's own start resync,
/// which covers it: at `syncbus run` start both come, and one full compare is enough.
pub const FIRST_RESYNC_WAIT: Duration = Duration::from_secs(10);

/// One message from the SUB socket.
pub(crate) fn handle(
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
        starts.started.insert(root.clone());
        starts.expire_catch_up(root);
        if starts.catch_up.contains_key(root) {
            // The watcher's start resync after a clean stop: a catch-up will do.
            batch.changes.retain(|c| !whole(c));
            dispatch(root, starts.start_job(root), routes)?;
        }
    } else if matches!(seen, Seen::Gap { .. } | Seen::NewEpoch) {
        starts.deferred.remove(root);
        starts.started.insert(root.clone());
        dispatch(
            root,
            Job::Resync {
                root: shared.clone(),
            },
            routes,
        )?;
    }
    // Heartbeats too: they move the workers' crash checkpoint on.
    let floor_us = starts.safe.insert(root.clone(), batch.safe_us).unwrap_or(0);
    let job = Job::Changes {
        root: shared,
        changes: Arc::new(batch.changes),
        floor_us,
        // Nothing is vouched for before the root's start compare was asked for: the
        // changes made while syncbus was down are its.
        safe_us: if starts.started.contains(root) {
            batch.safe_us
        } else {
            0
        },
    };
    dispatch(root, job, routes)
}

/// How each root's first compare after start is done.
pub(crate) struct Starts {
    /// Roots whose first-message resync waits for a whole-root resync in the stream.
    pub(crate) deferred: HashMap<String, Instant>,
    /// Roots whose first compare may be a catch-up: `syncbus run` stopped cleanly at
    /// this checkpoint before, with every change up to it delivered or journalled.
    pub(crate) catch_up: HashMap<String, u64>,
    /// Roots whose start compare was asked for (a catch-up, or a whole-root compare
    /// in the stream or of our own): only then does their `safe_us` go to the workers.
    pub(crate) started: HashSet<String>,
    /// The `safe_us` of each root's last message.
    pub(crate) safe: HashMap<String, u64>,
    /// When a root's catch-up was run without being used up (we joined late).
    peeked: HashMap<String, Instant>,
}

impl Starts {
    /// `catch_up`: the checkpoint `syncbus run` handed over, for every root served.
    pub(crate) fn new(catch_up: HashMap<String, u64>) -> Starts {
        Starts {
            deferred: HashMap::new(),
            catch_up,
            started: HashSet::new(),
            safe: HashMap::new(),
            peeked: HashMap::new(),
        }
    }

    /// A catch-up kept for the watcher's start resync is kept only as long as a
    /// deferred start waits for it: a whole-root resync later than that is about
    /// something else (an overflow, a root back, a stage restarted), which the
    /// checkpoint knows nothing of, and compares in full.
    fn expire_catch_up(&mut self, root: &str) {
        if self
            .peeked
            .get(root)
            .is_some_and(|at| at.elapsed() >= FIRST_RESYNC_WAIT)
        {
            self.peeked.remove(root);
            self.catch_up.remove(root);
        }
    }

    /// Like [`Starts::start_job`], without using up the catch-up.
    pub(crate) fn peek_job(&mut self, root: &str) -> Job {
        self.started.insert(root.to_string());
        if self.catch_up.contains_key(root) {
            self.peeked
                .entry(root.to_string())
                .or_insert_with(Instant::now);
        }
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
    pub(crate) fn start_job(&mut self, root: &str) -> Job {
        let job = self.peek_job(root);
        self.catch_up.remove(root);
        self.peeked.remove(root);
        job
    }
}

/// The checkpoint `syncbus run` hands the first dispatcher it starts after a clean stop.
pub const CATCH_UP_ENV: &str = "SYNCBUS_CATCH_UP_SINCE_US";

pub(crate) fn catch_up_since() -> Option<u64> {
    std::env::var(CATCH_UP_ENV).ok()?.parse().ok()
}

impl Starts {
    /// The roots whose start compare waited long enough for the watcher's, taken off
    /// the waiting list.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<String> {
        let due: Vec<String> = self
            .deferred
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(r, _)| r.clone())
            .collect();
        for root in &due {
            self.deferred.remove(root);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::wire::{Change, Op};
    use std::sync::mpsc;

    fn batch(seq: u64, epoch: u64, changes: Vec<Change>) -> Vec<u8> {
        said(seq, epoch, changes, 0)
    }

    /// A message saying `safe_us`.
    fn said(seq: u64, epoch: u64, changes: Vec<Change>, safe_us: u64) -> Vec<u8> {
        wire::encode(&ChangeBatch {
            version: wire::VERSION,
            epoch,
            seq,
            root: "r".into(),
            time_us: 0,
            safe_us,
            changes,
        })
    }

    /// One root `r` served by one worker: the stage loop's books for it, and what the
    /// worker is sent.
    struct OneRoot {
        rx: mpsc::Receiver<Job>,
        routes: HashMap<String, Vec<Served>>,
        topic: Vec<u8>,
        topics: HashMap<Vec<u8>, String>,
        trackers: HashMap<String, SeqTracker>,
    }

    impl OneRoot {
        fn new() -> OneRoot {
            let (tx, rx) = mpsc::channel();
            let routes = HashMap::from([(
                "r".to_string(),
                vec![Served {
                    target: "t".into(),
                    tx,
                }],
            )]);
            let topic = wire::changes_topic("r").into_bytes();
            let topics = HashMap::from([(topic.clone(), "r".to_string())]);
            OneRoot {
                rx,
                routes,
                topic,
                topics,
                trackers: HashMap::new(),
            }
        }

        /// Takes in one message; the jobs it sent the worker.
        fn feed(&mut self, starts: &mut Starts, payload: Vec<u8>) -> Vec<Job> {
            let (topic, topics, routes) = (&self.topic, &self.topics, &self.routes);
            handle(topic, &payload, topics, &mut self.trackers, starts, routes).unwrap();
            self.rx.try_iter().collect()
        }
    }

    /// The jobs, heartbeats left out.
    fn taken(jobs: Vec<Job>) -> Vec<Job> {
        jobs.into_iter()
            .filter(|j| !matches!(j, Job::Changes { changes, .. } if changes.is_empty()))
            .collect()
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
        let mut r = OneRoot::new();
        let mut starts = Starts::new(HashMap::new());
        let mut feed = |payload: Vec<u8>| {
            let jobs = taken(r.feed(&mut starts, payload));
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
        let mut r = OneRoot::new();
        let mut starts = Starts::new(HashMap::new());
        let jobs = taken(r.feed(&mut starts, batch(3, 2, vec![])));
        assert!(matches!(&jobs[..], [Job::Resync { .. }]), "{jobs:?}");
        assert!(starts.deferred.is_empty());
    }

    /// What the workers hear of a root's `safe_us` (the crash checkpoint): nothing
    /// before its start compare was asked for, since the changes made while syncbus was
    /// down are that compare's; then each message's, with the changes it carries dated
    /// by the message before.
    #[test]
    fn a_roots_say_reaches_the_workers_only_once_its_start_compare_was_asked_for() {
        let mut r = OneRoot::new();
        let mut starts = Starts::new(HashMap::from([("r".to_string(), 50)]));
        let mut feed = |payload: Vec<u8>| {
            r.feed(&mut starts, payload)
                .into_iter()
                .map(|j| match j {
                    Job::Changes {
                        changes,
                        floor_us,
                        safe_us,
                        ..
                    } => format!("changes {} floor {floor_us} safe {safe_us}", changes.len()),
                    Job::CatchUp { since_us, .. } => format!("catch-up {since_us}"),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(feed(said(1, 1, vec![], 100)), ["changes 0 floor 0 safe 0"]);
        assert_eq!(
            feed(said(2, 1, vec![change(Op::Upsert, "a")], 200)),
            ["changes 1 floor 100 safe 0"],
            "the start compare is still waiting for the watcher's"
        );
        // The watcher's start resync after a clean stop: a catch-up from the
        // checkpoint, which holds the workers' say back until it is done.
        assert_eq!(
            feed(said(
                3,
                1,
                vec![change(Op::Resync, ""), change(Op::Upsert, "b")],
                300
            )),
            ["catch-up 50", "changes 1 floor 200 safe 300"]
        );
        assert_eq!(
            feed(said(4, 1, vec![], 400)),
            ["changes 0 floor 300 safe 400"]
        );
    }
}
