//! A crash (`syncbus run` and every stage killed at once, as by the OOM killer) costs a
//! catch-up from the checkpoint kept while running, not a full compare; and what was on
//! its way at the crash (held in the filter, or in a run cut short) still arrives,
//! because that checkpoint never passes a change not yet on the target or in the
//! journal.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use crate::{Mirror, CONVERGE};

/// The checkpoint kept while running: its time (µs), once it says `running`.
fn running_checkpoint(m: &Mirror) -> Option<u64> {
    let text = fs::read_to_string(m.dir.path().join("state/checkpoint.toml")).ok()?;
    let t: toml::Table = toml::from_str(&text).ok()?;
    (t.get("kind")?.as_str()? == "running").then_some(())?;
    Some(t.get("since_us")?.as_integer()? as u64)
}

/// Waits until the checkpoint kept while running is at or after `t` (µs).
fn wait_checkpoint_after(m: &Mirror, t: u64) -> u64 {
    m.wait_for("a checkpoint kept while running", CONVERGE, || {
        running_checkpoint(m).filter(|&since| since >= t)
    })
}

/// When `path` last changed (its ctime, µs).
fn ctime_us(path: &std::path::Path) -> u64 {
    let m = fs::symlink_metadata(path).unwrap();
    m.ctime() as u64 * 1_000_000 + m.ctime_nsec() as u64 / 1000
}

/// After the restart: a catch-up from the checkpoint kept while running, no full
/// compare.
fn assert_caught_up(m: &Mirror) {
    m.wait_for("the catch-up", CONVERGE, || {
        m.log().contains("catch-up compared").then_some(())
    });
    let log = m.log();
    assert!(
        log.contains("did not stop cleanly: catching up from the checkpoint"),
        "{log}"
    );
    assert!(
        !log.contains("full sync started"),
        "a full compare ran after the crash:\n{log}"
    );
}

/// A file that must rest (`stable_ms`) is held by the filter: a crash while it is held
/// must not leave a checkpoint past it.
#[test]
fn a_crash_while_the_filter_holds_a_change_costs_a_catch_up_that_brings_it() {
    let mut m = Mirror::new(1, "stable_ms = 12000\n");
    m.start().wait_ready();
    m.converge();
    let idle = protocol::now_us();
    wait_checkpoint_after(&m, idle);
    fs::write(m.s("held"), "written once, then left to rest").unwrap();
    let written = Instant::now();
    // The scenario: a change held for 8 s, longer than the checkpoint trails the
    // pipeline (a few seconds), so a checkpoint that ignored it would pass it.
    std::thread::sleep(Duration::from_secs(8).saturating_sub(written.elapsed()));
    assert!(
        !m.dsts[0].join("held").exists(),
        "the file must still be held at the crash"
    );
    let since = running_checkpoint(&m).expect("a checkpoint kept while running");
    assert!(
        since <= ctime_us(&m.s("held")),
        "the checkpoint ({since}) passed a change the filter held"
    );
    m.crash();
    m.start();
    assert_caught_up(&m);
    m.converge();
}

/// A big file in a run slowed down (`--bwlimit`) and a change queued behind it: a
/// crash cuts the run short; both arrive after the restart, with what changed while
/// nothing ran.
#[test]
fn a_crash_during_a_run_costs_a_catch_up_that_brings_what_was_on_its_way() {
    let mut m = Mirror::new(1, "");
    let mut text = fs::read_to_string(&m.config).unwrap();
    // The last table is the target's: about 10 s for 1 MiB.
    text.push_str("bwlimit = \"100\"\n");
    fs::write(&m.config, text).unwrap();
    fs::write(m.s("old"), "before the start").unwrap();
    m.start().wait_ready();
    m.converge();
    let idle = protocol::now_us();
    wait_checkpoint_after(&m, idle);
    let big: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(m.s("big"), &big).unwrap();
    let written = Instant::now();
    // Its run has begun once rsync made its temp file on the target.
    m.wait_for("the big file's run", CONVERGE, || {
        fs::read_dir(&m.dsts[0])
            .ok()?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".big."))
            .then_some(())
    });
    fs::write(m.s("queued"), "behind the big file").unwrap();
    // The scenario: a run going on for 7 s, longer than the checkpoint trails.
    std::thread::sleep(Duration::from_secs(7).saturating_sub(written.elapsed()));
    assert!(
        !m.dsts[0].join("big").exists() && !m.dsts[0].join("queued").exists(),
        "the run must still be going at the crash"
    );
    let since = running_checkpoint(&m).expect("a checkpoint kept while running");
    assert!(
        since <= ctime_us(&m.s("big")),
        "the checkpoint ({since}) passed a change still being sent"
    );
    m.crash();
    fs::write(m.s("while-down"), "written while nothing ran").unwrap();
    fs::remove_file(m.s("old")).unwrap();
    m.start();
    assert_caught_up(&m);
    m.converge();
}
