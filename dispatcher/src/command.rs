//! The rsync command line per target kind, the one place that spawns a process, and
//! what its exit code means. argv only, never a shell: file names travel on stdin,
//! NUL-separated.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use protocol::config::{Endpoint, Target};

/// How many bytes of rsync's stderr are kept for the error message.
const STDERR_TAIL: usize = 4096;

/// What to do after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Transient (network, target busy): try again soon.
    Retry,
    /// Some paths could not be sent and the rest was (rsync's 23): a failure, retried
    /// like `Retry`, but an incremental run is first narrowed to the paths that fail.
    Partial,
    /// Retrying will not help until someone changes something: try again rarely, loudly.
    Fatal,
}

/// rsync's exit code (`None`: killed by a signal) → what to do.
pub fn classify(code: Option<i32>) -> Outcome {
    match code {
        // 24: some source files vanished — they are gone, and their delete is on its way.
        Some(0 | 24) => Outcome::Success,
        // syntax/usage, protocol incompatibility, action not supported, --max-delete.
        Some(1 | 2 | 4 | 25) => Outcome::Fatal,
        Some(23) => Outcome::Partial,
        // 3 file selection, 5 starting protocol, 6 daemon log, 10 socket I/O, 11 file I/O,
        // 12 protocol stream, 13 diagnostics, 14 IPC, 20 signal, 21 waitpid, 22 memory,
        // 30 timeout, 35 connect timeout, 255 ssh, a signal, or anything unknown:
        // transient until proven otherwise.
        _ => Outcome::Retry,
    }
}

pub fn classify_status(status: ExitStatus) -> Outcome {
    classify(status.code())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// `--files-from=-` with the touched paths; `-r` when a directory appeared whole.
    Incremental,
    /// Delete the listed paths on the target: run from a scratch source that holds
    /// only their parent directories, so each listed path is a missing argument.
    DeleteOnly,
    /// `--delete` of the whole transfer, restricted by the rules file.
    Resync,
    /// The listings of a catch-up: `--dirs --delete` of the `./DIR/.` on stdin.
    Listing,
    /// Two-way targets only: the listed files *from* the peer, where its copy is newer
    /// (a file dated older than the peer's was written here, by a rename or a restore:
    /// the push kept the peer's, so newest wins on this side too).
    Pull,
    /// Two-way targets only, a dry run: what a whole-root run *from* the peer would
    /// bring here (the peer's copy newer or missing here; never deleting), itemized
    /// with size and mtime so that files the peer is still writing can be told apart.
    PullList,
}

/// A command line that cannot be built (a retryable failure: the config may be fixed).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ArgError(String);

/// The program to run: `$SYNCBUS_RSYNC` or `rsync` from PATH.
pub fn rsync_program() -> OsString {
    std::env::var_os("SYNCBUS_RSYNC")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "rsync".into())
}

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

/// rsync's `-e` value for an ssh target. rsync splits it on spaces honouring quotes, so
/// each word is single-quoted; a word with a `'` is refused rather than guessed at.
pub fn ssh_command(
    port: Option<u16>,
    identity: Option<&Path>,
    options: &[String],
) -> Result<String, ArgError> {
    let mut words: Vec<String> = vec!["ssh".into()];
    if let Some(p) = port {
        words.push("-p".into());
        words.push(p.to_string());
    }
    if let Some(i) = identity {
        words.push("-i".into());
        words.push(i.to_str().map(str::to_string).ok_or_else(|| {
            ArgError(format!(
                "identity file `{}` is not UTF-8, which rsync's -e cannot carry",
                i.display()
            ))
        })?);
    }
    words.extend(options.iter().cloned());
    let mut out = String::new();
    for w in &words {
        if w.contains('\'') {
            return Err(ArgError(format!(
                "ssh word `{w}` contains a single quote, which rsync's -e splitting cannot carry"
            )));
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push('\'');
        out.push_str(w);
        out.push('\'');
    }
    Ok(out)
}

/// The arguments every run to `target` shares, after the mode's own.
pub fn common_args(target: &Target) -> Result<Vec<OsString>, ArgError> {
    // No `--timeout`: with it, every run to a daemon without TCP_NODELAY on its side
    // costs ~20 ms more (measured: 33 → 52 ms per run on loopback). `run` enforces the
    // same I/O-inactivity limit from outside instead.
    let mut a: Vec<OsString> = Vec::new();
    if let Some(b) = &target.bwlimit {
        a.push(format!("--bwlimit={b}").into());
    }
    // The destination directory may not exist yet (first run, new root subdirectory).
    a.push("--mkpath".into());
    match &target.endpoint {
        Endpoint::Rsync { password_file, .. } => {
            // Nagle + delayed ACK cost 90–170 ms per run on loopback; 5 ms without.
            a.push("--sockopts=TCP_NODELAY".into());
            a.push("--contimeout=10".into());
            if let Some(f) = password_file {
                let mut s = OsString::from("--password-file=");
                s.push(f);
                a.push(s);
            }
        }
        Endpoint::Ssh {
            port,
            identity_file,
            options,
            ..
        } => {
            a.push("-e".into());
            a.push(ssh_command(*port, identity_file.as_deref(), options)?.into());
        }
        Endpoint::Local { .. }
        | Endpoint::Command { .. }
        | Endpoint::Http { .. }
        | Endpoint::Tcp { .. } => {}
    }
    a.extend(target.extra_args.iter().map(OsString::from));
    Ok(a)
}

/// The full argv (without the program) of one run from `root` to `dest`.
pub fn build_args(
    target: &Target,
    mode: &Mode,
    rules_file: Option<&Path>,
    root: &Path,
    dest: &str,
) -> Result<Vec<OsString>, ArgError> {
    let mut a: Vec<OsString> = vec!["-a".into()];
    match mode {
        Mode::Incremental => {
            a.push("--force".into());
            a.push("--delete-missing-args".into());
            // Every listed path is known to have changed: rsync's quick check (same
            // size, same mtime second) would skip a quick rewrite, so skip the check.
            a.push("--ignore-times".into());
            // Directory times to the nanosecond too (else a directory created within
            // the second of its source's mtime keeps its own): the catch-up reads a
            // directory whose time differs on the target as "another directory".
            a.push("--modify-window=-1".into());
            a.push("--files-from=-".into());
        }
        Mode::DeleteOnly => {
            a.push("--force".into());
            a.push("--delete-missing-args".into());
            // The scratch parents must not overwrite the target's directories.
            a.push("--no-implied-dirs".into());
            a.push("--files-from=-".into());
        }
        Mode::Listing => {
            // The direct entries of the listed directories (`./DIR/.`), no deeper (see
            // catchup.rs). Times to the second on purpose: changed files go in their
            // own run, and a child directory whose time differs by less is the same.
            a.push("--no-recursive".into());
            a.push("--dirs".into());
            a.push("--delete".into());
            a.push("--force".into());
            a.push("--files-from=-".into());
        }
        Mode::Pull => {
            a.push("--ignore-missing-args".into());
            a.push("--files-from=-".into());
        }
        Mode::PullList => {
            a.push("--dry-run".into());
            a.push("--modify-window=-1".into());
        }
        Mode::Resync => {
            a.push("--delete".into());
            a.push("--force".into());
            // Compare mtimes to the nanosecond (rsync >= 3.1.3): a rewrite of the same
            // size within the same second, made while no event could be seen, must
            // not pass the quick check.
            a.push("--modify-window=-1".into());
        }
    }
    if target.two_way {
        two_way_args(&mut a);
    }
    // Also makes rsync read the merged rules file NUL-separated.
    a.push("--from0".into());
    if let Some(f) = rules_file {
        let mut s = OsString::from("--filter=merge ");
        s.push(f);
        a.push(s);
    }
    a.extend(common_args(target)?);
    let mut local = root.as_os_str().to_os_string();
    local.push("/");
    if matches!(mode, Mode::Pull | Mode::PullList) {
        a.push(dest.into());
        a.push(local);
    } else {
        a.push(local);
        a.push(dest.into());
    }
    Ok(a)
}

/// A run to the other side of a two-way pair. The peer's watcher must be able to tell
/// what this run did from what its users do, and nothing newer over there may be lost:
/// - newest wins: `--update` keeps a file that is newer on the peer (its own syncbus
///   brings it here), and the quick check (to the nanosecond) replaces `--ignore-times`,
///   so a file that is already the same over there is not written again;
/// - files are written in the peer's `.syncbus/incoming/` and renamed into place, and
///   what a run replaces or deletes is moved into its `.syncbus/backup/`: the peer sees
///   renames from and into its own `.syncbus/`, which it does not send back;
/// - compares never delete (the peer may hold new files this side has not seen yet):
///   deletes travel only as deletes of named paths;
/// - directory times are not set: each setting would be an attribute change over there,
///   sent back here by the peer.
fn two_way_args(a: &mut Vec<OsString>) {
    a.retain(|o| o != "--ignore-times" && o != "--delete");
    a.push("--update".into());
    a.push("--omit-dir-times".into());
    a.push(format!("--temp-dir={}", protocol::config::TWO_WAY_INCOMING).into());
    a.push("--backup".into());
    a.push(format!("--backup-dir={}", protocol::config::TWO_WAY_BACKUP).into());
    a.push(format!("--exclude=/{}/", protocol::config::TWO_WAY_DIR).into());
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
pub type Sink<'a> = &'a (dyn Fn(&[u8]) + Sync);

/// How one run ended.
#[derive(Debug)]
pub struct RunResult {
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
pub fn run(
    program: &OsString,
    args: &[OsString],
    stdin: &[u8],
    idle: Option<Duration>,
    stdout: Option<Sink>,
    setup: &dyn Fn(&mut Command),
    tick: impl FnMut(Duration) -> bool,
) -> RunResult {
    run_classified(
        program, args, stdin, idle, stdout, setup, classify, false, tick,
    )
}

/// [`run`] for a program of the user's (a command target): only exit 0 is success,
/// anything else is retried. It runs in a process group of its own: whatever it leaves
/// behind when it exits, or when `tick` stops it, is killed with it (a background
/// child holding its pipes would otherwise hold up the worker).
pub fn run_user_program(
    program: &OsString,
    args: &[OsString],
    stdin: &[u8],
    setup: &dyn Fn(&mut Command),
    tick: impl FnMut(Duration) -> bool,
) -> RunResult {
    let zero_or_retry = |code: Option<i32>| match code {
        Some(0) => Outcome::Success,
        _ => Outcome::Retry,
    };
    run_classified(
        program,
        args,
        stdin,
        None,
        None,
        setup,
        zero_or_retry,
        true,
        tick,
    )
}

#[allow(clippy::too_many_arguments)]
fn run_classified(
    program: &OsString,
    args: &[OsString],
    stdin: &[u8],
    idle: Option<Duration>,
    stdout: Option<Sink>,
    setup: &dyn Fn(&mut Command),
    classify: fn(Option<i32>) -> Outcome,
    group: bool,
    mut tick: impl FnMut(Duration) -> bool,
) -> RunResult {
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
                let outcome = classify(st.code());
                let error = match outcome {
                    Outcome::Success => String::new(),
                    _ => {
                        let how = match (st.code(), st.signal()) {
                            (Some(c), _) => format!("{name} exited with code {c}"),
                            (None, Some(sig)) => format!("{name} killed by signal {sig}"),
                            _ => format!("{name} ended: {st}"),
                        };
                        if tail.is_empty() {
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
    use std::path::PathBuf;

    #[test]
    fn exit_code_table() {
        use Outcome::*;
        let table: &[(Option<i32>, Outcome)] = &[
            (Some(0), Success),
            (Some(24), Success),
            (Some(1), Fatal),
            (Some(2), Fatal),
            (Some(4), Fatal),
            (Some(25), Fatal),
            (Some(3), Retry),
            (Some(5), Retry),
            (Some(6), Retry),
            (Some(10), Retry),
            (Some(11), Retry),
            (Some(12), Retry),
            (Some(13), Retry),
            (Some(14), Retry),
            (Some(20), Retry),
            (Some(21), Retry),
            (Some(22), Retry),
            (Some(23), Partial),
            (Some(30), Retry),
            (Some(35), Retry),
            (Some(255), Retry),
            (Some(77), Retry),
            (None, Retry),
        ];
        for &(code, want) in table {
            assert_eq!(classify(code), want, "exit {code:?}");
        }
        assert_eq!(classify_status(ExitStatus::from_raw(9)), Retry, "SIGKILL");
        assert_eq!(classify_status(ExitStatus::from_raw(24 << 8)), Success);
    }

    fn target(endpoint: Endpoint) -> Target {
        Target {
            name: "t".into(),
            endpoint,
            roots: vec!["www".into()],
            timeout: 30,
            bwlimit: None,
            extra_args: vec!["--chmod=D755".into()],
            two_way: false,
            conflict_copies: false,
            allow_wipe: false,
            on_failure: Default::default(),
        }
    }

    fn strings(a: Vec<OsString>) -> Vec<String> {
        a.into_iter()
            .map(|s| s.into_string().unwrap())
            .collect::<Vec<_>>()
    }

    #[test]
    fn argv_for_an_rsync_daemon() {
        let mut t = target(Endpoint::Rsync {
            url: "rsync://h:8730/m/".into(),
            password_file: Some(PathBuf::from("/etc/p w")),
        });
        t.bwlimit = Some("2M".into());
        let a = build_args(
            &t,
            &Mode::Incremental,
            Some(Path::new("/run/x/rules")),
            Path::new("/srv/www"),
            &t.destination("www"),
        )
        .unwrap();
        assert_eq!(
            strings(a),
            [
                "-a",
                "--force",
                "--delete-missing-args",
                "--ignore-times",
                "--modify-window=-1",
                "--files-from=-",
                "--from0",
                "--filter=merge /run/x/rules",
                "--bwlimit=2M",
                "--mkpath",
                "--sockopts=TCP_NODELAY",
                "--contimeout=10",
                "--password-file=/etc/p w",
                "--chmod=D755",
                "/srv/www/",
                "rsync://h:8730/m/",
            ]
        );
    }

    #[test]
    fn argv_for_ssh_quotes_every_word() {
        let t = target(Endpoint::Ssh {
            dest: "u@h:/data/".into(),
            port: Some(2222),
            identity_file: Some(PathBuf::from("/k/id ed")),
            options: vec!["-o".into(), "StrictHostKeyChecking=yes".into()],
        });
        let a = build_args(&t, &Mode::Resync, None, Path::new("/srv"), "u@h:/data/").unwrap();
        assert_eq!(
            strings(a),
            [
                "-a",
                "--delete",
                "--force",
                "--modify-window=-1",
                "--from0",
                "--mkpath",
                "-e",
                "'ssh' '-p' '2222' '-i' '/k/id ed' '-o' 'StrictHostKeyChecking=yes'",
                "--chmod=D755",
                "/srv/",
                "u@h:/data/",
            ]
        );
        let e = ssh_command(None, None, &["-o".into(), "ProxyCommand=it's".into()]);
        assert!(e.unwrap_err().to_string().contains("single quote"));
    }

    #[test]
    fn argv_for_a_local_dir_has_nothing_extra() {
        let mut t = target(Endpoint::Local {
            path: PathBuf::from("/backup"),
        });
        t.timeout = 0;
        t.extra_args.clear();
        let a = build_args(&t, &Mode::Incremental, None, Path::new("/srv"), "/backup/").unwrap();
        assert_eq!(
            strings(a),
            [
                "-a",
                "--force",
                "--delete-missing-args",
                "--ignore-times",
                "--modify-window=-1",
                "--files-from=-",
                "--from0",
                "--mkpath",
                "/srv/",
                "/backup/"
            ]
        );
    }

    #[test]
    fn two_way_runs_keep_what_is_newer_and_never_delete_in_a_compare() {
        let mut t = target(Endpoint::Local {
            path: PathBuf::from("/peer"),
        });
        t.two_way = true;
        t.extra_args.clear();
        let own = [
            "--update",
            "--omit-dir-times",
            "--temp-dir=.syncbus/incoming",
            "--backup",
            "--backup-dir=.syncbus/backup",
            "--exclude=/.syncbus/",
        ];
        for mode in [
            Mode::Incremental,
            Mode::Resync,
            Mode::Listing,
            Mode::DeleteOnly,
            Mode::Pull,
            Mode::PullList,
        ] {
            let a = strings(build_args(&t, &mode, None, Path::new("/srv"), "/peer/").unwrap());
            for want in own {
                assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
            }
            for never in ["--delete", "--ignore-times"] {
                assert!(!a.iter().any(|x| x == never), "{never} in {a:?}");
            }
        }
    }

    #[test]
    fn delete_only_runs_never_touch_the_parents_on_the_target() {
        let t = target(Endpoint::Local {
            path: PathBuf::from("/backup"),
        });
        let a = strings(
            build_args(
                &t,
                &Mode::DeleteOnly,
                None,
                Path::new("/scratch"),
                "/backup/",
            )
            .unwrap(),
        );
        for want in [
            "--delete-missing-args",
            "--no-implied-dirs",
            "--files-from=-",
            "--force",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        assert!(!a.iter().any(|x| x == "--delete" || x == "-r"), "{a:?}");
    }

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
