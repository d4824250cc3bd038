//! The real `syncbus-retrier` binary with real ZeroMQ sockets and a real journal. The
//! test plays the dispatcher: it reports failed work on the `reports` endpoint and
//! follows the `jobs` stream for the acknowledgement and the retries.

#![allow(clippy::disallowed_methods)] // tests and their helpers spawn what they check

use std::path::Path;
use std::time::{Duration, Instant};

use protocol::wire::{self, JobKind, JobMsg, Report, ReportKind, Touch, Work};
use testkit::Proc;

const DEADLINE: Duration = Duration::from_secs(20);

/// A temp instance: its config (one root, one local target that never succeeds: the
/// test only looks at what the retrier says) and its sockets.
struct Harness {
    dir: tempfile::TempDir,
    proc: Option<Proc>,
    ctx: zmq::Context,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        let text = "[bus]\nruntime_dir = \"run\"\n\n[retry]\nstate_dir = \"state\"\n\n\
                    [[root]]\nname = \"r\"\npath = \"src\"\n\n\
                    [[target]]\nname = \"t\"\nurl = \"dst\"\n";
        std::fs::write(dir.path().join("syncbus.toml"), text).unwrap();
        Harness {
            dir,
            proc: None,
            ctx: zmq::Context::new(),
        }
    }

    fn start(&mut self) {
        let config = self.dir.path().join("syncbus.toml");
        self.proc = Some(Proc::start(
            Path::new(env!("CARGO_BIN_EXE_syncbus-retrier")),
            [std::ffi::OsStr::new("--config"), config.as_os_str()],
        ));
    }

    fn endpoint(&self, name: &str) -> String {
        format!("ipc://{}", self.dir.path().join("run").join(name).display())
    }

    /// A SUB on the target's job stream.
    fn jobs(&self) -> zmq::Socket {
        let sub = self.ctx.socket(zmq::SUB).unwrap();
        sub.set_subscribe(wire::jobs_topic("t").as_bytes()).unwrap();
        sub.connect(&self.endpoint("jobs.sock")).unwrap();
        sub
    }

    /// The next job message of `kind`, within the deadline.
    fn next(&self, sub: &zmq::Socket, kind: JobKind) -> JobMsg {
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if sub.poll(zmq::POLLIN, 100).unwrap() == 0 {
                continue;
            }
            let parts = sub.recv_multipart(0).unwrap();
            let msg: JobMsg = wire::decode(&parts[1]).unwrap();
            if msg.kind == kind {
                return msg;
            }
        }
        let log = self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default();
        panic!("no {kind:?} job within {DEADLINE:?}; retrier log:\n{log}");
    }

    fn report(&self, kind: ReportKind, report_id: u64, covers: Vec<u64>, work: Work) {
        let push = self.ctx.socket(zmq::PUSH).unwrap();
        push.connect(&self.endpoint("reports.sock")).unwrap();
        let r = Report {
            version: wire::WORK_VERSION,
            epoch: 7,
            seq: report_id,
            report_id,
            kind,
            target: "t".into(),
            root: "r".into(),
            covers,
            work,
            error: "rsync exited with code 10".into(),
            time_us: protocol::now_us(),
        };
        protocol::bus::send(&push, wire::REPORT_TOPIC, &r).unwrap();
        push.set_linger(2000).unwrap();
    }
}

/// Failed work is acknowledged only once it is in the journal, comes back as a run job
/// with its paths, survives a restart of the retrier, and leaves the journal once a
/// report says it was delivered.
#[test]
fn failed_work_is_journalled_acked_retried_and_settled() {
    let mut h = Harness::new();
    h.start();
    let jobs = h.jobs();
    // The retrier's heartbeat shows the subscription is live before reporting.
    h.next(&jobs, JobKind::Heartbeat);
    // One path sent, one deleted, each with the time of its change: the job comes
    // back with both kept, through the journal and across a restart.
    let now = protocol::now_us();
    let mut work = Work::default();
    work.touch("a/b".into(), Touch::upsert(now - 5));
    work.touch("odd\nname".into(), Touch::delete(now - 3));
    let work_sent = work.clone();
    h.report(ReportKind::Failed, 41, Vec::new(), work);
    let ack = h.next(&jobs, JobKind::Ack);
    assert_eq!(ack.report_id, 41);
    let run = h.next(&jobs, JobKind::Run);
    assert_eq!(run.root, "r");
    assert_eq!(run.work.paths, work_sent.paths);
    let ids = run.job_ids.clone();
    assert!(!ids.is_empty());

    // A restart keeps the job: it is sent again from the journal.
    let mut p = h.proc.take().unwrap();
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(DEADLINE).and_then(|s| s.code()), Some(0));
    h.start();
    let jobs = h.jobs();
    // Joined after the retrier's first send: `ready`, as a dispatcher says when its
    // job stream is new, makes it send its jobs again.
    h.next(&jobs, JobKind::Heartbeat);
    h.report(ReportKind::Ready, 43, Vec::new(), Work::default());
    let again = h.next(&jobs, JobKind::Run);
    assert_eq!(again.job_ids, ids);
    assert_eq!(again.work.paths, run.work.paths);

    // Delivered (not acknowledged: a lost one only means the job runs once more):
    // the journal lets it go, and the fail log lists nothing.
    h.report(ReportKind::Delivered, 42, ids, Work::default());
    let fail_log = h.dir.path().join("state/rsync_fail_log.sh");
    testkit::eventually("the fail log emptied", DEADLINE, || {
        let text = std::fs::read_to_string(&fail_log).ok()?;
        (!text.contains("a/b")).then_some(())
    });
}
