//! The full lane: whole-root compares (the start compare, catch-ups, cron full syncs,
//! compares the retrier orders) on a thread of their own beside the live lane, each
//! behind the root guard; what they owe when they fail goes to the journal.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::status::FullStatus;
use protocol::PathBytes;

use crate::command::RunResult;
use crate::guard;
use ::rsync::Outcome;
use protocol::work::Work;

use super::*;

#[derive(Debug)]
pub(crate) struct FullDone {
    pub(super) root: String,
    pub(super) kind: FullKind,
    pub(super) job_ids: Vec<u64>,
    pub(super) result: RunResult,
    /// When the run began (µs since the Unix epoch; 0 when it never ran).
    pub(super) started_us: u64,
    /// False when nothing ran: the root guard refused the whole compare (not a
    /// failure: the target is not failing; the refusal is in the status).
    pub(super) ran: bool,
}

/// What the full lane does for a root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FullKind {
    /// Compare all of it, leaving out these globs too (a cron full sync's own).
    Full { excludes: Vec<String> },
    /// Compare what changed since this time (µs).
    CatchUp { since_us: u64 },
}

impl FullKind {
    /// One run that does what both ask: a full compare covers a catch-up.
    pub(super) fn merge(self, other: FullKind) -> FullKind {
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
    pub(super) fn owed(&self) -> Work {
        let mut w = Work::default();
        match self {
            FullKind::Full { excludes } => {
                w.resync(PathBytes::root());
                w.excludes = excludes.clone();
            }
            FullKind::CatchUp { since_us } => w.catch_up(*since_us),
        }
        w
    }
}

/// How often a running full sync says so in the log.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// A whole-root resync in the full lane.
pub(super) struct FullState {
    /// What the live lane sent meanwhile: sent again once the full sync is over, since
    /// the full sync may have copied an older version over it.
    pub(super) replay: Work,
    /// When the oldest change it brings over happened (µs), for the status; the
    /// same for the run asked for meanwhile.
    pub(super) since_us: u64,
    pub(super) again_since_us: u64,
    /// How far back it holds the crash checkpoint ([`Work::floor_us`]); the same for
    /// the run asked for meanwhile.
    pub(super) floor_us: Option<u64>,
    pub(super) again_floor_us: Option<u64>,
    /// Another run asked for while this one ran, and the jobs it covers.
    pub(super) again: Option<(FullKind, Vec<u64>)>,
}

/// What the full lane is asked to do.
pub(super) struct FullReq {
    pub(super) root: String,
    pub(super) kind: FullKind,
    pub(super) job_ids: Vec<u64>,
}

/// After a guarded compare that did not fail: remembers a refusal (status and record)
/// or clears one, and records the root's file system when the compare proved it (it
/// ran with deletes, or needed none, from a root that is not empty).
pub(super) fn settle_guard(
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
pub(super) fn full_lane(
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

impl Worker {
    /// Runs `kind` for `root` in the full lane, or once more after the run going on;
    /// `work` is what asked for it (its change time and crash-checkpoint floor).
    pub(super) fn start_full(&mut self, root: &str, kind: FullKind, covers: Vec<u64>, work: &Work) {
        let since_us = work.since_us;
        if let Some(running) = self.full.get_mut(root) {
            running.again_since_us = protocol::earliest_us(running.again_since_us, since_us);
            running.again_floor_us =
                protocol::work::lower_floor(running.again_floor_us, work.floor_us);
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
                    replay: Work::default(),
                    since_us,
                    again_since_us: 0,
                    floor_us: work.floor_us,
                    again_floor_us: None,
                    again: None,
                },
            );
        }
    }

    pub(super) fn full_finished(&mut self, done: &FullDone, intake: &mut Intake) {
        self.reporter.run_started_us = done.started_us;
        let state = self.full.remove(&done.root);
        let since_us = state.as_ref().map_or(0, |s| s.since_us);
        let floor_us = state.as_ref().and_then(|s| s.floor_us);
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
            let mut owed = done.kind.owed();
            owed.since_us = since_us;
            owed.floor_us = floor_us;
            if self.hand_over(
                &done.root,
                &owed,
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
            intake.batcher.merge(&done.root, replay);
        }
        if let Some((kind, covers)) = state.again {
            let mut owed = kind.owed();
            owed.since_us = state.again_since_us;
            owed.floor_us = state.again_floor_us;
            // A cron sync's own excludes hold only if the root owes nothing else
            // (`Work`'s merge rule).
            intake
                .covers
                .entry(done.root.clone())
                .or_default()
                .extend(covers);
            intake.batcher.merge(&done.root, owed);
        }
    }
}
