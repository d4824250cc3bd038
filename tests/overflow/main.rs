//! The inotify queue overflow, end to end. A binary of its own: it lowers a global
//! sysctl for a moment, and cargo runs test binaries one after another, so no other
//! test's watcher can start inside that moment.

#[path = "../common/mod.rs"]
mod common;

use std::fs;

use common::Mirror;

/// Restores a sysctl on drop.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(self.path, &self.old);
    }
}

#[test]
fn a_kernel_queue_overflow_becomes_a_resync_and_the_mirror_converges() {
    const QUEUE: &str = "/proc/sys/fs/inotify/max_queued_events";
    let old = fs::read_to_string(QUEUE).unwrap_or_default();
    // The limit is read when the watcher creates its inotify instance: lower it for
    // that moment only (root only), and restore it as soon as the watches are live.
    let restore = Sysctl {
        path: QUEUE,
        old: old.clone(),
    };
    if old.is_empty() || fs::write(QUEUE, "64").is_err() {
        eprintln!("skipped: cannot lower {QUEUE} (needs root)");
        return;
    }
    let mut m = Mirror::new(1, "");
    m.start();
    testkit::eventually("watches live", common::CONVERGE, || {
        m.log().contains("watches live").then_some(())
    });
    drop(restore);
    m.wait_ready();
    // Far more events than 64 before the watcher can read them: stop it meanwhile.
    let watcher = m
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("stage started") && l.contains("stage=\"watcher\""))
        .and_then(|l| {
            l.split("pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<i32>()
                .ok()
        })
        .expect("watcher pid in the log");
    // SAFETY: kill(2) on a pid read from our child's log.
    unsafe { libc::kill(watcher, libc::SIGSTOP) };
    for i in 0..500 {
        fs::write(m.s(&format!("during-overflow-{i}")), format!("{i}")).unwrap();
    }
    // SAFETY: as above.
    unsafe { libc::kill(watcher, libc::SIGCONT) };
    testkit::eventually("the overflow noticed", common::CONVERGE, || {
        m.log().contains("overflowed").then_some(())
    });
    m.converge();
    assert!(
        !m.log().contains("stage died"),
        "nothing crashed:\n{}",
        m.log()
    );
}
