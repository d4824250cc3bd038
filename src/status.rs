//! `syncbus status`: one look at a running syncbus, for people (a table), for scripts
//! (`--json`) and for probes (the exit code), and the same figures for Prometheus
//! ([`metrics_text`], served by `syncbus metrics`).
//!
//! Everything comes from the status files the stages keep in `<runtime_dir>/status`
//! (see `protocol::status`): reading them never waits on a stage, so a hung stage
//! cannot hang the probe. The exit code follows the Nagios plugin convention, which
//! systemd, Kubernetes and every monitoring tool understand: 0 healthy, 1 warning
//! (catching up: initial sync running, lag above `--warn-lag`), 2 critical (a stage
//! down, a target failing, lag above `--crit-lag`), 3 unknown (not running).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use protocol::config::Config;
use protocol::stage::EXIT_USAGE;
use protocol::status::{self, StageStatus};
use serde::Serialize;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Which instance (`--config`, a one-liner's `--source`, or `--runtime-dir`); with
    /// none, the default runtime dir, and a list of the one-liners running.
    #[command(flatten)]
    which: crate::instance::Which,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Redraw every second until interrupted (a quick view without Grafana).
    #[arg(long)]
    watch: bool,
    /// Replication lag (seconds) above which a target is a warning.
    #[arg(long, default_value_t = DEFAULT_LAG.0)]
    warn_lag: u64,
    /// Replication lag (seconds) above which a target is critical.
    #[arg(long, default_value_t = DEFAULT_LAG.1)]
    crit_lag: u64,
}

/// Lag (seconds) above which a target is a warning, and critical: `syncbus status`'s
/// defaults, and what `/metrics` reports `syncbus_health` with.
pub const DEFAULT_LAG: (u64, u64) = (30, 300);

/// How healthy the whole is; the order is the severity, the value the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

/// What `syncbus status --json` prints (a public format: fields are only added).
#[derive(Debug, Serialize)]
pub struct Report {
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
pub struct StageView {
    pub up: bool,
    pub pid: u32,
    /// Restarts by `syncbus run` (0 when another supervisor runs the stage).
    pub restarts: u32,
    /// Seconds since its main loop last checked in (at least once a second).
    pub reported_s: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct RootView {
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
pub struct TargetView {
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
    /// Roots whose whole-root compare to this target the root guard refused, and why
    /// (an empty root, or one on another file system): critical until one succeeds.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<String, String>,
    /// Paths (`root/path`) that could not be sent even alone, and rsync's reason: a
    /// warning until they are sent; the rest of the target's work goes on.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unsendable: BTreeMap<String, String>,
}

/// The stages a `syncbus run` runs when no supervisor file says otherwise.
const STAGES: [&str; 5] = ["watcher", "filter", "dispatcher", "retrier", "scheduler"];

/// When a stage last showed it is alive: its main loop's heartbeat (or its start).
fn last_beat(s: &StageStatus) -> u64 {
    s.alive_us.max(s.started_us)
}

fn age_s(now_us: u64, t_us: u64) -> f64 {
    now_us.saturating_sub(t_us) as f64 / 1e6
}

/// True when a process with this pid exists (EPERM: it does, as another user's).
fn alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for existence and permission.
    pid != 0
        && (unsafe { libc::kill(pid as i32, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Builds the report from the status files; `alive` tells whether a pid still runs.
pub fn gather(
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
        None => STAGES.iter().map(|s| s.to_string()).collect(),
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
pub fn text(r: &Report) -> String {
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

/// A Prometheus label value, escaped as the text format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric family: name, type, help, and how to read it from one view.
type Family<V> = (
    &'static str,
    &'static str,
    &'static str,
    fn(&V) -> Option<f64>,
);

const STAGE_FAMILIES: [Family<StageView>; 2] = [
    (
        "syncbus_stage_up",
        "gauge",
        "1 when the stage runs and reports.",
        |s| Some(f64::from(u8::from(s.up))),
    ),
    (
        "syncbus_stage_restarts_total",
        "counter",
        "Restarts of the stage by syncbus run.",
        |s| Some(f64::from(s.restarts)),
    ),
];

const ROOT_FAMILIES: [Family<RootView>; 6] = [
    (
        "syncbus_root_watches",
        "gauge",
        "Directories watched with inotify.",
        |v| v.watches.map(|x| x as f64),
    ),
    (
        "syncbus_root_events_total",
        "counter",
        "inotify events read.",
        |v| v.events.map(|x| x as f64),
    ),
    (
        "syncbus_root_changes_total",
        "counter",
        "Changes published on the change stream after filtering and coalescing.",
        |v| v.changes.map(|x| x as f64),
    ),
    (
        "syncbus_root_overflows_total",
        "counter",
        "inotify queue overflows (each healed by a resync).",
        |v| v.overflows.map(|x| x as f64),
    ),
    (
        "syncbus_root_echoes_total",
        "counter",
        "Two-way roots: writes and deletes of the peer, recognised and not sent back.",
        |v| v.echoes.map(|x| x as f64),
    ),
    (
        "syncbus_root_initial_sync_done",
        "gauge",
        "1 once the initial sync reached every target of the root.",
        |v| Some(f64::from(u8::from(v.initial_sync == "done"))),
    ),
];

const TARGET_FAMILIES: [Family<TargetView>; 10] = [
    (
        "syncbus_target_lag_seconds",
        "gauge",
        "Age of the oldest change not yet on the target (0 when none is owed).",
        |v| Some(v.lag_s),
    ),
    (
        "syncbus_target_backlog",
        "gauge",
        "Paths and subtrees owed to the target (queued and journalled).",
        |v| Some(v.backlog as f64),
    ),
    (
        "syncbus_target_last_success_timestamp_seconds",
        "gauge",
        "When a run last reached the target (Unix time; 0 never).",
        |v| Some(v.last_success_us as f64 / 1e6),
    ),
    (
        "syncbus_target_consecutive_failures",
        "gauge",
        "Failed runs in a row (0 when the target is healthy).",
        |v| Some(f64::from(v.failures)),
    ),
    (
        "syncbus_target_sent_bytes_total",
        "counter",
        "Bytes rsync reported as sent to the target.",
        |v| Some(v.bytes_sent as f64),
    ),
    (
        "syncbus_target_runs_total",
        "counter",
        "Runs (rsync, command or webhook) for the target.",
        |v| Some(v.runs as f64),
    ),
    (
        "syncbus_target_failed_runs_total",
        "counter",
        "Runs for the target that failed.",
        |v| Some(v.failed_runs as f64),
    ),
    (
        "syncbus_target_refused_roots",
        "gauge",
        "Roots whose whole-root compare to the target the root guard refused (empty, or on another file system).",
        |v| Some(v.refused.len() as f64),
    ),
    (
        "syncbus_target_unsendable_paths",
        "gauge",
        "Paths that could not be sent to the target even alone (the rest of its work goes on).",
        |v| Some(v.unsendable.len() as f64),
    ),
    (
        "syncbus_target_ignored_failures_total",
        "counter",
        "Failed runs of an `on_failure = \"log\"` target: logged, not retried.",
        |v| Some(v.ignored_failures as f64),
    ),
];

/// Writes the families of one kind of view, each sample labelled `key="name"`.
fn families<V>(o: &mut String, key: &str, views: &BTreeMap<String, V>, list: &[Family<V>]) {
    for (name, kind, help, get) in list {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (n, v) in views {
            if let Some(x) = get(v) {
                let _ = writeln!(o, "{name}{{{key}=\"{}\"}} {x}", label(n));
            }
        }
    }
}

/// The same figures in the Prometheus text exposition format (version 0.0.4).
pub fn metrics_text(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP syncbus_health Overall health as `syncbus status` exits: 0 ok, 1 warning, \
         2 critical, 3 unknown.\n# TYPE syncbus_health gauge\nsyncbus_health {}",
        r.health as u8
    );
    families(&mut o, "stage", &r.stages, &STAGE_FAMILIES);
    families(&mut o, "root", &r.roots, &ROOT_FAMILIES);
    families(&mut o, "target", &r.targets, &TARGET_FAMILIES);
    o
}

/// Reads the status files and builds the report now.
pub fn report(config: Option<&Config>, runtime_dir: &std::path::Path, lag: (u64, u64)) -> Report {
    let dir = status::dir(runtime_dir);
    let (files, error) = match status::read_all(&dir) {
        Ok(f) => (f, None),
        Err(e) => (BTreeMap::new(), Some(e)),
    };
    let now = protocol::now_us();
    let mut r = gather(&files, config, runtime_dir.to_path_buf(), now, &alive, lag);
    if let Some(e) = error {
        // Not "not running": most often a probe run as another user (the runtime dir
        // is 0700).
        r.problems = vec![format!(
            "cannot read {}: {e} (run syncbus status as the user syncbus runs as)",
            dir.display()
        )];
    }
    r
}

pub fn run(args: StatusArgs) -> ExitCode {
    let (config, dir) = match crate::instance::find(&args.which) {
        Ok(x) => x,
        Err(e) => {
            protocol::errln!("{e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    let lag = (args.warn_lag, args.crit_lag.max(args.warn_lag));
    loop {
        let r = report(config.as_ref(), &dir, lag);
        let out = if args.json {
            serde_json::to_string_pretty(&r).expect("a report always serializes") + "\n"
        } else if r.health == Health::Unknown && args.which.is_default() {
            // Nothing at the default place: say which one-liners run, and how to ask.
            let running = crate::instance::running();
            let mut t = text(&r);
            if !running.is_empty() {
                t.push_str(crate::instance::listing(&running).trim_start());
                t.push_str(
                    "\n(ask about one with `syncbus status --source DIR` or `--runtime-dir DIR`)\n",
                );
            }
            t
        } else {
            text(&r)
        };
        if args.watch {
            // Home, clear, draw: like watch(1).
            let mut o = std::io::stdout().lock();
            let drawn = std::io::Write::write_all(&mut o, format!("\x1b[H\x1b[2J{out}").as_bytes())
                .and_then(|()| std::io::Write::flush(&mut o));
            if drawn.is_err() {
                // Nobody reads any more (the pipe or terminal is gone).
                return ExitCode::SUCCESS;
            }
            drop(o);
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        protocol::out!("{out}");
        return ExitCode::from(r.health as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::status::{ChildStatus, FullStatus, RootStatus, TargetStatus};

    const NOW: u64 = 1_000_000_000_000;

    fn file(stage: &str, pid: u32) -> StageStatus {
        StageStatus {
            version: status::VERSION,
            stage: stage.into(),
            pid,
            started_us: NOW - 60_000_000,
            updated_us: NOW - 500_000,
            alive_us: NOW - 700_000,
            ..Default::default()
        }
    }

    /// A healthy instance: every stage reporting, root watched, initial sync done.
    fn healthy() -> BTreeMap<String, StageStatus> {
        let mut files = BTreeMap::new();
        for (i, s) in STAGES.iter().enumerate() {
            files.insert(s.to_string(), file(s, 100 + i as u32));
        }
        let w = files.get_mut("watcher").unwrap();
        w.roots.insert(
            "r".into(),
            RootStatus {
                watches: Some(3),
                events: Some(10),
                overflows: Some(0),
                changes: None,
                echoes: None,
                unwatched: String::new(),
            },
        );
        let d = files.get_mut("dispatcher").unwrap();
        let mut t = TargetStatus {
            runs: 4,
            bytes_sent: 2048,
            last_success_us: NOW - 2_000_000,
            ..Default::default()
        };
        t.full.insert(
            "r".into(),
            FullStatus {
                initial_done: true,
                ..Default::default()
            },
        );
        d.targets.insert("t".into(), t);
        files
    }

    fn at(files: &BTreeMap<String, StageStatus>, dead: &[u32]) -> Report {
        gather(
            files,
            None,
            "/run/x".into(),
            NOW,
            &|p| !dead.contains(&p),
            (30, 300),
        )
    }

    #[test]
    fn all_stages_reporting_and_nothing_owed_is_ok() {
        let r = at(&healthy(), &[]);
        assert_eq!(r.health, Health::Ok, "{:?}", r.problems);
        assert_eq!(r.roots["r"].watches, Some(3));
        assert_eq!(r.roots["r"].initial_sync, "done");
        assert_eq!(r.targets["t"].lag_s, 0.0);
        assert!(text(&r).starts_with("syncbus OK"));
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_owed_change_on_either_side() {
        let mut files = healthy();
        files
            .get_mut("dispatcher")
            .unwrap()
            .targets
            .get_mut("t")
            .unwrap()
            .oldest_us = NOW - 5_000_000;
        files.get_mut("retrier").unwrap().targets.insert(
            "t".into(),
            TargetStatus {
                backlog: 7,
                oldest_us: NOW - 45_000_000,
                ..Default::default()
            },
        );
        let r = at(&files, &[]);
        assert_eq!(r.targets["t"].lag_s, 45.0);
        assert_eq!(r.targets["t"].backlog, 7);
        assert_eq!(r.health, Health::Warning, "{:?}", r.problems);
        files
            .get_mut("retrier")
            .unwrap()
            .targets
            .get_mut("t")
            .unwrap()
            .oldest_us = NOW - 400_000_000;
        assert_eq!(at(&files, &[]).health, Health::Critical);
    }

    /// A compare the root guard refused is critical, with its reason,
    /// in the report, the JSON and the metrics.
    #[test]
    fn a_refused_compare_is_critical_and_counted() {
        let mut files = healthy();
        let t = files
            .get_mut("dispatcher")
            .unwrap()
            .targets
            .get_mut("t")
            .unwrap();
        t.refused.insert(
            "r".into(),
            "root `r` (`/srv`) is empty and target `t` holds files".into(),
        );
        let r = at(&files, &[]);
        assert_eq!(r.health, Health::Critical);
        assert!(
            r.problems
                .iter()
                .any(|p| p.contains("target t refuses the compare of root r: root `r`")),
            "{:?}",
            r.problems
        );
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["targets"]["t"]["refused"]["r"]
            .as_str()
            .is_some_and(|s| s.contains("is empty")));
        assert!(metrics_text(&r).contains("syncbus_target_refused_roots{target=\"t\"} 1"));
        assert!(metrics_text(&at(&healthy(), &[]))
            .contains("syncbus_target_refused_roots{target=\"t\"} 0"));
    }

    #[test]
    fn a_dead_or_silent_stage_or_a_failing_target_is_critical() {
        let files = healthy();
        let r = at(&files, &[101]); // the filter's pid is gone
        assert_eq!(r.health, Health::Critical);
        assert!(!r.stages["filter"].up);
        assert!(r.problems[0].contains("filter"), "{:?}", r.problems);

        let mut files = healthy();
        // Its file is fresh, but its main loop went silent.
        files.get_mut("retrier").unwrap().alive_us = NOW - 60_000_000;
        assert_eq!(at(&files, &[]).health, Health::Critical);

        let mut files = healthy();
        let t = files
            .get_mut("retrier")
            .unwrap()
            .targets
            .entry("t".into())
            .or_default();
        t.failures = 3;
        t.last_error = "rsync: connection refused\nrsync error: (code 10)".into();
        let r = at(&files, &[]);
        assert_eq!(r.health, Health::Critical);
        assert!(
            r.problems
                .iter()
                .any(|p| p.contains("3 tries") && p.contains("code 10")),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn a_running_initial_sync_is_a_warning_with_its_progress() {
        let mut files = healthy();
        let f = files
            .get_mut("dispatcher")
            .unwrap()
            .targets
            .get_mut("t")
            .unwrap()
            .full
            .get_mut("r")
            .unwrap();
        *f = FullStatus {
            initial_done: false,
            running_since_us: NOW - 12_000_000,
            entries: 5000,
            ..Default::default()
        };
        let r = at(&files, &[]);
        assert_eq!(r.health, Health::Warning);
        assert_eq!(
            (
                r.roots["r"].initial_sync.as_str(),
                r.roots["r"].initial_sync_entries
            ),
            ("running", 5000)
        );
        assert!(
            text(&r).contains("running 12 s, 5000 entries sent"),
            "{}",
            text(&r)
        );
    }

    #[test]
    fn no_status_at_all_is_unknown_and_the_supervisor_names_the_stages() {
        assert_eq!(at(&BTreeMap::new(), &[]).health, Health::Unknown);
        let mut files = healthy();
        let mut sup = file("supervisor", 99);
        for s in STAGES {
            sup.stages.insert(
                s.into(),
                ChildStatus {
                    up: true,
                    pid: 1,
                    restarts: 2,
                    since_us: NOW,
                },
            );
        }
        files.insert("supervisor".into(), sup);
        let r = at(&files, &[]);
        assert_eq!(r.stages["watcher"].restarts, 2);
        assert!(!r.stages.contains_key("supervisor"));
    }

    #[test]
    fn split_dispatchers_each_count_and_a_root_without_targets_owes_nothing() {
        let mut files = healthy();
        let d = files.remove("dispatcher").unwrap();
        let mut other = file("dispatcher", 200);
        other.targets.insert("u".into(), d.targets["t"].clone());
        files.insert("dispatcher@t".into(), d);
        files.insert("dispatcher@u".into(), other);
        let tmp = tempfile::tempdir().unwrap();
        for r in ["r", "tailonly"] {
            std::fs::create_dir(tmp.path().join(r)).unwrap();
        }
        let text = "[[root]]\nname = \"r\"\npath = \"r\"\n[[root]]\nname = \"tailonly\"\npath = \"tailonly\"\n\
                    [[target]]\nname = \"t\"\nurl = \"rsync://h/m\"\nroots = [\"r\"]\n\
                    [[target]]\nname = \"u\"\nurl = \"rsync://h/n\"\nroots = [\"r\"]\n";
        let config = Config::parse(text, &tmp.path().join("c.toml")).unwrap();
        let r = gather(
            &files,
            Some(&config),
            "/run/x".into(),
            NOW,
            &|_| true,
            (30, 300),
        );
        assert_eq!(r.health, Health::Ok, "{:?}", r.problems);
        assert!(
            !r.stages.contains_key("dispatcher"),
            "{:?}",
            r.stages.keys()
        );
        assert!(r.stages["dispatcher@t"].up && r.stages["dispatcher@u"].up);
        assert_eq!(r.roots["tailonly"].initial_sync, "no targets");
        assert_eq!(r.roots["r"].initial_sync_targets_done, 2);

        // A dispatcher that serves nothing of a configured target: critical.
        files.remove("dispatcher@u");
        let r = gather(
            &files,
            Some(&config),
            "/run/x".into(),
            NOW,
            &|_| true,
            (30, 300),
        );
        assert_eq!(r.health, Health::Critical);
        assert!(
            r.problems.iter().any(|p| p.contains("target u")),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn metrics_follow_the_text_format() {
        let r = at(&healthy(), &[]);
        let m = metrics_text(&r);
        assert!(m.contains("# TYPE syncbus_target_lag_seconds gauge\nsyncbus_target_lag_seconds{target=\"t\"} 0\n"), "{m}");
        assert!(m.contains("syncbus_target_sent_bytes_total{target=\"t\"} 2048\n"));
        assert!(m.contains("syncbus_stage_up{stage=\"watcher\"} 1\n"));
        assert!(m.contains("syncbus_health 0\n"));
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
        }
    }
}
