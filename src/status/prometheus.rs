//! The report in the Prometheus text format (`/metrics`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::gather::{RootView, StageView, TargetView};
use super::Report;

/// A Prometheus label value, escaped as the text format wants.
pub(super) fn label(v: &str) -> String {
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

const TARGET_FAMILIES: [Family<TargetView>; 11] = [
    (
        "syncbus_target_lag_seconds",
        "gauge",
        "Age of the oldest change not yet on the target (0 when none is owed).",
        |v| Some(v.lag_s),
    ),
    (
        "syncbus_target_checkpoint_age_seconds",
        "gauge",
        "How far back a start after a crash catches up: every change before is on the target or in the journal (absent while nothing is vouched for).",
        |v| v.checkpoint_age_s,
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
pub(crate) fn metrics_text(r: &Report) -> String {
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
