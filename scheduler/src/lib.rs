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
//!//!
//! # Where things are
//! - `timetable.rs`: [`next_fire`] and [`Timetable`], pure, with their cases.
//! - `stage.rs`: [`run`], the loop (one `match` over why it woke up) and the requests
//!   sent with a gap-free `seq`.
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

#![warn(unreachable_pub)]

mod stage;
mod timetable;

pub use stage::run;
pub use timetable::{next_fire, Due, Fire, Timetable, SLACK};
