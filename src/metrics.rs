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

pub fn run(config: &Config, shutdown: &Shutdown) -> Result<(), StageError> {
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
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                crate::status::metrics_text(&r),
            )
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
