//! The one place in the dispatcher that spawns a process: rsync with the command line
//! the `rsync` crate built, or a command target's program. argv only, never a shell:
//! file names travel on stdin, NUL-separated. A child without I/O for the target's
//! `timeout` is killed; its exit is classified by the `rsync` crate's rules.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ::rsync::{classify, rsync_program, Outcome};

/// How many bytes of rsync's stderr are kept for the error message.
const STDERR_TAIL: usize = 4096;

/// Where the rsync that runs will be found (`$SYNCBUS_RSYNC`, or `rsync` in PATH);
/// `Err` says what is missing and how to get it. Looked up, not run: a stage checks it
/// once at start, so a machine without rsync is an error, not a retry loop.
pub fn find_rsync() -> Result<PathBuf, String> {
    let program = rsync_program();
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        })
    };
    let found = if program.as_bytes().contains(&b'/') {
        Some(PathBuf::from(&program)).filter(|p| runnable(p))
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(&program))
                .find(|p| runnable(p))
        })
    };
    found.ok_or_else(|| {
        format!(
            "cannot find `{}`{}: install rsync (`apt-get install rsync`), or set SYNCBUS_RSYNC to its path",
            program.to_string_lossy(),
            if program.as_bytes().contains(&b'/') {
                ""
            } else {
                " in PATH"
            }
        )
    })
}

/// Notices a child whose I/O counters (`/proc/PID/io`: bytes read and written through
/// any fd, pipes and sockets included) stop moving for `limit`.
struct IdleWatch {
    io_path: String,
    limit: Duration,
    last: Option<u64>,
    since: std::time::Instant,
    next_check: std::time::Instant,
}

impl IdleWatch {
    fn new(pid: u32, limit: Duration) -> Self {
        let now = std::time::Instant::now();
        IdleWatch {
            io_path: format!("/proc/{pid}/io"),
            limit,
            last: None,
            since: now,
            next_check: now,
        }
    }

    fn stalled(&mut self) -> bool {
        let now = std::time::Instant::now();
        if now < self.next_check {
            return false;
        }
        self.next_check = now + Duration::from_millis(250);
        let Some(total) = io_total(&self.io_path) else {
            return false;
        };
        if self.last != Some(total) {
            self.last = Some(total);
            self.since = now;
            return false;
        }
        now.duration_since(self.since) >= self.limit
    }
}

/// `rchar + wchar` of one process.
fn io_total(path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    Some(field("rchar:")? + field("wchar:")?)
}

/// Takes a child's standard output chunk by chunk, on a thread of its own.
pub(crate) type Sink<'a> = &'a (dyn Fn(&[u8]) + Sync);

/// How one run ended.
#[derive(Debug)]
pub(crate) struct RunResult {
    pub outcome: Outcome,
    /// Empty on success; rsync's stderr tail or the reason it could not run.
    pub error: String,
}

/// Runs `program args` with `stdin` on its standard input. `tick(wait)` is called while
/// the child runs (it may block up to `wait`, e.g. to take in new work); when it returns
/// true the child is killed. A child that reads and writes nothing for `idle` (rsync's
/// `--timeout`, enforced from outside) is killed too and the run is retried. With
/// `stdout`, the child's standard output is read and handed to it chunk by chunk (from
/// another thread), e.g. to count lines for progress or to keep rsync's itemized list.
/// `setup` may add to the command (working directory, environment). Exit codes mean
/// what they mean to rsync ([`classify`]).
pub(crate) fn run(
    program: &OsString,
    args: &[OsString],
    stdin: &[u8],
    idle: Option<Duration>,
    stdout: Option<Sink>,
    setup: &dyn Fn(&mut Command),
    tick: impl FnMut(Duration) -> bool,
) -> RunResult {
    run_classified(program, args, stdin, idle, stdout, setup, Kind::Rsync, tick)
}

/// [`run`] for a program of the user's (a command target): only exit 0 is success,
/// anything else is retried. It runs in a process group of its own: whatever it leaves
/// behind when it exits, or when `tick` stops it, is killed with it (a background
/// child holding its pipes would otherwise hold up the worker).
pub(crate) fn run_user_program(
    program: &OsString,
    args: &[OsString],
    stdin: &[u8],
    setup: &dyn Fn(&mut Command),
    tick: impl FnMut(Duration) -> bool,
) -> RunResult {
    run_classified(
        program,
        args,
        stdin,
        None,
        None,
        setup,
        Kind::UserProgram,
        tick,
    )
}

/// Runs `ssh args` that talks to a shared connection's master over its socket
/// (`-O exit`): no login, no transfer; killed if it says nothing for 5 s.
pub(crate) fn run_ssh_control(args: &[String]) -> RunResult {
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    run_classified(
        &"ssh".into(),
        &args,
        b"",
        Some(Duration::from_secs(5)),
        None,
        &|_| {},
        Kind::SshControl,
        |wait| {
            std::thread::sleep(wait);
            false
        },
    )
}

/// What runs, for what its exit means and how it is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// rsync: its exit codes ([`classify`]), ssh's reason on a failure over ssh.
    Rsync,
    /// A command target's program: 0 or retry, in a process group of its own.
    UserProgram,
    /// `ssh -O …` to a shared connection: 0 or not.
    SshControl,
}

#[allow(clippy::too_many_arguments)]
fn run_classified(
    program: &OsString,
    args: &[OsString],
    stdin: &[u8],
    idle: Option<Duration>,
    stdout: Option<Sink>,
    setup: &dyn Fn(&mut Command),
    kind: Kind,
    mut tick: impl FnMut(Duration) -> bool,
) -> RunResult {
    let group = kind == Kind::UserProgram;
    let name = Path::new(program)
        .file_name()
        .map_or_else(|| program.to_string_lossy(), |n| n.to_string_lossy())
        .into_owned();
    #[expect(
        clippy::disallowed_methods,
        reason = "the one place the dispatcher spawns: argv only, stdin for names"
    )]
    let mut cmd = Command::new(program);
    setup(&mut cmd);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(if stdout.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
    // SAFETY: prctl only sets a flag on the child and is async-signal-safe. The signal
    // fires when the spawning *thread* ends, which is the worker: it outlives its runs.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    if group {
        cmd.process_group(0);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return RunResult {
                outcome: Outcome::Fatal,
                error: format!(
                    "cannot run `{}`: not found{}",
                    program.to_string_lossy(),
                    if name == "rsync" {
                        " (install rsync, or set SYNCBUS_RSYNC)"
                    } else {
                        ""
                    }
                ),
            }
        }
        Err(e) => {
            return RunResult {
                outcome: Outcome::Retry,
                error: format!("cannot run `{}`: {e}", program.to_string_lossy()),
            }
        }
    };
    let mut input = child.stdin.take();
    let mut err_pipe = child.stderr.take();
    let out_pipe = child.stdout.take();
    std::thread::scope(|s| {
        if let (Some(mut out), Some(sink)) = (out_pipe, stdout) {
            s.spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink(&buf[..n]);
                }
            });
        }
        // Writing and reading on their own threads: a large list must not deadlock
        // against a child that is blocked writing its stderr.
        s.spawn(move || {
            if let Some(mut w) = input.take() {
                // A child that exits early closes the pipe: its exit code tells why.
                let _ = w.write_all(stdin);
            }
        });
        let reader = s.spawn(move || {
            let mut tail: Vec<u8> = Vec::new();
            if let Some(r) = err_pipe.as_mut() {
                let mut buf = [0u8; 8192];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > STDERR_TAIL {
                        tail.drain(..tail.len() - STDERR_TAIL);
                    }
                }
            }
            tail
        });
        let started = std::time::Instant::now();
        let mut wait = Duration::from_millis(1);
        let mut killed = false;
        let mut stalled = false;
        let mut watchdog = idle.map(|limit| IdleWatch::new(child.id(), limit));
        let pid = child.id() as i32;
        let kill_group = || {
            if group {
                // SAFETY: kill(2) on the process group our child leads.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    kill_group();
                    break Ok(st);
                }
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            if killed {
                std::thread::sleep(wait);
            } else if tick(wait) {
                kill_group();
                let _ = child.kill();
                killed = true;
            } else if watchdog.as_mut().is_some_and(|w| w.stalled()) {
                let _ = child.kill();
                killed = true;
                stalled = true;
            }
            // Short polls while the run is young (a live change takes ~10 ms to a
            // daemon, and every ms of polling is latency), longer ones for transfers.
            let cap = if started.elapsed() < Duration::from_millis(50) {
                Duration::from_millis(2)
            } else {
                Duration::from_millis(20)
            };
            wait = (wait * 2).min(cap);
        };
        let tail = reader.join().unwrap_or_default();
        let tail = String::from_utf8_lossy(&tail).trim().to_string();
        match status {
            Ok(_) if stalled => RunResult {
                outcome: Outcome::Retry,
                error: format!(
                    "no I/O for {} s (the target's timeout): killed{}{tail}",
                    idle.unwrap_or_default().as_secs(),
                    if tail.is_empty() { "" } else { ": " }
                ),
            },
            Ok(st) if killed => RunResult {
                outcome: Outcome::Retry,
                error: if tail.is_empty() {
                    format!("stopped by the shutdown deadline ({st})")
                } else {
                    format!("stopped by the shutdown deadline ({st}): {tail}")
                },
            },
            Ok(st) => {
                let outcome = match kind {
                    Kind::Rsync => classify(st.code()),
                    Kind::UserProgram | Kind::SshControl if st.code() == Some(0) => {
                        Outcome::Success
                    }
                    Kind::UserProgram | Kind::SshControl => Outcome::Retry,
                };
                let error = match outcome {
                    Outcome::Success => String::new(),
                    _ => {
                        let how = match (st.code(), st.signal()) {
                            (Some(c), _) => format!("{name} exited with code {c}"),
                            (None, Some(sig)) => format!("{name} killed by signal {sig}"),
                            _ => format!("{name} ended: {st}"),
                        };
                        // ssh's own reason (refused, denied, unknown host), one line,
                        // instead of rsync's "connection unexpectedly closed": it is
                        // what status shows of a failing target.
                        let reason = (kind == Kind::Rsync)
                            .then(|| ::rsync::ssh::failure_reason(st.code(), &tail))
                            .flatten();
                        if let Some(reason) = reason {
                            format!("{reason} ({how})")
                        } else if tail.is_empty() {
                            how
                        } else {
                            format!("{how}: {tail}")
                        }
                    }
                };
                RunResult { outcome, error }
            }
            Err(e) => RunResult {
                outcome: Outcome::Retry,
                error: format!("cannot wait for {name}: {e}"),
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_is_fatal_and_says_so() {
        let r = run(
            &"/nonexistent/rsync".into(),
            &[],
            b"",
            None,
            None,
            &|_| {},
            |_| false,
        );
        assert_eq!(r.outcome, Outcome::Fatal);
        assert!(r.error.contains("install rsync"), "{}", r.error);
    }
}

#[cfg(test)]
mod reason_tests {
    use super::*;

    fn fake_rsync(script: &str) -> RunResult {
        run(
            &"sh".into(),
            &["-c".into(), script.into()],
            b"",
            None,
            None,
            &|_| {},
            |w| {
                std::thread::sleep(w);
                false
            },
        )
    }

    #[test]
    fn a_run_that_ssh_failed_says_sshs_reason_on_one_line() {
        let r = fake_rsync(
            "echo 'ssh: connect to host h port 22: Connection refused' >&2; \
             echo 'rsync: connection unexpectedly closed (0 bytes received so far) [sender]' >&2; \
             echo 'rsync error: error in rsync protocol data stream (code 12)' >&2; exit 12",
        );
        assert_eq!(r.outcome, Outcome::Retry);
        assert_eq!(
            r.error,
            "ssh: connect to host h port 22: Connection refused (sh exited with code 12)"
        );
        // Any other failure keeps rsync's whole tail.
        let r = fake_rsync("echo 'rsync: link_stat failed' >&2; exit 23");
        assert_eq!(r.error, "sh exited with code 23: rsync: link_stat failed");
    }
}

#[cfg(test)]
mod idle_tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn a_child_without_io_is_killed_after_the_idle_limit_and_retried() {
        let started = std::time::Instant::now();
        let r = run(
            &"sleep".into(),
            &["30".into()],
            b"",
            Some(Duration::from_secs(1)),
            None,
            &|_| {},
            |w| {
                std::thread::sleep(w);
                false
            },
        );
        assert_eq!(r.outcome, Outcome::Retry);
        assert!(r.error.contains("no I/O for 1 s"), "{}", r.error);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "killed long before sleep ends"
        );
    }

    #[test]
    fn the_lines_a_child_prints_are_counted_for_progress() {
        let lines = AtomicU64::new(0);
        let count = |chunk: &[u8]| {
            let n = chunk.iter().filter(|&&b| b == b'\n').count() as u64;
            lines.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        let r = run(
            &"printf".into(),
            &["a\\nb\\nc\\n".into()],
            b"",
            None,
            Some(&count),
            &|_| {},
            |w| {
                std::thread::sleep(w);
                false
            },
        );
        assert_eq!(r.outcome, Outcome::Success, "{}", r.error);
        assert_eq!(lines.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[test]
    fn a_busy_child_is_not_killed() {
        // `cat /dev/zero` reads and writes all the time; only the tick stops it, after
        // twice the idle limit.
        let started = std::time::Instant::now();
        let r = run(
            &"cat".into(),
            &["/dev/zero".into()],
            b"",
            Some(Duration::from_secs(1)),
            None,
            &|_| {},
            |w| {
                std::thread::sleep(w);
                started.elapsed() > Duration::from_secs(2)
            },
        );
        assert!(r.error.contains("shutdown deadline"), "{}", r.error);
    }
}
