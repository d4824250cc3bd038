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
        fs::read_to_string(&fail_log)
            .ok()?
            .contains("owed-199")
            .then_some(())
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
