use super::gather::usual_stages;
use super::prometheus::label;
use super::*;
use protocol::status::StageStatus;
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
    for (i, s) in usual_stages().enumerate() {
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
    assert_eq!(r.targets["t"].checkpoint_age_s, None, "nothing vouched for");
    files
        .get_mut("dispatcher")
        .unwrap()
        .targets
        .get_mut("t")
        .unwrap()
        .safe_us = NOW - 6_000_000;
    assert_eq!(at(&files, &[]).targets["t"].checkpoint_age_s, Some(6.0));
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
    assert!(
        metrics_text(&at(&healthy(), &[])).contains("syncbus_target_refused_roots{target=\"t\"} 0")
    );
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
    for s in usual_stages() {
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
    assert!(
        m.contains(
            "# TYPE syncbus_target_lag_seconds gauge\nsyncbus_target_lag_seconds{target=\"t\"} 0\n"
        ),
        "{m}"
    );
    assert!(m.contains("syncbus_target_sent_bytes_total{target=\"t\"} 2048\n"));
    assert!(m.contains("syncbus_stage_up{stage=\"watcher\"} 1\n"));
    assert!(m.contains("syncbus_health 0\n"));
    assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    for line in m.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').unwrap();
        value.parse::<f64>().unwrap();
    }
}
