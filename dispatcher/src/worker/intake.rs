//! What the worker takes in: jobs from the SUB loop, the retrier and the full lane,
//! merged into the batcher, with the journal jobs each root's next run settles and the
//! acks of hand-overs.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use protocol::PathBytes;

use crate::batch::Batcher;

use super::*;

/// The receiving side: new jobs go straight into the batcher, also while rsync runs.
pub(super) struct Intake {
    pub(super) rx: Receiver<Job>,
    pub(super) batcher: Batcher,
    /// Journal jobs whose work is in the batcher, per root.
    pub(super) covers: HashMap<String, Vec<u64>>,
    /// Every journal job this worker holds (batcher or full lane): a job sent again
    /// by the retrier is not run twice.
    pub(super) held: HashSet<u64>,
    pub(super) acked: HashSet<u64>,
    pub(super) full_done: Vec<Arc<FullDone>>,
    pub(super) stopping: bool,
    pub(super) closed: bool,
    /// A two-way target's: where the live deletes it takes in are noted.
    pub(super) deletes: Option<Arc<Control>>,
    /// What the last message of each root's change stream said in `safe_us`.
    pub(super) safe: HashMap<String, u64>,
}

impl Intake {
    pub(super) fn accept(&mut self, job: Job) {
        match job {
            Job::Changes {
                root,
                changes,
                floor_us,
                safe_us,
            } => {
                // A cron sync's own excludes do not hide a live change it absorbs: the
                // change drops them (`Work`'s merge rule).
                for c in changes.iter() {
                    self.batcher.push(&root, c);
                }
                if !changes.is_empty() {
                    self.batcher.hold_back(&root, floor_us);
                }
                self.safe.insert(root.to_string(), safe_us);
                if let Some(control) = &self.deletes {
                    control.local_deletes.note(&root, &changes);
                }
            }
            // Start compares carry no change time: they are not lag (the status
            // shows them as the initial sync) however long they take.
            Job::Resync { root } => {
                self.batcher.resync(&root, PathBytes::root());
            }
            Job::CatchUp { root, since_us } => {
                let mut w = Work::default();
                w.catch_up(since_us);
                // A crash before it is done: the next start catches up from there too.
                w.hold_back(Some(since_us));
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
                self.batcher.merge(&root, work);
            }
            Job::Ack(id) => {
                self.acked.insert(id);
            }
            Job::FullDone(d) => self.full_done.push(d),
            Job::Stop => self.stopping = true,
        }
    }

    /// Takes in everything queued without blocking.
    pub(super) fn drain(&mut self) {
        while !self.closed {
            match self.rx.try_recv() {
                Ok(j) => self.accept(j),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.closed = true,
            }
        }
    }

    /// Waits up to `wait` for a job (until `None`: for ever), then drains.
    pub(super) fn wait(&mut self, wait: Option<Duration>) {
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
    pub(super) fn take_covers(&mut self, root: &str) -> Vec<u64> {
        self.covers.remove(root).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intake() -> (Intake, std::sync::mpsc::Sender<Job>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let intake = Intake {
            rx,
            batcher: Batcher::new(),
            covers: HashMap::new(),
            held: HashSet::new(),
            acked: HashSet::new(),
            full_done: Vec::new(),
            stopping: false,
            closed: false,
            deletes: None,
            safe: HashMap::new(),
        };
        (intake, tx)
    }

    fn cron_run(id: u64) -> Job {
        Job::Run {
            root: "r".into(),
            job_ids: vec![id],
            work: Work {
                resyncs: [PathBytes::root()].into(),
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
            floor_us: 0,
            safe_us: 0,
        }
    }

    /// Whether root `r`'s pending work still leaves out the cron sync's own excludes.
    fn cron_excludes(i: &Intake) -> bool {
        let batch = i.batcher.clone().take();
        batch.is_some_and(|b| !b.roots["r"].excludes.is_empty())
    }

    #[test]
    fn a_cron_syncs_excludes_never_hide_work_merged_with_it() {
        // Live change first, cron job second.
        let (mut i, _tx) = intake();
        i.accept(change("app.log"));
        i.accept(cron_run(1));
        assert!(!cron_excludes(&i));
        // Cron job first, live change second.
        let (mut i, _tx) = intake();
        i.accept(cron_run(1));
        assert!(cron_excludes(&i), "alone, it keeps its excludes");
        i.accept(change("app.log"));
        assert!(!cron_excludes(&i));
        // A catch-up merged in.
        let (mut i, _tx) = intake();
        i.accept(cron_run(1));
        i.accept(Job::CatchUp {
            root: "r".into(),
            since_us: 5,
        });
        assert!(!cron_excludes(&i));
        // Two cron runs of the same schedule keep them.
        let (mut i, _tx) = intake();
        i.accept(cron_run(1));
        i.accept(cron_run(2));
        assert!(cron_excludes(&i));
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
}
