//! The real `syncbus-watcher` binary on temporary roots; its raw stream is read from a
//! PULL socket bound on the raw endpoint (where the filter would be). Every wait has a
//! deadline and waits for a condition, never for a fixed time, except the one negative
//! check that says so.

#![allow(clippy::disallowed_methods)] // tests and their helpers spawn what they check

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use protocol::bus::{self, Endpoints};
use protocol::config::Config;
use protocol::wire::{self, RawBatch, RawEvent, RawKind};
use protocol::PathBytes;

const DEADLINE: Duration = Duration::from_secs(15);

/// A running watcher and everything it has sent so far.
struct Harness {
    tmp: tempfile::TempDir,
    roots: Vec<PathBuf>,
    outside: PathBuf,
    child: Child,
    _ctx: zmq::Context,
    pull: zmq::Socket,
    epoch: Option<u64>,
    seq: u64,
    /// Every event received, with the time it was received.
    seen: Vec<(Instant, RawEvent)>,
    /// Index in `seen` after the last event `wait_for` matched.
    cursor: usize,
    markers: u32,
    /// The last batch's read mark, and how many events had been received with it.
    read_to: (u64, usize),
}

fn toml_str(p: &Path) -> String {
    let s = p.to_str().expect("temp paths are UTF-8");
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn p(s: &str) -> PathBytes {
    PathBytes::from(s)
}

impl Harness {
    /// Starts the watcher on roots named `names` (first root is `tmp/<name>`), after
    /// `setup` has filled them.
    fn start(names: &[&str], setup: impl FnOnce(&[PathBuf])) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let runtime = tmp.path().join("run");
        bus::ensure_runtime_dir(&runtime).unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let roots: Vec<PathBuf> = names.iter().map(|n| tmp.path().join(n)).collect();
        let mut text = format!("[bus]\nruntime_dir = {}\n", toml_str(&runtime));
        for (name, root) in names.iter().zip(&roots) {
            fs::create_dir(root).unwrap();
            text += &format!("[[root]]\nname = \"{name}\"\npath = {}\n", toml_str(root));
        }
        setup(&roots);
        let file = tmp.path().join("syncbus.toml");
        fs::write(&file, text).unwrap();
        let config = Config::load(&file).unwrap();
        let ctx = zmq::Context::new();
        let pull = bus::socket(&ctx, zmq::PULL).unwrap();
        bus::bind(&pull, &Endpoints::new(&config).raw).unwrap();
        pull.set_rcvtimeo(50).unwrap();
        let log = fs::File::create(tmp.path().join("watcher.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_syncbus-watcher"))
            .arg("--config")
            .arg(&file)
            .env("RUST_LOG", "watcher=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Harness {
            roots: config.roots.iter().map(|r| r.path.clone()).collect(),
            tmp,
            outside,
            child,
            _ctx: ctx,
            pull,
            epoch: None,
            seq: 0,
            seen: Vec::new(),
            cursor: 0,
            markers: 0,
            read_to: (0, 0),
        }
    }

    fn root(&self) -> &Path {
        &self.roots[0]
    }

    fn log(&self) -> String {
        fs::read_to_string(self.tmp.path().join("watcher.log")).unwrap_or_default()
    }

    /// Receives one batch if one arrives within 50 ms; checks epoch and gap-free seq.
    fn recv(&mut self) -> bool {
        let parts = match self.pull.recv_multipart(0) {
            Ok(parts) => parts,
            Err(zmq::Error::EAGAIN) => return false,
            Err(e) => panic!("recv: {e}"),
        };
        assert_eq!(parts.len(), 2, "multipart [topic, payload]");
        assert_eq!(parts[0], wire::RAW_TOPIC.as_bytes());
        let batch: RawBatch = wire::decode(&parts[1]).unwrap();
        assert!(
            batch.read_to_us >= self.read_to.0,
            "the read mark went back: {} after {}",
            batch.read_to_us,
            self.read_to.0
        );
        assert!(
            batch.read_to_us <= protocol::now_us(),
            "a read mark in the future"
        );
        assert!(
            !batch.events.is_empty() || batch.read_to_us > self.read_to.0,
            "an empty batch that does not move the read mark"
        );
        assert!(batch.events.len() <= watcher::MAX_BATCH);
        match self.epoch {
            None => self.epoch = Some(batch.epoch),
            Some(e) => assert_eq!(batch.epoch, e, "epoch changed within one process"),
        }
        assert_eq!(batch.seq, self.seq + 1, "seq must be gap-free from 1");
        self.seq = batch.seq;
        let now = Instant::now();
        self.seen.extend(batch.events.into_iter().map(|e| (now, e)));
        self.read_to = (batch.read_to_us, self.seen.len());
        true
    }

    /// Waits for the first event after the cursor that matches; moves the cursor past it.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&RawEvent) -> bool) -> (Instant, RawEvent) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(i) = self.seen[self.cursor..].iter().position(|(_, e)| pred(e)) {
                let i = self.cursor + i;
                self.cursor = i + 1;
                return self.seen[i].clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; received:\n{:#?}\nwatcher log:\n{}",
                    self.seen.iter().map(|(_, e)| e).collect::<Vec<_>>(),
                    self.log()
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "watcher exited ({status}) while waiting for {what}:\n{}",
                    self.log()
                );
            }
            self.recv();
        }
    }

    fn wait_until(&mut self, what: &str, cond: impl Fn(&Harness) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !cond(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; received:\n{:#?}\nwatcher log:\n{}",
                    self.events().collect::<Vec<_>>(),
                    self.log()
                );
            }
            self.recv();
        }
    }

    fn wait_event(&mut self, root: &str, kind: RawKind, path: &str) -> (Instant, RawEvent) {
        let path = p(path);
        self.wait_for(&format!("{kind:?} {root}:{path:?}"), |e| {
            e.root == root && e.kind == kind && e.path == path
        })
    }

    /// Writes a marker file in `root` and waits for it: everything the watcher read before
    /// it is then in `seen`.
    fn sync(&mut self, root: usize) {
        self.markers += 1;
        let name = format!("marker-{}", self.markers);
        fs::write(self.roots[root].join(&name), b"m").unwrap();
        let root_name = self.root_name(root);
        self.wait_event(&root_name, RawKind::CloseWrite, &name);
    }

    fn root_name(&self, root: usize) -> String {
        self.roots[root]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    fn events(&self) -> impl Iterator<Item = &RawEvent> {
        self.seen.iter().map(|(_, e)| e)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// SIGTERM, then the exit status within the deadline.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit 5 s after SIGTERM");
            // Keep taking messages so a blocked send cannot be the reason.
            self.recv();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("watcher log:\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn startup_resync_is_sent_once_the_whole_tree_is_watched() {
    let mut h = Harness::start(&["r"], |roots| {
        fs::create_dir_all(roots[0].join("pre/deep/er")).unwrap();
    });
    let (_, e) = h.wait_event("r", RawKind::Resync, "");
    assert_eq!(h.seq, 1, "the resync is the first message");
    assert!(e.path.is_root());
    // Right after the resync, the deepest pre-existing directory already reports.
    fs::write(h.root().join("pre/deep/er/f"), b"x").unwrap();
    h.wait_event("r", RawKind::CloseWrite, "pre/deep/er/f");
    let status = h.stop();
    assert!(status.success(), "{status}");
}

/// The read mark (the crash checkpoint's start) passes a change's ctime only in or
/// after the batch that carries its event (a write's is the modify; the close comes
/// later and does not change the ctime); and it moves on while nothing happens.
#[test]
fn the_read_mark_passes_a_change_only_with_or_after_its_event() {
    let mut h = Harness::start(&["r"], |_| {});
    h.wait_event("r", RawKind::Resync, "");
    // A few: when nothing else happens the mark moves about once a second.
    for i in 0..3 {
        let name = format!("f{i}");
        let path = h.root().join(&name);
        fs::write(&path, b"x").unwrap();
        let m = fs::metadata(&path).unwrap();
        let ctime = m.ctime() as u64 * 1_000_000 + m.ctime_nsec() as u64 / 1000;
        // ctimes come from the kernel's coarse clock, a tick or so behind the one the
        // mark is read from (the checkpoint's margin covers that): past it by 50 ms.
        h.wait_until("a read mark past the write", |h| {
            h.read_to.0 > ctime + 50_000
        });
        let carried = h.seen[..h.read_to.1]
            .iter()
            .any(|(_, e)| e.kind == RawKind::Modify && e.path == p(&name));
        assert!(carried, "the mark passed {name} before its event was sent");
    }
    let idle = h.read_to.0;
    h.wait_until("the mark moving on while idle", |h| h.read_to.0 > idle);
    let status = h.stop();
    assert!(status.success(), "{status}");
}

#[test]
fn sigterm_stops_the_watcher_promptly_and_cleanly() {
    let mut h = Harness::start(&["r"], |_| {});
    h.wait_event("r", RawKind::Resync, "");
    let t = Instant::now();
    let status = h.stop();
    assert!(status.success(), "{status}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn files_in_new_nested_directories_are_reported_or_covered_by_the_directory_event() {
    let mut h = Harness::start(&["r"], |_| {});
    h.wait_event("r", RawKind::Resync, "");
    let root = h.root().to_path_buf();
    const N: usize = 30;
    let writer = std::thread::spawn(move || {
        (0..N)
            .map(|i| {
                fs::create_dir_all(root.join(format!("x{i}/b/c"))).unwrap();
                fs::write(root.join(format!("x{i}/b/c/f")), b"data").unwrap();
                Instant::now()
            })
            .collect::<Vec<_>>()
    });
    let written = writer.join().unwrap();
    h.sync(0);
    for (i, t_f) in written.iter().enumerate() {
        let top = p(&format!("x{i}"));
        let f = top.join(b"b/c/f");
        // The directory event comes before anything reported from inside it.
        let create = h
            .seen
            .iter()
            .position(|(_, e)| e.kind == RawKind::Create && e.dir && e.path == top)
            .unwrap_or_else(|| panic!("no Create for {top:?}"));
        if let Some(j) = h.seen.iter().position(|(_, e)| e.path.is_below(&top)) {
            assert!(create < j, "event inside {top:?} before its Create");
        }
        // Either f was reported, or a directory above it was announced after f was
        // complete (a recursive sync started on that event copies f).
        let reported = h
            .events()
            .any(|e| e.path == f && e.kind == RawKind::CloseWrite);
        let covered = h
            .seen
            .iter()
            .any(|(t, e)| e.dir && e.kind == RawKind::Create && f.is_below(&e.path) && *t > *t_f);
        assert!(reported || covered, "{f:?} neither reported nor covered");
    }
    // Every new directory is watched by now.
    for i in 0..N {
        fs::write(h.root().join(format!("x{i}/b/c/g")), b"g").unwrap();
    }
    for i in 0..N {
        h.cursor = 0;
        h.wait_event("r", RawKind::CloseWrite, &format!("x{i}/b/c/g"));
    }
}

#[test]
fn a_renamed_directory_reports_its_new_path() {
    let mut h = Harness::start(&["r"], |roots| {
        fs::create_dir_all(roots[0].join("d/sub")).unwrap();
    });
    h.wait_event("r", RawKind::Resync, "");
    fs::rename(h.root().join("d"), h.root().join("e")).unwrap();
    fs::write(h.root().join("e/sub/f"), b"x").unwrap();
    let (_, from) = h.wait_event("r", RawKind::MovedFrom, "d");
    let (_, to) = h.wait_event("r", RawKind::MovedTo, "e");
    assert!(from.dir && to.dir);
    assert_eq!(from.cookie, to.cookie);
    assert_ne!(from.cookie, 0);
    h.wait_event("r", RawKind::CloseWrite, "e/sub/f");
    // Twice more, back to back, with no wait in between.
    fs::rename(h.root().join("e"), h.root().join("g")).unwrap();
    fs::rename(h.root().join("g/sub"), h.root().join("h")).unwrap();
    fs::write(h.root().join("h/f2"), b"x").unwrap();
    h.wait_event("r", RawKind::CloseWrite, "h/f2");
    assert!(
        !h.events().any(
            |e| (e.path.as_bytes().ends_with(b"/f2") && e.path != p("h/f2"))
                || e.path.as_bytes().starts_with(b"d/")
        ),
        "stale path reported: {:#?}",
        h.events().collect::<Vec<_>>()
    );
}

#[test]
fn a_directory_moved_into_a_fresh_directory_reports_its_new_path() {
    // sersync loses these: `mkdir a; mv b a/b; touch a/b/x`. Several rounds, so that both
    // orders (the walk of `a` finds `b`, or `a` is watched before the move) occur.
    const N: usize = 8;
    let mut h = Harness::start(&["r"], |roots| {
        for i in 0..N {
            fs::create_dir_all(roots[0].join(format!("b{i}/inner"))).unwrap();
        }
    });
    h.wait_event("r", RawKind::Resync, "");
    let root = h.root().to_path_buf();
    for i in 0..N {
        fs::create_dir(root.join(format!("a{i}"))).unwrap();
        fs::rename(root.join(format!("b{i}")), root.join(format!("a{i}/b"))).unwrap();
        fs::write(root.join(format!("a{i}/b/x")), b"x").unwrap();
        fs::write(root.join(format!("a{i}/b/inner/y")), b"y").unwrap();
    }
    for i in 0..N {
        h.cursor = 0;
        h.wait_event("r", RawKind::CloseWrite, &format!("a{i}/b/x"));
        h.cursor = 0;
        h.wait_event("r", RawKind::CloseWrite, &format!("a{i}/b/inner/y"));
    }
    assert!(
        // `MovedFrom b<i>` is right (and unpaired when the walk of `a<i>` found `b`
        // first); nothing may be reported from *inside* the old path.
        !h.events()
            .any(|e| e.path.as_bytes().starts_with(b"b") && e.path.as_bytes().contains(&b'/')),
        "old path reported: {:#?}",
        h.events().collect::<Vec<_>>()
    );
}

#[test]
fn a_directory_moved_out_stops_reporting_and_one_moved_in_starts() {
    let mut h = Harness::start(&["r"], |roots| {
        fs::create_dir_all(roots[0].join("m/sub")).unwrap();
    });
    h.wait_event("r", RawKind::Resync, "");
    let out = h.outside.join("m");
    fs::rename(h.root().join("m"), &out).unwrap();
    let (_, e) = h.wait_event("r", RawKind::MovedFrom, "m");
    assert!(e.dir);
    fs::write(out.join("sub/f"), b"x").unwrap();
    fs::write(out.join("g"), b"x").unwrap();
    h.sync(0);
    let leaked: Vec<_> = h
        .events()
        .filter(|e| e.path.as_bytes().ends_with(b"f") || e.path.as_bytes().ends_with(b"g"))
        .collect();
    assert!(
        leaked.is_empty(),
        "moved-out tree still reports: {leaked:#?}"
    );
    // Back in under another name: watched again, announced after its watches.
    fs::rename(&out, h.root().join("m2")).unwrap();
    let (_, e) = h.wait_event("r", RawKind::MovedTo, "m2");
    assert!(e.dir);
    fs::write(h.root().join("m2/sub/h"), b"x").unwrap();
    h.wait_event("r", RawKind::CloseWrite, "m2/sub/h");
}

#[test]
fn odd_names_arrive_byte_exact() {
    let mut h = Harness::start(&["r"], |_| {});
    h.wait_event("r", RawKind::Resync, "");
    let dir: &[u8] = b"caf\xc3\xa9 \xff\xfe\nline";
    let file: &[u8] = b"-\n#x\x01\xc0";
    let dir_os = std::ffi::OsStr::from_bytes(dir);
    let file_os = std::ffi::OsStr::from_bytes(file);
    fs::create_dir(h.root().join(dir_os)).unwrap();
    let (_, e) = h.wait_for("Create of the odd directory", |e| {
        e.kind == RawKind::Create && e.path.as_bytes() == dir
    });
    assert!(e.dir);
    fs::write(h.root().join(dir_os).join(file_os), b"x").unwrap();
    fs::write(h.root().join(file_os), b"x").unwrap();
    let mut inside = dir.to_vec();
    inside.push(b'/');
    inside.extend_from_slice(file);
    h.wait_for("CloseWrite inside the odd directory", |e| {
        e.kind == RawKind::CloseWrite && e.path.as_bytes() == inside
    });
    h.wait_for("CloseWrite of the odd file", |e| {
        e.kind == RawKind::CloseWrite && e.path.as_bytes() == file
    });
}

#[test]
fn attrib_on_a_watched_directory_is_reported_on_its_own_path() {
    use std::os::unix::fs::PermissionsExt;
    let mut h = Harness::start(&["r"], |roots| {
        fs::create_dir(roots[0].join("d")).unwrap();
    });
    h.wait_event("r", RawKind::Resync, "");
    fs::set_permissions(h.root(), fs::Permissions::from_mode(0o750)).unwrap();
    let (_, e) = h.wait_event("r", RawKind::Attrib, "");
    assert!(e.dir);
    fs::set_permissions(h.root().join("d"), fs::Permissions::from_mode(0o750)).unwrap();
    let (_, e) = h.wait_event("r", RawKind::Attrib, "d");
    assert!(e.dir);
}

#[test]
fn a_root_that_disappears_is_resynced_only_once_it_is_back() {
    let mut h = Harness::start(&["r", "s"], |roots| {
        fs::create_dir_all(roots[0].join("sub")).unwrap();
        fs::write(roots[0].join("sub/f"), b"x").unwrap();
    });
    h.wait_event("r", RawKind::Resync, "");
    h.cursor = 0;
    h.wait_event("s", RawKind::Resync, "");
    fs::remove_dir_all(h.root()).unwrap();
    h.wait_event("r", RawKind::Delete, "sub");
    // The watcher notices (one ERROR line) and keeps the other root running.
    let deadline = Instant::now() + DEADLINE;
    while !h.log().contains("root directory is gone") {
        assert!(
            Instant::now() < deadline,
            "no root-gone error:\n{}",
            h.log()
        );
        h.recv();
    }
    h.sync(1);
    // Negative check with a bounded window: 2.5 root polls with the root missing must
    // bring no resync for it (an empty source must not wipe the target).
    let window = Instant::now() + watcher::ROOT_POLL * 5 / 2;
    while Instant::now() < window {
        h.recv();
    }
    let resyncs_r = |h: &Harness| {
        h.events()
            .filter(|e| e.root == "r" && e.kind == RawKind::Resync)
            .count()
    };
    assert_eq!(resyncs_r(&h), 1, "resync for a missing root");
    assert_eq!(h.log().matches("root directory is gone").count(), 1);
    fs::create_dir(h.root()).unwrap();
    let back = Instant::now();
    let (t, _) = h.wait_event("r", RawKind::Resync, "");
    assert!(t > back);
    assert_eq!(resyncs_r(&h), 2);
    fs::write(h.root().join("new"), b"x").unwrap();
    h.wait_event("r", RawKind::CloseWrite, "new");
    h.sync(1);
}

#[test]
fn a_queue_overflow_is_reported_as_a_resync_of_every_root() {
    let mut h = Harness::start(&["r", "s"], |_| {});
    h.wait_event("r", RawKind::Resync, "");
    h.cursor = 0;
    h.wait_event("s", RawKind::Resync, "");
    let limit: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .map(|s| s.trim().parse().unwrap())
        .unwrap_or(16384);
    let dir = h.root().join("burst");
    fs::create_dir(&dir).unwrap();
    h.wait_event("r", RawKind::Create, "burst");
    // Stop the watcher so that the kernel queue fills up.
    h.signal(libc::SIGSTOP);
    for i in 0..limit / 2 + 16 {
        // Two events each (CREATE, CLOSE_WRITE), none merged.
        fs::write(dir.join(i.to_string()), b"").unwrap();
    }
    fs::create_dir(dir.join("after")).unwrap();
    h.signal(libc::SIGCONT);
    let resyncs = |h: &Harness, root: &str| {
        h.events()
            .filter(|e| e.root == root && e.kind == RawKind::Resync && e.path.is_root())
            .count()
    };
    h.wait_until("a second resync of both roots", |h| {
        resyncs(h, "r") >= 2 && resyncs(h, "s") >= 2
    });
    assert!(h.log().contains("overflowed"));
    // The directories created while events were lost are watched after the re-walk.
    fs::write(dir.join("after/f"), b"x").unwrap();
    h.cursor = 0;
    h.wait_event("r", RawKind::CloseWrite, "burst/after/f");
}

/// Lazily unmounts on drop, so a failing test leaves no mount behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn a_filesystem_unmounted_below_a_root_is_watched_again_and_resynced() {
    // The directory a mount hid stayed unwatched after umount.
    let mounted = std::cell::Cell::new(None::<PathBuf>);
    let mut h = Harness::start(&["r"], |roots| {
        let mnt = roots[0].join("mnt");
        fs::create_dir(&mnt).unwrap();
        fs::write(mnt.join("under"), b"hidden while mounted").unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
            .arg(&mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            fs::create_dir(mnt.join("inside")).unwrap();
            mounted.set(Some(mnt));
        }
    });
    let Some(mnt) = mounted.take() else {
        eprintln!("skipped: cannot mount a tmpfs here (mount(2) needs root)");
        return;
    };
    let _unmount = Unmount(mnt.clone());
    h.wait_event("r", RawKind::Resync, "");
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    h.wait_event("r", RawKind::Resync, "mnt");
    fs::write(mnt.join("after"), b"x").unwrap();
    h.wait_event("r", RawKind::CloseWrite, "mnt/after");
}
