//! When each schedule fires: crontab(5) lines on a wall clock that may jump. Pure: the
//! clock is a parameter.

use chrono::{DateTime, TimeDelta, TimeZone};
use croner::Cron;

/// How far the wall clock may step without the timetable treating it as a jump: a fire
/// found later than this was missed (forward jump or suspend), and a clock that went
/// back further than this is planned again.
pub const SLACK: TimeDelta = TimeDelta::minutes(1);

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
}
