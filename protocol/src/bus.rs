//! ZeroMQ plumbing shared by all stages: where the sockets live, how they are made
//! (explicit high-water marks and linger), how a stage learns it must stop, and logging.
//!
//! Topology (binder first): the filter binds `raw` (PULL) and `changes` (PUB); the
//! watcher connects a PUSH to `raw`; dispatchers and outsiders connect SUBs to `changes`.
//! The retrier binds `reports` (PULL) and `jobs` (PUB); dispatchers and the scheduler
//! connect PUSHes to `reports`, dispatchers a SUB to `jobs`.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use crate::config::Config;

/// High-water mark of every socket. Inside the pipeline PUSH blocks at this mark
/// (back-pressure); a PUB drops for the subscriber that is this far behind, and the
/// subscriber sees the gap in `seq`.
pub const HWM: i32 = 100_000;
/// How long a closing socket may spend flushing what it still holds.
pub const LINGER: Duration = Duration::from_secs(2);
/// Interval of the filter's heartbeats (an empty change batch per root).
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// A socket that could not be set up, or a runtime dir not fit for sockets.
#[derive(Debug, Error)]
pub enum BusError {
    /// A ZeroMQ call on an endpoint failed.
    #[error("zmq {op} `{endpoint}`: {source}")]
    Zmq {
        /// The call that failed (`bind`, `connect`, …).
        op: &'static str,
        /// The endpoint it was done on.
        endpoint: String,
        /// ZeroMQ's error.
        #[source]
        source: zmq::Error,
    },
    /// The runtime dir cannot hold the sockets safely.
    #[error("runtime dir `{path}`: {message}")]
    RuntimeDir {
        /// The runtime dir.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// The endpoints of one syncbus instance.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The watcher's raw events to the filter (the filter binds a PULL).
    pub raw: String,
    /// The filter's change stream (it binds a PUB).
    pub changes: String,
    /// Reports to the retrier (it binds a PULL).
    pub reports: String,
    /// The retrier's acknowledgements and retry jobs (it binds a PUB).
    pub jobs: String,
    /// The public delivery stream (the retrier binds a PUB and relays what dispatchers
    /// report).
    pub deliveries: String,
}

impl Endpoints {
    /// The endpoints of the instance `config` describes (`ipc://` in its runtime dir).
    pub fn new(config: &Config) -> Self {
        let ipc = |name: &str| format!("ipc://{}", config.runtime_dir.join(name).display());
        Endpoints {
            raw: ipc("raw.sock"),
            changes: ipc("changes.sock"),
            reports: ipc("reports.sock"),
            jobs: ipc("jobs.sock"),
            deliveries: ipc("deliveries.sock"),
        }
    }
}

/// Creates the runtime dir with mode 0700, or checks that an existing one is ours and
/// private: anyone who can write there can inject changes into the mirror.
pub fn ensure_runtime_dir(path: &Path) -> Result<(), BusError> {
    private_dir(path)
        .map(drop)
        .map_err(|message| BusError::RuntimeDir {
            path: path.to_path_buf(),
            message,
        })
}

/// Creates `path` (mode 0700) or takes the existing one, and proves it is this user's
/// own: the last component is opened without following a symlink, and owner and mode
/// are read from the opened directory, which is returned so that callers can work
/// inside it without resolving the path again. Its parent must not let others replace
/// it (not writable by others, or sticky like /tmp). `Err` is the reason, for a message
/// that names the dir.
///
/// Another local user can otherwise pre-create the dir (in /tmp) as a symlink to a dir
/// the victim owns, pass a check that follows it, and swap it later for one of his own.
pub fn private_dir(path: &Path) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| format!("cannot create its parent: {e}"))?;
        let meta = std::fs::metadata(parent).map_err(|e| format!("its parent: {e}"))?;
        let mode = meta.permissions().mode();
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(format!(
                "its parent `{}` is writable by anyone and not sticky (mode {:04o}): others could replace it",
                parent.display(),
                mode & 0o7777
            ));
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create: {e}")),
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "a NUL byte in the path".to_string())?;
    // SAFETY: open(2) with a NUL-terminated path; the fd is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                "not a directory of its own (a symlink or a file): refusing it, someone else may have made it; remove it".to_string()
            }
            _ => format!("cannot open: {e}"),
        });
    }
    // SAFETY: `fd` is a descriptor we just opened and own from here on.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let meta = std::fs::File::from(fd.try_clone().map_err(|e| e.to_string())?)
        .metadata()
        .map_err(|e| e.to_string())?;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if meta.uid() != uid {
        return Err(format!("owned by uid {}, not by us ({uid})", meta.uid()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!("mode {mode:04o}, expected 0700"));
    }
    Ok(fd)
}

/// A socket with the house settings: explicit HWMs, linger, fast reconnects.
pub fn socket(ctx: &zmq::Context, kind: zmq::SocketType) -> Result<zmq::Socket, BusError> {
    let s = ctx.socket(kind).map_err(|source| BusError::Zmq {
        op: "socket",
        endpoint: String::new(),
        source,
    })?;
    let set = |r: zmq::Result<()>| {
        r.map_err(|source| BusError::Zmq {
            op: "setsockopt",
            endpoint: String::new(),
            source,
        })
    };
    set(s.set_sndhwm(HWM))?;
    set(s.set_rcvhwm(HWM))?;
    // Only what a socket sends is worth lingering for; a receiving socket's queued
    // subscriptions to a peer that is gone would hold up the exit for nothing.
    let sends = matches!(kind, zmq::PUSH | zmq::PUB);
    set(s.set_linger(if sends { LINGER.as_millis() as i32 } else { 0 }))?;
    set(s.set_reconnect_ivl(50))?;
    set(s.set_reconnect_ivl_max(1000))?;
    Ok(s)
}

/// Binds `s` to `endpoint`; the error names the endpoint.
pub fn bind(s: &zmq::Socket, endpoint: &str) -> Result<(), BusError> {
    s.bind(endpoint).map_err(|source| BusError::Zmq {
        op: "bind",
        endpoint: endpoint.to_string(),
        source,
    })
}

/// Binds an optional public copy of a stream (`bus.tcp_*`): a failure is logged, not
/// fatal, so a taken port never stops the pipeline.
pub fn bind_public(s: &zmq::Socket, endpoint: &str, what: &str) {
    if endpoint.starts_with("tcp://[") {
        let _ = s.set_ipv6(true);
    }
    match s.bind(endpoint) {
        Ok(()) => tracing::info!(
            endpoint,
            "{what} also on TCP (no authentication: see docs/wire-format.md)"
        ),
        Err(e) => {
            tracing::warn!(endpoint, error = %e, "cannot publish the {what} on TCP; going on without it")
        }
    }
}

/// Connects `s` to `endpoint`; the error names the endpoint.
pub fn connect(s: &zmq::Socket, endpoint: &str) -> Result<(), BusError> {
    s.connect(endpoint).map_err(|source| BusError::Zmq {
        op: "connect",
        endpoint: endpoint.to_string(),
        source,
    })
}

/// A SUB on the delivery stream for `targets`, connected to `endpoint` (left
/// unconnected, and so silent, when there are none).
pub fn deliveries_of<'a>(
    ctx: &zmq::Context,
    endpoint: &str,
    targets: impl IntoIterator<Item = &'a str>,
) -> Result<zmq::Socket, BusError> {
    let s = socket(ctx, zmq::SUB)?;
    let mut any = false;
    for t in targets {
        let topic = crate::wire::deliveries_topic(t);
        s.set_subscribe(topic.as_bytes())
            .map_err(|source| BusError::Zmq {
                op: "subscribe",
                endpoint: topic,
                source,
            })?;
        any = true;
    }
    if any {
        connect(&s, endpoint)?;
    }
    Ok(s)
}

/// Sends `[topic, msgpack(msg)]`, blocking while the peer is at its high-water mark.
pub fn send<T: Serialize>(s: &zmq::Socket, topic: &str, msg: &T) -> Result<(), BusError> {
    let payload = crate::wire::encode(msg);
    s.send_multipart([topic.as_bytes(), &payload[..]], 0)
        .map_err(|source| BusError::Zmq {
            op: "send",
            endpoint: topic.to_string(),
            source,
        })
}

/// One received `[topic, payload]`.
pub type Frame = (Vec<u8>, Vec<u8>);

/// Receives one `[topic, payload]` without blocking; `None` when nothing is queued.
/// Malformed frames (wrong part count) are returned as an empty topic.
pub fn try_recv(s: &zmq::Socket) -> Result<Option<Frame>, BusError> {
    match s.recv_multipart(zmq::DONTWAIT) {
        Ok(mut parts) if parts.len() == 2 => {
            let payload = parts.pop().unwrap_or_default();
            let topic = parts.pop().unwrap_or_default();
            Ok(Some((topic, payload)))
        }
        Ok(_) => Ok(Some((Vec::new(), Vec::new()))),
        Err(zmq::Error::EAGAIN) => Ok(None),
        Err(source) => Err(BusError::Zmq {
            op: "recv",
            endpoint: String::new(),
            source,
        }),
    }
}

/// SIGTERM / SIGINT / SIGHUP delivered as a readable fd (for `zmq::poll`) plus flags.
/// The first SIGTERM or SIGINT asks for a drain; a second one means "now".
pub struct Shutdown {
    read: UnixStream,
    _write: OwnedFd,
    stop: Arc<AtomicBool>,
    hup: Arc<AtomicBool>,
    count: Arc<std::sync::atomic::AtomicUsize>,
}

impl Shutdown {
    /// Installs the SIGTERM, SIGINT and SIGHUP handlers this value reports.
    pub fn install() -> std::io::Result<Self> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let hup = Arc::new(AtomicBool::new(false));
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for sig in [SIGTERM, SIGINT] {
            signal_hook::flag::register(sig, stop.clone())?;
            let c = count.clone();
            // SAFETY: the closure only does an atomic add, which is async-signal-safe.
            unsafe {
                signal_hook::low_level::register(sig, move || {
                    c.fetch_add(1, Ordering::SeqCst);
                })?;
            }
        }
        signal_hook::flag::register(SIGHUP, hup.clone())?;
        let write_fd = OwnedFd::from(write.try_clone()?);
        for sig in [SIGTERM, SIGINT, SIGHUP] {
            signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
        }
        Ok(Shutdown {
            read,
            _write: write_fd,
            stop,
            hup,
            count,
        })
    }

    /// The fd to poll: readable after any handled signal. Call [`Shutdown::drain`] then.
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Empties the wake-up pipe.
    pub fn drain(&self) {
        use std::io::Read;
        let mut buf = [0u8; 64];
        while matches!((&self.read).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// True once SIGTERM or SIGINT has arrived: the stage should drain and stop.
    pub fn requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// A second SIGTERM/SIGINT: stop without draining.
    pub fn urgent(&self) -> bool {
        self.count.load(Ordering::SeqCst) >= 2
    }

    /// True once per SIGHUP.
    pub fn take_hup(&self) -> bool {
        self.hup.swap(false, Ordering::SeqCst)
    }

    /// A flag that turns true on the first SIGTERM/SIGINT, for worker threads.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

/// Logging for operators: human lines on stderr, JSON lines with `json`; the level from
/// `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::fmt::format;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // The journal stamps each line itself and files it under the priority of its
    // `<N>` prefix: no second timestamp, no colours, and `journalctl -p err` works.
    let journal = crate::out::stderr_is_journal();
    let _ = match (journal, json) {
        (true, true) => builder
            .with_ansi(false)
            .event_format(Journald(format().json().without_time()))
            .try_init(),
        (true, false) => builder
            .with_ansi(false)
            .event_format(Journald(format().without_time()))
            .try_init(),
        (false, true) => builder.json().try_init(),
        (false, false) => builder.try_init(),
    };
}

/// A log line for journald: the inner format's line with the syslog priority of its
/// level as a `<N>` prefix (sd-daemon(3)), on each line of a message that has several
/// (a config's errors), so that none of them is filed as INFO.
struct Journald<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Journald<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        let priority = journal_priority(*event.metadata().level());
        // The level is padded to five columns for terminals; the journal needs no pad.
        for l in line.trim_start().lines() {
            writeln!(writer, "<{priority}>{l}")?;
        }
        Ok(())
    }
}

/// syslog(3) priorities: ERROR → err (3), WARN → warning (4), INFO → info (6), DEBUG
/// and TRACE → debug (7).
fn journal_priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

/// A random epoch for a publisher that just started.
pub fn new_epoch() -> u64 {
    rand::random::<u64>() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_dir_is_created_private_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        ensure_runtime_dir(&d).unwrap();
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = ensure_runtime_dir(&d).unwrap_err().to_string();
        assert!(e.contains("mode 0755, expected 0700"), "{e}");
    }

    /// Another user's trap: the dir pre-made as a symlink to a private dir we own, which
    /// a check that follows symlinks would take as ours.
    #[test]
    fn a_symlink_in_place_of_the_dir_is_refused_even_to_our_own_private_dir() {
        let t = tempfile::tempdir().unwrap();
        let ours = t.path().join("ours");
        std::fs::create_dir(&ours).unwrap();
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = t.path().join("syncbus-0");
        std::os::unix::fs::symlink(&ours, &link).unwrap();
        let e = ensure_runtime_dir(&link).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");

        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_runtime_dir(&open.join("run"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("writable by anyone and not sticky"), "{e}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_runtime_dir(&open.join("run")).unwrap();
    }

    #[test]
    fn push_pull_round_trip_over_ipc() {
        let t = tempfile::tempdir().unwrap();
        let ep = format!("ipc://{}/x.sock", t.path().display());
        let ctx = zmq::Context::new();
        let pull = socket(&ctx, zmq::PULL).unwrap();
        bind(&pull, &ep).unwrap();
        let push = socket(&ctx, zmq::PUSH).unwrap();
        connect(&push, &ep).unwrap();
        send(&push, "raw/", &42u32).unwrap();
        pull.set_rcvtimeo(5000).unwrap();
        let parts = pull.recv_multipart(0).unwrap();
        assert_eq!(parts[0], b"raw/");
        assert_eq!(rmp_serde::from_slice::<u32>(&parts[1]).unwrap(), 42);
    }
}
