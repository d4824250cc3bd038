//! The real `syncbus-scheduler` binary. The test plays the retrier: it binds the
//! `reports` PULL in a temp runtime dir and reads what the scheduler asks for.
//!
//! crontab(5) has no unit below the minute, so the firing test waits for the next
//! minute boundary (up to 60 s); the timing itself is covered by the pure tests of
//! `next_fire` and `Timetable`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::wire::{self, Report, ReportKind};
use protocol::PathBytes;
use testkit::Proc;

/// A fire of `* * * * *` comes within 60 s of the start.
const FIRE_DEADLINE: Duration = Duration::from_secs(70);
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

struct Harness {
    dir: tempfile::TempDir,
    /// The retrier's end; `None` plays a retrier that is down.
    pull: Option<zmq::Socket>,
    _ctx: zmq::Context,
}

impl Harness {
    /// Roots `www` and `data` (directories in the temp dir, named relative to the
    /// config file) and `extra` appended to the config; with `retrier`, the reports
    /// PULL is bound before the scheduler starts.
    fn new(extra: &str, retrier: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        for d in ["www", "data"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        let run = dir.path().join("run");
        fs::create_dir(&run).unwrap();
        fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
        let cfg = format!(
            "[bus]\nruntime_dir = {:?}\n\n\
             [[root]]\nname = \"www\"\npath = \"www\"\n\n\
             [[root]]\nname = \"data\"\npath = \"data\"\n\n{extra}",
            run.display().to_string()
        );
        fs::write(dir.path().join("syncbus.toml"), cfg).unwrap();
        let ctx = zmq::Context::new();
        let pull = retrier.then(|| {
            let pull = protocol::bus::socket(&ctx, zmq::PULL).unwrap();
            protocol::bus::bind(&pull, &format!("ipc://{}/reports.sock", run.display())).unwrap();
            pull
        });
        Harness {
            dir,
            pull,
            _ctx: ctx,
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("syncbus.toml")
    }

    fn start(&self) -> Proc {
        Proc::start(
            Path::new(env!("CARGO_BIN_EXE_syncbus-scheduler")),
            [Path::new("--config").as_os_str(), self.config().as_os_str()],
        )
    }

    /// The next report, or `None` if none comes within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<(Vec<u8>, Report)> {
        let pull = self.pull.as_ref().expect("a harness with a retrier");
        let mut items = [pull.as_poll_item(zmq::POLLIN)];
        zmq::poll(&mut items, timeout.as_millis() as i64).unwrap();
        let (topic, payload) = protocol::bus::try_recv(pull).unwrap()?;
        Some((topic, wire::decode::<Report>(&payload).unwrap()))
    }
}

/// Runs `f`; on a panic, shows the scheduler's log first.
fn with_log<T>(p: &Proc, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("--- scheduler log ---\n{}", p.log_text());
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn a_due_schedule_requests_a_full_sync_of_each_root() {
    let h = Harness::new(
        "[[schedule]]\ncron = \"* * * * *\"\nexclude_glob = [\"*.log\", \"cache/\"]\n",
        true,
    );
    let mut p = h.start();
    with_log(&p, || {
        testkit::eventually("the schedule logged at start", EXIT_DEADLINE, || {
            let log = p.log_text();
            (log.contains("* * * * *") && log.contains("next")).then_some(())
        });
        let mut got: Vec<(Vec<u8>, Report)> = Vec::new();
        testkit::eventually("a request for each root", FIRE_DEADLINE, || {
            got.extend(h.recv(Duration::from_millis(200)));
            (got.len() >= 2).then_some(())
        });
        let epoch = got[0].1.epoch;
        for (i, ((topic, r), root)) in got.iter().zip(["www", "data"]).enumerate() {
            assert_eq!(topic, wire::REPORT_TOPIC.as_bytes());
            assert_eq!(r.version, wire::WORK_VERSION);
            assert_eq!(r.kind, ReportKind::Request);
            assert_eq!((r.epoch, r.seq), (epoch, i as u64 + 1));
            assert_eq!(r.root, root);
            assert_eq!(r.target, "", "empty target: every target bound to the root");
            assert!(r.covers.is_empty());
            assert_eq!(r.work.resyncs, [PathBytes::root()].into());
            assert!(r.work.paths.is_empty());
            assert_eq!(r.work.excludes, vec!["*.log", "cache/"]);
            assert!(r.error.is_empty());
            assert!(r.time_us > 0);
        }
        assert_ne!(got[0].1.report_id, got[1].1.report_id);
        // One fire per minute: nothing else arrives right after.
        assert!(h.recv(Duration::from_millis(300)).is_none());
        assert!(p.log_text().contains("cron full sync requested"));
    });
    p.signal(libc::SIGTERM);
    let status = p.wait_exit(EXIT_DEADLINE).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", p.log_text());
}

#[test]
fn with_nothing_scheduled_it_waits_and_stops_on_sigterm() {
    let h = Harness::new("", true);
    let mut p = h.start();
    with_log(&p, || {
        testkit::eventually("the idle log line", EXIT_DEADLINE, || {
            p.log_text().contains("nothing scheduled").then_some(())
        });
    });
    p.signal(libc::SIGTERM);
    let status = p.wait_exit(EXIT_DEADLINE).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", p.log_text());
    assert!(h.recv(Duration::from_millis(100)).is_none());
}

#[test]
fn sigterm_stops_it_promptly_while_the_retrier_is_down() {
    // Nobody binds the reports endpoint: the fire's request waits in the PUSH queue,
    // and the stop must not wait for a peer beyond the socket's linger.
    let h = Harness::new(
        "[[schedule]]\ncron = \"* * * * *\"\nroots = [\"www\"]\n",
        false,
    );
    let mut p = h.start();
    with_log(&p, || {
        testkit::eventually("a request while the retrier is down", FIRE_DEADLINE, || {
            p.log_text()
                .contains("cron full sync requested")
                .then_some(())
        });
    });
    p.signal(libc::SIGTERM);
    let grace = protocol::bus::LINGER + Duration::from_secs(2);
    let status = p.wait_exit(grace).expect("exits within the linger");
    assert_eq!(status.code(), Some(0), "{}", p.log_text());
}
