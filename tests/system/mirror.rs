//! The live mirror, end to end.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::PathBuf;

use testkit::{write_mode, RsyncDaemon};

use crate::Mirror;

#[test]
fn existing_tree_is_synced_at_start_and_a_burst_of_thousands_converges() {
    let mut m = Mirror::new(1, "");
    fs::create_dir_all(m.s("old/deep")).unwrap();
    for i in 0..50 {
        fs::write(m.s(&format!("old/deep/f{i}")), format!("old {i}")).unwrap();
    }
    m.start().wait_ready();
    m.converge();
    // 3,000 files: 2,000 across 40 new directories, 1,000 into an existing one.
    for d in 0..40 {
        let dir = m.s(&format!("new/d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..50 {
            fs::write(
                dir.join(format!("f{i}")),
                format!("{d}/{i}\n").repeat(i + 1),
            )
            .unwrap();
        }
    }
    for i in 0..1000 {
        fs::write(m.s(&format!("old/b{i:04}")), vec![b'x'; i]).unwrap();
    }
    m.converge();
}

#[test]
fn tree_operations_users_do_converge_with_modes_and_symlinks() {
    let mut m = Mirror::new(1, "");
    fs::create_dir_all(m.s("t/x/sub/deep")).unwrap();
    fs::create_dir_all(m.s("t/y")).unwrap();
    for i in 0..10 {
        fs::write(m.s(&format!("t/x/f{i}")), format!("f{i}")).unwrap();
        fs::write(m.s(&format!("t/x/sub/s{i}")), format!("s{i}")).unwrap();
        fs::write(m.s(&format!("t/x/sub/deep/d{i}")), format!("d{i}")).unwrap();
    }
    fs::write(m.s("t/y/keep"), "y").unwrap();
    m.start().wait_ready();
    m.converge();

    fs::create_dir_all(m.s("t/a/b/c/d/e")).unwrap();
    fs::write(m.s("t/a/b/c/d/e/lvl"), "deep").unwrap();
    fs::rename(m.s("t/a/b"), m.s("t/a/B")).unwrap();
    fs::write(m.s("t/a/B/c/after-rename"), "written under the new name").unwrap();
    fs::rename(m.s("t/x/f0"), m.s("t/a/B/c/f0")).unwrap();
    fs::create_dir(m.s("t/new")).unwrap();
    fs::rename(m.s("t/x/f1"), m.s("t/new/f1")).unwrap();
    fs::create_dir(m.s("t/fresh")).unwrap();
    fs::rename(m.s("t/y"), m.s("t/fresh/y")).unwrap(); // a directory into a just-created one
    fs::write(m.s("t/fresh/y/inside"), "after the move").unwrap();
    fs::remove_dir_all(m.s("t/x/sub")).unwrap();
    fs::set_permissions(m.s("t/x/f2"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(m.s("t/a/B/c"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(m.s("t/x/f3"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("B/c", m.s("t/a/link")).unwrap();
    symlink("nowhere", m.s("t/a/dangling")).unwrap();
    fs::remove_file(m.s("t/x/f4")).unwrap();
    fs::create_dir(m.s("t/x/f4")).unwrap(); // file -> directory
    fs::write(m.s("t/x/f4/inner"), "i").unwrap();
    fs::remove_dir_all(m.s("t/new")).unwrap();
    fs::write(m.s("t/new"), "directory -> file").unwrap();
    for _ in 0..5 {
        fs::rename(m.s("t/fresh"), m.s("t/fresh2")).unwrap();
        fs::rename(m.s("t/fresh2"), m.s("t/fresh")).unwrap();
    }
    fs::write(m.s("t/ephemeral"), "e").unwrap();
    fs::remove_file(m.s("t/ephemeral")).unwrap();
    m.converge();
    // A dangling symlink really is on the target, as a symlink.
    let l = fs::symlink_metadata(m.dsts[0].join("t/a/dangling")).unwrap();
    assert!(l.file_type().is_symlink());
}

#[test]
fn editor_saves_converge_and_no_temp_file_ever_reaches_the_target() {
    let mut m = Mirror::new(1, "");
    fs::create_dir(m.s("edit")).unwrap();
    for i in 0..5 {
        fs::write(m.s(&format!("edit/doc{i}.txt")), format!("initial {i}\n")).unwrap();
    }
    m.start().wait_ready();
    m.converge();
    for round in 0..6 {
        for i in 0..5 {
            let name = format!("doc{i}.txt");
            let p = m.s(&format!("edit/{name}"));
            let body = format!("round {round} doc {i}\n").repeat(round + 1);
            match (round + i) % 4 {
                0 => {
                    // vim: swap file, write probe, rename to backup, write, drop backup.
                    let swp = m.s(&format!("edit/.{name}.swp"));
                    fs::write(&swp, "swap").unwrap();
                    fs::write(m.s("edit/4913"), "").unwrap();
                    fs::remove_file(m.s("edit/4913")).unwrap();
                    let backup = m.s(&format!("edit/{name}~"));
                    fs::rename(&p, &backup).unwrap();
                    fs::write(&p, &body).unwrap();
                    fs::remove_file(&backup).unwrap();
                    fs::remove_file(&swp).unwrap();
                }
                1 => {
                    // emacs: lock symlink, autosave, in-place save.
                    let lock = m.s(&format!("edit/.#{name}"));
                    symlink("user@host.1234:1700000000", &lock).unwrap();
                    let auto = m.s(&format!("edit/#{name}#"));
                    fs::write(&auto, "autosave").unwrap();
                    fs::write(&p, &body).unwrap();
                    fs::remove_file(&auto).unwrap();
                    fs::remove_file(&lock).unwrap();
                }
                2 => {
                    // write a temp file, rename it over the original (sed -i, many IDEs).
                    let tmp = m.s(&format!("edit/.{name}.{round:04x}.tmp"));
                    fs::write(&tmp, &body).unwrap();
                    fs::rename(&tmp, &p).unwrap();
                }
                _ => {
                    // gedit / GIO atomic save.
                    let tmp = m.s(&format!("edit/.goutputstream-{round}X{i}"));
                    fs::write(&tmp, &body).unwrap();
                    fs::rename(&tmp, &p).unwrap();
                }
            }
        }
    }
    m.converge();
    let log = m.daemons[0].log_text();
    let received: Vec<&str> = log.lines().filter(|l| l.contains(" recv ")).collect();
    assert!(
        !received.is_empty(),
        "the transfer log records received files"
    );
    for line in &received {
        let name = line.rsplit('/').next().unwrap_or(line);
        let temp = name.ends_with(".swp")
            || name == "4913"
            || name.ends_with('~')
            || name.starts_with(".#")
            || name.starts_with('#')
            || name.ends_with(".tmp")
            || name.starts_with(".goutputstream");
        assert!(!temp, "temp file reached the target: {line}");
    }
}

#[test]
fn odd_file_names_arrive_byte_for_byte_and_nothing_is_run() {
    let mut m = Mirror::new(1, "");
    m.start().wait_ready();
    // A shell would run these in the stages' working directory (inherited from here).
    let canary = std::env::current_dir().unwrap().join("syncbus-canary");
    let names: Vec<Vec<u8>> = vec![
        b"with space".to_vec(),
        b" leading space".to_vec(),
        b"trailing space ".to_vec(),
        b"new\nline".to_vec(),
        b"tab\there".to_vec(),
        b"-leading-dash".to_vec(),
        b"--delete".to_vec(),
        b"#hash first".to_vec(),
        b";semicolon first".to_vec(),
        b"`touch syncbus-canary`".to_vec(),
        b"$(touch syncbus-canary)".to_vec(),
        b"quote's \"double\"".to_vec(),
        b"back\\slash".to_vec(),
        b"glob*?[x]".to_vec(),
        b"non-utf8 \xff\xfe end".to_vec(),
        b"caf\xc3\xa9".to_vec(),
        vec![b'n'; 255],
    ];
    for n in &names {
        let p = m.src.join(OsStr::from_bytes(n));
        fs::write(&p, n).unwrap();
    }
    let dir = m.src.join(OsStr::from_bytes(b"dir \xff\n#;-x"));
    fs::create_dir(&dir).unwrap();
    for n in &names[..6] {
        fs::write(dir.join(OsStr::from_bytes(n)), b"inner").unwrap();
    }
    m.converge();
    for n in &names[..4] {
        fs::remove_file(m.src.join(OsStr::from_bytes(n))).unwrap();
    }
    fs::rename(&dir, m.src.join(OsStr::from_bytes(b"renamed \xfe"))).unwrap();
    m.converge();
    assert!(!canary.exists(), "a file name was executed by a shell");
}

#[test]
fn one_target_down_never_delays_the_other_and_catches_up_when_back() {
    let mut m = Mirror::new(2, "");
    m.start().wait_ready();
    m.daemons[0].kill();
    for i in 0..200 {
        fs::write(m.s(&format!("during-outage-{i}")), format!("{i}")).unwrap();
    }
    fs::create_dir(m.s("outage-dir")).unwrap();
    fs::write(m.s("outage-dir/x"), "x").unwrap();
    m.converge_to(&m.dsts[1].clone());
    assert!(
        !m.dsts[0].join("during-outage-0").exists(),
        "the dead target cannot have received anything"
    );
    m.daemons[0].restart();
    m.converge();
}

#[test]
fn excludes_from_config_and_builtin_set_are_never_mirrored() {
    let mut m = Mirror::new(
        1,
        "exclude = ['(.*)\\.svn', 'cache/.*']\nexclude_glob = ['*.log']\n",
    );
    fs::create_dir_all(m.s("pre/.svn")).unwrap();
    fs::write(m.s("pre/.svn/entries"), "svn").unwrap();
    fs::write(m.s("pre/app.log"), "log").unwrap();
    fs::write(m.s("pre/keep"), "keep").unwrap();
    m.start().wait_ready();
    fs::create_dir_all(m.s("cache/sub")).unwrap();
    fs::write(m.s("cache/sub/blob"), "blob").unwrap();
    fs::create_dir_all(m.s("fresh/.svn")).unwrap();
    fs::write(m.s("fresh/.svn/x"), "x").unwrap();
    fs::write(m.s("fresh/.notes.txt.swp"), "swap").unwrap();
    fs::write(m.s("fresh/a.log"), "log").unwrap();
    fs::write(m.s("fresh/keep"), "keep").unwrap();
    let dst = m.dsts[0].clone();
    testkit::eventually("fresh/keep mirrored", crate::CONVERGE, || {
        dst.join("fresh/keep").exists().then_some(())
    });
    m.wait_ready();
    let excluded = [
        "pre/.svn",
        "pre/app.log",
        "cache/sub",
        "fresh/.svn",
        "fresh/.notes.txt.swp",
        "fresh/a.log",
    ];
    for e in excluded {
        assert!(!dst.join(e).exists(), "{e} was mirrored");
    }
    assert!(dst.join("pre/keep").exists());
}

#[test]
fn files_written_while_watching_a_new_directory_are_not_lost() {
    // Many nested directories created at once: files land in directories before their
    // watches exist, and must arrive anyway.
    let mut m = Mirror::new(1, "");
    m.start().wait_ready();
    for a in 0..10 {
        for b in 0..10 {
            let d: PathBuf = m.s(&format!("n{a}/m{b}/o"));
            fs::create_dir_all(&d).unwrap();
            write_mode(&d.join("f"), format!("{a}{b}").as_bytes(), 0o640);
        }
    }
    m.converge();
}

#[test]
fn a_target_that_is_a_plain_directory_and_one_given_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("before"), "b").unwrap();
    let local = dir.path().join("local-mirror");
    let daemon_dst = dir.path().join("daemon-dst");
    let d = RsyncDaemon::start(&daemon_dst);
    let run = dir.path().join("run");
    let _p = testkit::Proc::start(
        crate::bin(),
        [
            OsStr::new("run"),
            OsStr::new("--source"),
            src.as_os_str(),
            OsStr::new("--target"),
            local.as_os_str(),
            OsStr::new("--target"),
            OsStr::new(&d.url()),
            OsStr::new("--runtime-dir"),
            run.as_os_str(),
            OsStr::new("--state-dir"),
            dir.path().join("state").as_os_str(),
        ],
    );
    testkit::wait_trees_equal(&src, &local, crate::CONVERGE);
    testkit::wait_trees_equal(&src, &daemon_dst, crate::CONVERGE);
    fs::write(src.join("after"), "a").unwrap();
    testkit::wait_trees_equal(&src, &local, crate::CONVERGE);
    testkit::wait_trees_equal(&src, &daemon_dst, crate::CONVERGE);
}

#[test]
fn a_rewrite_with_the_same_size_and_mtime_still_reaches_the_target() {
    // rsync's quick check skipped such a rewrite until the
    // incremental runs got --ignore-times.
    let mut m = Mirror::new(1, "");
    let p = m.s("same-size");
    fs::write(&p, "aaaa").unwrap();
    m.start().wait_ready();
    m.converge();
    let mtime = fs::metadata(&p).unwrap().modified().unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    use std::io::Write;
    (&f).write_all(b"bbbb").unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let dst = m.dsts[0].join("same-size");
    testkit::eventually("the rewrite on the target", crate::CONVERGE, || {
        (fs::read(&dst).ok()? == b"bbbb").then_some(())
    });
}

#[test]
fn a_replaced_directory_leaves_none_of_its_old_files_on_the_target() {
    // An incremental `-r` of the new directory kept the
    // files only the old one had.
    let mut m = Mirror::new(1, "");
    for (dir, files) in [
        ("site", &["a", "only-old"][..]),
        ("site.new", &["a", "only-new"][..]),
        ("e", &["old"][..]),
    ] {
        fs::create_dir(m.s(dir)).unwrap();
        for f in files {
            fs::write(m.s(&format!("{dir}/{f}")), format!("{dir}/{f}")).unwrap();
        }
    }
    m.start().wait_ready();
    m.converge();
    // The deploy swap.
    fs::rename(m.s("site"), m.s("site.old")).unwrap();
    fs::rename(m.s("site.new"), m.s("site")).unwrap();
    // A directory moved out of the tree and a new one made in its place.
    fs::rename(m.s("e"), m.dir.path().join("e-outside")).unwrap();
    fs::create_dir(m.s("e")).unwrap();
    fs::write(m.s("e/new"), "new").unwrap();
    m.converge();
}

#[test]
fn a_file_renamed_over_from_an_excluded_temp_name_then_deleted_is_deleted_on_the_target() {
    // The lone `moved_to` counted as "did not exist before",
    // so the delete right after it was dropped.
    let mut m = Mirror::new(1, "");
    fs::write(m.s("doc"), "v1").unwrap();
    m.start().wait_ready();
    m.converge();
    for i in 0..5 {
        let tmp = m.s(&format!(".goutputstream-T{i}"));
        fs::write(&tmp, format!("v{i}")).unwrap();
        fs::rename(&tmp, m.s("doc")).unwrap();
        fs::remove_file(m.s("doc")).unwrap();
        fs::write(m.s(&format!("keep{i}")), "k").unwrap();
        m.converge();
        fs::write(m.s("doc"), "again").unwrap();
        m.converge();
    }
}

#[test]
fn a_daemon_with_authentication_is_reached_through_the_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("secret-plans"), "v1").unwrap();
    let dst = dir.path().join("dst");
    let d = RsyncDaemon::start_with_auth(&dst, "mirror", "s3cret pass");
    let pw = dir.path().join("daemon.pass");
    write_mode(&pw, b"s3cret pass\n", 0o600);
    let url = d.url().replace("rsync://", "rsync://mirror@");
    let config = dir.path().join("syncbus.toml");
    fs::write(
        &config,
        format!(
            "[bus]\nruntime_dir = \"run\"\n[retry]\nstate_dir = \"state\"\n[[root]]\nname = \"r\"\npath = \"src\"\n\
             [[target]]\nname = \"auth\"\nurl = \"{url}\"\npassword_file = \"daemon.pass\"\n"
        ),
    )
    .unwrap();
    let p = testkit::Proc::start(
        crate::bin(),
        [
            OsStr::new("run"),
            OsStr::new("--config"),
            config.as_os_str(),
        ],
    );
    let r = std::panic::catch_unwind(|| {
        testkit::wait_trees_equal(&src, &dst, crate::CONVERGE);
        fs::write(src.join("secret-plans"), "version two").unwrap();
        testkit::wait_trees_equal(&src, &dst, crate::CONVERGE);
    });
    if let Err(e) = r {
        eprintln!("--- syncbus log ---\n{}", p.log_text());
        std::panic::resume_unwind(e);
    }
}

/// Lazily unmounts on drop, so a failing test leaves no mount behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_target_disk_loses_nothing_and_catches_up_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dst).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&dst)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a small tmpfs as a full disk (mount(2) needs root)");
        return;
    }
    let _unmount = Unmount(dst.clone());
    let p = testkit::Proc::start(
        crate::bin(),
        [
            OsStr::new("run"),
            OsStr::new("--source"),
            src.as_os_str(),
            OsStr::new("--target"),
            dst.as_os_str(),
            OsStr::new("--runtime-dir"),
            dir.path().join("run").as_os_str(),
            OsStr::new("--state-dir"),
            dir.path().join("state").as_os_str(),
        ],
    );
    fs::write(src.join("big"), vec![7u8; 1 << 20]).unwrap();
    for i in 0..20 {
        fs::write(src.join(format!("small{i}")), format!("{i}")).unwrap();
    }
    testkit::eventually("the full disk reported", crate::CONVERGE, || {
        let log = p.log_text();
        (log.contains("failed") && log.contains("No space left")).then_some(())
    });
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=8m"])
        .arg(&dst)
        .status()
        .unwrap();
    assert!(grown.success());
    let r = std::panic::catch_unwind(|| testkit::wait_trees_equal(&src, &dst, crate::CONVERGE));
    if let Err(e) = r {
        eprintln!("--- syncbus log ---\n{}", p.log_text());
        std::panic::resume_unwind(e);
    }
}
