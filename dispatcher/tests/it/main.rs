//! The real `syncbus-dispatcher` binary against real rsync and local target dirs. The
//! test plays the filter: it binds the `changes` PUB in a temp runtime dir and
//! publishes change batches (and heartbeats, whose first sighting makes the dispatcher
//! resync each root).

#![allow(clippy::disallowed_methods)] // tests and their helpers spawn what they check

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::wire::{self, Change, ChangeBatch, Op};
use protocol::PathBytes;

const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds or the deadline passes; shows the dispatcher's log if not.
fn eventually(what: &str, h: &Harness, mut cond: impl FnMut() -> bool) {
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        testkit::eventually(what, DEADLINE, || cond().then_some(()))
    }));
    if let Err(e) = waited {
        eprintln!("--- dispatcher log ---\n{}", h.log());
        std::panic::resume_unwind(e);
    }
}

fn b(s: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(s))
}

struct Publisher {
    sock: zmq::Socket,
    epoch: u64,
    seq: u64,
}

impl Publisher {
    fn send(&mut self, root: &str, changes: Vec<Change>) {
        self.seq += 1;
        let msg = ChangeBatch {
            version: wire::VERSION,
            epoch: self.epoch,
            seq: self.seq,
            root: root.into(),
            time_us: protocol::now_us(),
            safe_us: 0,
            changes,
        };
        protocol::bus::send(&self.sock, &wire::changes_topic(root), &msg).unwrap();
    }
}

struct Harness {
    dir: tempfile::TempDir,
    child: Option<Child>,
    publisher: Arc<Mutex<Publisher>>,
    stop: Arc<AtomicBool>,
    _ctx: zmq::Context,
}

const ROOT: &str = "www";

impl Harness {
    /// `targets`: (name, url) — `{dir}` in a url is replaced by the temp dir. The source
    /// tree is `{dir}/src`, filled by `setup` before the dispatcher starts.
    fn start(targets: &[(&str, &str)], root_extra: &str, setup: impl FnOnce(&Path)) -> Harness {
        Harness::start_with_timeout(targets, root_extra, 5, setup)
    }

    fn start_with_timeout(
        targets: &[(&str, &str)],
        root_extra: &str,
        timeout: u64,
        setup: impl FnOnce(&Path),
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        setup(&src);
        let run = dir.path().join("run");
        fs::create_dir(&run).unwrap();
        fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
        let mut cfg = format!(
            "[bus]\nruntime_dir = {:?}\n\n[[root]]\nname = {ROOT:?}\npath = {:?}\n{root_extra}\n",
            run.display().to_string(),
            src.display().to_string()
        );
        for (name, url) in targets {
            let url = url.replace("{dir}", &dir.path().display().to_string());
            cfg += &format!("\n[[target]]\nname = {name:?}\nurl = {url:?}\ntimeout = {timeout}\n");
        }
        let cfg_path = dir.path().join("syncbus.toml");
        fs::write(&cfg_path, cfg).unwrap();

        let ctx = zmq::Context::new();
        let sock = protocol::bus::socket(&ctx, zmq::PUB).unwrap();
        protocol::bus::bind(&sock, &format!("ipc://{}/changes.sock", run.display())).unwrap();
        let publisher = Arc::new(Mutex::new(Publisher {
            sock,
            epoch: protocol::bus::new_epoch(),
            seq: 0,
        }));
        let log = fs::File::create(dir.path().join("dispatcher.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_syncbus-dispatcher"))
            .arg("--config")
            .arg(&cfg_path)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // Heartbeats, as the filter sends them; the first one seen triggers the resync.
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (p, stop) = (publisher.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    p.lock().unwrap().send(ROOT, vec![]);
                    // The heartbeat period (the filter's is 500 ms), not a wait.
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        Harness {
            dir,
            child: Some(child),
            publisher,
            stop,
            _ctx: ctx,
        }
    }

    fn src(&self) -> PathBuf {
        self.dir.path().join("src")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dispatcher.log")).unwrap_or_default()
    }

    fn publish(&self, changes: Vec<Change>) {
        self.publisher.lock().unwrap().send(ROOT, changes);
    }

    fn converge(&self, what: &str, target: &str) {
        let (src, dst) = (self.src(), self.path(target));
        eventually(what, self, || testkit::tree_diff(&src, &dst).is_empty());
    }

    fn sigterm(&self) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }

    /// SIGTERM, then the exit status within the grace period.
    fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        self.wait_exit(Duration::from_secs(15))
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            testkit::eventually("exit after SIGTERM", limit, || child.try_wait().unwrap())
        }));
        match waited {
            Ok(status) => status,
            Err(e) => {
                let _ = child.kill();
                eprintln!("--- dispatcher log ---\n{}", self.log());
                std::panic::resume_unwind(e);
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::env::var_os("SYNCBUS_TEST_LOG").is_some() {
            eprintln!("--- dispatcher log ---\n{}", self.log());
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn change(op: Op, path: &[u8]) -> Change {
    Change {
        op,
        path: PathBytes::new(path.to_vec()),
        from: None,
        dir: false,
        recursive: false,
        since_us: 0,
    }
}
fn upsert(path: &[u8]) -> Change {
    change(Op::Upsert, path)
}
fn new_dir(path: &[u8]) -> Change {
    Change {
        dir: true,
        recursive: true,
        ..change(Op::Upsert, path)
    }
}
fn delete(path: &[u8]) -> Change {
    change(Op::Delete, path)
}
fn moved(from: &[u8], to: &[u8], dir: bool) -> Change {
    Change {
        from: Some(PathBytes::new(from.to_vec())),
        dir,
        ..change(Op::Move, to)
    }
}

const NASTY: &[&[u8]] = &[
    b"with space",
    b"new\nline",
    b"-leading-dash",
    b"#hash",
    b";semicolon",
    b"non-utf8-\xff\xfe",
    b"glob*[x]?",
];

#[test]
fn initial_resync_then_live_changes_arrive_byte_for_byte() {
    let mut h = Harness::start(&[("local", "{dir}/dst")], "", |src| {
        fs::create_dir_all(src.join("d/e")).unwrap();
        fs::write(src.join("d/e/f"), b"deep").unwrap();
        fs::write(src.join(b(b"#old \xff")), b"present at start").unwrap();
        std::os::unix::fs::symlink("d/e/f", src.join("link")).unwrap();
    });
    let src = h.src();
    h.converge("initial resync copies the tree", "dst");

    // Upserts of awkward names, at the top and in a directory.
    for name in NASTY {
        fs::write(src.join(b(name)), name).unwrap();
        fs::write(src.join("d").join(b(name)), b"in d").unwrap();
    }
    let mut changes: Vec<Change> = NASTY.iter().map(|n| upsert(n)).collect();
    changes.extend(NASTY.iter().map(|n| upsert(&[b"d/", *n].concat())));
    h.publish(changes);
    h.converge("upserts of awkward names", "dst");

    // Deletes, a file move, a directory move, a content change.
    fs::remove_file(src.join(b(b"#hash"))).unwrap();
    fs::remove_file(src.join(b(b"d/new\nline"))).unwrap();
    fs::rename(src.join(b(b";semicolon")), src.join(b(b"d/;moved \xff"))).unwrap();
    fs::rename(src.join("d"), src.join("d2")).unwrap();
    fs::write(src.join(b(b"-leading-dash")), b"changed content, longer").unwrap();
    h.publish(vec![
        delete(b"#hash"),
        delete(b"d/new\nline"),
        moved(b";semicolon", b"d/;moved \xff", false),
        moved(b"d", b"d2", true),
        upsert(b"-leading-dash"),
    ]);
    h.converge("deletes and moves", "dst");

    // rm -r of a nested structure, announced by its deepest delete only: the topmost
    // missing ancestor must be listed for rsync to delete it.
    fs::create_dir_all(src.join("nest/a/b/c")).unwrap();
    fs::write(src.join("nest/a/b/c/file"), b"x").unwrap();
    fs::write(src.join("nest/a/top"), b"y").unwrap();
    h.publish(vec![new_dir(b"nest")]);
    h.converge("new nested dir", "dst");
    fs::remove_dir_all(src.join("nest/a")).unwrap();
    h.publish(vec![delete(b"nest/a/b/c/file")]);
    h.converge("rm -r of a nested dir", "dst");
    assert!(!h.path("dst/nest/a").exists());

    let st = h.terminate();
    assert!(st.success(), "exit after SIGTERM: {st}\n{}", h.log());
    // The initial sync reports what it sent (its progress lines count the same way).
    let log = h.log();
    let sent: u64 = log
        .lines()
        .filter(|l| l.contains("full sync finished"))
        .filter_map(|l| {
            l.split("entries_sent=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or_else(|| panic!("no full sync finished with a count:\n{log}"));
    assert!(sent > 0, "{log}");
}

#[test]
fn subtree_resync_leaves_the_rest_of_the_target_alone() {
    let h = Harness::start(&[("local", "{dir}/dst")], "", |src| {
        fs::create_dir_all(src.join("s/in")).unwrap();
        fs::create_dir_all(src.join("other")).unwrap();
        fs::write(src.join("s/in/f"), b"one").unwrap();
        fs::write(src.join("other/o"), b"source").unwrap();
        fs::write(src.join("s2"), b"sibling with a common prefix").unwrap();
    });
    h.converge("initial resync", "dst");
    let dst = h.path("dst");
    // The target drifts outside the subtree; inside it has an extraneous file; the
    // source changed inside without an event.
    fs::write(dst.join("other/o"), b"target differs").unwrap();
    fs::write(dst.join("other/extra"), b"only on target").unwrap();
    fs::write(dst.join("s2"), b"target differs too").unwrap();
    fs::write(dst.join("s/in/extra"), b"only on target").unwrap();
    fs::write(h.src().join("s/in/new"), b"unannounced").unwrap();
    h.publish(vec![change(Op::Resync, b"s")]);
    eventually("subtree converges", &h, || {
        testkit::tree_diff(&h.src().join("s"), &dst.join("s")).is_empty()
    });
    assert_eq!(fs::read(dst.join("other/o")).unwrap(), b"target differs");
    assert_eq!(
        fs::read(dst.join("other/extra")).unwrap(),
        b"only on target"
    );
    assert_eq!(fs::read(dst.join("s2")).unwrap(), b"target differs too");
}

#[test]
fn excluded_names_never_reach_the_target() {
    let h = Harness::start(
        &[("local", "{dir}/dst")],
        r#"exclude = ['(.*/)?secret[^/]*']"#,
        |src| {
            fs::create_dir_all(src.join("d")).unwrap();
            fs::write(src.join("d/.x.swp"), b"swap").unwrap();
            fs::write(src.join("d/secret-1"), b"regex").unwrap();
            fs::write(src.join("d/plain"), b"ok").unwrap();
        },
    );
    let dst = h.path("dst");
    eventually("initial resync", &h, || dst.join("d/plain").exists());
    let src = h.src();
    fs::create_dir_all(src.join("n/m")).unwrap();
    fs::write(src.join("n/.y.swp"), b"swap").unwrap();
    fs::write(src.join("n/m/secret-2"), b"regex").unwrap();
    fs::write(src.join("n/m/ok"), b"ok").unwrap();
    h.publish(vec![new_dir(b"n")]);
    eventually("new recursive dir", &h, || dst.join("n/m/ok").exists());
    for p in ["d/.x.swp", "d/secret-1", "n/.y.swp", "n/m/secret-2"] {
        assert!(!dst.join(p).exists(), "{p} reached the target");
    }
}

#[test]
fn failing_and_hanging_targets_do_not_delay_a_healthy_one() {
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // Accepts connections and never says a word: rsync hangs until its --timeout (60 s).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let closed_url = format!("rsync://127.0.0.1:{closed_port}/m/");
    let silent_url = format!("rsync://127.0.0.1:{silent_port}/m/");
    let mut h = Harness::start_with_timeout(
        &[
            ("under-a-file", "{dir}/blocker/dst"),
            ("closed-port", &closed_url),
            ("silent", &silent_url),
            ("healthy", "{dir}/dst"),
        ],
        "",
        60,
        |src| {
            fs::write(src.join("f"), b"x").unwrap();
            let blocker = src.parent().unwrap().join("blocker");
            fs::write(blocker, b"a file where a directory should be").unwrap();
        },
    );
    h.converge("healthy target, initial", "dst");
    fs::write(h.src().join("g"), b"live").unwrap();
    h.publish(vec![upsert(b"g")]);
    h.converge("healthy target, live change", "dst");
    eventually("both quick failures are logged for retry", &h, || {
        let log = h.log();
        log.contains("retrying from memory")
            && log.contains("under-a-file")
            && log.contains("closed-port")
    });
    // The silent target's rsync is still hanging: the drain kills it at the deadline
    // and reports what it abandons.
    let started = Instant::now();
    let st = h.terminate();
    // No retrier runs here, so the hung target's work could not be journalled: the
    // stage says so with its exit code (`syncbus run` then keeps no checkpoint).
    assert_eq!(st.code(), Some(1), "exit after SIGTERM: {st}\n{}", h.log());
    assert!(h.log().contains("left behind"), "{}", h.log());
    assert!(
        started.elapsed() < Duration::from_secs(14),
        "{:?}",
        started.elapsed()
    );
    let log = h.log();
    // What the hung target still owed is reported: either its worker hands it over
    // (here: no retrier runs, so it is abandoned) or the drain gives up on the worker.
    assert!(
        log.lines()
            .any(|l| (l.contains("abandoned") && l.contains("silent"))
                || l.contains("workers did not stop within the grace period")),
        "{log}"
    );
}

#[test]
fn a_second_signal_stops_at_once() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "rsync://127.0.0.1:{}/m/",
        silent.local_addr().unwrap().port()
    );
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let mut h = Harness::start_with_timeout(&[("silent", &url)], "", 60, |_| {});
    eventually("the hanging resync has started", &h, || {
        h.log().contains("full sync started")
    });
    h.sigterm();
    eventually("the drain has started", &h, || {
        h.log().contains("draining workers")
    });
    let started = Instant::now();
    h.sigterm();
    let st = h.wait_exit(Duration::from_secs(5));
    // Stopped now, with the resync unfinished: not a clean drain.
    assert_eq!(st.code(), Some(1), "{st}\n{}", h.log());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_vanished_source_root_never_wipes_the_target() {
    let h = Harness::start(&[("local", "{dir}/dst")], "", |src| {
        fs::write(src.join("precious"), b"keep me").unwrap();
    });
    h.converge("initial resync", "dst");
    let aside = h.path("src-aside");
    fs::rename(h.src(), &aside).unwrap();
    h.publish(vec![change(Op::Resync, b""), delete(b"precious")]);
    eventually("the refusal is logged", &h, || {
        h.log().contains("not running rsync")
    });
    assert_eq!(fs::read(h.path("dst/precious")).unwrap(), b"keep me");
    // The root comes back with a change: the retry converges.
    fs::rename(&aside, h.src()).unwrap();
    fs::write(h.src().join("after"), b"back").unwrap();
    h.converge("retry after the root is back", "dst");
}

#[test]
fn a_burst_of_messages_becomes_a_few_batches() {
    let h = Harness::start(&[("local", "{dir}/dst")], "", |_| {});
    // Empty trees match before the dispatcher listens: a file that arrives proves it
    // takes the stream, so the burst is not published to nobody (then one full compare
    // carries it, and no batch is logged).
    fs::write(h.src().join("listening"), b"yes").unwrap();
    h.publish(vec![upsert(b"listening")]);
    h.converge("the dispatcher listening", "dst");
    let before = h.log().matches("batch sent").count();
    const N: usize = 300;
    for i in 0..N {
        let name = format!("f{i:04}");
        fs::write(h.src().join(&name), name.as_bytes()).unwrap();
        // One message per file, as a filter with a tiny quiet period would send them.
        h.publish(vec![upsert(name.as_bytes())]);
    }
    h.converge("the burst arrives", "dst");
    // The run is logged just after rsync returns, so possibly after the trees match.
    eventually("the last run is logged", &h, || {
        h.log().matches("batch sent").count() > before
    });
    assert!(!h.log().contains("messages lost"), "{}", h.log());
    let runs = h.log().matches("batch sent").count() - before;
    eprintln!("{runs} rsync runs for {N} messages");
    assert!(
        (1..N / 10).contains(&runs),
        "{runs} rsync runs for {N} messages: batching does not merge"
    );
}
