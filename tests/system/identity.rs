//! Work belongs to an identity: an instance's runtime and state dirs are its own before
//! anything is written into them, one-liners get dirs of their own, and journalled
//! work is replayed only against the root path and target place it was owed to.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::{wait_trees_equal, Proc, RsyncDaemon};

use crate::{bin, Mirror, CONVERGE};

fn one_liner(src: &Path, target: &str, dirs: Option<(&Path, &Path)>) -> Proc {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("run"),
        OsStr::new("--source"),
        src.as_os_str(),
        OsStr::new("--target"),
        OsStr::new(target),
    ];
    if let Some((run, state)) = dirs {
        args.extend([
            OsStr::new("--runtime-dir"),
            run.as_os_str(),
            OsStr::new("--state-dir"),
            state.as_os_str(),
        ]);
    }
    Proc::start(bin(), args)
}

/// A refused second `syncbus run` on the same runtime dir writes nothing there: the
/// first one's next SIGHUP still mirrors its own source to its own target.
#[test]
fn a_refused_second_run_leaves_the_first_ones_config_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (a, empty) = (dir.path().join("a"), dir.path().join("empty"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&empty).unwrap();
    fs::write(a.join("before"), "b").unwrap();
    let (t, t2) = (dir.path().join("t"), dir.path().join("t2"));
    let (d, d2) = (RsyncDaemon::start(&t), RsyncDaemon::start(&t2));
    let (run, state) = (dir.path().join("run"), dir.path().join("state"));
    let first = one_liner(&a, &d.url(), Some((&run, &state)));
    wait_trees_equal(&a, &t, CONVERGE);

    let second = Command::new(bin())
        .args(["run", "--source"])
        .arg(&empty)
        .args(["--target", &d2.url(), "--runtime-dir"])
        .arg(&run)
        .arg("--state-dir")
        .arg(dir.path().join("state2"))
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(69));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another `syncbus run`"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    first.signal(libc::SIGHUP);
    testkit::eventually("the SIGHUP handled", CONVERGE, || {
        first
            .log_text()
            .contains("SIGHUP: config valid")
            .then_some(())
    });
    fs::write(a.join("after"), "a").unwrap();
    wait_trees_equal(&a, &t, CONVERGE);
    assert!(
        fs::read_dir(&t2).map_or(true, |mut e| e.next().is_none()),
        "the refused run's target got files"
    );
}

/// Removes a one-liner's dirs under the default runtime and state dirs at the end.
struct Instance {
    runtime_dir: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.runtime_dir);
        let _ = fs::remove_dir_all(&self.state_dir);
    }
}

fn status_of(src: &Path) -> Option<serde_json::Value> {
    let out = Command::new(bin())
        .args(["status", "--json", "--source"])
        .arg(src)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Two one-liners side by side, no dirs given: each runs in dirs of its own, `status`,
/// `fail-log` and `tail` find each by its source, and a bare `status` lists them.
#[test]
fn one_liners_run_side_by_side_and_are_found_by_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Vec::new();
    let mut instances = Vec::new();
    let mut pairs = Vec::new();
    for name in ["one", "two"] {
        let src = dir.path().join(name);
        fs::create_dir(&src).unwrap();
        fs::write(src.join("file"), name).unwrap();
        let dst = dir.path().join(format!("{name}-dst"));
        let d = RsyncDaemon::start(&dst);
        procs.push(one_liner(&src, &d.url(), None));
        pairs.push((src, dst, d));
    }
    for (i, (src, dst, _)) in pairs.iter().enumerate() {
        wait_trees_equal(src, dst, CONVERGE);
        let runtime_dir = testkit::eventually("status found by --source", CONVERGE, || {
            let v = status_of(src)?;
            (v["health"] == "ok").then(|| PathBuf::from(v["runtime_dir"].as_str().unwrap()))
        });
        let state_dir = protocol::config::Config::load(&runtime_dir.join("generated.toml"))
            .unwrap()
            .retry
            .state_dir;
        assert!(
            runtime_dir.ends_with(format!(
                "instances/{}",
                runtime_dir.file_name().unwrap().to_str().unwrap()
            )) && runtime_dir
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(["one-", "two-"][i]),
            "{}",
            runtime_dir.display()
        );
        instances.push(Instance {
            runtime_dir,
            state_dir,
        });
    }
    assert_ne!(instances[0].runtime_dir, instances[1].runtime_dir);
    assert_ne!(instances[0].state_dir, instances[1].state_dir);

    // Both still mirror.
    for (src, dst, _) in &pairs {
        fs::write(src.join("later"), "l").unwrap();
        wait_trees_equal(src, dst, CONVERGE);
    }
    let out = Command::new(bin())
        .args(["fail-log", "--source"])
        .arg(&pairs[1].0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("#!/bin/sh"));

    // A bare `status` names both, with how to ask about each.
    let out = Command::new(bin()).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for (src, _, _) in &pairs {
        let src = fs::canonicalize(src).unwrap();
        assert!(text.contains(&src.display().to_string()), "{text}");
    }

    // The same one-liner a second time is refused: it is the same instance.
    let again = Command::new(bin())
        .args(["run", "--source"])
        .arg(&pairs[0].0)
        .args(["--target", &pairs[0].2.url()])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(69));

    // Stop them, then the dirs go (before the `Instance`s are dropped).
    for p in &mut procs {
        p.signal(libc::SIGTERM);
        p.wait_exit(CONVERGE).expect("stops on SIGTERM");
    }
}

/// Work journalled for a root whose path then changed (the same names now mean another
/// tree) is not replayed: it is dropped with a WARN and the root is compared in full.
#[test]
fn journalled_work_owed_to_another_root_path_is_replaced_by_a_full_compare() {
    let mut m = Mirror::new(1, "");
    m.start().wait_ready();
    m.daemons[0].kill();
    fs::write(m.s("owed-to-the-old-tree"), "old").unwrap();
    let fail_log = m.dir.path().join("state/rsync_fail_log.sh");
    m.wait_for("the change journalled", CONVERGE, || {
        fs::read_to_string(&fail_log)
            .ok()?
            .contains("owed-to-the-old-tree")
            .then_some(())
    });
    let p = m.proc.as_mut().unwrap();
    p.signal(libc::SIGTERM);
    p.wait_exit(CONVERGE).expect("stops on SIGTERM");

    // The same root name, another tree.
    let other = m.dir.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("of-the-new-tree"), "new").unwrap();
    let text = fs::read_to_string(&m.config).unwrap();
    fs::write(
        &m.config,
        text.replace("path = \"src\"", "path = \"other\""),
    )
    .unwrap();
    m.daemons[0].restart();
    m.start();
    m.wait_for("the WARN about the stale work", CONVERGE, || {
        m.log()
            .contains("owed to another root path or target place")
            .then_some(())
    });
    wait_trees_equal(&other, &m.dsts[0], CONVERGE);
    let out = Command::new(bin())
        .args(["fail-log", "--config"])
        .arg(&m.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("owed-to-the-old-tree"), "{text}");
}
