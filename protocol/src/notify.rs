//! The service manager's notification protocol (sd_notify(3)), without libsystemd: one
//! datagram of `KEY=value` lines to the unix socket named by `NOTIFY_SOCKET` (a path,
//! or an abstract name when it starts with `@`). Without that variable (not under
//! systemd, or a stage that `syncbus run` started) every call does nothing.
//!
//! Who says what:
//! - `syncbus run` (the `syncbus.service` unit, `Type=notify`): `READY=1` once every
//!   root's watches are live, `WATCHDOG=1` while every stage's main loop beats,
//!   `STATUS=` the one-line health, `RELOADING=1`/`STOPPING=1` (`src/service.rs`).
//!   Its stages never inherit `NOTIFY_SOCKET`: systemd listens to the main pid only.
//! - A stage run alone (one unit per stage): its status writer says `READY=1` at the
//!   stage's first heartbeat (the watcher beats only once its watches are live) and
//!   `WATCHDOG=1` while the heartbeat is fresh ([`crate::status::Writer`]).

use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The variables systemd hands the main process; children must not inherit them.
pub const ENV: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

static STAGE_ALONE: AtomicBool = AtomicBool::new(false);

/// Marks this process as a stage whose status writer speaks for it to systemd
/// (`stage_main` calls it; the supervisor, which speaks for itself, does not).
pub fn stage_speaks_for_itself() {
    STAGE_ALONE.store(true, Ordering::Relaxed);
}

/// Whether [`stage_speaks_for_itself`] was called.
pub fn stage_alone() -> bool {
    STAGE_ALONE.load(Ordering::Relaxed)
}

/// Sends `state` (newline-separated `KEY=value` assignments). `Ok(false)` when there is
/// no `NOTIFY_SOCKET`.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    send(&socket, state)?;
    Ok(true)
}

fn send(socket: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = socket.as_bytes();
    let sock = UnixDatagram::unbound()?;
    match bytes.split_first() {
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        Some((b'/', _)) => {
            sock.send_to(state.as_bytes(), socket)?;
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither a path nor an abstract name",
            ))
        }
    }
    Ok(())
}

/// How often systemd wants `WATCHDOG=1` (`WatchdogSec=`), if it wants it from this
/// process (`WATCHDOG_PID`, when set, names it).
pub fn watchdog() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// One line for `STATUS=`: no newline (it would end the assignment), at most 200 bytes.
pub fn status_line(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > 200 {
        let mut end = 197;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1\nSTATUS=ok").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("syncbus-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send(std::ffi::OsStr::new(&format!("@{name}")), "WATCHDOG=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");

        assert!(send(std::ffi::OsStr::new("relative"), "READY=1").is_err());
    }

    #[test]
    fn a_status_line_is_one_line_and_short() {
        assert_eq!(status_line("a\nb\tc"), "a b c");
        let long = "é".repeat(300);
        let l = status_line(&long);
        assert!(l.len() <= 200 && l.ends_with('…'), "{}", l.len());
    }
}
