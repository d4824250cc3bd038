//! A real OpenSSH server on 127.0.0.1 for ssh targets: its own host key and a client
//! key made with `ssh-keygen` in a temp dir, on a free port, logging each login.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// Where Debian's `openssh-server` puts the daemon.
pub const SSHD: &str = "/usr/sbin/sshd";

/// `sshd -D -e` with a config of its own: public-key logins only, as the user running
/// the tests (root too), keys and log in its temp dir.
pub struct Sshd {
    pub port: u16,
    /// The client's private key: a target's `identity_file`.
    pub client_key: PathBuf,
    log: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    _work: tempfile::TempDir,
}

impl Sshd {
    /// A running sshd. Panics, saying what to install, on a machine without sshd or
    /// ssh-keygen (`apt-get install openssh-server`; scripts/test.sh does): a test of
    /// ssh targets that skipped itself could not fail.
    pub fn start() -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "no {SSHD}: apt-get install openssh-server (scripts/test.sh does)"
        );
        let work = tempfile::tempdir().expect("tempdir");
        let keygen = |name: &str| {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(work.path().join(name))
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "ssh-keygen failed or is missing (apt-get install openssh-client)"
            );
        };
        keygen("host_key");
        keygen("client_key");
        // sshd refuses to start without its privilege separation directory, which
        // the package makes at boot (tmpfiles.d), not at install.
        // SAFETY: getuid has no preconditions and cannot fail.
        if unsafe { libc::getuid() } == 0 {
            let _ = fs::create_dir_all("/run/sshd");
        }
        let dir = work.path();
        fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).expect("authorized_keys");
        let log = dir.join("sshd.log");
        let config = dir.join("sshd_config");
        let mut d = Sshd {
            port: 0,
            client_key: dir.join("client_key"),
            log,
            config,
            child: None,
            _work: work,
        };
        for _ in 0..20 {
            d.port = free_port();
            d.write_config();
            if d.spawn() {
                return d;
            }
        }
        panic!("sshd did not start:\n{}", d.log_text());
    }

    fn write_config(&self) {
        let dir = self.config.parent().expect("temp dir");
        let text = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPidFile {dir}/sshd.pid\n\
             StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             MaxStartups 100\nMaxSessions 100\nLogLevel INFO\n",
            port = self.port,
            dir = dir.display()
        );
        fs::write(&self.config, text).expect("write sshd_config");
    }

    fn spawn(&mut self) -> bool {
        let err = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open sshd log");
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn sshd");
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

    /// The `[[target]]` keys of a target mirroring into `dir` on this server (host
    /// keys are not checked: the server's is new each run).
    pub fn target_keys(&self, dir: &Path) -> String {
        format!(
            "url = \"127.0.0.1:{}/\"\nport = {}\nidentity_file = \"{}\"\n\
             ssh_options = [\"-o\", \"StrictHostKeyChecking=no\", \"-o\", \"UserKnownHostsFile=/dev/null\", \"-o\", \"BatchMode=yes\"]\n",
            dir.display(),
            self.port,
            self.client_key.display()
        )
    }

    /// Logins so far, across restarts (sshd logs `Accepted publickey` for each).
    pub fn logins(&self) -> usize {
        self.log_text().matches("Accepted publickey").count()
    }

    /// Kills the server and every connection it forked (SIGSTOP first, so none is
    /// forked meanwhile, then SIGKILL): a target that just went down, shared
    /// connections included.
    pub fn kill(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = c.id() as i32;
        // SAFETY: kill(2) on the child we spawned.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let mut doomed = vec![pid];
        let mut i = 0;
        while i < doomed.len() {
            doomed.extend(children_of(doomed[i]));
            i += 1;
        }
        for p in doomed {
            // SAFETY: kill(2) on the server we spawned and the processes it forked.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        let _ = c.wait();
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "sshd did not come back on port {}:\n{}",
                self.port,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The pids whose parent is `pid` (from /proc/*/stat).
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let child: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid: i32 = after.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}
