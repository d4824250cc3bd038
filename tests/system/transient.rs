//! Names of usually transient shapes: a file that stays in the tree
//! is data and reaches the targets; one made and removed within moments does not.

use std::fs;
use std::time::Duration;

use crate::{Mirror, CONVERGE};

/// Real files that the old built-in excludes dropped forever.
const PERSISTING: [&str; 6] = [
    ".env.sample",
    ".env.docker",
    ".htaccess.backup",
    ".vimrc.before",
    "report.txt~",
    "4913",
];

#[test]
fn files_with_temp_like_names_that_stay_arrive_and_brief_ones_do_not() {
    let mut m = Mirror::new(1, "");
    fs::create_dir(m.s("old")).unwrap();
    // Already on the target: a new directory goes recursively with whatever it holds.
    fs::create_dir(m.s("brief")).unwrap();
    fs::create_dir(m.s("new")).unwrap();
    for n in PERSISTING {
        fs::write(m.s(&format!("old/{n}")), format!("old {n}\n")).unwrap();
    }
    m.start().wait_ready();
    let dst = m.dsts[0].clone();
    let arrived = |dir: &str| {
        PERSISTING.iter().all(|n| {
            fs::read_to_string(dst.join(format!("{dir}/{n}"))).ok() == Some(format!("{dir} {n}\n"))
        })
    };
    // By the start compare (a whole-root rsync): nothing in the tree is excluded.
    m.wait_for("the persisting names, by the full sync", CONVERGE, || {
        arrived("old").then_some(())
    });

    // The start may compare twice (the filter's first message, the watcher's start
    // resync); a compare copies what exists while it runs, brief or not. Once a second
    // sentinel came through the stream after both requests, wait for them to finish.
    m.wait_ready();
    m.wait_for("the start compares finished", CONVERGE, || {
        let log = m.log();
        (log.matches("full sync started").count() == log.matches("full sync finished").count())
            .then_some(())
    });

    // Brief ones: vim's write probe (create, close, unlink), a backup written and
    // dropped while the editor writes the real file (100 ms: longer than the 2 ms an
    // ordinary closed file waits, so only holding the name keeps it off).
    fs::write(m.s("brief/4913"), "").unwrap();
    fs::remove_file(m.s("brief/4913")).unwrap();
    fs::write(m.s("brief/doc.txt~"), "backup\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    fs::write(m.s("brief/doc.txt"), "saved\n").unwrap();
    fs::remove_file(m.s("brief/doc.txt~")).unwrap();
    fs::write(m.s("brief/.doc.txt.Ab12Cd"), "rsync temp\n").unwrap();
    fs::rename(m.s("brief/.doc.txt.Ab12Cd"), m.s("brief/renamed.txt")).unwrap();

    // Live: the same names, written after the brief ones (so held at least as long),
    // into a directory the target has (each name goes on its own).
    for n in PERSISTING {
        fs::write(m.s(&format!("new/{n}")), format!("new {n}\n")).unwrap();
    }
    m.wait_for("the persisting names, live", CONVERGE, || {
        arrived("new").then_some(())
    });
    m.converge();
    // The daemon logs a transfer once its run ends, which may be just after the file
    // is in place: wait for the last persisting name's line.
    let log = m.wait_for("the transfer log of the live names", CONVERGE, || {
        let log = m.daemons[0].log_text();
        log.lines()
            .any(|l| l.contains(" recv ") && l.ends_with("new/report.txt~"))
            .then_some(log)
    });
    for brief in ["brief/4913", "brief/doc.txt~", "brief/.doc.txt.Ab12Cd"] {
        assert!(
            !log.lines()
                .any(|l| l.contains(" recv ") && l.ends_with(brief)),
            "{brief} reached the target:\n{log}\n{}",
            m.log()
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains(" recv ") && l.ends_with("new/report.txt~")),
        "the transfer log records received files:\n{log}"
    );
}
