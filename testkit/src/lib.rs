//! Dev-only helpers for syncbus's system tests: a real `rsync --daemon` on 127.0.0.1
//! ([`RsyncDaemon`]), byte-for-byte tree comparison ([`tree_diff`]), waiting for a
//! condition with a deadline instead of sleeping ([`eventually`]), a handle on a
//! running binary that is stopped when dropped ([`Proc`]), and a real OpenSSH server
//! for ssh targets ([`Sshd`]).

#![allow(clippy::disallowed_methods)] // tests and their helpers spawn what they check

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod sshd;
pub use sshd::Sshd;

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What one entry of a tree looks like, for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File {
        mode: u32,
        mtime: i64,
        content: Vec<u8>,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: Vec<u8>,
    },
    Other,
}

/// Every entry below `root` (not `root` itself), keyed by relative path bytes.
pub fn scan(root: &Path) -> BTreeMap<Vec<u8>, Entry> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            let r = rel.join(e.file_name());
            let p = root.join(&r);
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let ft = m.file_type();
            let entry = if ft.is_symlink() {
                Entry::Symlink {
                    target: fs::read_link(&p)
                        .map(|t| t.as_os_str().as_bytes().to_vec())
                        .unwrap_or_default(),
                }
            } else if ft.is_dir() {
                stack.push(r.clone());
                Entry::Dir {
                    mode: m.mode() & 0o7777,
                }
            } else if ft.is_file() {
                Entry::File {
                    mode: m.mode() & 0o7777,
                    mtime: m.mtime(),
                    content: fs::read(&p).unwrap_or_default(),
                }
            } else {
                Entry::Other
            };
            out.insert(r.as_os_str().as_bytes().to_vec(), entry);
        }
    }
    out
}

/// Differences between two trees (empty when equal), at most `limit` lines.
pub fn tree_diff(a: &Path, b: &Path) -> Vec<String> {
    tree_diff_without(a, b, None)
}

/// `tree_diff` leaving out one top-level entry of both trees and what is below it
/// (a two-way root's own `.syncbus`).
pub fn tree_diff_without(a: &Path, b: &Path, skip: Option<&str>) -> Vec<String> {
    let keep = |t: BTreeMap<Vec<u8>, Entry>| -> BTreeMap<Vec<u8>, Entry> {
        let Some(skip) = skip else { return t };
        t.into_iter()
            .filter(|(k, _)| {
                let rest = k.strip_prefix(skip.as_bytes());
                !rest.is_some_and(|r| r.is_empty() || r[0] == b'/')
            })
            .collect()
    };
    let (ta, tb) = (keep(scan(a)), keep(scan(b)));
    let show = |k: &[u8]| String::from_utf8_lossy(k).escape_debug().to_string();
    let mut out = Vec::new();
    for (k, va) in &ta {
        match tb.get(k) {
            None => out.push(format!("only in source: {}", show(k))),
            Some(vb) if vb != va => {
                out.push(format!("differs: {} ({})", show(k), describe(va, vb)))
            }
            _ => {}
        }
    }
    for k in tb.keys().filter(|k| !ta.contains_key(*k)) {
        out.push(format!("only in mirror: {}", show(k)));
    }
    out.truncate(20);
    out
}

fn describe(a: &Entry, b: &Entry) -> String {
    match (a, b) {
        (
            Entry::File {
                mode: ma,
                mtime: ta,
                content: ca,
            },
            Entry::File {
                mode: mb,
                mtime: tb,
                content: cb,
            },
        ) => {
            format!(
                "mode {ma:o}/{mb:o}, mtime {ta}/{tb}, {} / {} bytes{}",
                ca.len(),
                cb.len(),
                if ca == cb { "" } else { ", content differs" }
            )
        }
        _ => format!("{a:?} vs {b:?}").chars().take(200).collect(),
    }
}

/// Waits until the two trees are identical, or panics with the last difference.
pub fn wait_trees_equal(src: &Path, dst: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let diff = tree_diff(src, dst);
        if diff.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "trees still differ after {timeout:?}:\n  {}",
                diff.join("\n  ")
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A real `rsync --daemon` on 127.0.0.1 serving module `m` from a directory, with
/// transfer logging on so tests can see every name that crossed the wire.
pub struct RsyncDaemon {
    pub port: u16,
    pub module_dir: PathBuf,
    pub log: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
    _work: tempfile::TempDir,
}

impl RsyncDaemon {
    pub fn start(module_dir: &Path) -> RsyncDaemon {
        Self::start_with(module_dir, None)
    }

    /// A daemon whose module needs `user` with `password` (rsync's `auth users`).
    pub fn start_with_auth(module_dir: &Path, user: &str, password: &str) -> RsyncDaemon {
        Self::start_with(module_dir, Some((user, password)))
    }

    fn start_with(module_dir: &Path, auth: Option<(&str, &str)>) -> RsyncDaemon {
        fs::create_dir_all(module_dir).expect("create module dir");
        let work = tempfile::tempdir().expect("tempdir");
        let log = work.path().join("rsyncd.log");
        let conf = work.path().join("rsyncd.conf");
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let mut text = format!(
            "address = 127.0.0.1\nuid = {uid}\ngid = {gid}\nuse chroot = no\nlog file = {}\n\
             transfer logging = yes\nlog format = %b %o %n\n\n[m]\npath = {}\nread only = no\n\
             munge symlinks = no\n",
            log.display(),
            module_dir.display()
        );
        if let Some((user, password)) = auth {
            let secrets = work.path().join("rsyncd.secrets");
            write_mode(&secrets, format!("{user}:{password}\n").as_bytes(), 0o600);
            text.push_str(&format!(
                "auth users = {user}\nsecrets file = {}\nstrict modes = yes\n",
                secrets.display()
            ));
        }
        fs::write(&conf, text).expect("write rsyncd.conf");
        let mut d = RsyncDaemon {
            port: 0,
            module_dir: module_dir.to_path_buf(),
            log,
            conf,
            child: None,
            _work: work,
        };
        for _ in 0..20 {
            d.port = free_port();
            if d.spawn() {
                return d;
            }
        }
        panic!("rsync daemon did not start (is rsync installed?)");
    }

    /// `rsync://127.0.0.1:PORT/m/`
    pub fn url(&self) -> String {
        format!("rsync://127.0.0.1:{}/m/", self.port)
    }

    fn spawn(&mut self) -> bool {
        use std::os::unix::process::CommandExt;
        let child = Command::new("rsync")
            .process_group(0)
            .arg("--daemon")
            .arg("--no-detach")
            .arg(format!("--config={}", self.conf.display()))
            .arg(format!("--port={}", self.port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn rsync --daemon (is rsync installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        false
    }

    /// Kills the daemon and every connection it forked with SIGKILL (a target that
    /// just went down: forked children hold the listening socket too).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the process group we created for the daemon.
            unsafe {
                libc::kill(-(c.id() as i32), libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "rsync daemon did not come back on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The daemon's log (with `transfer logging`, one line per transferred name).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// A running program whose stderr goes to a file; SIGTERM then SIGKILL on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    pub fn start<I, S>(program: &Path, args: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        Proc::start_logging(program, args, &filter)
    }

    /// `start` with its own `RUST_LOG` filter (a test that wants a stage's debug lines
    /// in the log it prints on failure).
    pub fn start_logging<I, S>(program: &Path, args: I, filter: &str) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("stderr.log");
        let err = fs::File::create(&log).expect("create log");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Proc {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for exit up to `timeout`; `None` if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Writes a file and sets its mode.
pub fn write_mode(path: &Path, content: &[u8], mode: u32) {
    fs::write(path, content).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_diff_sees_content_mode_and_type() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        assert!(tree_diff(a.path(), b.path()).is_empty());
        fs::write(a.path().join("f"), b"x").unwrap();
        assert_eq!(tree_diff(a.path(), b.path()), vec!["only in source: f"]);
        fs::write(b.path().join("f"), b"y").unwrap();
        assert!(tree_diff(a.path(), b.path())[0].contains("content differs"));
        std::os::unix::fs::symlink("f", b.path().join("l")).unwrap();
        assert!(tree_diff(a.path(), b.path())
            .iter()
            .any(|d| d.contains("only in mirror: l")));
    }

    #[test]
    fn rsync_daemon_accepts_a_push_and_logs_it() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        fs::write(src.path().join("hello"), b"hi").unwrap();
        let d = RsyncDaemon::start(dst.path());
        let st = Command::new("rsync")
            .arg("-a")
            .arg(format!("{}/", src.path().display()))
            .arg(d.url())
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(fs::read(dst.path().join("hello")).unwrap(), b"hi");
        eventually("transfer log line", Duration::from_secs(5), || {
            d.log_text().contains("hello").then_some(())
        });
    }
}
