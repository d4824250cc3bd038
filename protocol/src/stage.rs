//! The common `main` of every stage binary: `syncbus-<stage> --config FILE [--log-json]`
//! (also reached as `syncbus <stage> …`). Loads the config, installs the signal handlers
//! and calls the stage's `run`, mapping its outcome to an exit code the supervisor and
//! systemd understand.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::bus::{self, Shutdown};
use crate::config::{Config, EXIT_BAD_CONFIG};

/// Exit code for an environment limit a restart cannot fix (EX_CONFIG), e.g. the inotify
/// watch limit: the supervisor stops instead of restarting in a loop.
pub const EXIT_ENVIRONMENT: i32 = 78;
/// Exit code for a missing service or program (EX_UNAVAILABLE): rsync not installed,
/// the runtime dir held by another instance. Not restarted either.
pub const EXIT_UNAVAILABLE: i32 = 69;

/// How a stage ended, beyond plain success.
#[derive(Debug)]
pub enum StageError {
    /// Fix the machine, not the process (exit 78, not restarted).
    Environment(String),
    /// Something this stage needs is missing, e.g. rsync (exit 69, not restarted).
    Unavailable(String),
    /// Anything else (exit 1, restarted by the supervisor).
    Failed(String),
}

impl<E: std::error::Error> From<E> for StageError {
    fn from(e: E) -> Self {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        StageError::Failed(msg)
    }
}

/// Options every stage accepts.
pub struct StageArgs {
    pub config: PathBuf,
    pub log_json: bool,
    /// `--target NAME` (repeatable; dispatcher only): serve just these targets.
    pub targets: Vec<String>,
}

const USAGE: &str = "usage: syncbus {stage} --config FILE [--log-json] [--target NAME]…";

/// Parses the stage options; `Err` holds the message for a usage error.
pub fn parse_args(
    stage: &str,
    args: impl IntoIterator<Item = OsString>,
) -> Result<StageArgs, String> {
    let usage = || USAGE.replace("{stage}", stage);
    let mut config = None;
    let mut log_json = false;
    let mut targets = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--config" | "-c") => config = it.next().map(PathBuf::from),
            Some("--log-json") => log_json = true,
            Some("--target") => targets.push(
                it.next()
                    .and_then(|t| t.into_string().ok())
                    .ok_or_else(|| format!("--target needs a name\n{}", usage()))?,
            ),
            Some("--help" | "-h") => return Err(usage()),
            _ => return Err(format!("unexpected argument {a:?}\n{}", usage())),
        }
    }
    let config = config.ok_or_else(|| format!("--config FILE is required\n{}", usage()))?;
    Ok(StageArgs {
        config,
        log_json,
        targets,
    })
}

/// Runs a stage to completion and returns its exit code.
pub fn stage_main(
    stage: &str,
    args: impl IntoIterator<Item = OsString>,
    run: impl FnOnce(&Config, &StageArgs, &Shutdown) -> Result<(), StageError>,
) -> ExitCode {
    let args = match parse_args(stage, args) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    bus::init_logging(args.log_json);
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    let shutdown = match Shutdown::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(stage, error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = bus::ensure_runtime_dir(&config.runtime_dir) {
        tracing::error!(stage, error = %e, "cannot use the runtime dir");
        return ExitCode::from(EXIT_ENVIRONMENT as u8);
    }
    tracing::info!(stage, config = %args.config.display(), pid = std::process::id(), "stage starting");
    match run(&config, &args, &shutdown) {
        Ok(()) => {
            tracing::info!(stage, "stage stopped");
            ExitCode::SUCCESS
        }
        Err(StageError::Environment(msg)) => {
            tracing::error!(stage, error = %msg, "stage cannot run here");
            ExitCode::from(EXIT_ENVIRONMENT as u8)
        }
        Err(StageError::Unavailable(msg)) => {
            tracing::error!(stage, error = %msg, "stage cannot run here");
            ExitCode::from(EXIT_UNAVAILABLE as u8)
        }
        Err(StageError::Failed(msg)) => {
            tracing::error!(stage, error = %msg, "stage failed");
            ExitCode::FAILURE
        }
    }
}
