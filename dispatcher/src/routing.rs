//! Which worker gets what: the workers are started here, one thread per target, and
//! the ways to them kept: changes by root, the retrier's jobs by target, deliveries by
//! the target an after-sync hook follows.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use protocol::bus::{self, Endpoints};
use protocol::config::{Config, Target};
use protocol::seq::{Seen, SeqTracker};
use protocol::stage::StageError;
use protocol::wire::{self, JobKind, JobMsg, ReportKind};

use crate::guard;
use crate::worker::{Control, Job, Reporter, RootInfo, Worker};

pub(crate) struct Served {
    pub(crate) target: String,
    pub(crate) tx: Sender<Job>,
}

/// The retrier's job stream as this dispatcher follows it, per target.
pub(crate) struct JobStream {
    tx: Sender<Job>,
    tracker: SeqTracker,
    /// Says `ready` when the stream cannot be vouched for (start, gap, new retrier).
    reporter: Reporter,
}

/// This dispatcher's workers, and the ways to them.
pub(crate) struct Routing {
    /// root name → the workers bound to it
    pub(crate) routes: HashMap<String, Vec<Served>>,
    /// After-sync hooks: target they follow → (hook's roots, hook's worker).
    pub(crate) hooks: HashMap<String, Vec<(Vec<String>, Served)>>,
    /// topic `jobs/<target>/` → that worker
    pub(crate) streams: HashMap<Vec<u8>, JobStream>,
    /// (is an after-sync hook, its worker), for the stop order.
    pub(crate) stops: Vec<(bool, Sender<Job>)>,
    /// Workers started; each says on `done_rx` when it ended (is a hook, clean).
    pub(crate) workers: usize,
    pub(crate) done_rx: Receiver<(bool, bool)>,
}

impl Routing {
    /// Starts a worker for each of `targets`, each on its own thread.
    pub(crate) fn start(
        config: &Config,
        targets: &[&Target],
        control: &Arc<Control>,
        ctx: &zmq::Context,
        eps: &Endpoints,
    ) -> Result<Routing, StageError> {
        let mut routes: HashMap<String, Vec<Served>> = HashMap::new();
        let mut hooks: HashMap<String, Vec<(Vec<String>, Served)>> = HashMap::new();
        let (done_tx, done_rx) = mpsc::channel::<(bool, bool)>();
        let mut workers = 0usize;
        let reporter = |name: &str| -> Result<Reporter, StageError> {
            let push = bus::socket(ctx, zmq::PUSH)?;
            bus::connect(&push, &eps.reports)?;
            Ok(Reporter::new(push, name))
        };
        let mut streams: HashMap<Vec<u8>, JobStream> = HashMap::new();
        let mut stops: Vec<(bool, Sender<Job>)> = Vec::new();
        for t in targets {
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
            let after = t.follows();
            let is_hook = !after.is_empty();
            stops.push((is_hook, tx.clone()));
            if after.is_empty() {
                for r in &t.roots {
                    routes.entry(r.clone()).or_default().push(Served {
                        target: t.name.clone(),
                        tx: tx.clone(),
                    });
                }
            }
            for a in after {
                hooks.entry(a.clone()).or_default().push((
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
        Ok(Routing {
            routes,
            hooks,
            streams,
            stops,
            workers,
            done_rx,
        })
    }
}

/// Selects the targets to serve: all of them, or the ones named.
pub(crate) fn select<'a>(
    config: &'a Config,
    only: &[String],
) -> Result<Vec<&'a Target>, StageError> {
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

pub(crate) fn dispatch(
    root: &str,
    job: Job,
    routes: &HashMap<String, Vec<Served>>,
) -> Result<(), StageError> {
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

/// Hands the retrier's acks and jobs to the workers; says `ready` for a target whose
/// job stream was joined, broken or restarted, so the retrier sends its jobs again.
pub(crate) fn forward_jobs(
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

#[cfg(test)]
mod tests {
    use super::*;

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
