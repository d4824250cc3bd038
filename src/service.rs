//! What `syncbus run` tells systemd (`Type=notify`, see `protocol::notify`): `READY=1`
//! once every root's watches are live, `WATCHDOG=1` while every stage's main loop beats
//! and the supervisor's own loop goes round, and `STATUS=` the one-line health that
//! `systemctl status` shows. All of it comes from the status files `syncbus status`
//! reads ([`crate::status::report`]), read once a second: the supervisor learns nothing
//! over any other channel.
//!
//! # Invariants
//! - `READY=1` is sent once per start (and again after each reload's `RELOADING=1`),
//!   never before the watcher reported every root of the config watched: systemd's
//!   "started" then means a change made from now on is seen.
//! - `WATCHDOG=1`, once ready, only while every stage is up (its heartbeat younger than
//!   `protocol::status::STALE`, its pid alive): a stage whose loop hangs, or one that
//!   keeps dying, stops the pings, and systemd restarts the whole service after
//!   `WatchdogSec=`. The supervisor restarts a dead stage itself; a hung one only
//!   systemd's watchdog catches.
//! - Nothing is sent without `NOTIFY_SOCKET`; the stages never get it.

use std::time::{Duration, Instant};

use protocol::config::Config;
use protocol::notify;

use crate::status::{Health, Report};

/// How often the status files are read.
const EVERY: Duration = Duration::from_secs(1);

/// What the report says, for systemd.
#[derive(Debug, PartialEq)]
pub(crate) struct Assessment {
    /// Every root of the config is watched (in full, or in part at the watch limit).
    pub watching: bool,
    /// Every stage the supervisor runs is up.
    pub alive: bool,
    /// The line for `STATUS=`.
    pub status: String,
}

/// Reads a report as systemd needs it (pure). `roots` are the config's root names,
/// `stages` the stages the supervisor runs.
pub(crate) fn assess(r: &Report, roots: &[String], stages: &[&str]) -> Assessment {
    let waiting: Vec<&str> = roots
        .iter()
        .filter(|name| {
            !r.roots
                .get(*name)
                .is_some_and(|v| v.watches.unwrap_or(0) > 0 || !v.unwatched.is_empty())
        })
        .map(String::as_str)
        .collect();
    let down: Vec<&str> = stages
        .iter()
        .copied()
        .filter(|s| !r.stages.get(*s).is_some_and(|v| v.up))
        .collect();
    let health = match r.health {
        Health::Ok => "ok",
        Health::Warning => "warning",
        Health::Critical => "critical",
        Health::Unknown => "unknown",
    };
    let status = if !waiting.is_empty() {
        format!(
            "starting: waiting for the watches of {}",
            waiting.join(", ")
        )
    } else if let Some(first) = r.problems.first() {
        let more = match r.problems.len() - 1 {
            0 => String::new(),
            n => format!(" (+{n} more: syncbus status)"),
        };
        format!("{health}: {first}{more}")
    } else {
        let watches: u64 = r.roots.values().filter_map(|v| v.watches).sum();
        let lag = r.targets.values().map(|t| t.lag_s).fold(0.0, f64::max);
        format!(
            "{health}: {} root{} ({watches} directories watched), {} target{}, lag {lag:.1} s",
            roots.len(),
            if roots.len() == 1 { "" } else { "s" },
            r.targets.len(),
            if r.targets.len() == 1 { "" } else { "s" },
        )
    };
    Assessment {
        watching: waiting.is_empty(),
        alive: down.is_empty(),
        status: notify::status_line(&status),
    }
}

/// The supervisor's side of the conversation with systemd.
pub(crate) struct Service {
    /// Whether systemd listens at all (`NOTIFY_SOCKET`).
    listening: bool,
    watchdog: Option<Duration>,
    ready: bool,
    status: String,
    next_look: Instant,
    warned: bool,
}

impl Service {
    pub(crate) fn new() -> Service {
        Service {
            listening: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: notify::watchdog(),
            ready: false,
            status: String::new(),
            next_look: Instant::now(),
            warned: false,
        }
    }

    /// Called at every turn of the supervisor's loop: at most once a second, reads the
    /// status files and says what changed.
    pub(crate) fn tick(&mut self, config: &Config, stages: &[&str]) {
        if !self.listening || Instant::now() < self.next_look {
            return;
        }
        self.next_look = Instant::now() + EVERY;
        let r = crate::status::report(
            Some(config),
            &config.runtime_dir,
            crate::status::DEFAULT_LAG,
        );
        let roots: Vec<String> = config.roots.iter().map(|r| r.name.clone()).collect();
        let a = assess(&r, &roots, stages);
        let mut msg = Vec::new();
        if a.watching && !self.ready {
            self.ready = true;
            tracing::info!("every root is watched: telling systemd we are ready");
            msg.push("READY=1".to_string());
        }
        if a.status != self.status {
            msg.push(format!("STATUS={}", a.status));
            self.status = a.status;
        }
        // Before READY the watcher may walk a large tree for minutes without a beat
        // (systemd's start timeout guards that phase); from READY on, only while every
        // stage beats.
        if self.watchdog.is_some() && (a.alive || !self.ready) {
            msg.push("WATCHDOG=1".into());
        }
        self.send(&msg.join("\n"));
    }

    /// A reload begins: systemd shows `reloading` until the next `READY=1`.
    pub(crate) fn reloading(&mut self) {
        if self.listening {
            self.ready = false;
            self.next_look = Instant::now();
            self.send("RELOADING=1\nSTATUS=reloading the config");
        }
    }

    pub(crate) fn stopping(&mut self) {
        if self.listening {
            self.send("STOPPING=1\nSTATUS=stopping: draining the stages in data-flow order");
        }
    }

    fn send(&mut self, msg: &str) {
        if msg.is_empty() {
            return;
        }
        if let Err(e) = notify::notify(msg) {
            if !self.warned {
                self.warned = true;
                tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::gather::{RootView, StageView, TargetView};

    fn report(watches: &[(&str, u64)], up: &[(&str, bool)], problems: &[&str]) -> Report {
        Report {
            health: if problems.is_empty() {
                Health::Ok
            } else {
                Health::Critical
            },
            problems: problems.iter().map(|p| p.to_string()).collect(),
            time_us: 0,
            runtime_dir: "/run/syncbus".into(),
            metrics_url: String::new(),
            stages: up
                .iter()
                .map(|(n, up)| {
                    (
                        n.to_string(),
                        StageView {
                            up: *up,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            roots: watches
                .iter()
                .map(|(n, w)| {
                    (
                        n.to_string(),
                        RootView {
                            watches: Some(*w),
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            targets: [(
                "backup".to_string(),
                TargetView {
                    lag_s: 0.25,
                    ..Default::default()
                },
            )]
            .into(),
            schedules: Default::default(),
        }
    }

    #[test]
    fn ready_waits_for_every_root_and_the_watchdog_for_every_stage() {
        let roots = ["www".to_string(), "up".to_string()];
        let stages = ["watcher", "filter"];
        let a = assess(
            &report(&[("www", 12)], &[("watcher", true), ("filter", true)], &[]),
            &roots,
            &stages,
        );
        assert!(!a.watching && a.alive);
        assert_eq!(a.status, "starting: waiting for the watches of up");
        // A root known but not watched yet (0) is not live either.
        let a = assess(
            &report(&[("www", 12), ("up", 0)], &[("watcher", true)], &[]),
            &roots,
            &stages,
        );
        assert!(!a.watching && !a.alive);
        let a = assess(
            &report(
                &[("www", 12), ("up", 3)],
                &[("watcher", true), ("filter", true)],
                &[],
            ),
            &roots,
            &stages,
        );
        assert!(a.watching && a.alive);
        assert_eq!(
            a.status,
            "ok: 2 roots (15 directories watched), 1 target, lag 0.2 s"
        );
        let a = assess(
            &report(
                &[("www", 12), ("up", 3)],
                &[("watcher", true), ("filter", false)],
                &[
                    "stage filter is down: not running",
                    "target backup is failing",
                ],
            ),
            &roots,
            &stages,
        );
        assert!(a.watching && !a.alive);
        assert_eq!(
            a.status,
            "critical: stage filter is down: not running (+1 more: syncbus status)"
        );
    }
}
