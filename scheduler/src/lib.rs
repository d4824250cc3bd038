//! The scheduler stage: cron full syncs (sersync's `crontab` + `crontabfilter`).
//!
//! In: the config's `[[schedule]]` tables (a crontab(5) line, the roots, globs to leave
//! out) and the machine's local clock. Out: each time a schedule fires, one `Report` of
//! kind `request` per root of the schedule, PUSHed to the retrier's `reports` endpoint
//! (topic `report/`): "resync this whole root on every target bound to it, minus these
//! globs". The retrier journals the request and hands it to the dispatchers; the
//! scheduler never talks to rsync or to a target itself.
//!
//! [`next_fire`] and [`Timetable`] are the pure core (time is a parameter); [`run`] is
//! the thin loop around them: wait for the earliest fire or a signal, send what is due.
//!
//! # Invariants
//! - Times are crontab(5) times: the local wall clock; day-of-week 0 and 7 are Sunday,
//!   1 is Monday (croner's default parser, not its Quartz mode); a line that restricts
//!   both day-of-month and day-of-week fires when either matches, as in vixie cron.
//! - A schedule fires at most once per wake-up. When the wall clock jumps forward or the
//!   machine was suspended, the runs missed meanwhile become one run, and the next one
//!   is counted from now: a full sync converges whatever happened before, so one is as
//!   good as many, and a burst would only queue identical work.
//! - When the wall clock goes back by more than [`SLACK`], every schedule is planned
//!   again from the new time: the runs in the repeated stretch happen again rather than
//!   being skipped. A smaller step back (NTP) changes nothing, so a run just made is
//!   never repeated because the clock was nudged.
//! - `seq` is gap-free from 1 for one `epoch`; the epoch is new at every start.
//! - Shutdown never waits on the bus: requests are sent without blocking, and while the
//!   queue towards the retrier is full the stage still answers signals. Only the
//!   socket's linger ([`LINGER`](protocol::bus::LINGER)) may delay the exit.
//!
//! # Known problems
//! - Nothing is persisted: a run that fell due while the scheduler was stopped (or the
//!   machine was off) is not made up at start — like cron, unlike anacron.
//! - Requests are fire-and-forget. PUSH queues them while the retrier is down (up to the
//!   high-water mark) and delivers them when it binds; requests still queued when the
//!   linger runs out at exit are lost, and the retrier's acknowledgement (on the `jobs`
//!   stream) is not read. The next fire asks again.
//! - Daylight saving time follows croner: a fixed-time line whose time falls in the
//!   skipped hour runs just after the jump; in the repeated hour it runs once; `*/15`
//!   style lines run in both halves of the repeated hour.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Local, TimeDelta, TimeZone};
use croner::Cron;
use protocol::bus::{self, BusError, Endpoints, Shutdown};
use protocol::config::{Config, Schedule};
use protocol::stage::StageError;
use protocol::status::{self, StageStatus};
use protocol::wire::{self, Report, ReportKind, Work, REPORT_TOPIC};
use protocol::PathBytes;

/// How far the wall clock may step without the timetable treating it as a jump: a fire
/// found later than this was missed (forward jump or suspend), and a clock that went
/// back further than this is planned again.
pub const SLACK: TimeDelta = TimeDelta::minutes(1);

/// The longest wait between two looks at the wall clock, so a clock jump is noticed
/// within a minute even when the next fire is days away (`poll` waits on the monotonic
/// clock, which does not jump).
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The first time strictly after `after` that `cron` names, on `after`'s wall clock;
/// `None` when the line never fires (`0 0 30 2 *`).
pub fn next_fire<Tz: TimeZone>(cron: &Cron, after: DateTime<Tz>) -> Option<DateTime<Tz>> {
    // croner steps off `after`'s whole second, so a fraction past a match is skipped
    // too; the filter states the contract instead of trusting that detail.
    cron.find_next_occurrence(&after, false)
        .ok()
        .filter(|t| *t > after)
}

/// One schedule's fire, as [`Timetable::due`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fire<Tz: TimeZone> {
    /// Index of the schedule (the order of `[[schedule]]` in the config).
    pub schedule: usize,
    /// The time the schedule named.
    pub planned: DateTime<Tz>,
    /// How late it fires, when later than [`SLACK`]: the clock jumped forward or the
    /// machine slept, and the runs missed meanwhile are folded into this one.
    pub late: Option<TimeDelta>,
}

/// What one look at the clock found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due<Tz: TimeZone> {
    pub fires: Vec<Fire<Tz>>,
    /// How far the clock went back since the last look, when further than [`SLACK`]
    /// (every schedule was planned again from now).
    pub clock_went_back: Option<TimeDelta>,
}

/// When each schedule fires next; the clock is a parameter.
#[derive(Debug, Clone)]
pub struct Timetable<Tz: TimeZone> {
    crons: Vec<Cron>,
    next: Vec<Option<DateTime<Tz>>>,
    last_seen: DateTime<Tz>,
}

impl<Tz: TimeZone> Timetable<Tz> {
    /// Plans every schedule's first fire strictly after `now`.
    pub fn new(crons: Vec<Cron>, now: DateTime<Tz>) -> Self {
        let next = crons.iter().map(|c| next_fire(c, now.clone())).collect();
        Timetable {
            crons,
            next,
            last_seen: now,
        }
    }

    /// The planned fire of schedule `i`; `None` if it never fires.
    pub fn next(&self, i: usize) -> Option<&DateTime<Tz>> {
        self.next.get(i).and_then(Option::as_ref)
    }

    /// The earliest planned fire of any schedule; `None` when nothing will ever fire.
    pub fn next_wake(&self) -> Option<DateTime<Tz>> {
        self.next.iter().flatten().min().cloned()
    }

    /// The schedules due at `now`, each once, with their next fire planned strictly
    /// after `now` (never after the missed time: that would be a burst).
    pub fn due(&mut self, now: DateTime<Tz>) -> Due<Tz> {
        let back = self.last_seen.clone() - now.clone();
        let clock_went_back = (back > SLACK).then_some(back);
        self.last_seen = now.clone();
        if clock_went_back.is_some() {
            for (next, cron) in self.next.iter_mut().zip(&self.crons) {
                *next = next_fire(cron, now.clone());
            }
        }
        let mut fires = Vec::new();
        for (i, (next, cron)) in self.next.iter_mut().zip(&self.crons).enumerate() {
            let Some(planned) = next.clone().filter(|t| *t <= now) else {
                continue;
            };
            let late = now.clone() - planned.clone();
            fires.push(Fire {
                schedule: i,
                planned,
                late: (late > SLACK).then_some(late),
            });
            *next = next_fire(cron, now.clone());
        }
        Due {
            fires,
            clock_went_back,
        }
    }
}

/// The PUSH towards the retrier, with this run's epoch and sequence.
struct Requests {
    socket: zmq::Socket,
    endpoint: String,
    epoch: u64,
    seq: u64,
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
        self.seq += 1;
        let report = Report {
            version: wire::WORK_VERSION,
            epoch: self.epoch,
            seq: self.seq,
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
                        Err(e) => return Err(StageError::Failed(format!("zmq poll: {e}"))),
                    }
                    if items[1].is_readable() {
                        shutdown.drain();
                    }
                    if shutdown.requested() {
                        return Ok(false);
                    }
                }
                Err(source) => {
                    return Err(BusError::Zmq {
                        op: "send",
                        endpoint: self.endpoint.clone(),
                        source,
                    }
                    .into())
                }
            }
        }
    }
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
        epoch: bus::new_epoch(),
        seq: 0,
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
        epoch = out.epoch,
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
        let mut items = [zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN)];
        match zmq::poll(&mut items, timeout) {
            // A signal interrupted the wait: the loop looks at it below.
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => return Err(StageError::Failed(format!("zmq poll: {e}"))),
        }
        if items[0].is_readable() {
            shutdown.drain();
        }
        if shutdown.requested() {
            break;
        }
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
                tracing::info!(root, cron = %s.cron, seq = out.seq, "cron full sync requested");
            }
            if let Some(next) = table.next(fire.schedule) {
                tracing::debug!(cron = %s.cron, next = %next, "next fire");
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
    use chrono::{Datelike, FixedOffset, NaiveDate, Timelike, Utc, Weekday};

    fn cron(line: &str) -> Cron {
        // The same check the config applies, so these are lines a user could write.
        protocol::config::check_cron(line).unwrap();
        line.parse().unwrap()
    }

    /// `YYYY-MM-DD HH:MM:SS` in UTC (the pure core works on any zone's wall clock).
    fn at(s: &str) -> DateTime<Utc> {
        chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
            .unwrap()
            .and_utc()
    }

    // 2025-06-11 is a Wednesday.
    const WED: &str = "2025-06-11";

    #[test]
    fn next_fire_reads_crontab5_lines() {
        assert_eq!(
            NaiveDate::from_ymd_opt(2025, 6, 11).unwrap().weekday(),
            Weekday::Wed
        );
        let noon = &format!("{WED} 12:07:00");
        let cases: &[(&str, &str, &str)] = &[
            ("30 3 * * *", noon, "2025-06-12 03:30:00"),
            ("30 3 * * *", "2025-06-11 03:29:59", "2025-06-11 03:30:00"),
            ("*/15 * * * *", noon, "2025-06-11 12:15:00"),
            ("*/15 * * * *", "2025-06-11 23:45:00", "2025-06-12 00:00:00"),
            // crontab(5): 1 is Monday. Quartz would say Sunday (06-15).
            ("0 0 * * 1", noon, "2025-06-16 00:00:00"),
            ("0 0 * * 0", noon, "2025-06-15 00:00:00"),
            ("0 0 * * 7", noon, "2025-06-15 00:00:00"),
            ("0 0 * * 6", noon, "2025-06-14 00:00:00"),
            ("0 0 * * mon", noon, "2025-06-16 00:00:00"),
            ("0 0 * * sun", noon, "2025-06-15 00:00:00"),
            ("30 3 * * 1-5", "2025-06-13 04:00:00", "2025-06-16 03:30:00"),
            // Day-of-month and day-of-week both restricted: either one (vixie cron).
            ("0 0 1 * 1", noon, "2025-06-16 00:00:00"),
            ("0 0 1 * 1", "2025-06-28 00:00:00", "2025-06-30 00:00:00"),
            ("0 0 13 * 5", noon, "2025-06-13 00:00:00"),
            ("@hourly", noon, "2025-06-11 13:00:00"),
            ("@daily", noon, "2025-06-12 00:00:00"),
            ("@weekly", noon, "2025-06-15 00:00:00"),
            ("@monthly", noon, "2025-07-01 00:00:00"),
            ("@yearly", noon, "2026-01-01 00:00:00"),
            ("0 0 29 2 *", "2025-03-01 00:00:00", "2028-02-29 00:00:00"),
        ];
        for (line, after, want) in cases {
            assert_eq!(
                next_fire(&cron(line), at(after)),
                Some(at(want)),
                "`{line}` after {after}"
            );
        }
    }

    #[test]
    fn next_fire_is_strictly_after() {
        let c = cron("30 3 * * *");
        assert_eq!(
            next_fire(&c, at("2025-06-11 03:30:00")),
            Some(at("2025-06-12 03:30:00"))
        );
        let just_past = at("2025-06-11 03:30:00") + TimeDelta::milliseconds(1);
        assert_eq!(next_fire(&c, just_past), Some(at("2025-06-12 03:30:00")));
        let just_before = at("2025-06-11 03:30:00") - TimeDelta::milliseconds(1);
        assert_eq!(next_fire(&c, just_before), Some(at("2025-06-11 03:30:00")));
    }

    #[test]
    fn next_fire_uses_the_wall_clock_of_the_zone_given() {
        let plus2 = FixedOffset::east_opt(2 * 3600).unwrap();
        let after = at(&format!("{WED} 12:00:00")).with_timezone(&plus2);
        let next = next_fire(&cron("30 3 * * *"), after).unwrap();
        assert_eq!(next.to_rfc3339(), "2025-06-12T03:30:00+02:00");
        assert_eq!(next.with_timezone(&Utc), at("2025-06-12 01:30:00"));
    }

    #[test]
    fn a_line_that_never_fires_has_no_next() {
        let t = table(&["0 0 30 2 *"], &format!("{WED} 12:00:00"));
        assert_eq!(t.next(0), None);
        assert_eq!(t.next_wake(), None);
    }

    /// Against a minute-by-minute scan: the first matching minute strictly after.
    #[test]
    fn next_fire_is_the_first_matching_minute() {
        let lines = [
            "30 3 * * *",
            "*/15 * * * *",
            "0 0 * * 1",
            "5 4 * * 0",
            "@hourly",
        ];
        for line in lines {
            let c = cron(line);
            let mut after = at("2025-06-09 00:00:00") + TimeDelta::seconds(17);
            while after < at("2025-06-17 00:00:00") {
                let got = next_fire(&c, after).unwrap();
                let mut t = after.with_second(0).unwrap() + TimeDelta::minutes(1);
                while !c.is_time_matching(&t).unwrap() {
                    t += TimeDelta::minutes(1);
                }
                assert_eq!(got, t, "`{line}` after {after}");
                after += TimeDelta::minutes(97);
            }
        }
    }

    fn table(lines: &[&str], now: &str) -> Timetable<Utc> {
        Timetable::new(lines.iter().map(|l| cron(l)).collect(), at(now))
    }

    fn fired(due: &Due<Utc>) -> Vec<usize> {
        due.fires.iter().map(|f| f.schedule).collect()
    }

    #[test]
    fn each_schedule_fires_once_at_its_time() {
        let mut t = table(&["30 3 * * *", "*/15 * * * *"], "2025-06-11 03:10:00");
        assert_eq!(t.next_wake(), Some(at("2025-06-11 03:15:00")));
        assert!(t.due(at("2025-06-11 03:14:59")).fires.is_empty());
        let due = t.due(at("2025-06-11 03:15:00"));
        assert_eq!(fired(&due), [1]);
        assert_eq!(due.fires[0].planned, at("2025-06-11 03:15:00"));
        assert_eq!(due.fires[0].late, None);
        // Waking a little late is normal (poll rounds up): still one fire, not late.
        let due = t.due(at("2025-06-11 03:30:00") + TimeDelta::milliseconds(3));
        assert_eq!(fired(&due), [0, 1]);
        assert!(due.fires.iter().all(|f| f.late.is_none()));
        assert_eq!(t.next(0), Some(&at("2025-06-12 03:30:00")));
        assert_eq!(t.next(1), Some(&at("2025-06-11 03:45:00")));
        assert!(t.due(at("2025-06-11 03:31:00")).fires.is_empty());
    }

    #[test]
    fn a_forward_jump_fires_once_not_a_burst() {
        let mut t = table(&["*/15 * * * *"], "2025-06-11 03:10:00");
        // Suspended for three hours: twelve runs missed, one made.
        let due = t.due(at("2025-06-11 06:07:00"));
        assert_eq!(fired(&due), [0]);
        assert_eq!(due.fires[0].planned, at("2025-06-11 03:15:00"));
        assert_eq!(due.fires[0].late, Some(TimeDelta::minutes(172)));
        assert_eq!(t.next(0), Some(&at("2025-06-11 06:15:00")));
        assert!(t.due(at("2025-06-11 06:07:01")).fires.is_empty());
        assert_eq!(due.clock_went_back, None);
    }

    #[test]
    fn a_clock_that_goes_back_is_planned_again() {
        let mut t = table(&["@hourly"], "2025-06-11 09:59:00");
        assert_eq!(fired(&t.due(at("2025-06-11 10:00:00"))), [0]);
        assert_eq!(t.next(0), Some(&at("2025-06-11 11:00:00")));
        // Back by 90 minutes: 09:00 and 10:00 come round again and run again.
        let due = t.due(at("2025-06-11 08:30:00"));
        assert!(due.fires.is_empty());
        assert_eq!(due.clock_went_back, Some(TimeDelta::minutes(90)));
        assert_eq!(t.next(0), Some(&at("2025-06-11 09:00:00")));
        assert_eq!(fired(&t.due(at("2025-06-11 09:00:00"))), [0]);
    }

    #[test]
    fn a_small_step_back_does_not_repeat_a_run() {
        let mut t = table(&["30 3 * * *"], "2025-06-11 03:00:00");
        assert_eq!(fired(&t.due(at("2025-06-11 03:30:00"))), [0]);
        // NTP pulls the clock back 20 s: 03:30 must not run twice.
        let due = t.due(at("2025-06-11 03:29:40"));
        assert_eq!(
            due,
            Due {
                fires: vec![],
                clock_went_back: None
            }
        );
        assert!(t.due(at("2025-06-11 03:30:00")).fires.is_empty());
        assert_eq!(t.next(0), Some(&at("2025-06-12 03:30:00")));
    }

    #[test]
    fn poll_timeout_rounds_up() {
        assert_eq!(poll_ms(Duration::from_micros(1)), 1);
        assert_eq!(poll_ms(Duration::ZERO), 0);
        assert_eq!(poll_ms(MAX_SLEEP), 60_000);
    }
}
