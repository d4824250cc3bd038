//! The link to the retrier: reports (failed work, delivered jobs, ready), the delivery
//! stream, and the hand-over of failed work with its wait for the journal's ack. Owed
//! work crosses as it is ([`Work`]): its deletes and change times come back intact.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protocol::seq::Stamp;
use protocol::wire::{self, Report, ReportKind, Work};
use protocol::PathBytes;

use protocol::work::Touch;

use super::*;

/// How long a hand-over to the retrier may wait for its acknowledgement before the
/// worker keeps the work itself.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(2);

/// Sends reports to the retrier (one PUSH socket per thread: zmq sockets are not shared).
pub(crate) struct Reporter {
    pub(super) push: zmq::Socket,
    /// The reports' stream, and the delivery stream's (the same epoch).
    reports: Stamp,
    deliveries: Stamp,
    pub(super) target: String,
    /// When the run being reported began (0: unknown, as for the full lane's).
    pub run_started_us: u64,
}

impl Reporter {
    pub(crate) fn new(push: zmq::Socket, target: &str) -> Self {
        let epoch = protocol::bus::new_epoch();
        Reporter {
            push,
            reports: Stamp::new(epoch),
            deliveries: Stamp::new(epoch),
            target: target.to_string(),
            run_started_us: 0,
        }
    }

    /// Tells the delivery stream what one run brought to the target, or failed to
    /// (relayed by the retrier; dropped, and seen as a gap, if it is gone for long).
    pub(crate) fn deliver(
        &mut self,
        root: &str,
        paths: &BTreeMap<PathBytes, Touch>,
        resyncs: &[PathBytes],
        failed: Option<(u32, &str)>,
    ) {
        let (epoch, seq) = self.deliveries.stamp();
        let msg = wire::Delivery {
            version: wire::VERSION,
            epoch,
            seq,
            target: self.target.clone(),
            root: root.to_string(),
            ok: failed.is_none(),
            time_us: protocol::now_us(),
            paths: paths
                .iter()
                .map(|(p, t)| wire::Delivered {
                    path: p.clone(),
                    since_us: t.since_us,
                })
                .collect(),
            resyncs: resyncs.to_vec(),
            attempt: failed.map_or(0, |f| f.0),
            error: failed.map_or(String::new(), |f| f.1.to_string()),
            started_us: self.run_started_us,
        };
        let topic = wire::deliveries_topic(&self.target);
        let payload = wire::encode(&msg);
        if let Err(e) = self
            .push
            .send_multipart([topic.as_bytes(), &payload[..]], zmq::DONTWAIT)
        {
            tracing::debug!(target = %self.target, error = %e, "delivery report dropped");
        }
    }

    /// Sends one report; returns its id (for the ack). A send that fails is logged:
    /// the caller waits for an ack that will not come and keeps the work.
    pub(crate) fn send(
        &mut self,
        kind: ReportKind,
        root: &str,
        covers: Vec<u64>,
        work: Work,
        error: &str,
    ) -> u64 {
        let (epoch, seq) = self.reports.stamp();
        let report = Report {
            version: wire::WORK_VERSION,
            epoch,
            seq,
            report_id: rand::random::<u64>() | 1,
            kind,
            target: self.target.clone(),
            root: root.to_string(),
            covers,
            work,
            error: error.to_string(),
            time_us: protocol::now_us(),
        };
        let payload = wire::encode(&report);
        if let Err(e) = self
            .push
            .send_multipart([wire::REPORT_TOPIC.as_bytes(), &payload[..]], zmq::DONTWAIT)
        {
            tracing::warn!(target = %self.target, error = %e, "cannot queue a report for the retrier");
        }
        report.report_id
    }
}

impl Worker {
    /// Hands `work` to the retrier's journal and waits for the ack. `false` when the
    /// retrier did not answer in time: the caller keeps the work.
    pub(super) fn hand_over(
        &mut self,
        root: &str,
        work: &Work,
        covers: Vec<u64>,
        error: &str,
        intake: &mut Intake,
    ) -> bool {
        if work.is_empty() && covers.is_empty() {
            return true;
        }
        let id = self.reporter.send(
            ReportKind::Failed,
            root,
            covers.clone(),
            work.clone(),
            error,
        );
        let deadline = Instant::now() + ACK_WAIT;
        loop {
            if intake.acked.remove(&id) {
                for c in &covers {
                    intake.held.remove(c);
                }
                return true;
            }
            let now = Instant::now();
            if now >= deadline || self.control.abort.load(Ordering::SeqCst) {
                return false;
            }
            intake.wait(Some(deadline - now));
        }
    }
}
