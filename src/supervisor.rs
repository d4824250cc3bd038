//! `syncbus run`: starts the stages as child processes of this one, restarts any that
//! dies (with backoff), stops them upstream first on SIGTERM so each can drain into the
//! next, and re-reads the config on SIGHUP. It holds no business logic.
//!
//! # Invariants
//! - One `syncbus run` per runtime dir (an flock on `run.lock`).
//! - Children are in their own process group (a terminal's Ctrl-C reaches only us, so
//!   the stop order holds) and get SIGTERM from the kernel if we die
//!   (`PR_SET_PDEATHSIG`), so no stage outlives a killed supervisor.
//! - A stage that exits 64, 69, 71 or 78 (`protocol::stage`: a bad command line,
//!   something missing, a kernel limit, a bad config) is not restarted: everything
//!   stops and `syncbus run` exits with that code.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::bus::{self, Shutdown};
use protocol::config::Config;
use protocol::stage::{EXIT_CONFIG, EXIT_OSERR, EXIT_UNAVAILABLE, EXIT_USAGE};
use protocol::status::{self, StageStatus};

use crate::instance::{self, PlanError, RunWhat};

/// The stages of [`protocol::stage::STAGES`] in start order: the binders first (the retrier binds the
/// report and job sockets, the filter the raw and change sockets), the watcher after
/// them. Stop order follows the data flow: watcher, filter, dispatcher (which hands
/// what is left to the retrier), retrier; each with its grace.
const START_ORDER: [&str; 6] = [
    "retrier",
    "filter",
    "dispatcher",
    "watcher",
    "scheduler",
    "metrics",
];
const STOP_ORDER: [(&str, Duration); 6] = [
    ("metrics", Duration::from_secs(5)),
    ("scheduler", Duration::from_secs(5)),
    ("watcher", Duration::from_secs(5)),
    ("filter", Duration::from_secs(5)),
    // The dispatcher's own drain grace is 10 s; give it room to finish.
    ("dispatcher", Duration::from_secs(15)),
    ("retrier", Duration::from_secs(5)),
];
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a stage that died waits before its restart, after `failures` in a row.
fn restart_delay(failures: u32) -> Duration {
    protocol::backoff::delay(BACKOFF_MIN, BACKOFF_MAX, failures, 0.0, 0.0)
}

/// A stage that ran this long before dying starts again from the shortest backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct RunArgs {
    /// The config file (syncbus.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Mirror this directory, without a config file (needs `--target`).
    #[arg(long, conflicts_with = "config", requires = "targets")]
    source: Option<PathBuf>,
    /// Where `--source` goes (repeatable): rsync://…, `[user@]host:path` or a directory.
    #[arg(long = "target", conflicts_with = "config", requires = "source")]
    targets: Vec<String>,
    /// Directory for the bus sockets (mode 0700). Default: the config's `bus.runtime_dir`.
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Directory of the retry journal and fail log. Default: the config's `retry.state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Let whole-root compares delete on the targets even from an empty root or one on
    /// another file system than at the last run (`allow_wipe = true` on every root,
    /// for this run only). Without it, such a compare deletes nothing and status says
    /// CRITICAL: an unmounted disk looks exactly like that.
    #[arg(long)]
    allow_wipe: bool,
    /// Log JSON lines instead of human text (passed on to every stage).
    #[arg(long)]
    log_json: bool,
}

struct Stage {
    name: &'static str,
    child: Option<Child>,
    started: Instant,
    restarts: u32,
    /// Deaths (or failed starts) in a row, for the restart backoff.
    failures: u32,
    next_start: Option<Instant>,
}

impl RunArgs {
    fn what(&self) -> RunWhat<'_> {
        RunWhat {
            config: self.config.as_deref(),
            source: self.source.as_deref(),
            targets: &self.targets,
            runtime_dir: self.runtime_dir.as_deref(),
            state_dir: self.state_dir.as_deref(),
            allow_wipe: self.allow_wipe,
        }
    }
}

pub fn run(args: RunArgs) -> ExitCode {
    bus::init_logging(args.log_json);
    let plan = match instance::plan(&args.what()) {
        Ok(p) => p,
        Err(PlanError::Usage(msg)) => {
            protocol::errln!("{msg}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
        Err(PlanError::Config(errors, generated)) => {
            protocol::errln!("{errors}");
            if generated {
                protocol::errln!("(in the config generated from --source/--target)");
            }
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let config = &plan.config;
    if config.targets.iter().any(|t| t.runs_rsync()) {
        if let Err(msg) = dispatcher::command::find_rsync() {
            tracing::error!("{msg}");
            return ExitCode::from(EXIT_UNAVAILABLE as u8);
        }
    }
    // Both dirs are this instance's before anything is written into either: a second
    // `syncbus run` sharing one of them is refused here, having changed nothing.
    let held = match Held::take(config) {
        Ok(h) => h,
        Err((code, msg)) => {
            tracing::error!("{msg}");
            return ExitCode::from(code);
        }
    };
    if let Err(msg) = plan.write_generated() {
        tracing::error!("{msg}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let staged = match StagedConfig::of(&plan) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot hand the generated config to the stages");
            return ExitCode::from(EXIT_OSERR as u8);
        }
    };
    let shutdown = match Shutdown::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot find my own executable");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        config = %plan.file.display(),
        runtime_dir = %config.runtime_dir.display(),
        roots = config.roots.len(),
        targets = config.targets.len(),
        "syncbus starting"
    );
    let loaded = sections(&plan.text);
    let catch_up = take_checkpoint(config, &loaded);
    let mut sup = Supervisor {
        exe,
        runtime_dir: config.runtime_dir.clone(),
        state_dir: config.retry.state_dir.clone(),
        args,
        staged,
        held,
        catch_up,
        loaded,
        stages: START_ORDER
            .iter()
            .map(|&name| Stage {
                name,
                child: None,
                started: Instant::now(),
                restarts: 0,
                failures: 0,
                next_start: Some(Instant::now()),
            })
            .collect(),
        board: Arc::new(Mutex::new(StageStatus::new(
            "supervisor",
            protocol::now_us(),
        ))),
        service: crate::service::Service::new(),
        config: config.clone(),
    };
    // What a killed run left there is not about this one.
    status::clear(&sup.runtime_dir);
    let _status = status::Writer::shared(&sup.runtime_dir, "supervisor", &sup.board);
    let code = sup.supervise(&shutdown);
    tracing::info!(code, "syncbus stopped");
    ExitCode::from(code)
}

/// The runtime and state dirs, held: opened without following symlinks, checked to be
/// this user's own and private ([`bus::private_dir`]), and locked, for as long as
/// `syncbus run` runs.
struct Held {
    runtime_dir: PathBuf,
    state_dir: PathBuf,
    /// (device, inode) of the runtime dir as opened: the path naming another one later
    /// means it was removed (or replaced) under us.
    runtime_id: (u64, u64),
    _dirs: Vec<OwnedFd>,
    _locks: Vec<File>,
}

impl Held {
    /// `Err((exit code, message))`.
    fn take(config: &Config) -> Result<Held, (u8, String)> {
        let open = |dir: &Path, what: &str| {
            bus::private_dir(dir).map_err(|m| {
                (
                    EXIT_CONFIG as u8,
                    format!("cannot use the {what} `{}`: {m}", dir.display()),
                )
            })
        };
        let runtime = open(&config.runtime_dir, "runtime dir")?;
        let state = open(&config.retry.state_dir, "state dir")?;
        let id = |fd: &OwnedFd| {
            File::from(fd.try_clone().ok()?)
                .metadata()
                .ok()
                .map(|m| (m.dev(), m.ino()))
        };
        let runtime_id = id(&runtime).unwrap_or_default();
        let unavailable = |m: String| (EXIT_UNAVAILABLE as u8, m);
        let mut locks =
            vec![lock(&runtime, &config.runtime_dir, "runtime dir").map_err(unavailable)?];
        // One dir for both is one lock (a second flock of the same file would fail).
        if id(&state) != Some(runtime_id) {
            locks.push(lock(&state, &config.retry.state_dir, "state dir").map_err(unavailable)?);
        }
        Ok(Held {
            runtime_dir: config.runtime_dir.clone(),
            state_dir: config.retry.state_dir.clone(),
            runtime_id,
            _dirs: vec![runtime, state],
            _locks: locks,
        })
    }

    /// Whether the runtime dir's path still names the dir we hold.
    fn runtime_dir_intact(&self) -> bool {
        std::fs::symlink_metadata(&self.runtime_dir)
            .is_ok_and(|m| m.is_dir() && (m.dev(), m.ino()) == self.runtime_id)
    }
}

/// Takes a dir's lock, so two instances never share sockets or a journal. The lock file
/// is opened inside the held dir, never through a symlink. `what` is "runtime dir" or
/// "state dir", for the message.
fn lock(dir_fd: &OwnedFd, dir: &Path, what: &str) -> Result<File, String> {
    let name = std::ffi::CString::new(instance::LOCK_FILE).expect("no NUL in a constant");
    // SAFETY: openat(2) relative to a directory fd we hold, with a NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir_fd.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    let path = dir.join(instance::LOCK_FILE);
    if fd < 0 {
        return Err(format!(
            "cannot open `{}`: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` was just opened and is owned by the File from here on.
    let mut f = unsafe { File::from_raw_fd(fd) };
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(format!(
            "another `syncbus run` (pid {}) uses the {what} `{}`; stop it, or give this one its own ({})",
            holder.trim(),
            dir.display(),
            if what == "state dir" {
                "`retry.state_dir` or `--state-dir`"
            } else {
                "`bus.runtime_dir` or `--runtime-dir`"
            }
        ));
    }
    use std::io::Write;
    let _ = f.set_len(0);
    let _ = writeln!(f, "{}", std::process::id());
    Ok(f)
}

/// How the stages get their config: the user's file by its path, or a generated one as
/// a sealed memfd each stage inherits as fd 3 (`--config /dev/fd/3`), so no stage ever
/// reads a config from a dir where someone else might have put one.
enum StagedConfig {
    File(PathBuf),
    Memfd(OwnedFd),
}

/// The fd number a stage finds a generated config at.
const CONFIG_FD: i32 = 3;

impl StagedConfig {
    fn of(plan: &instance::Plan) -> std::io::Result<StagedConfig> {
        if !plan.generated {
            return Ok(StagedConfig::File(plan.file.clone()));
        }
        let name = std::ffi::CString::new("syncbus.toml").expect("no NUL in a constant");
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just made.
        let mut f = unsafe { File::from_raw_fd(fd) };
        std::io::Write::write_all(&mut f, plan.text.as_bytes())?;
        let seals =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(StagedConfig::Memfd(OwnedFd::from(f)))
    }

    /// The `--config` argument, and the fd to hand over as [`CONFIG_FD`].
    fn arg(&self) -> (std::ffi::OsString, Option<i32>) {
        match self {
            StagedConfig::File(p) => (p.clone().into_os_string(), None),
            StagedConfig::Memfd(fd) => {
                (format!("/dev/fd/{CONFIG_FD}").into(), Some(fd.as_raw_fd()))
            }
        }
    }
}

/// The file in the state dir that holds the last clean stop's checkpoint.
const CHECKPOINT_FILE: &str = "checkpoint.toml";
/// Taken off a checkpoint: the kernel stamps ctimes with a coarse clock.
const CHECKPOINT_MARGIN_US: u64 = 1_000_000;

/// Reads and removes the checkpoint of the last clean stop (so a crash after this start
/// can never reuse it). Usable only if the roots and targets are the ones it was taken
/// with: a new target has never seen a full compare.
///
/// The two-way manifests beside it are kept for the dispatcher's catch-up only when the
/// checkpoint is used: a manifest of another stop would delete on the peer what was
/// never deleted here.
fn take_checkpoint(config: &Config, now: &toml::Table) -> Option<u64> {
    let _ = std::fs::remove_file(config.runtime_dir.join(watcher::STOPPED_FILE));
    clear_manifests(&config.runtime_dir);
    let taken = take_checkpoint_file(config, now);
    if taken.is_none() {
        clear_manifests(&config.retry.state_dir);
    }
    taken
}

fn take_checkpoint_file(config: &Config, now: &toml::Table) -> Option<u64> {
    let path = config.retry.state_dir.join(CHECKPOINT_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove the checkpoint; comparing in full");
        return None;
    }
    // The checkpoint vouches only for what was read before the stop; what was owed then
    // is in the journal. Without one (removed, emptied) the owed work is unknown.
    let journal = config.retry.state_dir.join("journal.redb");
    if std::fs::metadata(&journal).map_or(true, |m| m.len() == 0) {
        tracing::warn!(journal = %journal.display(), "the journal is missing or empty: comparing in full");
        return None;
    }
    let saved: toml::Table = toml::from_str(&text).ok()?;
    let same = ["root", "target"]
        .iter()
        .all(|k| saved.get(*k) == now.get(*k));
    let since = saved.get("since_us")?.as_integer()?;
    if since.max(0) as u64 > protocol::now_us() {
        // The clock went back: ctimes cannot be compared with it.
        tracing::info!("the clock is behind the last stop: comparing in full");
        return None;
    }
    let at_stop = Clocks {
        boot_id: saved.get("boot_id")?.as_str()?.to_string(),
        boottime_us: saved.get("boottime_us")?.as_integer()?.max(0) as u64,
        realtime_us: saved.get("realtime_us")?.as_integer()?.max(0) as u64,
    };
    if let Err(why) = at_stop.still_trusted(&Clocks::now()) {
        tracing::warn!("{why}: the file times since the stop cannot be trusted; comparing in full");
        return None;
    }
    if !same {
        tracing::info!("roots or targets changed since the last stop: comparing in full");
        return None;
    }
    Some((since.max(0) as u64).saturating_sub(CHECKPOINT_MARGIN_US))
}

/// Removes every two-way manifest (`protocol::manifest`) from `dir`.
fn clear_manifests(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if protocol::manifest::is_manifest_name(e.file_name().as_bytes()) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a two-way manifest");
            }
        }
    }
}

/// Moves the manifests the watcher wrote at its stop from the runtime dir into the state
/// dir (another file system, maybe: copied, synced, then removed), replacing those of
/// the last stop. One that cannot be moved is left out: without it the next start brings
/// what is missing here back from the peer rather than deleting it there.
fn keep_manifests(runtime_dir: &Path, state_dir: &Path) {
    clear_manifests(state_dir);
    let Ok(entries) = std::fs::read_dir(runtime_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !protocol::manifest::is_manifest_name(name.as_bytes()) {
            continue;
        }
        let dest = state_dir.join(&name);
        let tmp = state_dir.join(format!("{}.tmp", name.to_string_lossy()));
        let moved = std::fs::copy(e.path(), &tmp)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &dest));
        if let Err(err) = moved {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&dest);
            tracing::warn!(path = %e.path().display(), error = %err, "cannot keep the two-way manifest; the next start brings what is missing here back from the peer");
        }
        let _ = std::fs::remove_file(e.path());
    }
}

/// The clocks at one moment: enough to tell later whether the wall clock, which stamps
/// ctimes, may have gone back since (a checkpoint's time is then ahead of changes made
/// after it, and a catch-up would miss them).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Clocks {
    /// `/proc/sys/kernel/random/boot_id`: the boot clock means nothing across boots.
    boot_id: String,
    /// CLOCK_BOOTTIME: monotonic, counts suspend too.
    boottime_us: u64,
    /// CLOCK_REALTIME: what ctimes are stamped with.
    realtime_us: u64,
}

impl Clocks {
    fn now() -> Clocks {
        let read = |clock| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes one timespec we own.
            unsafe { libc::clock_gettime(clock, &mut ts) };
            ts.tv_sec.max(0) as u64 * 1_000_000 + ts.tv_nsec.max(0) as u64 / 1_000
        };
        Clocks {
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            boottime_us: read(libc::CLOCK_BOOTTIME),
            realtime_us: read(libc::CLOCK_REALTIME),
        }
    }

    /// `Err(why)` unless the wall clock provably never went back between `self` and
    /// `now`: the same boot, and the wall clock advanced as much as the boot clock, less
    /// what NTP may slew (500 ppm) and half a second.
    fn still_trusted(&self, now: &Clocks) -> Result<(), &'static str> {
        if self.boot_id.is_empty() || self.boot_id != now.boot_id {
            return Err("the machine restarted since the last stop");
        }
        let elapsed = now.boottime_us.saturating_sub(self.boottime_us);
        let slack = 500_000 + elapsed / 2_000;
        if now.realtime_us + slack < self.realtime_us + elapsed {
            return Err("the clock was set back since the last stop");
        }
        Ok(())
    }
}

/// The config sections each stage reads: a SIGHUP restarts only the stages whose
/// sections changed.
fn stage_sections(stage: &str) -> &'static [&'static str] {
    match stage {
        "watcher" | "filter" => &["bus", "root"],
        "dispatcher" => &["bus", "root", "target"],
        "retrier" => &["bus", "root", "target", "retry"],
        "scheduler" => &["bus", "root", "schedule"],
        "metrics" => &["bus", "root", "target", "metrics"],
        _ => &["bus", "root", "target", "retry", "schedule"],
    }
}

/// What of the config `stage` reads, as written: a SIGHUP restarts the stages whose
/// view changed. Roots take settings from the targets bound to them (a two-way target
/// makes its root tell the peer's writes apart, rest files, keep `.syncbus/` off every
/// target), so the watcher and the filter see those keys of the targets too.
fn stage_view(stage: &str, config: &toml::Table) -> toml::Table {
    let mut view: toml::Table = stage_sections(stage)
        .iter()
        .filter_map(|sec| Some((sec.to_string(), config.get(*sec)?.clone())))
        .collect();
    if matches!(stage, "watcher" | "filter") {
        if let Some(toml::Value::Array(targets)) = config.get("target") {
            let binding = targets
                .iter()
                .filter_map(|t| {
                    let t = t.as_table()?;
                    let keys = ["name", "roots", "two_way", "losers"];
                    let kept: toml::Table = keys
                        .iter()
                        .filter_map(|k| Some((k.to_string(), t.get(*k)?.clone())))
                        .collect();
                    Some(toml::Value::Table(kept))
                })
                .collect();
            view.insert("target".into(), toml::Value::Array(binding));
        }
    }
    view
}

/// A config's top-level tables as written (empty when unreadable: every stage then
/// counts as changed).
fn sections(text: &str) -> toml::Table {
    toml::from_str(text).unwrap_or_default()
}

struct Supervisor {
    exe: PathBuf,
    /// What `syncbus run` was asked to run: planned again at each SIGHUP.
    args: RunArgs,
    /// The config the stages are started with.
    staged: StagedConfig,
    held: Held,
    runtime_dir: PathBuf,
    state_dir: PathBuf,
    /// The checkpoint of the last clean stop, for the first dispatcher.
    catch_up: Option<u64>,
    /// The sections of the config the running stages were started with.
    loaded: toml::Table,
    stages: Vec<Stage>,
    /// What `syncbus status` learns from the supervisor: stages up, pids, restarts.
    board: Arc<Mutex<StageStatus>>,
    /// What systemd learns: ready, alive, the health in one line.
    service: crate::service::Service,
    /// The config the running stages were started with.
    config: Config,
}

impl Supervisor {
    fn supervise(&mut self, shutdown: &Shutdown) -> u8 {
        loop {
            self.start_due();
            self.post_status();
            self.service.tick(&self.config, &START_ORDER);
            let mut pfd = libc::pollfd {
                fd: shutdown.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            shutdown.drain();
            if shutdown.requested() {
                self.service.stopping();
                tracing::info!("stopping: watcher first, then filter, then dispatcher");
                if self.stop_all(shutdown) {
                    self.write_checkpoint();
                }
                return 0;
            }
            if shutdown.take_hup() {
                self.reload(shutdown);
            }
            if let Some(code) = self.reap() {
                let _ = self.stop_all(shutdown);
                return code;
            }
            if !self.held.runtime_dir_intact() {
                // Its sockets are gone with it: restarted stages could not meet. Stop
                // and let the service manager start us again, which makes it anew
                // (0700), rather than limp on.
                tracing::error!(
                    runtime_dir = %self.runtime_dir.display(),
                    "the runtime dir was removed or replaced while running; stopping (a new start makes it again)"
                );
                let _ = self.stop_all(shutdown);
                return 1;
            }
        }
    }

    fn post_status(&self) {
        let Ok(mut b) = self.board.lock() else { return };
        b.alive_us = protocol::now_us();
        for s in &self.stages {
            let c = b.stages.entry(s.name.to_string()).or_default();
            c.up = s.child.is_some();
            c.pid = s.child.as_ref().map_or(0, |c| c.id());
            c.restarts = s.restarts;
        }
    }

    fn spawn(&mut self, name: &'static str) -> std::io::Result<Child> {
        #[expect(
            clippy::disallowed_methods,
            reason = "the supervisor spawns its stages: this binary, argv only"
        )]
        let mut cmd = Command::new(&self.exe);
        let (config_arg, config_fd) = self.staged.arg();
        cmd.arg(name).arg("--config").arg(config_arg);
        cmd.env_remove(dispatcher::CATCH_UP_ENV);
        // systemd listens to us alone (NotifyAccess=main): we speak for the stages.
        for var in protocol::notify::ENV {
            cmd.env_remove(var);
        }
        if name == "dispatcher" {
            // Only the first dispatcher after a clean stop: a restart after a crash
            // compares in full.
            if let Some(t) = self.catch_up.take() {
                cmd.env(dispatcher::CATCH_UP_ENV, t.to_string());
            }
        }
        if self.args.log_json {
            cmd.arg("--log-json");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        // The parent-death signal is ours to ask for: a stage started alone (a unit, a
        // shell's `&`) must outlive whatever started it.
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec we only call async-signal-safe functions.
        unsafe {
            cmd.pre_exec(move || {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                // We may have died before the prctl: then no signal will ever come.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                // The generated config, as fd 3 without close-on-exec.
                if let Some(fd) = config_fd {
                    let kept = if fd == CONFIG_FD {
                        libc::fcntl(fd, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, CONFIG_FD)
                    };
                    if kept < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.spawn()
    }

    fn start_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.stages.len() {
            let due = self.stages[i].next_start.is_some_and(|t| t <= now);
            if !due || self.stages[i].child.is_some() {
                continue;
            }
            let name = self.stages[i].name;
            match self.spawn(name) {
                Ok(child) => {
                    tracing::info!(
                        stage = name,
                        pid = child.id(),
                        restarts = self.stages[i].restarts,
                        "stage started"
                    );
                    let s = &mut self.stages[i];
                    s.child = Some(child);
                    s.started = now;
                    s.next_start = None;
                    if let Ok(mut b) = self.board.lock() {
                        b.stages.entry(name.to_string()).or_default().since_us = protocol::now_us();
                    }
                }
                Err(e) => {
                    let s = &mut self.stages[i];
                    tracing::error!(stage = name, error = %e, "cannot start stage");
                    s.failures += 1;
                    s.next_start = Some(now + restart_delay(s.failures));
                }
            }
        }
    }

    /// Notices dead stages and schedules their restart; `Some(code)` when one died in
    /// a way a restart cannot fix.
    fn reap(&mut self) -> Option<u8> {
        for s in &mut self.stages {
            let Some(child) = s.child.as_mut() else {
                continue;
            };
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            s.child = None;
            let code = status.code();
            if matches!(
                code,
                Some(EXIT_USAGE | EXIT_UNAVAILABLE | EXIT_OSERR | EXIT_CONFIG)
            ) {
                tracing::error!(
                    stage = s.name,
                    code,
                    "stage cannot run with this config on this machine; stopping"
                );
                return code.map(|c| c as u8);
            }
            if s.started.elapsed() >= HEALTHY_AFTER {
                s.failures = 0;
            }
            s.failures += 1;
            let delay = restart_delay(s.failures);
            s.restarts += 1;
            tracing::warn!(
                stage = s.name,
                code,
                signal = status.signal(),
                restart_in_ms = delay.as_millis() as u64,
                restarts = s.restarts,
                "stage died; restarting"
            );
            s.next_start = Some(Instant::now() + delay);
        }
        None
    }

    fn stop_all(&mut self, shutdown: &Shutdown) -> bool {
        self.stop(shutdown, &START_ORDER)
    }

    /// Stops the named stages in data-flow order.
    /// Stops the named stages in data-flow order; true when every one of them was
    /// running and exited 0 on its own (a clean drain).
    fn stop(&mut self, shutdown: &Shutdown, which: &[&str]) -> bool {
        let mut clean = true;
        for (name, grace) in STOP_ORDER.into_iter().filter(|(n, _)| which.contains(n)) {
            let Some(s) = self.stages.iter_mut().find(|s| s.name == name) else {
                continue;
            };
            s.next_start = None;
            let Some(mut child) = s.child.take() else {
                clean = false;
                continue;
            };
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    clean &= status.success();
                    break;
                }
                if Instant::now() > deadline || shutdown.urgent() {
                    tracing::warn!(stage = name, "stage did not stop in time; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    clean = false;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        clean
    }

    /// After a clean stop: every change read by the watcher up to its stop time is on a
    /// target or in the journal. Records that time with the roots and targets it holds
    /// for, so the next start can compare only what changed since.
    fn write_checkpoint(&self) {
        let stopped = self.runtime_dir.join(watcher::STOPPED_FILE);
        let Some(since) = std::fs::read_to_string(&stopped)
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
        else {
            return;
        };
        let _ = std::fs::remove_file(&stopped);
        // Before the checkpoint that vouches for them (a crash in between leaves new
        // manifests without a checkpoint, which the next start removes).
        keep_manifests(&self.runtime_dir, &self.state_dir);
        let mut table = toml::Table::new();
        table.insert("since_us".into(), toml::Value::Integer(since));
        let clocks = Clocks::now();
        table.insert("boot_id".into(), clocks.boot_id.into());
        table.insert(
            "boottime_us".into(),
            toml::Value::Integer(clocks.boottime_us as i64),
        );
        table.insert(
            "realtime_us".into(),
            toml::Value::Integer(clocks.realtime_us as i64),
        );
        // The sections the stages ran with, not the file as it is now: an edit not yet
        // applied (no SIGHUP) must make the next start compare in full.
        for (k, v) in &self.loaded {
            if k == "root" || k == "target" {
                table.insert(k.clone(), v.clone());
            }
        }
        let Ok(text) = toml::to_string(&table) else {
            return;
        };
        let path = self.state_dir.join(CHECKPOINT_FILE);
        let tmp = self.state_dir.join("checkpoint.toml.tmp");
        let written = std::fs::create_dir_all(&self.state_dir)
            .and_then(|_| {
                let mut f = std::fs::File::create(&tmp)?;
                use std::io::Write;
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|_| std::fs::rename(&tmp, &path));
        match written {
            Ok(()) => tracing::info!(
                since_us = since,
                "clean stop: the next start compares only what changed since"
            ),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the checkpoint; the next start compares in full")
            }
        }
    }

    /// SIGHUP: a valid new config restarts the stages whose sections changed, upstream
    /// first (a restarted watcher or filter means a resync; the journal keeps what is
    /// pending); an invalid one is reported and the running pipeline kept.
    fn reload(&mut self, shutdown: &Shutdown) {
        // `READY=1` follows from the next ticks, once every root is watched again.
        self.service.reloading();
        let plan = match instance::plan(&self.args.what()) {
            Ok(p) => p,
            Err(PlanError::Config(errors, _)) => {
                tracing::error!(errors = %errors, "SIGHUP: new config is invalid; keeping the running one");
                return;
            }
            Err(PlanError::Usage(msg)) => {
                tracing::error!(error = %msg, "SIGHUP: cannot read the config; keeping the running one");
                return;
            }
        };
        if plan.config.runtime_dir != self.held.runtime_dir
            || plan.config.retry.state_dir != self.held.state_dir
        {
            tracing::error!("SIGHUP: the new config moves the runtime or state dir, which a running instance cannot do; keeping the running one (restart syncbus to move them)");
            return;
        }
        let staged = plan
            .write_generated()
            .map_err(std::io::Error::other)
            .and_then(|()| StagedConfig::of(&plan));
        match staged {
            Ok(s) => self.staged = s,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: cannot hand the new config to the stages; keeping the running one");
                return;
            }
        }
        self.config = plan.config.clone();
        let new = sections(&plan.text);
        let changed: Vec<&'static str> = self
            .stages
            .iter()
            .map(|s| s.name)
            .filter(|name| stage_view(name, &self.loaded) != stage_view(name, &new))
            .collect();
        self.loaded = new;
        if changed.is_empty() {
            tracing::info!("SIGHUP: config valid and unchanged; nothing restarted");
            return;
        }
        tracing::info!(stages = ?changed, "SIGHUP: config valid; restarting the stages it changes");
        let _ = self.stop(shutdown, &changed);
        // A watcher stopped for a reload leaves a stop time and manifests that no
        // checkpoint may take later: the final stop writes its own.
        if changed.contains(&"watcher") {
            let _ = std::fs::remove_file(self.runtime_dir.join(watcher::STOPPED_FILE));
            clear_manifests(&self.runtime_dir);
        }
        for s in self.stages.iter_mut().filter(|s| changed.contains(&s.name)) {
            s.next_start = Some(Instant::now());
            s.failures = 0;
        }
    }
}

const DEMO_CONFIG: &str = include_str!("../deploy/demo.toml");

/// `syncbus demo`: a local mirror with the embedded config, no remote server needed.
pub fn demo(dir: &Path) -> ExitCode {
    if let Err(msg) = dispatcher::command::find_rsync() {
        protocol::errln!("syncbus demo: {msg} (scripts/demo.sh does this for you)");
        return ExitCode::from(EXIT_UNAVAILABLE as u8);
    }
    let (src, mirror, file) = (
        dir.join("src"),
        dir.join("mirror"),
        dir.join("syncbus.toml"),
    );
    for d in [&src, &mirror] {
        if let Err(e) = std::fs::create_dir_all(d) {
            protocol::errln!("cannot create `{}`: {e}", d.display());
            return ExitCode::FAILURE;
        }
    }
    let hello = src.join("hello.txt");
    if !hello.exists() {
        let _ = std::fs::write(
            &hello,
            "Edit me: every change appears in demo/mirror within milliseconds.\n",
        );
    }
    if let Err(e) = std::fs::write(&file, DEMO_CONFIG) {
        protocol::errln!("cannot write `{}`: {e}", file.display());
        return ExitCode::FAILURE;
    }
    protocol::outln!(
        "syncbus demo: mirroring {} → {} (config: {}).\n\
         Try, in another terminal:  echo hi > {}/new.txt; ls -l {}\n\
         and see how it is doing:   syncbus status --config {}\n\
         Stop with Ctrl-C.",
        src.display(),
        mirror.display(),
        file.display(),
        src.display(),
        mirror.display(),
        file.display()
    );
    run(RunArgs {
        config: Some(file),
        source: None,
        targets: Vec::new(),
        runtime_dir: None,
        state_dir: None,
        allow_wipe: false,
        log_json: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_and_stop_order_each_name_every_stage_once() {
        let mut stages = protocol::stage::STAGES.to_vec();
        stages.sort_unstable();
        let mut start = START_ORDER.to_vec();
        start.sort_unstable();
        let mut stop: Vec<&str> = STOP_ORDER.iter().map(|(n, _)| *n).collect();
        stop.sort_unstable();
        assert_eq!(start, stages);
        assert_eq!(stop, stages);
    }

    fn at(boot_id: &str, boottime_s: u64, realtime_s: u64) -> Clocks {
        Clocks {
            boot_id: boot_id.into(),
            boottime_us: boottime_s * 1_000_000,
            realtime_us: realtime_s * 1_000_000,
        }
    }

    #[test]
    fn a_checkpoint_is_trusted_only_while_the_wall_clock_never_went_back() {
        let stop = at("b1", 100, 1_000_000);
        // An hour later, both clocks moved alike.
        assert_eq!(stop.still_trusted(&at("b1", 3_700, 1_003_600)), Ok(()));
        // The wall clock set forward meanwhile: changes still have later ctimes.
        assert_eq!(stop.still_trusted(&at("b1", 3_700, 1_009_000)), Ok(()));
        // Set back by 10 s within the hour (the clock was fast at the stop).
        assert!(stop.still_trusted(&at("b1", 3_700, 1_003_590)).is_err());
        // NTP's slew over a day (500 ppm, ~43 s) is not a step.
        assert_eq!(
            stop.still_trusted(&at("b1", 86_500, 1_086_400 - 40)),
            Ok(())
        );
        // Another boot, or no boot id: the boot clock says nothing.
        assert!(stop.still_trusted(&at("b2", 3_700, 1_003_600)).is_err());
        assert!(at("", 100, 1_000_000)
            .still_trusted(&at("", 3_700, 1_003_600))
            .is_err());
    }
}
