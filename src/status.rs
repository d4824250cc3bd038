//! `syncbus status`: one look at a running syncbus, for people (a table), for scripts
//! (`--json`) and for probes (the exit code), and the same figures for Prometheus
//! ([`metrics_text`], served by `syncbus metrics`).
//!
//! Everything comes from the status files the stages keep in `<runtime_dir>/status`
//! (see `protocol::status`): reading them never waits on a stage, so a hung stage
//! cannot hang the probe. The exit code follows the Nagios plugin convention, which
//! systemd, Kubernetes and every monitoring tool understand: 0 healthy, 1 warning
//! (catching up: initial sync running, lag above `--warn-lag`), 2 critical (a stage
//! down, a target failing, lag above `--crit-lag`), 3 unknown (not running).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use protocol::config::Config;
use protocol::stage::EXIT_USAGE;
use protocol::status;

pub(crate) mod gather;
mod prometheus;
mod text;

pub(crate) use gather::{gather, Health, Report};
pub(crate) use prometheus::metrics_text;
use text::text;

#[derive(clap::Args)]
pub(crate) struct StatusArgs {
    /// Which instance (`--config`, a one-liner's `--source`, or `--runtime-dir`); with
    /// none, the default runtime dir, and a list of the one-liners running.
    #[command(flatten)]
    which: crate::instance::Which,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Redraw every second until interrupted (a quick view without Grafana).
    #[arg(long)]
    watch: bool,
    /// Replication lag (seconds) above which a target is a warning.
    #[arg(long, default_value_t = DEFAULT_LAG.0)]
    warn_lag: u64,
    /// Replication lag (seconds) above which a target is critical.
    #[arg(long, default_value_t = DEFAULT_LAG.1)]
    crit_lag: u64,
}

/// Lag (seconds) above which a target is a warning, and critical: `syncbus status`'s
/// defaults, and what `/metrics` reports `syncbus_health` with.
pub(crate) const DEFAULT_LAG: (u64, u64) = (30, 300);

/// True when a process with this pid exists (EPERM: it does, as another user's).
fn alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for existence and permission.
    pid != 0
        && (unsafe { libc::kill(pid as i32, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Reads the status files and builds the report now.
pub(crate) fn report(
    config: Option<&Config>,
    runtime_dir: &std::path::Path,
    lag: (u64, u64),
) -> Report {
    let dir = status::dir(runtime_dir);
    let (files, error) = match status::read_all(&dir) {
        Ok(f) => (f, None),
        Err(e) => (BTreeMap::new(), Some(e)),
    };
    let now = protocol::now_us();
    let mut r = gather(&files, config, runtime_dir.to_path_buf(), now, &alive, lag);
    if let Some(e) = error {
        // Not "not running": most often a probe run as another user (the runtime dir
        // is 0700).
        r.problems = vec![format!(
            "cannot read {}: {e} (run syncbus status as the user syncbus runs as)",
            dir.display()
        )];
    }
    r
}

pub(crate) fn run(args: StatusArgs) -> ExitCode {
    let (config, dir) = match crate::instance::find(&args.which) {
        Ok(x) => x,
        Err(e) => {
            protocol::errln!("{e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    let lag = (args.warn_lag, args.crit_lag.max(args.warn_lag));
    loop {
        let r = report(config.as_ref(), &dir, lag);
        let out = if args.json {
            serde_json::to_string_pretty(&r).expect("a report always serializes") + "\n"
        } else if r.health == Health::Unknown && args.which.is_default() {
            // Nothing at the default place: say which one-liners run, and how to ask.
            let running = crate::instance::running();
            let mut t = text(&r);
            if !running.is_empty() {
                t.push_str(crate::instance::listing(&running).trim_start());
                t.push_str(
                    "\n(ask about one with `syncbus status --source DIR` or `--runtime-dir DIR`)\n",
                );
            }
            t
        } else {
            text(&r)
        };
        if args.watch {
            // Home, clear, draw: like watch(1).
            let mut o = std::io::stdout().lock();
            let drawn = std::io::Write::write_all(&mut o, format!("\x1b[H\x1b[2J{out}").as_bytes())
                .and_then(|()| std::io::Write::flush(&mut o));
            if drawn.is_err() {
                // Nobody reads any more (the pipe or terminal is gone).
                return ExitCode::SUCCESS;
            }
            drop(o);
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        protocol::out!("{out}");
        return ExitCode::from(r.health as u8);
    }
}

#[cfg(test)]
mod tests;
