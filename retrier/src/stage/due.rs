//! What is due at each round: probe answers taken in, probes started, due jobs sent
//! (one `run` per root), heartbeats, the fail log.

use std::collections::BTreeMap;
use std::time::Instant;

use protocol::stage::StageError;
use protocol::wire::JobKind;

use super::{Retrier, FAIL_LOG_EVERY};
use crate::policy;
use crate::IN_FLIGHT;

impl Retrier<'_> {
    /// Heartbeats, probes, due jobs and the fail log.
    pub(super) fn tick(&mut self, now: Instant, publisher: &zmq::Socket) -> Result<(), StageError> {
        self.heal_journal(now)?;
        while let Ok((name, up)) = self.probes.1.try_recv() {
            if let Some(t) = self.targets.get_mut(&name) {
                if t.probed(up, now) {
                    tracing::info!(target = %name, "target reachable again; retrying now");
                }
            }
        }
        let names: Vec<String> = self.targets.keys().cloned().collect();
        for name in names {
            let pending = self.jobs.values().any(|j| j.target == name);
            let t = self.targets.get_mut(&name).expect("listed above");
            if t.probe_due(pending, now) {
                t.start_probe(&name, self.config.retry.probe, &self.probes.0, now);
            }
            // A journal that cannot be written cannot record what a run did.
            if pending && t.is_due(now) && self.journal_error.is_none() {
                self.send_due(&name, now, publisher)?;
            }
            let t = self.targets.get_mut(&name).expect("listed above");
            if t.beat_due(now) {
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
        if let Some(t) = self.targets.get_mut(target) {
            t.sent(&self.config.retry, now);
        }
        Ok(())
    }
}
