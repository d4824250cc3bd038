//! What each kind of report does: `failed` work journalled (and acknowledged once on
//! disk), `delivered` jobs settled, a `request` journalled for every target of its root,
//! `ready` sends a target's jobs again.

use std::time::Instant;

use protocol::stage::StageError;
use protocol::wire::{JobKind, Report, ReportKind};

use super::{Job, Retrier};
use crate::journal::Record;
use crate::policy;

impl Retrier<'_> {
    pub(super) fn handle(
        &mut self,
        rep: Report,
        publisher: &zmq::Socket,
    ) -> Result<(), StageError> {
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
                    let retried = !rep.covers.is_empty();
                    if let Some(delay) = t.failed(&rep.error, retried, policy, now) {
                        tracing::warn!(target = %rep.target, root = %rep.root, attempt = t.failures(), retry_in_ms = delay.as_millis() as u64, error = %rep.error, "delivery failed; journalled, will retry");
                    }
                }
            }
            ReportKind::Delivered => {
                // Without covers it only says the target works again.
                if !rep.covers.is_empty() && self.store(&rep.covers, &[]).is_none() {
                    return Ok(());
                }
                if let Some(t) = self.targets.get_mut(&rep.target) {
                    let attempts = t.delivered(rep.time_us, now);
                    if attempts > 0 {
                        tracing::info!(target = %rep.target, attempts, "target recovered");
                    }
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
                    t.ready(now);
                }
                tracing::debug!(target = %rep.target, resent, "dispatcher ready");
            }
        }
        Ok(())
    }
}
