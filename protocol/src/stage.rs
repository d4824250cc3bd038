//! The common `main` of every stage binary: `syncbus-<stage> --config FILE [--log-json]`
//! (also reached as `syncbus <stage> …`). Loads the config, installs the signal handlers
//! and calls the stage's `run`, mapping its outcome to an exit code the supervisor and
//! systemd understand.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::bus::{self, Shutdown};
use crate::config::Config;

/// Every stage `syncbus run` runs, upstream first: the pipeline in the order changes
/// flow through it, the scheduler (which feeds the retrier), and metrics (which only
/// reads the others' status files). Each is also a `syncbus <stage>` subcommand and the
/// name of its status file.
pub const STAGES: [&str; 6] = [
    "watcher",
    "filter",
    "dispatcher",
    "retrier",
    "scheduler",
    "metrics",
];

// Exit codes, from sysexits(3) as systemd names them (`status=78/CONFIG`). None of them
// is restarted, by `syncbus run` or by the units (`RestartPreventExitStatus=64 69 71
// 78`): each needs a person to change something first. Any other failure exits 1 and
// is restarted.

/// EX_USAGE: the command line is wrong (an unknown option, `--config` missing).
pub const EXIT_USAGE: i32 = 64;
/// EX_DATAERR: a command's input is not what it takes (`import-sersync` of a file that
/// is not a usable sersync config).
pub const EXIT_DATAERR: i32 = 65;
/// EX_NOINPUT: a command's input file cannot be read (`import-sersync`).
pub const EXIT_NOINPUT: i32 = 66;
/// EX_UNAVAILABLE: something syncbus needs is missing or taken: rsync not installed,
/// the runtime or state dir (or the journal) held by another instance.
pub const EXIT_UNAVAILABLE: i32 = 69;
/// EX_OSERR: the kernel refuses a resource a restart will not get either: the inotify
/// instance limit (`fs.inotify.max_user_instances`), like sysexits' "cannot fork".
/// Not EX_UNAVAILABLE, so that the status alone tells "raise a sysctl" from "install
/// rsync" or "stop the other instance".
pub const EXIT_OSERR: i32 = 71;
/// EX_CONFIG: the config file is invalid or unreadable, or names a place in a state
/// syncbus refuses (a runtime or state dir that is a symlink, someone else's, not 0700).
pub const EXIT_CONFIG: i32 = 78;

/// How a stage ended, beyond plain success.
#[derive(Debug)]
pub enum StageError {
    /// A place the config names is not fit for use (exit 78, not restarted).
    Config(String),
    /// Fix the machine, not the process: a kernel limit (exit 71, not restarted).
    Environment(String),
    /// Something this stage needs is missing or held by another instance, e.g. rsync
    /// (exit 69, not restarted).
    Unavailable(String),
    /// Anything else (exit 1, restarted by the supervisor).
    Failed(String),
}

/// `e` and its sources, outermost first, joined by `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// A socket that cannot be made, bound, polled or sent on: the stage exits 1 and the
/// supervisor restarts it (a bind refused because the runtime dir is not ours is
/// caught before, as a `Config` error).
impl From<crate::bus::BusError> for StageError {
    fn from(e: crate::bus::BusError) -> Self {
        StageError::Failed(error_chain(&e))
    }
}

/// Options every stage accepts.
pub struct StageArgs {
    /// `--config FILE`: the config file.
    pub config: PathBuf,
    /// `--log-json`: log JSON lines instead of human text.
    pub log_json: bool,
    /// `--target NAME` (repeatable; dispatcher only): serve just these targets.
    pub targets: Vec<String>,
}

/// The usage line of a stage (only the dispatcher takes `--target`).
fn usage(stage: &str) -> String {
    let targets = if stage == "dispatcher" {
        " [--target NAME]…"
    } else {
        ""
    };
    format!("usage: syncbus {stage} --config FILE [--log-json]{targets}")
}

/// What the command line asks for, when it is not a run.
#[derive(Debug, PartialEq, Eq)]
pub enum ArgsError {
    /// `--help`: the text for stdout, exit 0.
    Help(String),
    /// A usage error: the message for stderr, exit 64.
    Usage(String),
}

/// The `--help` text of a stage.
fn help(stage: &str) -> String {
    let targets = if stage == "dispatcher" {
        "\n  --target NAME    serve only this target (repeatable; several dispatchers can split\n                   the targets between them)"
    } else {
        ""
    };
    format!(
        "Run the syncbus {stage} stage alone (for one systemd or supervisor unit per stage;\n\
         `syncbus run` runs every stage itself).\n\n{}\n\n\
         Options:\n  -c, --config FILE  the config file (syncbus.toml)\n  \
         --log-json       log JSON lines instead of human text{targets}\n  \
         -h, --help       print this help\n\n\
         Exit codes: 0 stopped on request, 64 bad command line, 69 something needed is missing\n\
         or taken, 71 a kernel limit, 78 bad config; 1 anything else (worth a restart).\n",
        usage(stage)
    )
}

/// Parses the stage options.
pub fn parse_args(
    stage: &str,
    args: impl IntoIterator<Item = OsString>,
) -> Result<StageArgs, ArgsError> {
    let mut config = None;
    let mut log_json = false;
    let mut targets = Vec::new();
    let mut it = args.into_iter();
    let bad = |m: String| ArgsError::Usage(format!("{m}\n{}", usage(stage)));
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--config" | "-c") => config = it.next().map(PathBuf::from),
            Some("--log-json") => log_json = true,
            Some("--target") => targets.push(
                it.next()
                    .and_then(|t| t.into_string().ok())
                    .ok_or_else(|| bad("--target needs a name".into()))?,
            ),
            Some("--help" | "-h") => return Err(ArgsError::Help(help(stage))),
            _ => return Err(bad(format!("unexpected argument {a:?}"))),
        }
    }
    let config = config.ok_or_else(|| bad("--config FILE is required".into()))?;
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
        Err(ArgsError::Help(text)) => {
            crate::out!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Usage(msg)) => {
            crate::errln!("{msg}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    bus::init_logging(args.log_json);
    crate::notify::stage_speaks_for_itself();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(errors) => {
            crate::errln!("{errors}");
            return ExitCode::from(EXIT_CONFIG as u8);
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
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    tracing::info!(stage, config = %args.config.display(), pid = std::process::id(), "stage starting");
    match run(&config, &args, &shutdown) {
        Ok(()) => {
            tracing::info!(stage, "stage stopped");
            ExitCode::SUCCESS
        }
        Err(StageError::Config(msg)) => {
            tracing::error!(stage, error = %msg, "stage cannot run with this config");
            ExitCode::from(EXIT_CONFIG as u8)
        }
        Err(StageError::Environment(msg)) => {
            tracing::error!(stage, error = %msg, "stage cannot run here");
            ExitCode::from(EXIT_OSERR as u8)
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
