//! One target's backoff state in the retrier: failures in a row, when its jobs may go
//! out next, what its probe last said, its job stream's `seq` and heartbeat.

use std::time::{Duration, Instant};

use protocol::config::{Endpoint, Retry};
use protocol::seq::Stamp;
use protocol::status::TargetStatus;

use crate::policy;
use crate::probe::{self, probe_of, Probe, ProbeTx};

/// How often each target's job stream carries a message, a heartbeat if nothing else.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);

pub(crate) struct TargetState {
    /// Consecutive failed tries; 0 when the target is healthy.
    failures: u32,
    /// When its jobs may go out next.
    due: Instant,
    probe: Probe,
    probe_down: bool,
    next_probe: Instant,
    /// A probe runs on its own thread (a connect or a DNS lookup may block).
    probing: bool,
    /// The target's job topic.
    stamp: Stamp,
    next_beat: Instant,
    /// The error of the last failed try and when the target last took something.
    last_error: String,
    last_success_us: u64,
}

impl TargetState {
    pub(crate) fn new(endpoint: &Endpoint, now: Instant, epoch: u64) -> Self {
        TargetState {
            failures: 0,
            due: now,
            probe: probe_of(endpoint),
            probe_down: false,
            next_probe: now,
            probing: false,
            stamp: Stamp::new(epoch),
            next_beat: now,
            last_error: String::new(),
            last_success_us: 0,
        }
    }

    /// Failed tries in a row.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// A `failed` report: `error` is empty when the work was handed over untried. A
    /// try counts as one more failure when it retried journalled work (`retried`) or
    /// the target was healthy; then the target is due after the backoff, returned.
    pub(crate) fn failed(
        &mut self,
        error: &str,
        retried: bool,
        policy: &Retry,
        now: Instant,
    ) -> Option<Duration> {
        let tried = !error.is_empty();
        if tried {
            self.last_error = error.to_string();
        }
        if tried && (retried || self.failures == 0) {
            self.failures += 1;
            let delay = policy::next_attempt(policy, self.failures, rand::random());
            self.due = now + delay;
            return Some(delay);
        }
        None
    }

    /// A delivery: the target is healthy and due at once. Returns the failures in a
    /// row it had.
    pub(crate) fn delivered(&mut self, time_us: u64, now: Instant) -> u32 {
        let failures = self.failures;
        self.failures = 0;
        self.due = now;
        self.probe_down = false;
        self.last_success_us = time_us;
        failures
    }

    /// Its dispatcher (re)joined: a healthy target's jobs go out at once.
    pub(crate) fn ready(&mut self, now: Instant) {
        if self.failures == 0 {
            self.due = now;
        }
    }

    /// A probe's answer. True when a failing target that did not answer does again:
    /// its jobs are due now, not at the end of the backoff.
    pub(crate) fn probed(&mut self, up: bool, now: Instant) -> bool {
        self.probing = false;
        let back = up && self.probe_down && self.failures > 0;
        if back {
            self.due = now;
        }
        self.probe_down = !up;
        back
    }

    /// Whether a probe should start now: the target is failing with jobs pending, has
    /// something to probe, and none is running.
    pub(crate) fn probe_due(&self, pending: bool, now: Instant) -> bool {
        pending
            && self.failures > 0
            && now >= self.next_probe
            && !self.probing
            && self.probe != Probe::None
    }

    /// Starts a probe on its own thread; the next one is due `every` later.
    pub(crate) fn start_probe(&mut self, name: &str, every: Duration, tx: &ProbeTx, now: Instant) {
        self.next_probe = now + every;
        self.probing = probe::spawn(name, self.probe.clone(), tx.clone());
    }

    /// Whether its jobs may go out now.
    pub(crate) fn is_due(&self, now: Instant) -> bool {
        now >= self.due
    }

    /// Whether its stream is due a heartbeat.
    pub(crate) fn beat_due(&self, now: Instant) -> bool {
        now >= self.next_beat
    }

    /// Its jobs went out: a failing target gets new ones no sooner than its backoff
    /// allows.
    pub(crate) fn sent(&mut self, policy: &Retry, now: Instant) {
        if self.failures > 0 {
            self.due = now + policy::next_attempt(policy, self.failures, rand::random());
        }
    }

    /// The `(epoch, seq)` of its next job message, which also puts off the next
    /// heartbeat.
    pub(crate) fn next_stamp(&mut self) -> (u64, u64) {
        self.next_beat = Instant::now() + HEARTBEAT;
        self.stamp.stamp()
    }

    /// The earliest time the loop must look at this target again; `waiting`: it has
    /// jobs that are not out and the journal takes writes.
    pub(crate) fn next_wake(&self, now: Instant, waiting: bool) -> Instant {
        let mut wake = self.next_beat;
        if self.probing {
            // Its answer comes on a channel, not a socket: look again soon.
            wake = wake.min(now + Duration::from_millis(20));
        }
        if waiting {
            wake = wake.min(self.due.max(now));
            if self.failures > 0 {
                wake = wake.min(self.next_probe.max(now));
            }
        }
        wake
    }

    /// Its part of the status: failures in a row, the last error while failing, the
    /// last success, and when the next try is due while waiting for it.
    pub(crate) fn status(&self, now: Instant, now_us: u64) -> TargetStatus {
        let waiting = self.failures > 0 && self.due > now;
        TargetStatus {
            failures: self.failures,
            last_error: if self.failures > 0 {
                self.last_error.clone()
            } else {
                String::new()
            },
            last_success_us: self.last_success_us,
            next_retry_us: if waiting {
                now_us + self.due.duration_since(now).as_micros() as u64
            } else {
                0
            },
            ..Default::default()
        }
    }
}
