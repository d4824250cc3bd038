//! The stage around the watches: the socket, the loop (one `match` over why it woke
//! up), the batches sent with a gap-free `seq`, the status, the drain at a stop.

mod limit;
mod read;
mod watches;

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inotify::{Inotify, Watches};
use protocol::bus::{self, BusError, Endpoints, Shutdown};
use protocol::config::Config;
use protocol::seq::Stamp;
use protocol::stage::StageError;
use protocol::status::{self, StageStatus};
use protocol::wire::{self, RawBatch, RawEvent, RawKind};
use protocol::PathBytes;
use tracing::{debug, info, warn};

use crate::error::{inotify_sysctl, WatcherError};
use crate::manifest;
use crate::pace::Pacer;
use crate::watch_map::{RootIx, WatchMap};
use crate::{MAX_BATCH, READ_BUFFER, STOPPED_FILE};

/// A blocked send wakes up this often to see whether shutdown was asked for.
const SEND_TIMEOUT_MS: i32 = 200;

/// Runs the watcher until `shutdown` is requested. Returns `Err` for what a restart cannot
/// fix ([`StageError::Environment`]: an inotify limit) or a broken bus.
pub fn run(config: &Config, shutdown: &Shutdown) -> Result<(), StageError> {
    run_inner(config, shutdown).map_err(WatcherError::into_stage_error)
}

fn run_inner(config: &Config, shutdown: &Shutdown) -> Result<(), WatcherError> {
    let ctx = zmq::Context::new();
    let sock = bus::socket(&ctx, zmq::PUSH)?;
    sock.set_sndtimeo(SEND_TIMEOUT_MS)
        .map_err(|source| BusError::Zmq {
            op: "setsockopt",
            endpoint: String::new(),
            source,
        })?;
    // Long enough for the filter to take a burst at the stop; the stop time below is
    // recorded only if everything was flushed within it.
    sock.set_linger(STOP_LINGER.as_millis() as i32)
        .map_err(|source| BusError::Zmq {
            op: "setsockopt",
            endpoint: String::new(),
            source,
        })?;
    let endpoint = Endpoints::new(config).raw;
    bus::connect(&sock, &endpoint)?;
    let mut w = Watcher::new(config, sock, shutdown)?;
    let _status = status::Writer::shared(&config.runtime_dir, "watcher", &w.board);
    info!(
        roots = config.roots.len(),
        epoch = w.stamp.epoch(),
        endpoint = %endpoint,
        "watcher started"
    );
    let result = w.main_loop();
    // The socket closes here and the context waits for what it holds to be delivered,
    // up to STOP_LINGER; returning sooner means everything reached the filter.
    drop(w);
    let flushing = Instant::now();
    drop(ctx);
    let flushed = flushing.elapsed() + Duration::from_millis(200) < STOP_LINGER;
    // Every change before this moment has been read and sent: `syncbus run` turns it
    // into a checkpoint if the stages after us stop cleanly too.
    if let (Ok(Some(stopped_at)), true) = (&result, flushed) {
        // Before the stop time: the supervisor takes a stop time to mean the manifests
        // of this stop are written (or failed, and are absent).
        manifest::write_all(config);
        let path = config.runtime_dir.join(STOPPED_FILE);
        if let Err(e) = std::fs::write(&path, stopped_at.to_string()) {
            warn!(path = %path.display(), error = %e, "cannot record the stop time");
        }
    }
    result.map(|_| ())
}

/// How far the read mark moves before an otherwise empty message tells the filter.
const MARK_EVERY: Duration = Duration::from_secs(1);

/// Bytes of events the kernel has queued on the inotify `fd` (`FIONREAD`).
fn queued_bytes(fd: std::os::fd::RawFd) -> Option<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int we own.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    (rc == 0).then_some(n.max(0) as u32)
}

/// How long a stopping watcher waits for the filter to take what it still holds.
const STOP_LINGER: Duration = Duration::from_secs(4);

/// Why the loop woke up. A wake-up can bring several; they are handled in this order.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// SIGTERM or SIGINT: stop watching, hand over what the kernel queued, return.
    Stop,
    /// inotify has events queued: one read, translated.
    Inotify,
    /// Every wake-up ends here, whether events came or a deadline (a missing root to
    /// look for, a root to walk again, the status) did: send what is queued.
    Tick,
}

struct RootState {
    name: String,
    path: PathBuf,
    alive: bool,
    /// One side of a two-way pair: its `.syncbus/` dirs must exist (and be watched, so
    /// the peer's renames out of and into them pair up in the filter).
    two_way: bool,
    /// When to look for a missing root next.
    next_check: Instant,
    /// Why some of its directories are not watched (the watch limit), and when to walk
    /// it again.
    unwatched: Option<(String, Instant)>,
}

struct Watcher<'a> {
    inotify: Inotify,
    watches: Watches,
    buf: Vec<u8>,
    roots: Vec<RootState>,
    map: WatchMap,
    sock: zmq::Socket,
    shutdown: &'a Shutdown,
    stamp: Stamp,
    out: Vec<RawEvent>,
    /// A send was abandoned because shutdown was asked for: send nothing more.
    abandoned: bool,
    /// Events read and overflows seen, per root.
    counts: Vec<(u64, u64)>,
    /// What the status file says, refreshed at most once per [`status::EVERY`] (a
    /// watch count walks the map).
    board: Arc<Mutex<StageStatus>>,
    next_post: Instant,
    /// Something the status shows changed since it was last posted.
    status_dirty: bool,
    /// Every change with a ctime before this (µs) has been read ([`RawBatch::read_to_us`];
    /// 0 until the kernel queue was first found empty).
    read_to_us: u64,
    /// What the last batch sent said of it.
    sent_read_to_us: u64,
    /// The last batch's `time_us`: each batch's is later (the filter finds a held
    /// change's batch by it).
    last_time_us: u64,
    /// When to read next while events stream in (see `pace.rs`).
    pacer: Pacer,
}

impl<'a> Watcher<'a> {
    fn new(
        config: &Config,
        sock: zmq::Socket,
        shutdown: &'a Shutdown,
    ) -> Result<Self, WatcherError> {
        let inotify = Inotify::init().map_err(|source| match source.raw_os_error() {
            Some(libc::EMFILE) => WatcherError::InstanceLimit {
                limit: inotify_sysctl("max_user_instances"),
            },
            _ => WatcherError::Inotify { op: "init", source },
        })?;
        let watches = inotify.watches();
        let now = Instant::now();
        Ok(Watcher {
            inotify,
            watches,
            buf: vec![0; READ_BUFFER],
            roots: config
                .roots
                .iter()
                .map(|r| RootState {
                    name: r.name.clone(),
                    path: r.path.clone(),
                    // Everything starts dead; `rebuild` brings up what exists.
                    alive: false,
                    two_way: r.two_way,
                    next_check: now,
                    unwatched: None,
                })
                .collect(),
            map: WatchMap::new(),
            sock,
            shutdown,
            stamp: Stamp::new(bus::new_epoch()),
            out: Vec::new(),
            abandoned: false,
            counts: vec![(0, 0); config.roots.len()],
            board: Arc::new(Mutex::new(StageStatus::new("watcher", protocol::now_us()))),
            next_post: now,
            status_dirty: true,
            read_to_us: 0,
            sent_read_to_us: 0,
            last_time_us: 0,
            pacer: Pacer::default(),
        })
    }

    /// Watches until shutdown; `Some(time)` when it drained the kernel queue at the
    /// end, so every change before `time` was read and sent.
    fn main_loop(&mut self) -> Result<Option<u64>, WatcherError> {
        self.rebuild(true)?;
        self.flush()?;
        'run: loop {
            status::beat(&self.board);
            if self.shutdown.requested() {
                break;
            }
            for event in self.wait()? {
                match event {
                    Event::Stop => break 'run,
                    Event::Inotify => {
                        let before_check = protocol::now_us();
                        self.read_and_handle()?;
                        if queued_bytes(self.inotify.as_raw_fd()) == Some(0) {
                            self.vouch(before_check);
                        }
                    }
                    Event::Tick => {
                        self.check_missing_roots()?;
                        self.rewalk_unwatched()?;
                        self.flush()?;
                    }
                }
            }
        }
        // Hand over what the kernel already queued, without waiting for more.
        if self.shutdown.urgent() {
            return Ok(None);
        }
        let stopped_at = protocol::now_us();
        while self.read_and_handle()? {
            self.flush()?;
        }
        self.flush()?;
        // A send given up on (the filter took nothing) leaves no checkpoint.
        Ok((!self.abandoned).then_some(stopped_at))
    }

    /// Blocks until inotify or the shutdown fd is readable, or a missing root or a
    /// re-walk is due, and says why it woke up: a stop alone, or inotify (when events
    /// are queued) and then the tick. While events stream in, inotify is not watched:
    /// the wait ends when the pacer's next read is due, whatever is queued by then.
    fn wait(&mut self) -> Result<Vec<Event>, WatcherError> {
        let now = Instant::now();
        let paced = self.pacer.next_read();
        let timeout = self
            .roots
            .iter()
            .filter(|r| !r.alive)
            .map(|r| r.next_check)
            .chain(
                self.roots
                    .iter()
                    .filter_map(|r| Some(r.unwatched.as_ref()?.1)),
            )
            .chain(paced)
            .map(|t| t.saturating_duration_since(now))
            .min()
            // Awake at least once per status interval, to keep the status file current.
            .map_or(status::EVERY, |d| d.min(status::EVERY));
        let mut fds = [
            libc::pollfd {
                // A negative fd is ignored by poll: while paced, events wait in the
                // kernel queue until the read is due.
                fd: if paced.is_some() {
                    -1
                } else {
                    self.inotify.as_raw_fd()
                },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.shutdown.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let polled_at = protocol::now_us();
        // ppoll rather than poll: a pace is a fraction of a millisecond away, which
        // poll's milliseconds would round to a busy loop or to twice the pace.
        let timeout = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a valid array of two pollfd and `timeout` a valid timespec for
        // the duration of the call; a null signal mask leaves the mask as it is.
        let n = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &timeout,
                std::ptr::null(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(vec![Event::Tick]);
            }
            return Err(WatcherError::Inotify {
                op: "poll",
                source: e,
            });
        }
        let [readable, signal] = fds.map(|fd| fd.revents != 0);
        let inotify = match paced {
            Some(due) => Instant::now() >= due,
            None => readable,
        };
        if paced.is_none() && !readable {
            // poll found the queue empty when called, and nothing came since (while
            // paced, inotify is left out of the wait: that says nothing).
            self.vouch(polled_at);
        }
        if signal {
            self.shutdown.drain();
            if self.shutdown.take_hup() {
                debug!("SIGHUP: nothing to reload in the watcher");
            }
            if self.shutdown.requested() {
                return Ok(vec![Event::Stop]);
            }
        }
        let mut events = Vec::with_capacity(2);
        if inotify {
            events.push(Event::Inotify);
        }
        events.push(Event::Tick);
        Ok(events)
    }

    /// Every change with a ctime before `t` has been read (the kernel queue was found
    /// empty at `t` or later), unless a root is missing or not watched whole: its
    /// changes are not read at all, so the mark stays where it was (and their resync,
    /// when it comes, carries that mark as its floor).
    fn vouch(&mut self, t: u64) {
        if self.roots.iter().all(|r| r.alive && r.unwatched.is_none()) {
            self.read_to_us = self.read_to_us.max(t);
        }
    }

    fn push(&mut self, root: RootIx, path: PathBytes, kind: RawKind, dir: bool, cookie: u32) {
        self.out.push(RawEvent {
            root: self.roots[root].name.clone(),
            path,
            kind,
            dir,
            cookie,
        });
    }

    fn resync(&mut self, root: RootIx) {
        self.push(root, PathBytes::root(), RawKind::Resync, true, 0);
    }

    /// Sends everything queued, at most [`MAX_BATCH`] events per message; only the last
    /// message says how far everything was read (the others say what the last batch
    /// sent did). With nothing queued, an empty message tells the filter once the mark
    /// moved by [`MARK_EVERY`].
    fn flush(&mut self) -> Result<(), WatcherError> {
        self.post_status();
        if self.out.is_empty()
            && self.read_to_us >= self.sent_read_to_us + MARK_EVERY.as_micros() as u64
        {
            return self.send(Vec::new(), self.read_to_us);
        }
        while !self.out.is_empty() {
            let n = self.out.len().min(MAX_BATCH);
            let events: Vec<RawEvent> = self.out.drain(..n).collect();
            let mark = if self.out.is_empty() {
                self.read_to_us
            } else {
                self.sent_read_to_us
            };
            self.send(events, mark)?;
        }
        Ok(())
    }

    fn post_status(&mut self) {
        let now = Instant::now();
        if !self.status_dirty || now < self.next_post {
            return;
        }
        self.next_post = now + status::EVERY;
        self.status_dirty = false;
        let Ok(mut b) = self.board.lock() else {
            return;
        };
        for (i, r) in self.roots.iter().enumerate() {
            let e = b.roots.entry(r.name.clone()).or_default();
            e.watches = Some(self.map.count(i) as u64);
            e.events = Some(self.counts[i].0);
            e.overflows = Some(self.counts[i].1);
            e.unwatched = r
                .unwatched
                .as_ref()
                .map(|u| u.0.clone())
                .unwrap_or_default();
        }
    }

    fn send(&mut self, events: Vec<RawEvent>, read_to_us: u64) -> Result<(), WatcherError> {
        if self.abandoned {
            return Ok(());
        }
        let (epoch, seq) = self.stamp.stamp();
        let time_us = protocol::now_us().max(self.last_time_us + 1);
        self.last_time_us = time_us;
        self.sent_read_to_us = read_to_us;
        let batch = RawBatch {
            version: wire::VERSION,
            epoch,
            seq,
            time_us,
            read_to_us,
            events,
        };
        loop {
            match bus::send(&self.sock, wire::RAW_TOPIC, &batch) {
                Ok(()) => return Ok(()),
                Err(BusError::Zmq {
                    source: zmq::Error::EAGAIN,
                    ..
                }) => {
                    // The filter is not taking messages (back-pressure). Keep trying until
                    // asked to stop; the next watcher's new epoch makes the filter resync.
                    if self.shutdown.requested() {
                        warn!(
                            seq,
                            events = batch.events.len(),
                            "shutting down with a batch the filter did not take"
                        );
                        self.abandoned = true;
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
