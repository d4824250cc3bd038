//! Hot files: a file written for seconds reaches the targets whole, in a handful of
//! rsync runs rather than one per write, while a file written once still goes alone.

use std::fs;
use std::io::Write;
use std::time::Duration;

use crate::{Mirror, CONVERGE};

/// Times the daemon received `name` (its transfer log has one `recv NAME` line each).
fn received(log: &str, name: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" recv ") && l.ends_with(&format!(" {name}")))
        .count()
}

#[test]
fn a_file_written_for_seconds_arrives_whole_in_few_runs_and_one_written_once_alone() {
    const CHUNK: usize = 16 * 1024;
    const CHUNKS: usize = 160;
    let mut m = Mirror::new(1, "");
    m.start().wait_ready();
    let dst = m.dsts[0].join("hot.bin");
    let want: Vec<u8> = (0..CHUNKS)
        .flat_map(|i| std::iter::repeat_n(i as u8, CHUNK))
        .collect();

    // 16 KiB every 12 ms for about 2 s, one open file: each write outlasts the 10 ms
    // quiet window, so without the hot-file rule every write would be its own run.
    let mut f = fs::File::create(m.s("hot.bin")).unwrap();
    let mut seen = Vec::new();
    for chunk in want.chunks(CHUNK) {
        f.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(12));
        // A reader on the target sees only whole copies of a moment of the source
        // (rsync writes a temporary file and renames it): always a prefix.
        if let Ok(got) = fs::read(&dst) {
            seen.push(got.len());
            assert!(
                want.starts_with(&got),
                "the target held {} bytes that are not what the source held",
                got.len()
            );
        }
    }
    drop(f);
    m.wait_for("the whole file on the target", CONVERGE, || {
        (fs::read(&dst).ok()? == want).then_some(())
    });
    // The last copy's line is logged when its run ends, maybe after it is in place.
    let log = m.wait_for("hot.bin in the transfer log", CONVERGE, || {
        let log = m.daemons[0].log_text();
        (received(&log, "hot.bin") > 0).then_some(log)
    });
    let runs = received(&log, "hot.bin");
    eprintln!("hot.bin went {runs} times");
    assert!(
        (1..=20).contains(&runs),
        "hot.bin went {runs} times (sizes seen on the target: {seen:?})"
    );

    // A file written once goes by itself, once.
    fs::write(m.s("once.txt"), "once\n").unwrap();
    m.wait_for("once.txt on the target", CONVERGE, || {
        (fs::read_to_string(m.dsts[0].join("once.txt")).ok()? == "once\n").then_some(())
    });
    m.converge();
    // Its transfer is logged when its run ends, maybe just after the file is in place.
    m.wait_for("once.txt in the transfer log", CONVERGE, || {
        (received(&m.daemons[0].log_text(), "once.txt") > 0).then_some(())
    });
    assert_eq!(received(&m.daemons[0].log_text(), "once.txt"), 1);
}
