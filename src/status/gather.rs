//! `gather`, pure: the status files, which pids live and the clock → a [`Report`]
//! with a Nagios-style health.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use protocol::config::Config;
use protocol::stage::STAGES;
use protocol::status::{self, StageStatus};
use serde::Serialize;

/// How healthy the whole is; the order is the severity, the value the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Health {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

/// What `syncbus status --json` prints (a public format: fields are only added).
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub health: Health,
    /// Why the health is not `ok`, one sentence each.
    pub problems: Vec<String>,
    pub time_us: u64,
    pub runtime_dir: PathBuf,
    /// Where the Prometheus endpoint answers (empty: off or not running).
    pub metrics_url: String,
    pub stages: BTreeMap<String, StageView>,
    pub roots: BTreeMap<String, RootView>,
    pub targets: BTreeMap<String, TargetView>,
    /// Next run of each cron schedule (µs since the Unix epoch; 0: never).
    pub schedules: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct StageView {
    pub up: bool,
    pub pid: u32,
    /// Restarts by `syncbus run` (0 when another supervisor runs the stage).
    pub restarts: u32,
    /// Seconds since its main loop last checked in (at least once a second).
    pub reported_s: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct RootView {
    pub watches: Option<u64>,
    pub events: Option<u64>,
    pub changes: Option<u64>,
    pub overflows: Option<u64>,
    /// Two-way roots: the peer's writes and deletes, recognised and not sent back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echoes: Option<u64>,
    /// Why some of its directories are not watched (the inotify watch limit).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub unwatched: String,
    /// `done` (on every target bound to the root), `running` (on one at least) or
    /// `pending` (waiting, or failed and to be retried).
    pub initial_sync: String,
    /// Targets on which the initial sync is done, of those that report on the root.
    pub initial_sync_targets_done: usize,
    pub initial_sync_targets: usize,
    /// Entries a running whole-root compare sent so far, summed over the targets.
    pub initial_sync_entries: u64,
    /// Seconds the longest running compare has been at it.
    pub initial_sync_running_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct TargetView {
    /// Age of the oldest change not yet delivered (0 when nothing is owed).
    pub lag_s: f64,
    /// Paths and subtrees owed: queued in the dispatcher and journalled in the retrier.
    pub backlog: u64,
    pub last_success_us: u64,
    pub failures: u32,
    pub last_error: String,
    pub bytes_sent: u64,
    pub runs: u64,
    pub failed_runs: u64,
    /// Failed runs of an `on_failure = "log"` target, not retried.
    pub ignored_failures: u64,
    /// Seconds until the retrier tries again (while failing).
    pub next_retry_s: Option<f64>,
    /// Age of the dispatcher's say that every change before it is on the target or in
    /// the journal: how far back a start after a crash would catch up (absent while it
    /// cannot vouch: starting, comparing the whole root).
    pub checkpoint_age_s: Option<f64>,
    /// Roots whose whole-root compare to this target the root guard refused, and why
    /// (an empty root, or one on another file system): critical until one succeeds.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<String, String>,
    /// Paths (`root/path`) that could not be sent even alone, and rsync's reason: a
    /// warning until they are sent; the rest of the target's work goes on.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unsendable: BTreeMap<String, String>,
}

/// The stages expected when no supervisor file says which run: all but metrics, which
/// a setup of one unit per stage may leave out.
pub(super) fn usual_stages() -> impl Iterator<Item = &'static str> {
    STAGES.into_iter().filter(|s| *s != "metrics")
}

/// When a stage last showed it is alive: its main loop's heartbeat (or its start).
fn last_beat(s: &StageStatus) -> u64 {
    s.alive_us.max(s.started_us)
}

pub(super) fn age_s(now_us: u64, t_us: u64) -> f64 {
    now_us.saturating_sub(t_us) as f64 / 1e6
}

/// Builds the report from the status files; `alive` tells whether a pid still runs.
pub(crate) fn gather(
    files: &BTreeMap<String, StageStatus>,
    config: Option<&Config>,
    runtime_dir: PathBuf,
    now_us: u64,
    alive: &dyn Fn(u32) -> bool,
    (warn_lag, crit_lag): (u64, u64),
) -> Report {
    let mut problems: Vec<(Health, String)> = Vec::new();
    let fresh =
        |s: &StageStatus| age_s(now_us, last_beat(s)) < status::STALE.as_secs_f64() && alive(s.pid);
    let supervisor = files.get("supervisor").filter(|s| fresh(s));

    // Stages: what the supervisor runs, else the usual five; every dispatcher file.
    let mut names: BTreeSet<String> = match supervisor {
        Some(s) => s.stages.keys().cloned().collect(),
        None => usual_stages().map(String::from).collect(),
    };
    let dispatchers: Vec<&String> = files
        .keys()
        .filter(|n| n.starts_with("dispatcher@"))
        .collect();
    if !dispatchers.is_empty() && !files.contains_key("dispatcher") {
        names.remove("dispatcher");
    }
    names.extend(dispatchers.into_iter().cloned());
    names.extend(files.keys().filter(|n| *n != "supervisor").cloned());
    let mut stages = BTreeMap::new();
    for name in names {
        let file = files.get(&name);
        let sup = supervisor.and_then(|s| s.stages.get(&name));
        let up = file.is_some_and(fresh);
        let view = StageView {
            up,
            pid: file.map_or(sup.map_or(0, |c| c.pid), |f| f.pid),
            restarts: sup.map_or(0, |c| c.restarts),
            reported_s: file.map(|f| age_s(now_us, last_beat(f))),
        };
        if !up {
            let why = match file {
                None => "not running".to_string(),
                Some(f) if !alive(f.pid) => format!("gone (pid {})", f.pid),
                Some(f) => format!("silent for {:.0} s", age_s(now_us, last_beat(f))),
            };
            problems.push((Health::Critical, format!("stage {name} is down: {why}")));
        }
        stages.insert(name, view);
    }
    let live: Vec<&StageStatus> = files
        .iter()
        .filter(|(n, s)| *n != "supervisor" && fresh(s))
        .map(|(_, s)| s)
        .collect();
    for s in live.iter().filter(|s| !s.problem.is_empty()) {
        problems.push((Health::Critical, format!("{}: {}", s.stage, s.problem)));
    }

    // Roots: watcher and filter figures, initial sync from the dispatchers.
    let mut roots: BTreeMap<String, RootView> = BTreeMap::new();
    for name in config
        .map(|c| c.roots.iter().map(|r| r.name.clone()).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        roots.entry(name).or_default();
    }
    for s in &live {
        for (name, r) in &s.roots {
            let v = roots.entry(name.clone()).or_default();
            v.watches = r.watches.or(v.watches);
            v.events = r.events.or(v.events);
            v.changes = r.changes.or(v.changes);
            v.overflows = r.overflows.or(v.overflows);
            v.echoes = r.echoes.or(v.echoes);
            if !r.unwatched.is_empty() {
                v.unwatched = r.unwatched.clone();
            }
        }
    }
    for (name, v) in &roots {
        if !v.unwatched.is_empty() {
            problems.push((
                Health::Critical,
                format!(
                    "root {name}: changes in some directories go unseen: {}",
                    v.unwatched
                ),
            ));
        }
    }

    // Targets: the dispatcher's live side and the retrier's journal, merged.
    let mut targets: BTreeMap<String, TargetView> = BTreeMap::new();
    let mut served: BTreeSet<String> = BTreeSet::new();
    let mut oldest: BTreeMap<String, u64> = BTreeMap::new();
    let mut fulls: BTreeMap<String, Vec<(String, status::FullStatus)>> = BTreeMap::new();
    for name in config
        .map(|c| c.targets.iter().map(|t| t.name.clone()).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        targets.entry(name).or_default();
    }
    for s in &live {
        for (name, t) in &s.targets {
            if s.stage == "dispatcher" {
                served.insert(name.clone());
                for (root, f) in &t.full {
                    fulls
                        .entry(root.clone())
                        .or_default()
                        .push((name.clone(), f.clone()));
                }
            }
            let v = targets.entry(name.clone()).or_default();
            v.backlog += t.backlog;
            v.failures = v.failures.max(t.failures);
            if !t.last_error.is_empty() {
                v.last_error = t.last_error.clone();
            }
            v.last_success_us = v.last_success_us.max(t.last_success_us);
            v.bytes_sent += t.bytes_sent;
            v.runs += t.runs;
            v.failed_runs += t.failed_runs;
            v.refused
                .extend(t.refused.iter().map(|(r, why)| (r.clone(), why.clone())));
            v.unsendable.extend(t.unsendable.clone());
            v.ignored_failures += t.ignored_failures;
            if t.next_retry_us > 0 {
                v.next_retry_s = Some(t.next_retry_us.saturating_sub(now_us) as f64 / 1e6);
            }
            if t.safe_us > 0 {
                v.checkpoint_age_s = Some(age_s(now_us, t.safe_us));
            }
            let o = oldest.entry(name.clone()).or_default();
            *o = protocol::earliest_us(*o, t.oldest_us);
        }
    }
    let dispatcher_up = stages
        .iter()
        .any(|(n, s)| n.starts_with("dispatcher") && s.up);
    for (name, v) in &mut targets {
        v.lag_s = oldest
            .get(name)
            .filter(|&&t| t > 0)
            .map_or(0.0, |&t| age_s(now_us, t));
        if dispatcher_up && !served.contains(name) {
            problems.push((
                Health::Critical,
                format!("target {name}: no running dispatcher serves it"),
            ));
        }
        if v.failures > 0 {
            let error = v.last_error.lines().last().unwrap_or("").trim();
            problems.push((
                Health::Critical,
                format!(
                    "target {name} is failing ({} tries in a row): {error}",
                    v.failures
                ),
            ));
        }
        for (root, why) in &v.refused {
            problems.push((
                Health::Critical,
                format!("target {name} refuses the compare of root {root}: {why}"),
            ));
        }
        for (path, why) in &v.unsendable {
            problems.push((
                Health::Warning,
                format!("target {name} cannot take {path}: {why}"),
            ));
        }
        if v.lag_s > crit_lag as f64 {
            problems.push((
                Health::Critical,
                format!(
                    "target {name} lags {:.0} s (critical above {crit_lag} s)",
                    v.lag_s
                ),
            ));
        } else if v.lag_s > warn_lag as f64 {
            problems.push((
                Health::Warning,
                format!(
                    "target {name} lags {:.0} s (warning above {warn_lag} s)",
                    v.lag_s
                ),
            ));
        }
    }
    // A root no target mirrors (say, one only followed by `syncbus tail`) owes nothing.
    let bound = |root: &str| {
        config.is_none_or(|c| c.targets.iter().any(|t| t.roots.iter().any(|r| r == root)))
    };
    for (name, v) in &mut roots {
        if !bound(name) {
            v.initial_sync = "no targets".into();
            continue;
        }
        let all = fulls.get(name).map(Vec::as_slice).unwrap_or_default();
        let running: Vec<&status::FullStatus> = all
            .iter()
            .map(|(_, f)| f)
            .filter(|f| f.running_since_us > 0)
            .collect();
        v.initial_sync_entries = running.iter().map(|f| f.entries).sum();
        v.initial_sync_running_s = running
            .iter()
            .map(|f| age_s(now_us, f.running_since_us))
            .fold(0.0, f64::max);
        v.initial_sync_targets = all.len();
        v.initial_sync_targets_done = all.iter().filter(|(_, f)| f.initial_done).count();
        v.initial_sync = if !all.is_empty() && v.initial_sync_targets_done == all.len() {
            "done".into()
        } else if !running.is_empty() {
            "running".into()
        } else {
            "pending".into()
        };
        if v.initial_sync != "done" && dispatcher_up {
            problems.push((
                Health::Warning,
                format!(
                    "root {name}: initial sync {} (done on {} of {} targets)",
                    v.initial_sync, v.initial_sync_targets_done, v.initial_sync_targets
                ),
            ));
        }
    }
    let metrics_url = live
        .iter()
        .find(|s| !s.listen.is_empty())
        .map_or(String::new(), |s| format!("http://{}/metrics", s.listen));
    let schedules = live
        .iter()
        .flat_map(|s| s.schedules.clone())
        .collect::<BTreeMap<_, _>>();
    let health = if files.values().all(|s| !fresh(s)) {
        // The stages are all down then: one sentence says it.
        problems.clear();
        problems.push((
            Health::Unknown,
            format!(
                "syncbus is not running: no live status in {}",
                status::dir(&runtime_dir).display()
            ),
        ));
        Health::Unknown
    } else {
        problems.iter().map(|(h, _)| *h).max().unwrap_or(Health::Ok)
    };
    Report {
        health,
        problems: problems.into_iter().map(|(_, p)| p).collect(),
        time_us: now_us,
        runtime_dir,
        metrics_url,
        stages,
        roots,
        targets,
        schedules,
    }
}
