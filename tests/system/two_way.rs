//! Two-way sync: two roots on this machine, each with its own `syncbus run` whose
//! target is an rsync daemon serving the other root (`two_way = true` on both sides).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use testkit::{eventually, tree_diff_without, Proc, RsyncDaemon};

use crate::common::{bin, CONVERGE};

/// One side: its root, its config and its `syncbus run`.
struct Side {
    name: &'static str,
    root: PathBuf,
    config: PathBuf,
    proc: Option<Proc>,
}

impl Side {
    fn status(&self) -> Value {
        let out = Command::new(bin())
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// rsync runs this side made to the peer so far.
    fn runs(&self) -> u64 {
        self.status()["targets"]["peer"]["runs"]
            .as_u64()
            .unwrap_or(0)
    }

    /// `runs` once the status has caught up (it is rewritten once a second): the same
    /// value twice, more than a second apart.
    fn settled_runs(&self) -> u64 {
        eventually("a settled run count", CONVERGE, || {
            let first = self.runs();
            std::thread::sleep(Duration::from_millis(1200));
            (self.runs() == first).then_some(first)
        })
    }

    /// The peer's writes and deletes this side recognised and did not send back.
    fn echoes(&self) -> u64 {
        self.status()["roots"]["r"]["echoes"].as_u64().unwrap_or(0)
    }

    /// What the backup keeps of `rel`: the copy and its versions (`NAME~<ns>`).
    fn kept(&self, rel: &str) -> Vec<String> {
        let path = self.p(".syncbus/backup").join(rel);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(dir) = fs::read_dir(path.parent().unwrap()) else {
            return Vec::new();
        };
        dir.filter_map(|e| {
            let e = e.ok()?;
            let n = e.file_name().into_string().ok()?;
            let version = n
                .strip_prefix(&format!("{name}~"))
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
            (n == name || version).then(|| fs::read_to_string(e.path()).unwrap_or_default())
        })
        .collect()
    }

    fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }

    /// `syncbus run` of this side.
    fn start(&mut self) {
        self.proc = Some(Proc::start(
            bin(),
            [
                std::ffi::OsStr::new("run"),
                std::ffi::OsStr::new("--config"),
                self.config.as_os_str(),
            ],
        ));
    }

    /// A clean stop (SIGTERM), which leaves a checkpoint.
    fn stop(&mut self) {
        let mut p = self.proc.take().expect("running");
        p.signal(libc::SIGTERM);
        let st = p.wait_exit(CONVERGE).expect("syncbus run stops on SIGTERM");
        assert!(st.success(), "{st:?}\n{}", p.log_text());
        assert!(
            self.state_dir().join("checkpoint.toml").exists(),
            "no checkpoint after a clean stop:\n{}",
            p.log_text()
        );
    }

    fn state_dir(&self) -> PathBuf {
        self.root
            .parent()
            .unwrap()
            .join(format!("state-{}", self.name))
    }

    /// `syncbus status`'s exit code and health.
    /// Nothing owed to the peer: the start compares (a second may follow the first)
    /// are over and no change waits.
    fn idle(&self) -> bool {
        let out = Command::new(bin())
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        out.status.code() == Some(0) && v["targets"]["peer"]["backlog"] == 0
    }

    fn health(&self) -> (i32, String) {
        let out = Command::new(bin())
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (
            out.status.code().unwrap_or(-1),
            v["health"].as_str().unwrap_or("").to_string(),
        )
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

struct Pair {
    _dir: tempfile::TempDir,
    a: Side,
    b: Side,
    /// `daemons[0]` serves a's root (b's target), `daemons[1]` b's root (a's target).
    daemons: Vec<RsyncDaemon>,
}

impl Pair {
    /// Both sides running, each with `root_extra` in its `[[root]]` table.
    fn start(root_extra: &str) -> Pair {
        Pair::start_with(root_extra, "")
    }

    /// `start`, with `target_extra` in each side's two-way `[[target]]` table too.
    fn start_with(root_extra: &str, target_extra: &str) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let mut daemons = Vec::new();
        let mut sides = Vec::new();
        for name in ["a", "b"] {
            let root = dir.path().join(name);
            fs::create_dir(&root).unwrap();
            daemons.push(RsyncDaemon::start(&root));
        }
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let peer = &daemons[1 - i];
            let config = dir.path().join(format!("{name}.toml"));
            fs::write(
                &config,
                format!(
                    "[bus]\nruntime_dir = \"run-{name}\"\n\n[retry]\nstate_dir = \"state-{name}\"\n\n\
                     [metrics]\nlisten = \"127.0.0.1:0\"\n\n[[root]]\nname = \"r\"\npath = \"{name}\"\n\
                     {root_extra}\n\n[[target]]\nname = \"peer\"\nurl = \"{}\"\ntwo_way = true\ntimeout = 10\n{target_extra}\n",
                    peer.url()
                ),
            )
            .unwrap();
            sides.push(Side {
                name,
                root: dir.path().join(name),
                config,
                proc: None,
            });
        }
        let b = sides.pop().unwrap();
        let a = sides.pop().unwrap();
        let mut pair = Pair {
            _dir: dir,
            a,
            b,
            daemons,
        };
        for s in [&mut pair.a, &mut pair.b] {
            s.start();
        }
        // Live both ways: a file from each side reaches the other.
        for (from, to) in [(&pair.a, &pair.b), (&pair.b, &pair.a)] {
            let name = format!("ready-from-{}", from.name);
            fs::write(from.p(&name), "ready").unwrap();
            pair.wait(&format!("{name} on {}", to.name), || {
                to.p(&name).exists().then_some(())
            });
        }
        // The start compares are over on both sides: a whole-root compare that runs
        // on into a test pushes what the other side lacks, deleted or not yet written.
        for s in [&pair.a, &pair.b] {
            pair.wait(&format!("{}'s start compares over", s.name), || {
                s.idle().then_some(())
            });
        }
        pair
    }

    /// `eventually`, printing both logs when it times out.
    fn wait<T>(&self, what: &str, f: impl FnMut() -> Option<T>) -> T {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(what, CONVERGE, f)
        })) {
            Ok(v) => v,
            Err(e) => {
                eprintln!(
                    "--- a's log ---\n{}\n--- b's log ---\n{}",
                    self.a.log(),
                    self.b.log()
                );
                std::panic::resume_unwind(e);
            }
        }
    }

    /// Both trees the same, syncbus's own `.syncbus` aside.
    fn converge(&self) {
        let mut last = Vec::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually("the two trees to be the same", CONVERGE, || {
                last = tree_diff_without(&self.a.root, &self.b.root, Some(".syncbus"));
                last.is_empty().then_some(())
            })
        }));
        if let Err(e) = r {
            eprintln!(
                "--- still differ ---\n{}\n--- a's log ---\n{}\n--- b's log ---\n{}",
                last.join("\n"),
                self.a.log(),
                self.b.log()
            );
            std::panic::resume_unwind(e);
        }
    }
}

fn set_mtime(p: &Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Changes made on either side reach the other; what the peer wrote is recognised and
/// not sent back (no echo run); deletes go both ways.
#[test]
fn changes_on_both_sides_converge_without_echoes() {
    let pair = Pair::start("");
    let (a, b) = (&pair.a, &pair.b);
    for i in 0..10 {
        fs::create_dir_all(a.p("from-a")).unwrap();
        fs::write(a.p(&format!("from-a/f{i}")), format!("a {i}")).unwrap();
        fs::create_dir_all(b.p("from-b/deep")).unwrap();
        fs::write(b.p(&format!("from-b/deep/g{i}")), format!("b {i}")).unwrap();
    }
    fs::write(a.p("odd name\nwith -- newline"), "odd").unwrap();
    pair.converge();
    // Deletes both ways, of what the other side made.
    fs::remove_file(a.p("from-b/deep/g3")).unwrap();
    fs::remove_file(b.p("from-a/f7")).unwrap();
    pair.converge();
    assert!(
        !b.p("from-b/deep/g3").exists() && !a.p("from-a/f7").exists(),
        "a delete came back\n--- a's log ---\n{}\n--- b's log ---\n{}",
        a.log(),
        b.log()
    );

    // Echoes: new files from a into a directory b has, and three replaced ones (b's
    // rsync hard-links those into a backup directory it has to create first). Once
    // b's filter has seen them all as a's writes, b has nothing to send.
    let (b_runs, b_echoes) = (b.settled_runs(), b.echoes());
    for i in 0..5 {
        fs::write(a.p(&format!("from-a/later{i}")), "later").unwrap();
    }
    for i in 0..3 {
        fs::write(a.p(&format!("from-a/f{i}")), "edited on a").unwrap();
    }
    pair.wait("b recognised a's eight writes", || {
        (b.echoes() >= b_echoes + 8).then_some(())
    });
    assert!(
        b.kept("from-a/f0").contains(&"a 0".to_string()),
        "b keeps what a's edit replaced: {:?}",
        b.kept("from-a/f0")
    );
    // A change b had not recognised would be published after its 1 s rest: wait that
    // out, then nothing may have run from b.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(b.runs(), b_runs, "b sent a's writes back:\n{}", b.log());
    pair.converge();
}

/// The same file changed on both sides at once: the newer mtime wins on both, and the
/// loser is kept in the backup dir of the side it lost on.
#[test]
fn concurrent_edits_resolve_to_the_newest_on_both_sides() {
    let pair = Pair::start("");
    let (a, b) = (&pair.a, &pair.b);
    // Both written before either side lets them go (a file rests 1 s first), 1.2 s
    // apart in mtime: in different seconds (rsync's `--update` compares whole
    // seconds; within one, the newer edit is put back by the filter, but the loser may
    // not stay in the backup), and too close for a restore of an old file, which is
    // fetched back too (`a_conflict_leaves_a_copy…` covers that).
    let now = SystemTime::now();
    let older = now - Duration::from_millis(1200);
    fs::write(a.p("both"), "a's older edit").unwrap();
    set_mtime(&a.p("both"), older);
    fs::write(b.p("both"), "b's newer edit").unwrap();
    set_mtime(&b.p("both"), now);
    fs::write(b.p("other"), "b's older edit").unwrap();
    set_mtime(&b.p("other"), older);
    fs::write(a.p("other"), "a's newer edit").unwrap();
    set_mtime(&a.p("other"), now);
    // Equal trees can be a passing moment (rsync's `--update` compares whole seconds,
    // so the older copy may land first, and the newer one is then put back): wait
    // for the end state.
    let read = |s: &Side, p: &str| fs::read_to_string(s.p(p)).unwrap_or_default();
    let seen = std::cell::RefCell::new(Vec::new());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pair.wait("the newer edit of each file on both sides", || {
            let now = vec![
                read(a, "both"),
                read(b, "both"),
                read(a, "other"),
                read(b, "other"),
            ];
            let done = now[..2] == ["b's newer edit", "b's newer edit"]
                && now[2..] == ["a's newer edit", "a's newer edit"];
            *seen.borrow_mut() = now;
            done.then_some(())
        })
    }));
    if let Err(e) = r {
        eprintln!("a/both, b/both, a/other, b/other: {:?}", seen.borrow());
        std::panic::resume_unwind(e);
    }
    pair.converge();
    let (on_a, on_b) = (a.kept("both"), b.kept("other"));
    assert!(on_a.contains(&"a's older edit".to_string()), "{on_a:?}");
    assert!(on_b.contains(&"b's older edit".to_string()), "{on_b:?}");
}

/// `losers = "copy"`: the losing edit of a conflict is also kept beside the file, on
/// both sides; an ordinary update leaves no copy.
#[test]
fn a_conflict_leaves_a_copy_of_the_losing_edit_when_asked_to() {
    let pair = Pair::start_with("", "losers = \"copy\"");
    let (a, b) = (&pair.a, &pair.b);
    fs::write(a.p("plain"), "one").unwrap();
    pair.wait("plain on b", || b.p("plain").exists().then_some(()));
    fs::write(a.p("plain"), "two").unwrap();
    let now = SystemTime::now();
    // Dated well before its change: fetched back, which makes the conflict show here.
    fs::write(a.p("both"), "a's older edit").unwrap();
    set_mtime(&a.p("both"), now - Duration::from_secs(10));
    fs::write(b.p("both"), "b's newer edit").unwrap();
    set_mtime(&b.p("both"), now);
    let copies = |s: &Side| -> Vec<String> {
        fs::read_dir(&s.root)
            .unwrap()
            .filter_map(|e| {
                let n = e.ok()?.file_name().into_string().ok()?;
                n.contains(".conflict-").then_some(n)
            })
            .collect()
    };
    let copy = pair.wait("a conflict copy on both sides", || {
        let (ca, cb) = (copies(a), copies(b));
        (ca.len() == 1 && ca == cb).then(|| ca[0].clone())
    });
    pair.converge();
    assert!(copy.starts_with("both.conflict-"), "{copy}");
    assert_eq!(fs::read_to_string(a.p(&copy)).unwrap(), "a's older edit");
    assert_eq!(fs::read_to_string(b.p("both")).unwrap(), "b's newer edit");
    assert_eq!(fs::read_to_string(b.p("plain")).unwrap(), "two");
    assert_eq!(copies(a), vec![copy], "an ordinary update made no copy");
}

/// A large file written slowly (open for seconds, pauses shorter than the rest time)
/// never shows up on the other side cut short.
#[test]
fn a_file_written_slowly_never_appears_truncated_on_the_other_side() {
    use std::io::Write;
    let pair = Pair::start("stable_ms = 800");
    let (a, b) = (&pair.a, &pair.b);
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let chunks = 40;
    let full = chunk.len() * chunks;
    let mut f = fs::File::create(a.p("upload.bin")).unwrap();
    let mut seen_partial = None;
    for _ in 0..chunks {
        f.write_all(&chunk).unwrap();
        f.flush().unwrap();
        // The pause between writes, not a wait for anything: a slow upload.
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(m) = fs::metadata(b.p("upload.bin")) {
            if m.len() as usize != full {
                seen_partial = Some(m.len());
            }
        }
    }
    drop(f);
    let deadline = Instant::now() + CONVERGE;
    loop {
        if let Ok(m) = fs::metadata(b.p("upload.bin")) {
            if m.len() as usize != full {
                seen_partial = Some(m.len());
            } else if fs::read(b.p("upload.bin")).unwrap() == fs::read(a.p("upload.bin")).unwrap() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "upload.bin never reached b whole"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(seen_partial, None, "b had a cut-short upload.bin");
    pair.converge();
}

/// A delete on one side racing a change of the same file on the other: the changed
/// file is kept on both.
#[test]
fn a_delete_racing_a_modify_keeps_the_modified_file() {
    let pair = Pair::start("");
    let (a, b) = (&pair.a, &pair.b);
    fs::write(a.p("contested"), "first").unwrap();
    pair.wait("contested on b", || b.p("contested").exists().then_some(()));
    fs::remove_file(a.p("contested")).unwrap();
    fs::write(b.p("contested"), "changed on b").unwrap();
    // Both sides without it is a moment of the race (b's copy in its backup, about to
    // be put back), so wait for the end state rather than for equal trees.
    pair.wait("the changed file on both sides", || {
        let on = |s: &Side| fs::read_to_string(s.p("contested")).ok();
        (on(a).as_deref() == Some("changed on b") && on(b).as_deref() == Some("changed on b"))
            .then_some(())
    });
    pair.converge();
}

/// A small deterministic generator (the seed is printed, so a failure can be replayed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// 60 s of random writes, deletes and renames on both sides at once: the trees end up
/// the same, the runs are bounded by the operations, and they stop (no ping-pong).
#[test]
fn sixty_seconds_of_random_operations_on_both_sides_converge_without_a_loop() {
    let pair = Pair::start("");
    let (a, b) = (&pair.a, &pair.b);
    let seed = std::env::var("SYNCBUS_TWO_WAY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("random operations with SYNCBUS_TWO_WAY_SEED={seed}");
    let mut rng = Lcg(seed);
    for s in [a, b] {
        for d in ["d0", "d1", "d2"] {
            fs::create_dir_all(s.p(d)).unwrap();
        }
    }
    pair.converge();
    let runs_before = a.settled_runs() + b.settled_runs();
    let end = Instant::now() + Duration::from_secs(60);
    let mut ops = 0u64;
    while Instant::now() < end {
        let side = if rng.next(2) == 0 { a } else { b };
        let name = |rng: &mut Lcg| format!("d{}/f{}", rng.next(3), rng.next(12));
        let path = name(&mut rng);
        match rng.next(10) {
            0..=5 => {
                let body = format!(
                    "{} {ops} {}",
                    side.name,
                    "x".repeat(rng.next(4000) as usize)
                );
                let _ = fs::write(side.p(&path), body);
            }
            6 | 7 => {
                let _ = fs::remove_file(side.p(&path));
            }
            _ => {
                let _ = fs::rename(side.p(&path), side.p(&name(&mut rng)));
            }
        }
        ops += 1;
        // The pace of the operations, not a wait for anything.
        std::thread::sleep(Duration::from_millis(20 + rng.next(60)));
    }
    pair.converge();
    // Settled: no run for a whole rest time and more, on either side.
    let settled = a.settled_runs() + b.settled_runs();
    std::thread::sleep(Duration::from_millis(3000));
    let after = a.runs() + b.runs();
    assert_eq!(after, settled, "runs went on after the trees were the same");
    let runs = after - runs_before;
    eprintln!("{ops} operations, {runs} rsync runs on both sides");
    assert!(
        runs <= ops,
        "{runs} runs for {ops} operations: changes went back and forth"
    );
    pair.converge();
}

/// Both sides healthy by `syncbus status` (exit 0, `ok`) and the same trees.
fn wait_healthy(pair: &Pair) {
    pair.converge();
    for s in [&pair.a, &pair.b] {
        pair.wait(&format!("{}'s status OK", s.name), || {
            (s.health() == (0, "ok".to_string())).then_some(())
        });
    }
    pair.converge();
}

/// A file deleted on one side while its syncbus was stopped is deleted on
/// the peer soon after that side starts (its clean stop's manifest proves the file was
/// there), and status is not OK until the two sides agree.
#[test]
fn a_delete_made_while_stopped_reaches_the_peer_after_the_start() {
    let mut pair = Pair::start("");
    for s in [&pair.a, &pair.b] {
        fs::create_dir_all(s.p("dir")).unwrap();
    }
    fs::write(pair.a.p("x"), "made on a").unwrap();
    fs::write(pair.a.p("dir/y"), "made on a").unwrap();
    fs::write(pair.b.p("kept"), "made on b").unwrap();
    pair.converge();
    pair.a.stop();
    fs::remove_file(pair.a.p("x")).unwrap();
    fs::remove_file(pair.a.p("dir/y")).unwrap();
    // While a cannot reach b, the two differ: a's status must not say OK.
    pair.daemons[1].kill();
    pair.a.start();
    pair.wait("a's status not OK while b is out of reach", || {
        let (code, health) = pair.a.health();
        (code != 0 && !health.is_empty() && health != "ok").then_some(())
    });
    assert!(
        pair.b.p("x").exists(),
        "b lost x while a could not reach it"
    );
    pair.daemons[1].restart();
    pair.wait("x and dir/y gone from b", || {
        (!pair.b.p("x").exists() && !pair.b.p("dir/y").exists()).then_some(())
    });
    wait_healthy(&pair);
    assert!(!pair.a.p("x").exists(), "x came back to a");
    assert!(pair.a.p("kept").exists() && pair.b.p("dir").is_dir());
    // What b lost is kept in its backup.
    assert!(
        pair.b.kept("x").contains(&"made on a".to_string()),
        "{:?}",
        pair.b.kept("x")
    );
}

/// A file missing on one side at its start that nothing proves deleted
/// (no checkpoint, so no manifest) comes back from the peer at once: both sides agree
/// and both statuses are OK.
#[test]
fn a_file_missing_without_proof_comes_back_from_the_peer_at_start() {
    let mut pair = Pair::start("");
    fs::write(pair.a.p("x"), "made on a").unwrap();
    fs::create_dir_all(pair.a.p("d/e")).unwrap();
    fs::write(pair.a.p("d/e/z"), "made on a").unwrap();
    pair.converge();
    pair.a.stop();
    // An unusable checkpoint: the manifest beside it must not be used either.
    fs::remove_file(pair.a.state_dir().join("checkpoint.toml")).unwrap();
    assert!(
        pair.a.state_dir().join("manifest-r.paths").exists(),
        "a clean stop keeps the manifest beside the checkpoint"
    );
    fs::remove_file(pair.a.p("x")).unwrap();
    fs::remove_dir_all(pair.a.p("d")).unwrap();
    pair.a.start();
    pair.wait("x and d/e/z back on a", || {
        (pair.a.p("x").exists() && pair.a.p("d/e/z").exists()).then_some(())
    });
    wait_healthy(&pair);
    assert_eq!(fs::read_to_string(pair.b.p("x")).unwrap(), "made on a");
    assert!(
        !pair.a.state_dir().join("manifest-r.paths").exists(),
        "a manifest without its checkpoint was kept"
    );
}
