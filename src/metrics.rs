//! `syncbus metrics`: the Prometheus endpoint, a stage of its own. It serves `GET
//! /metrics` from the same status files as `syncbus status` (see [`crate::status`]),
//! so a scrape never waits on the mirror and a hung stage shows as down instead of
//! hanging the scrape. Loopback by default (`[metrics] listen`); no file names ever
//! appear in it, only root and target names and figures.
//!
//! A port already taken (say, by a second syncbus on the host) is a warning: the
//! mirror matters more than its metrics.
//!
//! Each connection is served on a thread of its own within [`IO_TIMEOUT`] all told, and
//! at most [`MAX_OPEN`] at once (more are closed at once): idle or slow clients, which
//! any local user can open, neither delay other scrapes nor pile up.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::bus::Shutdown;
use protocol::config::Config;
use protocol::stage::StageError;
use protocol::status::{self, StageStatus};

/// Largest request head read; a scraper sends a few hundred bytes.
const MAX_REQUEST: usize = 8192;
/// All a client gets to send its request, and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once; a scraper needs one.
const MAX_OPEN: usize = 32;

pub(crate) fn run(config: &Config, shutdown: &Shutdown) -> Result<(), StageError> {
    let board = Arc::new(Mutex::new(StageStatus::new("metrics", protocol::now_us())));
    let _status = status::Writer::shared(&config.runtime_dir, "metrics", &board);
    let listener = match config.metrics {
        None => {
            tracing::info!("metrics endpoint off ([metrics] listen = \"off\")");
            None
        }
        Some(addr) => match TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(listen = %addr, error = %e, "cannot serve /metrics (set [metrics] listen to a free port, or \"off\"); the mirror runs on");
                None
            }
        },
    };
    if let Some(l) = &listener {
        let bound = l
            .local_addr()
            .map_err(|e| StageError::Failed(format!("metrics socket: {e}")))?;
        l.set_nonblocking(true)
            .map_err(|e| StageError::Failed(format!("metrics socket: {e}")))?;
        if let Ok(mut b) = board.lock() {
            b.listen = bound.to_string();
        }
        tracing::info!(url = %format!("http://{bound}/metrics"), "metrics endpoint listening");
    }
    // Connections being served now (each on its own thread, each done within
    // IO_TIMEOUT); a stop does not wait for them.
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds = [
            libc::pollfd {
                fd: shutdown.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_ref().map_or(-1, |l| l.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd for the duration of the call (fd -1 is ignored).
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        status::beat(&board);
        shutdown.drain();
        if shutdown.requested() {
            return Ok(());
        }
        let Some(l) = &listener else { continue };
        while let Ok((stream, _)) = l.accept() {
            if open.load(Ordering::Acquire) >= MAX_OPEN {
                // Closed at once: the client may try again.
                continue;
            }
            open.fetch_add(1, Ordering::AcqRel);
            let (slot, config) = (open.clone(), config.clone());
            let spawned = std::thread::Builder::new()
                .name("metrics-conn".into())
                .spawn(move || {
                    if let Err(e) = serve(stream, &config) {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                    slot.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                // No thread, no connection: its slot is free again.
                open.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Answers one request and closes the connection.
fn serve(mut stream: TcpStream, config: &Config) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let left = || {
        let d = deadline.saturating_duration_since(std::time::Instant::now());
        (!d.is_zero())
            .then_some(d)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))
    };
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        stream.set_read_timeout(Some(left()?))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let (code, kind, body) = match (method, path) {
        (b"GET" | b"HEAD", b"/metrics") => {
            let r = crate::status::report(
                Some(config),
                &config.runtime_dir,
                crate::status::DEFAULT_LAG,
            );
            let mut text = crate::status::metrics_text(&r);
            text.push_str(&process_text(&config.runtime_dir, &r));
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text)
        }
        (b"GET" | b"HEAD", b"/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "syncbus: the metrics are at /metrics\n".to_string(),
        ),
        (b"GET" | b"HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != b"HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out)
}

/// What `/proc/PID` says of one process.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct ProcStats {
    cpu_s: f64,
    rss_bytes: u64,
    open_fds: u64,
    start_time_s: f64,
}

/// Reads `/proc/PID/stat` and `/proc/PID/fd` (None: gone, or not ours to read).
fn proc_stats(pid: u32) -> Option<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let btime = std::fs::read_to_string("/proc/stat").ok()?;
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    parse_stat(&stat, &btime, open_fds)
}

/// proc(5): the fields after the command name (which may hold spaces and parentheses,
/// so the split is at the last `)`); utime, stime and starttime in clock ticks, rss in
/// pages; `btime` from /proc/stat is the boot time in seconds since the epoch.
fn parse_stat(stat: &str, proc_stat: &str, open_fds: u64) -> Option<ProcStats> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is f[N - 3].
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    // SAFETY: sysconf(3) has no preconditions.
    let (tick, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    let btime: u64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(ProcStats {
        cpu_s: (num(14)? + num(15)?) as f64 / tick,
        rss_bytes: num(24)? * page,
        open_fds,
        start_time_s: btime as f64 + num(22)? as f64 / tick,
    })
}

/// `syncbus_build_info` and the standard process metrics (Prometheus client
/// conventions) of the process that runs the instance: `syncbus run` (its pid from its
/// status file), else this one (the metrics stage run alone). Each stage's CPU and
/// memory too, labelled, since the work is done there.
fn process_text(runtime_dir: &std::path::Path, r: &crate::status::Report) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP syncbus_build_info The running syncbus version.\n# TYPE syncbus_build_info gauge\nsyncbus_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let supervisor = status::read_all(&status::dir(runtime_dir))
        .ok()
        .and_then(|f| f.get("supervisor").map(|s| s.pid))
        .filter(|&pid| pid != 0);
    let main = supervisor
        .and_then(proc_stats)
        .or_else(|| proc_stats(std::process::id()));
    if let Some(p) = main {
        let _ = write!(
            o,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
             # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}\n\
             # HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}\n\
             # HELP process_open_fds Number of open file descriptors.\n\
             # TYPE process_open_fds gauge\nprocess_open_fds {}\n\
             # HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n\
             # TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {}\n",
            p.cpu_s, p.rss_bytes, p.open_fds, p.start_time_s
        );
    }
    let stages: Vec<(&String, ProcStats)> = r
        .stages
        .iter()
        .filter(|(_, v)| v.up && v.pid != 0)
        .filter_map(|(n, v)| Some((n, proc_stats(v.pid)?)))
        .collect();
    if !stages.is_empty() {
        o.push_str("# HELP syncbus_stage_cpu_seconds_total CPU time of each stage's process (user and system).\n# TYPE syncbus_stage_cpu_seconds_total counter\n");
        for (n, p) in &stages {
            let _ = writeln!(
                o,
                "syncbus_stage_cpu_seconds_total{{stage=\"{n}\"}} {}",
                p.cpu_s
            );
        }
        o.push_str("# HELP syncbus_stage_resident_memory_bytes Resident memory of each stage's process.\n# TYPE syncbus_stage_resident_memory_bytes gauge\n");
        for (n, p) in &stages {
            let _ = writeln!(
                o,
                "syncbus_stage_resident_memory_bytes{{stage=\"{n}\"}} {}",
                p.rss_bytes
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_is_read_past_a_command_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime priority nice threads itreal starttime
        // vsize rss …
        let stat = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 3 0 1000 123456 300 18446744073709551615";
        // SAFETY: sysconf(3) has no preconditions.
        let (tick, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK) as f64,
                libc::sysconf(libc::_SC_PAGESIZE) as u64,
            )
        };
        let p = parse_stat(stat, "cpu 1 2 3\nbtime 1700000000\n", 7).unwrap();
        assert_eq!(p.cpu_s, 400.0 / tick);
        assert_eq!(p.rss_bytes, 300 * page);
        assert_eq!(p.open_fds, 7);
        assert_eq!(p.start_time_s, 1_700_000_000.0 + 1000.0 / tick);
        assert!(parse_stat("42 (x", "btime 1\n", 0).is_none());
    }

    #[test]
    fn this_process_reads_itself() {
        let p = proc_stats(std::process::id()).unwrap();
        assert!(
            p.rss_bytes > 0 && p.open_fds > 0 && p.start_time_s > 1.6e9,
            "{p:?}"
        );
    }
}
