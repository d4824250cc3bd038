//! syncbus under systemd, without systemd: the notification socket (`Type=notify`) and
//! the journal stream (`JOURNAL_STREAM`) are what the service manager hands a service,
//! so a test can hand them too and read what arrives. The units themselves are checked
//! by `systemd-analyze` (`cli.rs`).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{bin, Mirror, CONVERGE};

/// Kills the child on the way out, whatever the test did.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The messages that reach `sock` until `done` holds for all of them, or the deadline.
fn collect(
    sock: &UnixDatagram,
    deadline: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + deadline;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !done(&got) && Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

fn has(msgs: &[String], assignment: &str) -> bool {
    msgs.iter()
        .any(|m| m.lines().any(|l| l.starts_with(assignment)))
}

/// `Type=notify`. `syncbus run` says READY=1 only once the root is watched
/// (a change written after it is mirrored), its health as STATUS=, WATCHDOG=1 while
/// every stage beats when systemd asks for a watchdog, and STOPPING=1 at SIGTERM.
/// Its stages stay silent (systemd listens to the main pid only).
#[test]
fn syncbus_run_tells_the_service_manager_ready_status_and_watchdog() {
    let m = Mirror::new(1, "");
    let sock_path = m.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let log = m.dir.path().join("run.log");
    let child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&m.config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "4000000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let got = collect(&sock, CONVERGE, |g| has(g, "READY=1"));
    let text = || fs::read_to_string(&log).unwrap_or_default();
    assert!(has(&got, "READY=1"), "{got:?}\n{}", text());
    // READY means watched: the root's watcher said so before, and a file written now is
    // seen (mirrored).
    assert!(text().contains("watches live"), "{}", text());
    assert!(has(&got, "STATUS="), "{got:?}");
    fs::write(m.s("after-ready"), "seen").unwrap();
    let dst = m.dsts[0].join("after-ready");
    testkit::eventually("the file written after READY mirrored", CONVERGE, || {
        dst.exists().then_some(())
    });
    let more = collect(&sock, CONVERGE, |g| has(g, "WATCHDOG=1"));
    assert!(has(&more, "WATCHDOG=1"), "{more:?}");
    assert!(
        more.iter()
            .chain(&got)
            .any(|m| m.contains("STATUS=ok: 1 root")),
        "{got:?} {more:?}"
    );

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let last = collect(&sock, CONVERGE, |g| has(g, "STOPPING=1"));
    assert!(has(&last, "STOPPING=1"), "{last:?}");
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", text());
    // Every message came from `syncbus run` itself: no stage ever said READY.
    let all: Vec<&String> = got.iter().chain(&more).chain(&last).collect();
    assert_eq!(
        all.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "{all:?}"
    );
}

/// Without `WATCHDOG_USEC` there is no watchdog to ping.
#[test]
fn no_watchdog_pings_unless_asked_and_a_stage_alone_says_ready() {
    let m = Mirror::new(1, "");
    let sock_path = m.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    // One unit per stage: the retrier alone, with a watchdog.
    let child = Command::new(bin())
        .args(["retrier", "--config"])
        .arg(&m.config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "4000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let retrier = Killed(child);
    let got = collect(&sock, CONVERGE, |g| {
        has(g, "READY=1") && has(g, "WATCHDOG=1")
    });
    assert!(has(&got, "READY=1") && has(&got, "WATCHDOG=1"), "{got:?}");
    drop(retrier);

    let child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&m.config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env_remove("WATCHDOG_USEC")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _run = Killed(child);
    // Until a few seconds after READY: pings would come every second.
    let got = collect(&sock, CONVERGE, |g| has(g, "READY=1"));
    assert!(has(&got, "READY=1"), "{got:?}");
    let after = collect(&sock, Duration::from_secs(3), |_| false);
    assert!(
        !has(&got, "WATCHDOG=1") && !has(&after, "WATCHDOG=1"),
        "{got:?} {after:?}"
    );
}

/// Under systemd, stderr is the journal (`JOURNAL_STREAM` names its device
/// and inode). Lines then carry their syslog priority (`<3>` error, `<4>` warning, `<6>`
/// info), which `journalctl -p err` filters on, and no timestamp of their own (the
/// journal stamps each line). The same stderr without the variable keeps the human
/// format with its timestamp.
#[test]
fn on_the_journal_stream_lines_carry_priorities_and_no_timestamp() {
    let m = Mirror::new(1, "");
    let run = |journal: bool, path_env: &str, file: &std::path::Path| {
        let f = fs::File::create(file).unwrap();
        let meta = f.metadata().unwrap();
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--config"])
            .arg(&m.config)
            .env("PATH", path_env)
            .env_remove("SYNCBUS_RSYNC")
            .stdout(Stdio::null())
            .stderr(f);
        if journal {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        } else {
            cmd.env_remove("JOURNAL_STREAM");
        }
        cmd.status().unwrap()
    };
    // No rsync: an error at start (exit 69).
    let journal = m.dir.path().join("journal.log");
    assert_eq!(run(true, "/nonexistent", &journal).code(), Some(69));
    let text = fs::read_to_string(&journal).unwrap();
    let first = text.lines().next().unwrap_or_default();
    assert!(first.starts_with("<3>"), "{text}");
    assert!(first.contains("cannot find `rsync`"), "{text}");
    // No timestamp: the level follows the prefix.
    assert!(first.starts_with("<3>ERROR "), "{text}");

    // The same, on a plain file: the human format, timestamp first.
    let plain = m.dir.path().join("plain.log");
    assert_eq!(run(false, "/nonexistent", &plain).code(), Some(69));
    let text = fs::read_to_string(&plain).unwrap();
    assert!(
        !text.contains("<3>") && text.starts_with(|c: char| c.is_ascii_digit()),
        "{text}"
    );

    // A bad config is an error too, every line of it.
    let bad = m.dir.path().join("bad.toml");
    fs::write(
        &bad,
        "[[root]]\nname = \"r\"\npath = \"nowhere\"\n\n[[target]]\nname = \"t\"\nurl = \"rsync://h/m\"\nroots = [\"nope\"]\n",
    )
    .unwrap();
    let f = fs::File::create(&journal).unwrap();
    let meta = f.metadata().unwrap();
    let out = Command::new(bin())
        .args(["check-config"])
        .arg(&bad)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(f)
        .status()
        .unwrap();
    assert_eq!(out.code(), Some(78));
    let text = fs::read_to_string(&journal).unwrap();
    assert!(text.lines().count() >= 2, "{text}");
    assert!(text.lines().all(|l| l.starts_with("<3>")), "{text}");

    // A running pipeline: INFO lifecycle lines of the supervisor and of its stages.
    let f = fs::File::create(&journal).unwrap();
    let meta = f.metadata().unwrap();
    let child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&m.config)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    let _run = Killed(child);
    m.wait_for("the watcher's `watches live` line", CONVERGE, || {
        let text = fs::read_to_string(&journal).ok()?;
        text.lines()
            .any(|l| l.starts_with("<6>INFO ") && l.contains("watches live"))
            .then_some(())
    });
    let text = fs::read_to_string(&journal).unwrap();
    assert!(
        text.lines().all(|l| l.starts_with('<')),
        "a line without its priority:\n{text}"
    );
}
