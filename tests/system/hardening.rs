//! A hostile local user and a damaged machine: the runtime dir is taken only when it is
//! provably ours, the stages never read a config from it, and its loss stops syncbus
//! with a message instead of leaving it limping.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use testkit::{wait_trees_equal, Proc, RsyncDaemon};

use crate::{bin, stage_pid, Mirror, CONVERGE};

/// The runtime dir pre-made as a symlink to a private dir we own (what another user can
/// do in /tmp): refused, and nothing is written through it.
#[test]
fn a_runtime_dir_that_is_a_symlink_is_refused_and_left_untouched() {
    let m = Mirror::new(1, "");
    let ours = m.dir.path().join("victim-private");
    fs::create_dir(&ours).unwrap();
    fs::set_permissions(&ours, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&ours, m.dir.path().join("run")).unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&m.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("runtime dir") && err.contains("symlink"),
        "{err}"
    );
    assert_eq!(
        fs::read_dir(&ours).unwrap().count(),
        0,
        "written through the link"
    );
}

/// A one-liner's stages get their config from the supervisor (a sealed memfd), not from
/// the copy in the runtime dir: a restarted stage runs what the supervisor planned even
/// when that copy was changed meanwhile.
#[test]
fn restarted_stages_never_read_a_config_from_the_runtime_dir() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let (dst, other) = (dir.path().join("dst"), dir.path().join("other"));
    let (d, o) = (RsyncDaemon::start(&dst), RsyncDaemon::start(&other));
    let run = dir.path().join("run");
    let p = Proc::start(
        bin(),
        [
            OsStr::new("run"),
            OsStr::new("--source"),
            src.as_os_str(),
            OsStr::new("--target"),
            OsStr::new(&d.url()),
            OsStr::new("--runtime-dir"),
            run.as_os_str(),
            OsStr::new("--state-dir"),
            dir.path().join("state").as_os_str(),
        ],
    );
    fs::write(src.join("first"), "1").unwrap();
    wait_trees_equal(&src, &dst, CONVERGE);
    let copy = run.join("generated.toml");
    let text = fs::read_to_string(&copy).unwrap();
    fs::write(&copy, text.replace(&d.url(), &o.url())).unwrap();
    let pid = stage_pid(&p.log_text(), "dispatcher");
    // SAFETY: kill(2) with a pid read from our child's log.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    testkit::eventually("the dispatcher restarted", CONVERGE, || {
        (stage_pid(&p.log_text(), "dispatcher") != pid).then_some(())
    });
    fs::write(src.join("second"), "2").unwrap();
    wait_trees_equal(&src, &dst, CONVERGE);
    assert!(
        fs::read_dir(&other).map_or(true, |mut e| e.next().is_none()),
        "a stage ran the config found in the runtime dir"
    );
}

/// The runtime dir removed under a running syncbus: it stops with a message (so a
/// service manager starts it again), and the next start makes the dir anew, 0700.
#[test]
fn a_removed_runtime_dir_stops_syncbus_with_a_message_and_the_next_start_heals() {
    let mut m = Mirror::new(1, "");
    m.start().wait_ready();
    let run = m.dir.path().join("run");
    fs::remove_dir_all(&run).unwrap();
    let p = m.proc.as_mut().unwrap();
    let status = p.wait_exit(CONVERGE).expect("syncbus run stops");
    assert_eq!(status.code(), Some(1), "{}", p.log_text());
    assert!(
        p.log_text()
            .contains("the runtime dir was removed or replaced"),
        "{}",
        p.log_text()
    );
    m.start().wait_ready();
    assert_eq!(
        fs::metadata(&run).unwrap().permissions().mode() & 0o777,
        0o700
    );
    fs::write(m.s("after"), "a").unwrap();
    m.converge();
}

/// `syncbus tail` by a user who may not open the instance's sockets says so and fails,
/// instead of printing "following" and then nothing, forever. Needs root, to be the
/// other user.
#[test]
fn tail_without_the_right_to_read_the_streams_says_so_and_fails() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: only root can run tail as another user");
        return;
    }
    let mut m = Mirror::new(1, "");
    m.start().wait_ready();
    // The config is readable by all; the runtime dir (0700) is not.
    fs::set_permissions(m.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&m.config, fs::Permissions::from_mode(0o644)).unwrap();
    let mut tail = Command::new(bin());
    std::os::unix::process::CommandExt::uid(&mut tail, 65534);
    std::os::unix::process::CommandExt::gid(&mut tail, 65534);
    let err_file = m.dir.path().join("tail.err");
    let mut child = tail
        .args(["tail", "--config"])
        .arg(&m.config)
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    let status = testkit::eventually("tail to exit", CONVERGE, || child.try_wait().unwrap());
    let err = fs::read_to_string(&err_file).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(!err.contains("following"), "{err}");
}

/// The inotify watch limit reached while running (a tree that grew) leaves that root
/// watched in part and says so (CRITICAL), instead of stopping syncbus; once the limit
/// is raised, the root is watched in full again and resynced, so the files written in
/// directories that had no watch arrive too. The limit is lowered in a user namespace
/// of the test's own (`/proc/sys/user/max_inotify_watches` is per namespace).
#[test]
fn the_watch_limit_reached_while_running_degrades_the_root_until_it_is_raised() {
    let can = Command::new("unshare")
        .args(["-U", "-r", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !can {
        eprintln!("skipped: no user namespaces here (unshare -U -r)");
        return;
    }
    let mut m = Mirror::new(1, "");
    fs::create_dir(m.s("a")).unwrap();
    // unshare execs the shell, which execs syncbus run: the pid is syncbus run's, and
    // SIGTERM at the end reaches it.
    m.proc = Some(Proc::start(
        std::path::Path::new("unshare"),
        [
            OsStr::new("-U"),
            OsStr::new("-r"),
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new("echo \"$1\" > /proc/sys/user/max_inotify_watches && shift && exec \"$@\""),
            OsStr::new("sh"),
            OsStr::new("30"),
            bin().as_os_str(),
            OsStr::new("run"),
            OsStr::new("--config"),
            m.config.as_os_str(),
        ],
    ));
    m.wait_ready();
    let watcher = stage_pid(&m.log(), "watcher");
    for i in 0..40 {
        fs::create_dir_all(m.s(&format!("many/d{i}"))).unwrap();
    }
    let r = m.wait_for("status to name the unwatched root", CONVERGE, || {
        let (code, r) = crate::status::status(&m);
        let unseen = r["problems"]
            .as_array()?
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.contains("go unseen")));
        (code == 2 && unseen).then_some(r)
    });
    assert!(
        r["roots"]["r"]["unwatched"]
            .as_str()
            .is_some_and(|u| u.contains("watch limit")),
        "{r:#}"
    );
    // Still running: live changes in watched directories go on arriving.
    fs::write(m.s("a/live"), "l").unwrap();
    m.wait_for("a live change beside the unwatched part", CONVERGE, || {
        fs::read(m.dsts[0].join("a/live")).ok()
    });
    assert_eq!(stage_pid(&m.log(), "watcher"), watcher, "{}", m.log());
    // Written where some directories have no watch; then the limit is raised.
    for i in 0..40 {
        fs::write(m.s(&format!("many/d{i}/f")), format!("{i}")).unwrap();
    }
    let pid = m.proc.as_ref().unwrap().pid().to_string();
    let raised = Command::new("nsenter")
        .args(["-U", "-t", &pid, "sh", "-c"])
        .arg("echo 1000 > /proc/sys/user/max_inotify_watches")
        .status()
        .unwrap();
    assert!(raised.success());
    m.converge();
    m.wait_for(
        "status OK once every directory is watched",
        CONVERGE,
        || (crate::status::status(&m).0 == 0).then_some(()),
    );
}
