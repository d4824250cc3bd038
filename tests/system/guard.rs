//! An empty root, or one no longer on the file system it was on, never
//! wipes a full target at a whole-root compare; it is refused, status says CRITICAL
//! with the reason, and `allow_wipe` (or `syncbus run --allow-wipe`) lets it happen.

use std::fs;
use std::path::Path;
use std::process::Command;

use testkit::{Proc, RsyncDaemon};

use crate::status::status;
use crate::{bin, Mirror, CONVERGE};

fn fill(dir: &Path, n: usize) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..n {
        fs::write(dir.join(format!("sub/f{i}")), format!("{i}\n")).unwrap();
    }
}

fn count(dir: &Path) -> usize {
    testkit::scan(dir).len()
}

/// The reason the root guard gives for root `r` on target `t0`, once status has one.
fn refusal(m: &Mirror) -> String {
    m.wait_for("a refusal in the status", CONVERGE, || {
        let (code, r) = status(m);
        let why = r["targets"]["t0"]["refused"]["r"].as_str()?.to_string();
        assert_eq!(code, 2, "a refusal is critical: {r}");
        assert!(
            r["problems"].as_array()?.iter().any(|p| p
                .as_str()
                .is_some_and(|p| p.contains("refuses the compare of root r"))),
            "{r}"
        );
        Some(why)
    })
}

#[test]
fn an_empty_root_never_wipes_a_full_target_and_live_changes_still_flow() {
    let mut m = Mirror::new(1, "");
    let dst = m.dsts[0].clone();
    fill(&dst, 100);
    let before = count(&dst);
    m.start();
    let why = refusal(&m);
    assert!(
        why.contains("is empty") && why.contains("allow_wipe"),
        "{why}"
    );
    assert_eq!(
        count(&dst),
        before,
        "the start compare deleted on the target"
    );

    // The target is not failing: a new file arrives live, and the rest stays.
    fs::write(m.s("new"), "n").unwrap();
    m.wait_for("the new file on the target", CONVERGE, || {
        (fs::read(dst.join("new")).ok()? == b"n").then_some(())
    });
    assert_eq!(count(&dst), before + 1);
    let (_, r) = status(&m);
    assert_eq!(r["targets"]["t0"]["failures"], 0, "{r}");

    // `allow_wipe` on the target, applied by SIGHUP (the dispatcher restarts and
    // compares): the target becomes the source, and the refusal is gone.
    let mut text = fs::read_to_string(&m.config).unwrap();
    text.push_str("allow_wipe = true\n");
    fs::write(&m.config, text).unwrap();
    m.proc.as_ref().unwrap().signal(libc::SIGHUP);
    m.converge();
    m.wait_for("the refusal cleared", CONVERGE, || {
        let (code, r) = status(&m);
        (code == 0 && r["targets"]["t0"].get("refused").is_none()).then_some(())
    });
}

#[test]
fn allow_wipe_on_a_one_liner_empties_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let (empty, t) = (dir.path().join("empty"), dir.path().join("t"));
    fs::create_dir(&empty).unwrap();
    fill(&t, 100);
    let d = RsyncDaemon::start(&t);
    let (run, state) = (dir.path().join("run"), dir.path().join("state"));
    let p = Proc::start(
        bin(),
        [
            "run".as_ref(),
            "--source".as_ref(),
            empty.as_os_str(),
            "--target".as_ref(),
            d.url().as_ref(),
            "--allow-wipe".as_ref(),
            "--runtime-dir".as_ref(),
            run.as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
        ] as [&std::ffi::OsStr; 10],
    );
    let emptied = std::panic::catch_unwind(|| {
        testkit::eventually("the target emptied", CONVERGE, || {
            (count(&t) == 0).then_some(())
        })
    });
    if let Err(e) = emptied {
        eprintln!("--- syncbus log ---\n{}", p.log_text());
        std::panic::resume_unwind(e);
    }
}

/// A disk that did not mount: the root's directory is there, on the parent's file
/// system, holding what lay under the mount point (here one stale file).
#[test]
fn a_root_on_another_file_system_is_not_compared() {
    let mut m = Mirror::new(1, "");
    let src = m.src.clone();
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("sub/f{i}"), format!("{i}\n").into_bytes()))
        .collect();
    // A tmpfs over the root when we may mount (root), else the record is edited.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "syncbus-guard-test"])
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success());
    struct Unmount<'a>(&'a Path, bool);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            if self.1 {
                let _ = Command::new("umount").arg(self.0).status();
            }
        }
    }
    let guard = Unmount(&src, mounted);
    fill(&src, 20);
    m.start();
    m.converge();
    let record = m.dir.path().join("state/roots/r@t0.mount");
    m.wait_for("the root's file system on record", CONVERGE, || {
        fs::read_to_string(&record)
            .ok()?
            .contains("mount_point")
            .then_some(())
    });
    let mut p = m.proc.take().unwrap();
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(CONVERGE).is_some_and(|s| s.success()));

    if mounted {
        drop(guard);
        assert!(
            !fs::read_dir(&m.src).unwrap().any(|_| true),
            "the tmpfs did not go"
        );
    } else {
        // No mount allowed here: the record says the root was elsewhere.
        let text = fs::read_to_string(&record).unwrap();
        let moved: String = text
            .lines()
            .map(|l| {
                if l.starts_with("mount_point") {
                    "mount_point = \"/syncbus-test-elsewhere\"".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        fs::write(&record, moved + "\n").unwrap();
        fs::remove_dir_all(m.s("sub")).unwrap();
    }
    fs::write(m.s("stale"), "under the mount point").unwrap();
    m.start();
    let why = refusal(&m);
    assert!(why.contains("another file system"), "{why}");
    // Nothing deleted, nothing of the stale tree sent.
    for (p, c) in &files {
        assert_eq!(&fs::read(m.dsts[0].join(p)).unwrap(), c, "{p}");
    }
    assert!(!m.dsts[0].join("stale").exists(), "the stale file was sent");
}
