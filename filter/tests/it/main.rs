//! The real `syncbus-filter` binary on real ZeroMQ sockets in a temporary runtime dir:
//! the test pushes raw batches where the watcher would (a PUSH connected to the raw
//! endpoint) and reads the change stream as the dispatcher would (a SUB). Every wait
//! has a deadline and waits for a condition, never for a fixed time.

#![allow(clippy::disallowed_methods)] // tests and their helpers spawn what they check

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use protocol::bus::{self, Endpoints};
use protocol::config::Config;
use protocol::wire::{self, Change, ChangeBatch, Op, RawBatch, RawEvent, RawKind};
use protocol::PathBytes;

const DEADLINE: Duration = Duration::from_secs(15);
/// The epoch of the pretend watcher.
const WATCHER_EPOCH: u64 = 7;

/// A running filter, the pretend watcher's PUSH and a subscriber to the root `r`.
struct Harness {
    tmp: tempfile::TempDir,
    child: Child,
    _ctx: zmq::Context,
    push: zmq::Socket,
    sub: zmq::Socket,
    /// The filter's epoch and the last `seq` seen on `changes/r/`.
    epoch: Option<u64>,
    seq: u64,
    /// Every change received, in order.
    changes: Vec<Change>,
}

fn toml_str(p: &Path) -> String {
    let s = p.to_str().expect("temp paths are UTF-8");
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn ev(kind: RawKind, path: &str, cookie: u32) -> RawEvent {
    RawEvent {
        root: "r".into(),
        path: PathBytes::from(path),
        kind,
        dir: false,
        cookie,
    }
}

impl Harness {
    /// Starts the filter with one root `r`; `root_extra` is added to its section. Returns
    /// once the subscriber receives the filter's heartbeats (so nothing published after
    /// that is missed).
    fn start(root_extra: &str) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let runtime = tmp.path().join("run");
        bus::ensure_runtime_dir(&runtime).unwrap();
        let root = tmp.path().join("src");
        fs::create_dir(&root).unwrap();
        let text = format!(
            "[bus]\nruntime_dir = {}\n[[root]]\nname = \"r\"\npath = {}\n{root_extra}\n",
            toml_str(&runtime),
            toml_str(&root)
        );
        let file = tmp.path().join("syncbus.toml");
        fs::write(&file, text).unwrap();
        let config = Config::load(&file).unwrap();
        let endpoints = Endpoints::new(&config);
        let log = fs::File::create(tmp.path().join("filter.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_syncbus-filter"))
            .arg("--config")
            .arg(&file)
            .env("RUST_LOG", "filter=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let ctx = zmq::Context::new();
        let sub = bus::socket(&ctx, zmq::SUB).unwrap();
        sub.set_subscribe(wire::changes_topic("r").as_bytes())
            .unwrap();
        bus::connect(&sub, &endpoints.changes).unwrap();
        sub.set_rcvtimeo(50).unwrap();
        let push = bus::socket(&ctx, zmq::PUSH).unwrap();
        bus::connect(&push, &endpoints.raw).unwrap();
        let mut h = Harness {
            tmp,
            child,
            _ctx: ctx,
            push,
            sub,
            epoch: None,
            seq: 0,
            changes: Vec::new(),
        };
        h.wait_until("the first heartbeat", |h| h.epoch.is_some());
        h
    }

    fn log(&self) -> String {
        fs::read_to_string(self.tmp.path().join("filter.log")).unwrap_or_default()
    }

    /// Sends one raw batch as the watcher would.
    fn push(&self, seq: u64, events: Vec<RawEvent>) {
        let batch = RawBatch {
            version: wire::VERSION,
            epoch: WATCHER_EPOCH,
            seq,
            time_us: protocol::now_us(),
            read_to_us: 0,
            events,
        };
        bus::send(&self.push, wire::RAW_TOPIC, &batch).unwrap();
    }

    /// Receives one batch if one arrives within 50 ms; checks the epoch, and that `seq`
    /// has no gap after the first batch received.
    fn recv(&mut self) {
        let parts = match self.sub.recv_multipart(0) {
            Ok(parts) => parts,
            Err(zmq::Error::EAGAIN) => return,
            Err(e) => panic!("recv: {e}"),
        };
        assert_eq!(parts.len(), 2, "multipart [topic, payload]");
        assert_eq!(parts[0], wire::changes_topic("r").as_bytes());
        let batch: ChangeBatch = wire::decode(&parts[1]).unwrap();
        assert_eq!(batch.root, "r");
        match self.epoch {
            None => self.epoch = Some(batch.epoch),
            Some(e) => {
                assert_eq!(batch.epoch, e, "epoch changed within one process");
                assert_eq!(batch.seq, self.seq + 1, "seq must be gap-free");
            }
        }
        self.seq = batch.seq;
        self.changes.extend(batch.changes);
    }

    fn wait_until(&mut self, what: &str, cond: impl Fn(&Harness) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !cond(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; received:\n{:#?}\nfilter log:\n{}",
                    self.changes,
                    self.log()
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "filter exited ({status}) waiting for {what}:\n{}",
                    self.log()
                );
            }
            self.recv();
        }
    }

    /// Waits until a change of `path` has been received.
    fn wait_change(&mut self, path: &str) {
        let p = PathBytes::from(path);
        self.wait_until(&format!("a change of {path}"), |h| {
            h.changes.iter().any(|c| c.path == p)
        });
    }

    /// SIGTERM, then the exit status within the deadline; what it publishes meanwhile
    /// is received.
    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "no exit 5 s after SIGTERM");
            self.recv();
        };
        // What it published just before it exited is queued here by now.
        loop {
            let before = self.changes.len();
            let seq = self.seq;
            self.recv();
            if self.seq == seq && self.changes.len() == before {
                break status;
            }
        }
    }

    /// The changes received, as (op, path, from).
    fn summary(&self) -> Vec<(Op, String, Option<String>)> {
        self.changes
            .iter()
            .map(|c| {
                let from = c.from.as_ref().map(|f| f.to_string());
                (c.op, c.path.to_string(), from)
            })
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("filter log:\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_raw_batch_comes_out_coalesced_and_filtered_on_the_change_stream() {
    let mut h = Harness::start("");
    h.push(
        1,
        vec![
            // Made and written: one upsert.
            ev(RawKind::Create, "a", 0),
            ev(RawKind::Modify, "a", 0),
            ev(RawKind::CloseWrite, "a", 0),
            // A rename pair: one move.
            ev(RawKind::MovedFrom, "b", 5),
            ev(RawKind::MovedTo, "c", 5),
            // A built-in exclude (an editor's swap file): nothing.
            ev(RawKind::CloseWrite, ".a.swp", 0),
        ],
    );
    h.wait_change("a");
    h.wait_change("c");
    // A marker sent after them: once it is out, nothing else of batch 1 is held.
    h.push(2, vec![ev(RawKind::CloseWrite, "marker", 0)]);
    h.wait_change("marker");
    assert_eq!(
        h.summary(),
        vec![
            (Op::Upsert, "a".into(), None),
            (Op::Move, "c".into(), Some("b".into())),
            (Op::Upsert, "marker".into(), None),
        ]
    );
    let status = h.stop();
    assert!(status.success(), "{status}");
}

#[test]
fn a_gap_in_the_raw_stream_resyncs_the_root() {
    let mut h = Harness::start("");
    h.push(1, vec![ev(RawKind::CloseWrite, "first", 0)]);
    h.wait_change("first");
    // Batch 2 never arrives.
    h.push(3, vec![ev(RawKind::CloseWrite, "third", 0)]);
    h.wait_until("a resync", |h| h.changes.iter().any(|c| c.op == Op::Resync));
    let resync = h.changes.iter().find(|c| c.op == Op::Resync).unwrap();
    assert!(resync.path.is_root(), "{resync:?}");
}

#[test]
fn a_stop_publishes_what_is_still_held() {
    // A minute's quiet window: the write is held until the stop.
    let mut h = Harness::start("quiet_ms = 60000\nmax_hold_ms = 60000\n");
    h.push(1, vec![ev(RawKind::Modify, "held", 0)]);
    // A closed file goes after a moment whatever the window: once the marker is out,
    // the filter has taken in the batch before it.
    h.push(2, vec![ev(RawKind::CloseWrite, "marker", 0)]);
    h.wait_change("marker");
    assert_eq!(h.summary(), vec![(Op::Upsert, "marker".into(), None)]);
    let status = h.stop();
    assert!(status.success(), "{status}");
    assert_eq!(
        h.summary(),
        vec![
            (Op::Upsert, "marker".into(), None),
            (Op::Upsert, "held".into(), None),
        ]
    );
}
