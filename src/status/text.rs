//! The report as a table for people.

use std::fmt::Write as _;

use super::gather::age_s;
use super::{Health, Report};

/// Bytes for people: `1.4 MiB`.
fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Seconds for people: `0.02 s`, `42 s`, `3 min`, `5 h`.
fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2} s")
    } else if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.0} h", s / 3600.0)
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// The table `syncbus status` prints.
pub(super) fn text(r: &Report) -> String {
    let mut o = String::new();
    let health = match r.health {
        Health::Ok => "OK",
        Health::Warning => "WARNING",
        Health::Critical => "CRITICAL",
        Health::Unknown => "UNKNOWN",
    };
    let _ = writeln!(
        o,
        "syncbus {health}  (runtime dir {})",
        r.runtime_dir.display()
    );
    if !r.metrics_url.is_empty() {
        let _ = writeln!(o, "metrics at {}", r.metrics_url);
    }
    let _ = writeln!(
        o,
        "\n{:<22} {:<6} {:>8} {:>9}",
        "STAGE", "STATE", "PID", "RESTARTS"
    );
    for (name, s) in &r.stages {
        let state = if s.up { "up" } else { "DOWN" };
        let _ = writeln!(o, "{name:<22} {state:<6} {:>8} {:>9}", s.pid, s.restarts);
    }
    let _ = writeln!(
        o,
        "\n{:<16} {:>8} {:>10} {:>10} {:>9}  INITIAL SYNC",
        "ROOT", "WATCHES", "EVENTS", "CHANGES", "OVERFLOWS"
    );
    for (name, v) in &r.roots {
        let initial = match v.initial_sync.as_str() {
            "running" => format!(
                "running {}, {} entries sent",
                secs(v.initial_sync_running_s),
                v.initial_sync_entries
            ),
            "pending" if v.initial_sync_targets_done > 0 => format!(
                "pending (done on {} of {} targets)",
                v.initial_sync_targets_done, v.initial_sync_targets
            ),
            other => other.to_string(),
        };
        let _ = writeln!(
            o,
            "{name:<16} {:>8} {:>10} {:>10} {:>9}  {initial}",
            opt(v.watches),
            opt(v.events),
            opt(v.changes),
            opt(v.overflows)
        );
    }
    let _ = writeln!(
        o,
        "\n{:<16} {:>9} {:>8} {:>14} {:>8} {:>10} {:>7}",
        "TARGET", "LAG", "BACKLOG", "LAST SUCCESS", "FAILING", "SENT", "RUNS"
    );
    for (name, v) in &r.targets {
        let last = if v.last_success_us == 0 {
            "never".to_string()
        } else {
            format!("{} ago", secs(age_s(r.time_us, v.last_success_us)))
        };
        let failing = if v.failures == 0 {
            "no".to_string()
        } else {
            format!("{}x", v.failures)
        };
        let _ = writeln!(
            o,
            "{name:<16} {:>9} {:>8} {last:>14} {failing:>8} {:>10} {:>7}",
            secs(v.lag_s),
            v.backlog,
            bytes(v.bytes_sent),
            v.runs
        );
    }
    if !r.schedules.is_empty() {
        let _ = writeln!(o, "\nSCHEDULE");
        for (cron, next) in &r.schedules {
            let when = if *next == 0 {
                "never".to_string()
            } else {
                format!(
                    "next in {}",
                    secs(next.saturating_sub(r.time_us) as f64 / 1e6)
                )
            };
            let _ = writeln!(o, "{cron:<22} {when}");
        }
    }
    if !r.problems.is_empty() {
        let _ = writeln!(o, "\nPROBLEMS");
        for p in &r.problems {
            let _ = writeln!(o, "  - {p}");
        }
    }
    o
}
