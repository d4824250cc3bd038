//! The journal lost or broken while work was owed: never silent. A journal that is
//! missing, emptied or unreadable at start means every root is compared in full with
//! every target, and an unreadable one is moved aside instead of panicking in a loop.

use std::fs;

use crate::{Mirror, CONVERGE};

/// Target down, files changed, clean stop, then the journal is damaged as `how` says;
/// the start with the target up must still bring every file over.
fn owed_work_survives(how: &str) {
    let mut m = Mirror::new(1, "");
    m.start().wait_ready();
    m.daemons[0].kill();
    for i in 0..200 {
        fs::write(m.s(&format!("owed-{i}")), format!("{i}")).unwrap();
    }
    let fail_log = m.dir.path().join("state/rsync_fail_log.sh");
    m.wait_for("the changes journalled", CONVERGE, || {
        let text = fs::read_to_string(&fail_log).ok()?;
        // As paths, or absorbed by a resync of the whole root still owed (the initial
        // sync may have been cut short by the outage).
        (text.contains("owed-199") || text.contains("'--delete'")).then_some(())
    });
    let p = m.proc.as_mut().unwrap();
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(CONVERGE).and_then(|s| s.code()), Some(0));
    let journal = m.dir.path().join("state/journal.redb");
    assert!(m.dir.path().join("state/checkpoint.toml").exists());
    match how {
        "emptied" => fs::write(&journal, b"").unwrap(),
        "removed" => fs::remove_file(&journal).unwrap(),
        "garbage" => {
            // Garbage over everything after the header page: pages redb must read.
            let mut bytes = fs::read(&journal).unwrap();
            for (i, b) in bytes.iter_mut().enumerate().skip(4096) {
                *b = (i * 131 % 251) as u8;
            }
            fs::write(&journal, bytes).unwrap();
        }
        _ => unreachable!(),
    }
    m.daemons[0].restart();
    m.start();
    m.converge();
    m.wait_for("the loss logged", CONVERGE, || {
        m.log().contains("the journal was lost").then_some(())
    });
    let log = m.log();
    if how == "garbage" {
        assert!(log.contains("moved aside"), "{log}");
        let aside = fs::read_dir(m.dir.path().join("state"))
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("journal.redb.broken-")
            });
        assert!(aside, "the broken journal was not kept");
    }
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("stage died"), "{log}");
}

#[test]
fn an_emptied_journal_after_a_clean_stop_means_a_full_compare() {
    owed_work_survives("emptied");
}

#[test]
fn a_removed_journal_after_a_clean_stop_means_a_full_compare() {
    owed_work_survives("removed");
}

#[test]
fn a_journal_with_garbage_pages_is_moved_aside_not_a_panic_loop() {
    owed_work_survives("garbage");
}

/// A tmpfs mounted where the test says, unmounted when the test ends.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The state dir's disk fills up while a target is down: status names the journal
/// write that fails; once space is back the retrier writes again by itself (redb takes
/// no write after a failed one until the file is opened again), every file arrives,
/// and no temp file is left to keep the disk full. Needs root, to mount a small tmpfs.
#[test]
fn a_full_disk_under_the_state_dir_heals_by_itself_when_space_returns() {
    let mut m = Mirror::new(1, "");
    let state = m.dir.path().join("state");
    fs::create_dir(&state).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs"])
        .arg(&state)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _tmpfs = Tmpfs(state.clone());
    m.start().wait_ready();
    m.daemons[0].kill();
    // Fills the disk: whatever is left goes into one file.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    for i in 0..100 {
        fs::write(m.s(&format!("full-{i}")), format!("{i}")).unwrap();
    }
    let r = m.wait_for("status to name the journal", CONVERGE, || {
        let (code, r) = crate::status::status(&m);
        let named = r["problems"].as_array()?.iter().any(|p| {
            p.as_str()
                .is_some_and(|p| p.contains("cannot write the journal"))
        });
        (code == 2 && named).then_some(r)
    });
    assert!(r["problems"].to_string().contains("journal.redb"), "{r:#}");
    fs::remove_file(&filler).unwrap();
    m.daemons[0].restart();
    m.converge();
    m.wait_for("status OK once space is back", CONVERGE, || {
        (crate::status::status(&m).0 == 0).then_some(())
    });
    let left: Vec<String> = fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temp files left: {left:?}");
}
