//! `syncbus`, the one command users type: `run` supervises the whole pipeline on this
//! machine, `watcher` / `filter` / `dispatcher` run one stage (for systemd or supervisor
//! units), `check-config` validates a config file, `import-sersync` converts a sersync
//! config, `demo` mirrors a local demo tree.

#![warn(unreachable_pub)]

mod docs;
mod import_sersync;
mod instance;
mod metrics;
mod service;
mod status;
mod supervisor;
mod tail;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use protocol::config::{Config, Environment};
use protocol::stage::{EXIT_CONFIG, EXIT_DATAERR, EXIT_NOINPUT, EXIT_USAGE};

#[derive(Parser)]
#[command(
    name = "syncbus",
    version,
    about = "Mirror directory trees to other machines in real time (inotify + rsync on a ZeroMQ bus)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole pipeline (watcher, filter, dispatcher, retrier, scheduler) and keep it running.
    ///
    /// Either `--config FILE`, or `--source DIR` with one or more `--target URL`
    /// (like `lsyncd -rsync SRC TARGET`). URL is `rsync://[user@]host[:port]/module/path`,
    /// `[user@]host:path` (ssh) or a local directory.
    Run(supervisor::RunArgs),
    /// Follow the change stream, like `inotifywait -m` for the bus (`--json` for
    /// machines; `--root`, `--path GLOB` to filter). Lost messages are reported.
    Tail(tail::TailArgs),
    /// Show the health of a running syncbus: stages, roots (watches, events, initial
    /// sync), targets (lag, backlog, last success, failures, bytes sent).
    ///
    /// Exits 0 healthy, 1 warning (catching up), 2 critical (a stage down, a target
    /// failing or far behind), 3 unknown (not running): fit for systemd, Kubernetes
    /// and Nagios probes.
    Status(status::StatusArgs),
    /// Validate a config file: every error with file, line and key; exit 78 (EX_CONFIG) if bad.
    ///
    /// By default it also checks this machine as `syncbus run` would: each root is a
    /// directory, password and header files are private, command programs run. With
    /// `--no-environment` it checks syntax and meaning only, for a config written for
    /// another machine (a package, a config repository, CI).
    CheckConfig {
        /// The config file (syncbus.toml).
        file: PathBuf,
        /// Check syntax and meaning only; look at no file or program the config names.
        #[arg(long)]
        no_environment: bool,
    },
    /// Print the work the retry journal still owes, as a shell script of rsync commands
    /// (sersync's `rsync_fail_log.sh`, every name quoted). Safe while syncbus runs.
    FailLog {
        /// Which instance: `--config`, a one-liner's `--source`, or `--runtime-dir`.
        #[command(flatten)]
        which: instance::Which,
    },
    /// Convert a sersync 2.5 config (confxml.xml) into a syncbus config, on stdout.
    ///
    /// `syncbus import-sersync confxml.xml > syncbus.toml`. The TOML carries a comment at
    /// each decision; stderr gets a report in three lists: what was mapped, what was
    /// changed on purpose, and what has no equivalent. Read it, then run
    /// `syncbus check-config syncbus.toml`. The file may be ISO-8859-1 or UTF-8. Exit 66
    /// (EX_NOINPUT) when it cannot be read, 65 (EX_DATAERR) when it is not a usable
    /// sersync config; the message names the file, and the line and column where there
    /// is one.
    ImportSersync {
        /// The sersync config (confxml.xml).
        file: PathBuf,
    },
    /// Mirror a demo tree (`demo/src` → `demo/mirror`) with an embedded config.
    Demo {
        /// Where to put the demo tree and its config.
        #[arg(long, default_value = "demo")]
        dir: PathBuf,
    },
    /// Run the watcher stage alone: `syncbus watcher --config FILE`.
    #[command(disable_help_flag = true)]
    Watcher {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the filter stage alone: `syncbus filter --config FILE`.
    #[command(disable_help_flag = true)]
    Filter {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the retrier stage alone: `syncbus retrier --config FILE`.
    #[command(disable_help_flag = true)]
    Retrier {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the scheduler stage alone: `syncbus scheduler --config FILE`.
    #[command(disable_help_flag = true)]
    Scheduler {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Serve the Prometheus endpoint (`[metrics] listen`, loopback by default) alone:
    /// `syncbus metrics --config FILE`. `syncbus run` runs it as one of its stages.
    #[command(disable_help_flag = true)]
    Metrics {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the dispatcher stage alone: `syncbus dispatcher --config FILE [--target NAME]…`.
    #[command(disable_help_flag = true)]
    Dispatcher {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    // `syncbus generate-docs DIR` (for scripts/package.sh) is not a clap subcommand:
    // clap_complete would offer even a hidden one in the completions it writes.
    let mut args = std::env::args_os().skip(1);
    if let (Some("generate-docs"), Some(dir), None) = (
        args.next().as_deref().and_then(|a| a.to_str()),
        args.next(),
        args.next(),
    ) {
        return docs::run(std::path::Path::new(&dir));
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE as u8)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Cmd::Run(args) => supervisor::run(args),
        Cmd::CheckConfig {
            file,
            no_environment,
        } => check_config(
            &file,
            if no_environment {
                Environment::Ignored
            } else {
                Environment::Checked
            },
        ),
        Cmd::Tail(args) => tail::run(args),
        Cmd::Status(args) => status::run(args),
        Cmd::FailLog { which } => fail_log(&which),
        Cmd::ImportSersync { file } => import_sersync(&file),
        Cmd::Demo { dir } => supervisor::demo(&dir),
        Cmd::Watcher { args } => {
            protocol::stage::stage_main("watcher", args, |c, _, s| watcher::run(c, s))
        }
        Cmd::Filter { args } => {
            protocol::stage::stage_main("filter", args, |c, _, s| filter::run(c, s))
        }
        Cmd::Retrier { args } => {
            protocol::stage::stage_main("retrier", args, |c, _, s| retrier::run(c, s))
        }
        Cmd::Scheduler { args } => {
            protocol::stage::stage_main("scheduler", args, |c, _, s| scheduler::run(c, s))
        }
        Cmd::Metrics { args } => {
            protocol::stage::stage_main("metrics", args, |c, _, s| metrics::run(c, s))
        }
        Cmd::Dispatcher { args } => protocol::stage::stage_main("dispatcher", args, |c, a, s| {
            dispatcher::run(c, &a.targets, s)
        }),
    }
}

fn check_config(file: &std::path::Path, environment: Environment) -> ExitCode {
    match Config::load_in(file, environment) {
        Ok(c) => {
            protocol::outln!(
                "{}: ok ({} root{}, {} target{})",
                file.display(),
                c.roots.len(),
                if c.roots.len() == 1 { "" } else { "s" },
                c.targets.len(),
                if c.targets.len() == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            protocol::errln!("{errors}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
    }
}

fn fail_log(which: &instance::Which) -> ExitCode {
    let config = match instance::find_config(which) {
        Ok(c) => c,
        Err(msg) => {
            protocol::errln!("{msg}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    match retrier::fail_log(&config) {
        Ok(text) => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            protocol::errln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn import_sersync(file: &std::path::Path) -> ExitCode {
    use std::io::Write;
    let name = file.display().to_string();
    let converted = std::fs::read(file)
        .map_err(|source| import_sersync::ImportError::Read {
            file: name.clone(),
            source,
        })
        .and_then(|bytes| import_sersync::convert(&bytes, &name));
    match converted {
        Ok(c) => {
            protocol::err!("{}", c.report());
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(c.toml.as_bytes()).and_then(|()| out.flush()) {
                protocol::errln!("cannot write the converted config: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            protocol::errln!("{e}");
            // The sersync file is this command's input, not syncbus's config.
            ExitCode::from(match e {
                import_sersync::ImportError::Read { .. } => EXIT_NOINPUT,
                import_sersync::ImportError::Invalid { .. } => EXIT_DATAERR,
            } as u8)
        }
    }
}
