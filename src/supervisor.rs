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

mod checkpoint;
mod demo;
mod held;
mod reload;
mod staged;

use checkpoint::{take_checkpoint, CrashCheckpoint};
pub(crate) use demo::demo;
use held::Held;
use reload::sections;
use staged::{StagedConfig, CONFIG_FD};

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
pub(crate) struct RunArgs {
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

pub(crate) fn run(args: RunArgs) -> ExitCode {
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
        if let Err(msg) = dispatcher::find_rsync() {
            tracing::error!("{msg}");
            return ExitCode::from(EXIT_UNAVAILABLE as u8);
        }
    }
    // Both dirs are this instance's before anything is written into either: a second
    // `syncbus run` sharing one of them is refused here, having changed nothing.
    let held = match Held::take(config) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(e.exit_code());
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
        crash: CrashCheckpoint::new(config),
        config: config.clone(),
    };
    // What a killed run left there is not about this one.
    status::clear(&sup.runtime_dir);
    let _status = status::Writer::shared(&sup.runtime_dir, "supervisor", &sup.board);
    let code = sup.supervise(&shutdown);
    tracing::info!(code, "syncbus stopped");
    ExitCode::from(code)
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
    /// The checkpoint kept while running, for a start after a crash.
    crash: CrashCheckpoint,
    /// The config the running stages were started with.
    config: Config,
}

impl Supervisor {
    fn supervise(&mut self, shutdown: &Shutdown) -> u8 {
        loop {
            self.start_due();
            self.post_status();
            self.record_crash_checkpoint();
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
}
