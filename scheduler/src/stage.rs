//! The stage around the [`Timetable`]: the PUSH towards the retrier, the loop (one
//! `match` over why it woke up), a full-sync request per root of each fire.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Local;
use croner::Cron;
use protocol::bus::{self, BusError, Endpoints, Shutdown};
use protocol::config::{Config, Schedule};
use protocol::seq::Stamp;
use protocol::stage::StageError;
use protocol::status::{self, StageStatus};
use protocol::wire::{self, Report, ReportKind, Work, REPORT_TOPIC};
use protocol::PathBytes;

use crate::Timetable;

/// The longest wait between two looks at the wall clock, so a clock jump is noticed
/// within a minute even when the next fire is days away (`poll` waits on the monotonic
/// clock, which does not jump).
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The PUSH towards the retrier, with this run's epoch and sequence.
struct Requests {
    socket: zmq::Socket,
    endpoint: String,
    stamp: Stamp,
}

impl Requests {
    /// Asks for a full sync of `root` on every target bound to it. `Ok(false)` when a
    /// shutdown came while the queue towards the retrier was full (nothing was sent).
    fn request(
        &mut self,
        root: &str,
        schedule: &Schedule,
        shutdown: &Shutdown,
    ) -> Result<bool, StageError> {
        let (epoch, seq) = self.stamp.stamp();
        let report = Report {
            version: wire::WORK_VERSION,
            epoch,
            seq,
            report_id: rand::random(),
            kind: ReportKind::Request,
            // Empty: every target bound to the root.
            target: String::new(),
            root: root.to_string(),
            covers: Vec::new(),
            // A routine compare, not a change: no lag unless it fails (status).
            work: Work {
                resyncs: [PathBytes::root()].into(),
                excludes: schedule.exclude_glob.clone(),
                ..Work::default()
            },
            error: String::new(),
            time_us: protocol::now_us(),
        };
        let payload = wire::encode(&report);
        loop {
            let parts = [REPORT_TOPIC.as_bytes(), &payload[..]];
            match self.socket.send_multipart(parts, zmq::DONTWAIT) {
                Ok(()) => return Ok(true),
                Err(zmq::Error::EINTR) => {}
                // The queue towards the retrier is at its high-water mark: wait for room,
                // but keep answering signals (a blocking send would not).
                Err(zmq::Error::EAGAIN) => {
                    let mut items = [
                        self.socket.as_poll_item(zmq::POLLOUT),
                        zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
                    ];
                    match zmq::poll(&mut items, poll_ms(MAX_SLEEP)) {
                        Ok(_) | Err(zmq::Error::EINTR) => {}
                        Err(source) => return Err(self.error("poll", source).into()),
                    }
                    let [_room, signal] = &items;
                    if signal.is_readable() {
                        shutdown.drain();
                    }
                    if shutdown.requested() {
                        return Ok(false);
                    }
                }
                Err(source) => return Err(self.error("send", source).into()),
            }
        }
    }

    fn error(&self, op: &'static str, source: zmq::Error) -> BusError {
        BusError::Zmq {
            op,
            endpoint: self.endpoint.clone(),
            source,
        }
    }
}

/// Why the loop woke up.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// SIGTERM or SIGINT: return (a request still queued may go within the linger).
    Stop,
    /// A fire may be due, the clock looked at again, or the status heartbeat.
    Tick,
}

/// Waits up to `timeout_ms` for a signal, and says why it woke up.
fn wait(shutdown: &Shutdown, timeout_ms: i64) -> Result<Event, zmq::Error> {
    let mut items = [zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN)];
    match zmq::poll(&mut items, timeout_ms) {
        // A signal interrupted the wait: `shutdown` tells whether it asks to stop.
        Ok(_) | Err(zmq::Error::EINTR) => {}
        Err(e) => return Err(e),
    }
    let [signal] = &items;
    if signal.is_readable() {
        shutdown.drain();
    }
    Ok(if shutdown.requested() {
        Event::Stop
    } else {
        Event::Tick
    })
}

/// Runs the scheduler stage until SIGTERM/SIGINT: sends a full-sync request per root
/// each time a schedule fires.
pub fn run(config: &Config, shutdown: &Shutdown) -> Result<(), StageError> {
    let crons = config
        .schedules
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.cron
                .parse::<Cron>()
                .map_err(|e| StageError::Failed(format!("schedule[{i}].cron `{}`: {e}", s.cron)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let endpoints = Endpoints::new(config);
    let ctx = zmq::Context::new();
    let socket = bus::socket(&ctx, zmq::PUSH)?;
    bus::connect(&socket, &endpoints.reports)?;
    let mut out = Requests {
        socket,
        endpoint: endpoints.reports.clone(),
        stamp: Stamp::new(bus::new_epoch()),
    };
    let mut table = Timetable::new(crons, Local::now());
    let board = Arc::new(Mutex::new(StageStatus::new(
        "scheduler",
        protocol::now_us(),
    )));
    let _status = status::Writer::shared(&config.runtime_dir, "scheduler", &board);
    let post = |table: &Timetable<Local>| {
        if let Ok(mut b) = board.lock() {
            b.schedules = config
                .schedules
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let next = table
                        .next(i)
                        .map_or(0, |t| t.timestamp_micros().max(0) as u64);
                    (s.cron.clone(), next)
                })
                .collect();
        }
    };
    post(&table);
    tracing::info!(
        epoch = out.stamp.epoch(),
        reports = %endpoints.reports,
        schedules = config.schedules.len(),
        "scheduler ready"
    );
    if config.schedules.is_empty() {
        tracing::info!("nothing scheduled (no [[schedule]] in the config); waiting for shutdown");
    }
    for (i, s) in config.schedules.iter().enumerate() {
        match table.next(i) {
            Some(next) => {
                tracing::info!(cron = %s.cron, roots = ?s.roots, next = %next, "schedule")
            }
            None => {
                tracing::warn!(cron = %s.cron, roots = ?s.roots, "schedule never fires: no date matches it")
            }
        }
    }
    loop {
        status::beat(&board);
        // Awake at least once per status interval: the heartbeat says it is alive.
        let timeout = table.next_wake().map_or(poll_ms(status::EVERY), |t| {
            let wait = (t - Local::now()).to_std().unwrap_or(Duration::ZERO);
            poll_ms(wait.min(MAX_SLEEP).min(status::EVERY))
        });
        match wait(shutdown, timeout).map_err(|source| out.error("poll", source))? {
            Event::Stop => break,
            Event::Tick => {
                let due = table.due(Local::now());
                post(&table);
                if let Some(back) = due.clock_went_back {
                    tracing::warn!(
                        back_s = back.num_seconds(),
                        "wall clock went back; every schedule planned again from now"
                    );
                }
                for fire in due.fires {
                    let s = &config.schedules[fire.schedule];
                    if let Some(late) = fire.late {
                        tracing::warn!(
                            cron = %s.cron,
                            planned = %fire.planned,
                            late_s = late.num_seconds(),
                            "fire missed (clock jump or suspend): firing once for all missed runs"
                        );
                    }
                    for root in &s.roots {
                        if !out.request(root, s, shutdown)? {
                            tracing::warn!(root, cron = %s.cron, "shutdown while the reports queue was full: request dropped");
                            return Ok(());
                        }
                        tracing::info!(root, cron = %s.cron, seq = out.stamp.last(), "cron full sync requested");
                    }
                    if let Some(next) = table.next(fire.schedule) {
                        tracing::debug!(cron = %s.cron, next = %next, "next fire");
                    }
                }
            }
        }
    }
    Ok(())
}

/// zmq::poll takes milliseconds; round up so a deadline is never polled early forever.
fn poll_ms(d: Duration) -> i64 {
    (d.as_micros().div_ceil(1000)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_timeout_rounds_up() {
        assert_eq!(poll_ms(Duration::from_micros(1)), 1);
        assert_eq!(poll_ms(Duration::ZERO), 0);
        assert_eq!(poll_ms(MAX_SLEEP), 60_000);
    }
}
