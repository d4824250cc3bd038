//! ssh targets against a real OpenSSH server on 127.0.0.1 (`testkit::Sshd`): every
//! tree operation arrives, the runs share one connection (sshd's own count of logins),
//! it is closed when syncbus stops, and an outage shows ssh's reason, then heals.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use testkit::Sshd;

use crate::status::status;
use crate::{Mirror, CONVERGE};

/// A mirror whose one target is `sshd`, into `<tmp>/dst0` over ssh.
fn ssh_mirror() -> (Mirror, Sshd) {
    let sshd = Sshd::start();
    let mut m = Mirror::new(0, "");
    let dst = m.dir.path().join("dst0");
    m.add_target(&format!("{}timeout = 10\n", sshd.target_keys(&dst)), dst);
    (m, sshd)
}

#[test]
fn an_ssh_target_takes_every_tree_operation_over_one_shared_connection() {
    let (mut m, sshd) = ssh_mirror();
    m.start().wait_ready();
    let sockets = m.dir.path().join("run/ssh");
    let mode = fs::metadata(&sockets).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the sockets' directory is private");

    // Files, directories, renames, deletes, links, modes, odd names.
    fs::create_dir_all(m.s("a/b/c")).unwrap();
    fs::write(m.s("a/b/c/deep.txt"), "deep").unwrap();
    fs::write(m.s("top.txt"), "top").unwrap();
    fs::write(m.s("name with spaces & 'quotes'"), "odd").unwrap();
    std::os::unix::fs::symlink("top.txt", m.s("link")).unwrap();
    fs::create_dir(m.s("empty")).unwrap();
    m.converge();
    fs::write(m.s("top.txt"), "top, rewritten").unwrap();
    fs::rename(m.s("a/b"), m.s("moved")).unwrap();
    fs::rename(m.s("name with spaces & 'quotes'"), m.s("renamed")).unwrap();
    fs::set_permissions(m.s("renamed"), fs::Permissions::from_mode(0o600)).unwrap();
    m.converge();
    // A move's new name goes on rsync's command line: never as words for the shell.
    fs::rename(m.s("moved"), m.s("odd $(touch x) 'dir'")).unwrap();
    m.converge();
    fs::rename(m.s("odd $(touch x) 'dir'"), m.s("moved")).unwrap();
    m.converge();
    fs::remove_dir_all(m.s("moved")).unwrap();
    fs::remove_file(m.s("link")).unwrap();
    fs::remove_dir(m.s("empty")).unwrap();
    m.converge();

    // A burst of separate changes, each its own run (each waits for the one before to
    // arrive): through one shared connection, a handful of logins at most, not one
    // per run.
    let before = sshd.logins();
    let dst = m.dsts[0].clone();
    for i in 0..30 {
        let name = format!("burst-{i}");
        fs::write(m.s(&name), format!("{i}")).unwrap();
        m.wait_for(&format!("{name} on the target"), CONVERGE, || {
            (fs::read_to_string(dst.join(&name)).ok()? == format!("{i}")).then_some(())
        });
    }
    m.converge();
    let logins = sshd.logins() - before;
    eprintln!("ssh logins for 30 runs: {logins}");
    assert!(
        logins <= 5,
        "{logins} ssh logins for 30 runs: the connection is not shared\n{}",
        m.log()
    );
    assert!(
        fs::read_dir(&sockets).unwrap().next().is_some(),
        "a master's socket while running"
    );

    // A clean stop closes the connection: its socket goes with it.
    let p = m.proc.as_mut().unwrap();
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(CONVERGE).is_some_and(|s| s.success()));
    let left: Vec<_> = fs::read_dir(&sockets).unwrap().flatten().collect();
    assert!(left.is_empty(), "sockets left after the stop: {left:?}");
}

#[test]
fn an_ssh_outage_shows_sshs_reason_in_status_and_heals() {
    let (mut m, mut sshd) = ssh_mirror();
    m.start().wait_ready();
    sshd.kill();
    fs::write(m.s("during-outage"), "x").unwrap();
    let reason = format!(
        "ssh: connect to host 127.0.0.1 port {}: Connection refused",
        sshd.port
    );
    m.wait_for("ssh's reason in status", CONVERGE, || {
        let (_, r) = status(&m);
        let problems = r["problems"].to_string();
        problems.contains(&reason).then_some(())
    });
    // Not rsync's "connection unexpectedly closed": ssh's line is what status shows.
    let (code, r) = status(&m);
    assert_eq!(code, 2, "{r:#}");

    sshd.restart();
    fs::write(m.s("after-outage"), "y").unwrap();
    m.converge();
}
