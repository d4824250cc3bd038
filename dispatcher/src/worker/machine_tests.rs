//! The worker's failing-target, full-lane and shutdown rules, driven through its job
//! channel with a real rsync against a target that is down, and a stand-in for the
//! retrier on an in-process ZeroMQ socket that acknowledges what it is handed.

use std::collections::HashMap;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::rules::Rules;
use protocol::status::StageStatus;
use protocol::wire::{self, Change, Op, Report, ReportKind};

use super::*;

/// A worker for one root and a target nobody listens on, its job channel, and the
/// reports it sends.
struct Bench {
    _dir: tempfile::TempDir,
    tx: Sender<Job>,
    reports: zmq::Socket,
    control: Arc<Control>,
    done: std::thread::JoinHandle<bool>,
}

impl Bench {
    fn start() -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "f").unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let target = Target {
            name: "t".into(),
            endpoint: protocol::config::Endpoint::Rsync {
                url: format!("rsync://127.0.0.1:{port}/m/"),
                password_file: None,
            },
            roots: vec!["r".into()],
            timeout: 5,
            bwlimit: None,
            extra_args: vec![],
            two_way: false,
            conflict_copies: false,
            allow_wipe: false,
            hard_links: false,
            on_failure: Default::default(),
        };
        let roots = HashMap::from([(
            "r".to_string(),
            RootInfo {
                path: src,
                rules: Rules::new(&[], &[], false).unwrap(),
                allow_wipe: false,
                manifest: dir.path().join("no-manifest"),
            },
        )]);
        let ctx = zmq::Context::new();
        let endpoint = format!("inproc://reports-{port}");
        let reports = ctx.socket(zmq::PULL).unwrap();
        reports.bind(&endpoint).unwrap();
        let push = ctx.socket(zmq::PUSH).unwrap();
        push.connect(&endpoint).unwrap();
        let control = Arc::new(Control {
            board: Arc::new(Mutex::new(StageStatus::new("dispatcher", 0))),
            ..Default::default()
        });
        let (tx, rx) = mpsc::channel();
        let worker = Worker::new(
            target,
            roots,
            dir.path(),
            crate::guard::Store::new(dir.path(), "t"),
            control.clone(),
            Reporter::new(push, "t"),
            tx.clone(),
        )
        .unwrap();
        let done = std::thread::spawn(move || worker.run(rx));
        Bench {
            _dir: dir,
            tx,
            reports,
            control,
            done,
        }
    }

    /// The next report of `kind` (deliveries and others skipped), acknowledged as the
    /// retrier would once it is journalled.
    fn next(&self, kind: ReportKind) -> Report {
        let r = self.next_unacked(kind);
        let _ = self.tx.send(Job::Ack(r.report_id));
        r
    }

    /// The next report of `kind`, left unacknowledged (a retrier that is gone).
    fn next_unacked(&self, kind: ReportKind) -> Report {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if self.reports.poll(zmq::POLLIN, 100).unwrap() == 0 {
                continue;
            }
            let parts = self.reports.recv_multipart(0).unwrap();
            if parts[0] != wire::REPORT_TOPIC.as_bytes() {
                continue;
            }
            let r: Report = wire::decode(&parts[1]).unwrap();
            if r.kind == kind {
                return r;
            }
        }
        panic!("no {kind:?} report within 20 s");
    }

    fn change(&self, path: &str) {
        let c = Change {
            op: Op::Upsert,
            path: path.into(),
            from: None,
            dir: false,
            recursive: false,
            since_us: protocol::now_us(),
        };
        self.tx
            .send(Job::Changes {
                root: "r".into(),
                changes: Arc::new(vec![c]),
                floor_us: 0,
                safe_us: 0,
            })
            .unwrap();
    }

    fn runs(&self) -> u64 {
        self.control.board.lock().unwrap().targets["t"].runs
    }
}

/// A failed run is handed to the journal; while the target is failing, new work joins
/// the journal untried (no rsync run for it: an outage costs no storm); at the stop,
/// nothing is left behind, so the worker says it stopped clean.
#[test]
fn a_failing_target_gets_new_work_journalled_untried_and_a_stop_leaves_nothing() {
    let b = Bench::start();
    b.change("f");
    let failed = b.next(ReportKind::Failed);
    let owed: Vec<_> = failed.work.paths.iter().collect();
    assert_eq!(owed.len(), 1);
    // Handed over as it was owed: an upsert, dated by its change.
    let (path, touch) = owed[0];
    assert_eq!(path, &protocol::PathBytes::from("f"));
    assert!(!touch.deleted && touch.since_us > 0, "{touch:?}");
    assert!(failed.error.contains("code 10"), "{}", failed.error);
    let runs = b.runs();
    assert!(runs >= 1);

    b.change("g");
    let untried = b.next(ReportKind::Failed);
    let owed: Vec<_> = untried.work.paths.keys().collect();
    assert_eq!(owed, [&protocol::PathBytes::from("g")]);
    assert_eq!(b.runs(), runs, "new work for a failing target was tried");

    b.tx.send(Job::Stop).unwrap();
    assert!(b.done.join().unwrap(), "the stop left work behind");
}

/// Work the retrier never acknowledged is kept (and offered again at the stop); a stop
/// that could hand it to nobody says it left work behind, so `syncbus run` takes no
/// checkpoint from it.
#[test]
fn work_nobody_acknowledged_makes_the_stop_unclean() {
    let b = Bench::start();
    b.change("f");
    b.next_unacked(ReportKind::Failed);
    b.tx.send(Job::Stop).unwrap();
    assert!(
        !b.done.join().unwrap(),
        "a stop with unacknowledged work passed for clean"
    );
}

/// The full lane: a cron full sync that fails is handed back to the journal as what it
/// was, a compare of the whole root with the cron's own excludes, settling the journal
/// job it came from; the stop after it leaves nothing behind.
#[test]
fn a_failed_full_sync_is_journalled_whole_with_its_own_excludes() {
    let b = Bench::start();
    let cron = protocol::work::Work {
        resyncs: [protocol::PathBytes::root()].into(),
        excludes: vec!["*.log".into()],
        ..Default::default()
    };
    b.tx.send(Job::Run {
        root: "r".into(),
        job_ids: vec![7],
        work: cron,
    })
    .unwrap();
    let failed = b.next(ReportKind::Failed);
    assert_eq!(failed.covers, [7]);
    assert_eq!(
        failed.work.resyncs.iter().collect::<Vec<_>>(),
        [&protocol::PathBytes::root()]
    );
    assert_eq!(failed.work.excludes, ["*.log"]);
    assert!(failed.work.paths.is_empty() && failed.work.catch_up.is_none());

    b.tx.send(Job::Stop).unwrap();
    assert!(b.done.join().unwrap(), "the stop left work behind");
}
