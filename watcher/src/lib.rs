//! The watcher stage: recursive inotify on every root, raw events to the filter.
//!
//! In: the kernel's inotify events for every directory under each `[[root]]` of the
//! config (one inotify instance, a 64 KiB read buffer). Out: [`RawBatch`]es on a PUSH
//! socket connected to the `raw` endpoint, one batch per inotify read (split at
//! [`MAX_BATCH`] events), paths relative to their root as bytes. The watcher decides
//! nothing about what to sync: every directory is watched and every event is passed on;
//! exclusion and coalescing are the filter's job.
//!
//! [`run`] is the one seam; `main.rs`, `syncbus watcher` and the tests all call it.
//! The pure bookkeeping (which wd is which directory, kept right across renames) is
//! [`WatchMap`]; the event translation is [`kind_of`].
//!
//! # Invariants
//! - A root's `Resync ""` is sent only after every directory of that root is watched, and
//!   only for a root that exists: at start, after a queue overflow, when a root comes back.
//! - A new directory (created, or moved in from outside) is watched and walked — watches
//!   added to every directory below it — *before* its `Create`/`MovedTo` is sent, so a
//!   recursive sync of it started on that event covers everything not reported by events.
//!   Files found during such a walk are not reported.
//! - After a directory moves inside a root, every watch below it reports the new path;
//!   a directory moved out of the tree is unwatched and reports nothing more.
//! - Symlinks are never followed; paths are never decoded as UTF-8.
//! - `seq` starts at 1 and has no gaps for one `epoch` (one epoch per process).
//! - The instance limit (`EMFILE`) ends the stage with [`StageError::Environment`]
//!   naming the sysctl; sysctls are never written.
//! - The watch limit (`ENOSPC`) ends nothing: the root it hit is watched in part, says
//!   so in the status file (`unwatched`, which makes `syncbus status` CRITICAL), and is
//!   walked again every [`LIMIT_RETRY`]; once every directory is watched, it is resynced
//!   (changes in the unwatched part went unseen). The other roots carry on.
//!
//! # Known problems
//! - Mounting a filesystem over a watched directory is not noticed (inotify says nothing
//!   about mounts): changes inside the new mount go unseen until the next resync.
//!   Unmounting one below a root is handled: the directory underneath is watched and
//!   resynced.
//! - A root is noticed gone only when its own directory is deleted, moved or unmounted;
//!   renaming one of the root's *ancestors* goes unseen (inotify cannot tell).
//! - A directory moved out and back in between two reads, or moved within the tree while
//!   the move pair straddles a read and the wait for the second half (10 ms) runs out, is
//!   handled as moved out then moved in: correct, but re-walked.
//! - Events queued before a `Resync` from an overflow may carry paths that the re-walk has
//!   since changed; the resync that follows makes them harmless.
//! - A rename pair split across a `MAX_BATCH` boundary lands in two batches (the filter
//!   pairs by cookie).
//! - Roots that overlap would share inodes (one wd per inode); config validation refuses
//!   them, but a bind mount or a symlinked root can still make two roots meet.
//! - A chmod of a subdirectory arrives twice (`Attrib` from its parent and from its own
//!   watch); the filter's coalescing makes that one change.
//! - A root that is missing when the config is loaded is refused by `Config::load`, so the
//!   "missing at start" path of [`run`] is reached only when a root vanishes between
//!   loading and watching.

mod manifest;
mod watch_map;

pub use watch_map::{Renamed, RootIx, WatchMap};

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchMask, Watches};
use protocol::bus::{self, BusError, Endpoints, Shutdown};
use protocol::config::Config;
use protocol::stage::StageError;
use protocol::status::{self, StageStatus};
use protocol::wire::{self, RawBatch, RawEvent, RawKind};
use protocol::PathBytes;
use thiserror::Error;
use tracing::{debug, error, info, trace, warn};

/// Size of the inotify read buffer.
pub const READ_BUFFER: usize = 64 * 1024;
/// Most events in one batch; a larger read is split.
pub const MAX_BATCH: usize = 4096;
/// How long to wait for the `MOVED_TO` of a directory whose `MOVED_FROM` ended a read.
pub const MOVE_PAIR_WAIT: Duration = Duration::from_millis(10);
/// How often a missing root is looked for.
pub const ROOT_POLL: Duration = Duration::from_secs(1);
/// How often a root that hit the watch limit is walked again.
pub const LIMIT_RETRY: Duration = Duration::from_secs(5);
/// A blocked send wakes up this often to see whether shutdown was asked for.
const SEND_TIMEOUT_MS: i32 = 200;

/// Errors of this stage; all end up as a [`StageError`].
#[derive(Debug, Error)]
pub enum WatcherError {
    #[error(
        "inotify watch limit reached (fs.inotify.max_user_watches = {limit}) while watching \
         `{path}`: raise it with `sysctl fs.inotify.max_user_watches=…`",
        path = path.display()
    )]
    WatchLimit { limit: String, path: PathBuf },
    #[error(
        "cannot create an inotify instance: limit reached (fs.inotify.max_user_instances = \
         {limit}, or the open-file limit of this process): raise it with \
         `sysctl fs.inotify.max_user_instances=…`"
    )]
    InstanceLimit { limit: String },
    #[error("inotify {op}: {source}")]
    Inotify {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl WatcherError {
    /// The stage outcome: the inotify limits are [`StageError::Environment`] (a restart
    /// cannot fix them), everything else [`StageError::Failed`].
    pub fn into_stage_error(self) -> StageError {
        let e = self;
        match e {
            WatcherError::WatchLimit { .. } | WatcherError::InstanceLimit { .. } => {
                StageError::Environment(e.to_string())
            }
            WatcherError::Inotify { op, source } => {
                StageError::Failed(format!("inotify {op}: {source}"))
            }
            WatcherError::Bus(b) => StageError::from(b),
        }
    }
}

/// The current value of `/proc/sys/fs/inotify/<name>`, for error messages.
fn inotify_sysctl(name: &str) -> String {
    std::fs::read_to_string(Path::new("/proc/sys/fs/inotify").join(name))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn watch_mask() -> WatchMask {
    WatchMask::ONLYDIR
        | WatchMask::DONT_FOLLOW
        | WatchMask::EXCL_UNLINK
        | WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::ATTRIB
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

/// The wire kind of an event about an entry of a watched directory; `None` for the
/// events that only steer the watcher (`IGNORED`, `*_SELF`, overflow, unmount).
pub fn kind_of(mask: EventMask) -> Option<RawKind> {
    const TABLE: [(EventMask, RawKind); 7] = [
        (EventMask::CREATE, RawKind::Create),
        (EventMask::MODIFY, RawKind::Modify),
        (EventMask::CLOSE_WRITE, RawKind::CloseWrite),
        (EventMask::ATTRIB, RawKind::Attrib),
        (EventMask::DELETE, RawKind::Delete),
        (EventMask::MOVED_FROM, RawKind::MovedFrom),
        (EventMask::MOVED_TO, RawKind::MovedTo),
    ];
    TABLE
        .iter()
        .find(|(m, _)| mask.contains(*m))
        .map(|&(_, k)| k)
}

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
        epoch = w.epoch,
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

/// How long a stopping watcher waits for the filter to take what it still holds.
const STOP_LINGER: Duration = Duration::from_secs(4);

/// Where a cleanly stopped watcher records the time up to which it read every change
/// (µs since the Unix epoch), in the runtime dir.
pub const STOPPED_FILE: &str = "watcher.stopped";

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

/// One event as read, owned so that the buffer can be reused.
#[derive(Debug, Clone)]
struct Ev {
    wd: i32,
    mask: EventMask,
    cookie: u32,
    name: Option<Vec<u8>>,
}

struct Watcher<'a> {
    inotify: Inotify,
    watches: Watches,
    buf: Vec<u8>,
    roots: Vec<RootState>,
    map: WatchMap,
    sock: zmq::Socket,
    shutdown: &'a Shutdown,
    epoch: u64,
    seq: u64,
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
            epoch: bus::new_epoch(),
            seq: 0,
            out: Vec::new(),
            abandoned: false,
            counts: vec![(0, 0); config.roots.len()],
            board: Arc::new(Mutex::new(StageStatus::new("watcher", protocol::now_us()))),
            next_post: now,
            status_dirty: true,
        })
    }

    /// Watches until shutdown; `Some(time)` when it drained the kernel queue at the
    /// end, so every change before `time` was read and sent.
    fn main_loop(&mut self) -> Result<Option<u64>, WatcherError> {
        self.rebuild(true)?;
        self.flush()?;
        loop {
            status::beat(&self.board);
            if self.shutdown.requested() {
                break;
            }
            let (inotify_ready, signal_ready) = self.wait()?;
            if signal_ready {
                self.shutdown.drain();
                if self.shutdown.take_hup() {
                    debug!("SIGHUP: nothing to reload in the watcher");
                }
                if self.shutdown.requested() {
                    break;
                }
            }
            if inotify_ready {
                self.read_and_handle()?;
            }
            self.check_missing_roots()?;
            self.rewalk_unwatched()?;
            self.flush()?;
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

    /// Blocks until inotify or the shutdown fd is readable, or a missing root is due.
    fn wait(&mut self) -> Result<(bool, bool), WatcherError> {
        let now = Instant::now();
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
            .map(|t| t.saturating_duration_since(now))
            .min()
            // Awake at least once per status interval, to keep the status file current.
            .map_or(status::EVERY, |d| d.min(status::EVERY))
            .as_millis() as i32;
        let mut fds = [
            libc::pollfd {
                fd: self.inotify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.shutdown.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok((false, false));
            }
            return Err(WatcherError::Inotify {
                op: "poll",
                source: e,
            });
        }
        Ok((fds[0].revents != 0, fds[1].revents != 0))
    }

    /// Reads once (non-blocking); appends to `evs`. False when nothing was queued.
    fn read_into(&mut self, evs: &mut Vec<Ev>) -> Result<bool, WatcherError> {
        let events = match self.inotify.read_events(&mut self.buf) {
            Ok(events) => events,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(source) => return Err(WatcherError::Inotify { op: "read", source }),
        };
        let before = evs.len();
        evs.extend(events.map(|e| Ev {
            wd: e.wd.get_watch_descriptor_id(),
            mask: e.mask,
            cookie: e.cookie,
            name: e.name.map(|n| n.as_bytes().to_vec()),
        }));
        Ok(evs.len() > before)
    }

    /// One inotify read (plus, when it ends with half a directory move, a short wait for
    /// the other half), translated into `out`.
    /// `false` when the kernel had nothing queued.
    fn read_and_handle(&mut self) -> Result<bool, WatcherError> {
        let mut evs = Vec::new();
        if !self.read_into(&mut evs)? {
            return Ok(false);
        }
        let deadline = Instant::now() + MOVE_PAIR_WAIT;
        while has_unpaired_dir_move(&evs) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !poll_readable(self.inotify.as_raw_fd(), left) {
                break;
            }
            if !self.read_into(&mut evs)? {
                break;
            }
        }
        let paired = moved_to_cookies(&evs);
        let mut pending = HashMap::new();
        for ev in &evs {
            self.handle(ev, &paired, &mut pending)?;
        }
        Ok(true)
    }

    fn handle(
        &mut self,
        ev: &Ev,
        paired: &HashSet<u32>,
        pending: &mut HashMap<u32, (RootIx, PathBytes)>,
    ) -> Result<(), WatcherError> {
        if ev.wd == -1 || ev.mask.contains(EventMask::Q_OVERFLOW) {
            warn!("inotify queue overflowed: re-walking every root, then resyncing them");
            for c in &mut self.counts {
                c.1 += 1;
            }
            self.status_dirty = true;
            return self.rebuild(false);
        }
        if ev.mask.contains(EventMask::IGNORED) {
            self.map.remove_wd(ev.wd);
            self.status_dirty = true;
            return Ok(());
        }
        let Some((root, dir)) = self.map.get(ev.wd).map(|(r, p)| (r, p.clone())) else {
            trace!(wd = ev.wd, mask = ?ev.mask, "event for a forgotten watch");
            return Ok(());
        };
        self.counts[root].0 += 1;
        self.status_dirty = true;
        let is_dir = ev.mask.contains(EventMask::ISDIR);
        let Some(name) = &ev.name else {
            // About the watched directory itself.
            let gone = EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::UNMOUNT;
            if dir.is_root() && ev.mask.intersects(gone) {
                self.root_gone(root, ev.mask);
            } else if ev.mask.contains(EventMask::UNMOUNT) {
                // A filesystem mounted below the root went away: the directory it hid
                // is new to us. Watch it and compare that subtree in full.
                if dir.under(&self.roots[root].path).is_dir() {
                    warn!(root = %self.roots[root].name, path = %dir, "filesystem unmounted below the root: watching what was underneath and resyncing it");
                    self.walk(root, &dir)?;
                    self.push(root, dir, RawKind::Resync, true, 0);
                } else {
                    debug!(root = %self.roots[root].name, path = %dir, "unmounted directory has nothing underneath");
                }
            } else if ev.mask.contains(EventMask::ATTRIB) {
                self.push(root, dir, RawKind::Attrib, true, 0);
            }
            // Other self events of subdirectories are reported by their parent.
            return Ok(());
        };
        let Some(kind) = kind_of(ev.mask) else {
            return Ok(());
        };
        let path = dir.join(name);
        match kind {
            RawKind::Create if is_dir => {
                self.walk(root, &path)?;
            }
            RawKind::MovedFrom if is_dir => {
                if paired.contains(&ev.cookie) {
                    pending.insert(ev.cookie, (root, path.clone()));
                } else {
                    debug!(root = %self.roots[root].name, path = %path, "directory moved out of the tree");
                    self.unwatch_subtree(root, &path);
                }
            }
            RawKind::MovedTo if is_dir => match pending.remove(&ev.cookie) {
                Some((from_root, from)) if from_root == root => {
                    let r = self.map.rename(root, &from, &path);
                    self.rm_watches(&r.displaced);
                    if r.moved == 0 {
                        // The source was never watched (e.g. it could not be): watch now.
                        self.walk(root, &path)?;
                    }
                }
                Some((from_root, from)) => {
                    // Between two roots: forget the old paths, the walk re-adds the same
                    // wds under the new root.
                    self.map.remove_subtree(from_root, &from);
                    self.walk(root, &path)?;
                }
                None => {
                    self.walk(root, &path)?;
                }
            },
            _ => {}
        }
        let cookie = match kind {
            RawKind::MovedFrom | RawKind::MovedTo => ev.cookie,
            _ => 0,
        };
        self.push(root, path, kind, is_dir, cookie);
        Ok(())
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

    /// Watches `start` of `root` and every directory below it, into the live map.
    fn walk(&mut self, root: RootIx, start: &PathBytes) -> Result<usize, WatcherError> {
        self.status_dirty = true;
        let r = &self.roots[root];
        let walked = walk(
            &mut self.watches,
            &mut self.map,
            root,
            &r.name,
            &r.path,
            start,
        );
        self.limited(root, walked)
    }

    /// A walk that hit the watch limit leaves `root` watched in part: it is marked so
    /// (status CRITICAL) and walked again later, and the stage carries on.
    fn limited(
        &mut self,
        root: RootIx,
        walked: Result<usize, WatcherError>,
    ) -> Result<usize, WatcherError> {
        let e = match walked {
            Err(e @ WatcherError::WatchLimit { .. }) => e,
            other => return other,
        };
        let r = &mut self.roots[root];
        if r.unwatched.is_none() {
            error!(root = %r.name, error = %e, "not every directory of the root is watched: changes in the others go unseen until the limit is raised or directories go; the other roots carry on");
        }
        r.unwatched = Some((e.to_string(), Instant::now() + LIMIT_RETRY));
        self.status_dirty = true;
        Ok(0)
    }

    /// Walks again the roots that hit the watch limit, when due; one now watched in
    /// full is resynced, for the changes its unwatched directories did not report.
    fn rewalk_unwatched(&mut self) -> Result<(), WatcherError> {
        let now = Instant::now();
        for i in 0..self.roots.len() {
            let due = self.roots[i].unwatched.as_ref().is_some_and(|u| u.1 <= now);
            if !due || !self.roots[i].alive {
                continue;
            }
            self.roots[i].unwatched = None;
            let n = self.walk(i, &PathBytes::root())?;
            let r = &self.roots[i];
            if r.unwatched.is_none() {
                info!(root = %r.name, watches = n, "every directory of the root is watched again: resyncing it");
                self.resync(i);
            }
        }
        Ok(())
    }

    /// Watches every existing root from scratch into a fresh map, unwatches what the old
    /// map had that the walk did not find, then queues `Resync ""` for each existing root.
    /// Used at start (`first`) and after a queue overflow.
    fn rebuild(&mut self, first: bool) -> Result<(), WatcherError> {
        self.status_dirty = true;
        let mut fresh = WatchMap::new();
        let mut live = Vec::new();
        for i in 0..self.roots.len() {
            if !first && !self.roots[i].alive {
                continue; // polled for separately
            }
            let r = &self.roots[i];
            if r.two_way {
                for dir in [
                    protocol::config::TWO_WAY_INCOMING,
                    protocol::config::TWO_WAY_BACKUP,
                ] {
                    // A root that is not there yet gets its dirs when it is rebuilt.
                    if r.path.is_dir() {
                        if let Err(e) = std::fs::create_dir_all(r.path.join(dir)) {
                            tracing::warn!(root = %r.name, dir, error = %e, "cannot create the two-way dir; the peer's runs fail until it exists");
                        }
                    }
                }
            }
            let walked = walk(
                &mut self.watches,
                &mut fresh,
                i,
                &r.name,
                &r.path,
                &PathBytes::root(),
            );
            self.roots[i].unwatched = None;
            let n = self.limited(i, walked)?;
            let r = &self.roots[i];
            // A root the watch limit hit is live too, in part: it is resynced like the
            // others and walked again later.
            if fresh.wd(i, &PathBytes::root()).is_some() || r.unwatched.is_some() {
                info!(root = %r.name, path = %r.path.display(), watches = n, "watches live");
                live.push(i);
            } else {
                self.roots[i].alive = true; // so that root_gone logs the transition
                self.root_gone(i, EventMask::empty());
            }
        }
        let stale: Vec<i32> = self
            .map
            .wds()
            .filter(|wd| !fresh.contains_wd(*wd))
            .collect();
        self.rm_watches(&stale);
        // Watches of dead roots stay forgotten: they were removed when the root went.
        self.map = fresh;
        for i in live {
            self.roots[i].alive = true;
            self.resync(i);
        }
        Ok(())
    }

    fn root_gone(&mut self, root: RootIx, mask: EventMask) {
        let r = &mut self.roots[root];
        r.next_check = Instant::now() + ROOT_POLL;
        if !r.alive {
            return;
        }
        r.alive = false;
        r.unwatched = None;
        error!(
            root = %r.name,
            path = %r.path.display(),
            event = ?mask,
            "root directory is gone; the other roots keep running; looking for it every second"
        );
        self.unwatch_subtree(root, &PathBytes::root());
    }

    /// Looks for missing roots that are due; a root that is back is watched and resynced.
    fn check_missing_roots(&mut self) -> Result<(), WatcherError> {
        let now = Instant::now();
        for i in 0..self.roots.len() {
            let r = &mut self.roots[i];
            if r.alive || r.next_check > now {
                continue;
            }
            r.next_check = now + ROOT_POLL;
            if !r.path.is_dir() {
                continue;
            }
            let n = self.walk(i, &PathBytes::root())?;
            let r = &mut self.roots[i];
            if self.map.wd(i, &PathBytes::root()).is_some() {
                r.alive = true;
                info!(root = %r.name, path = %r.path.display(), watches = n, "root directory is back: watching it and resyncing");
                self.resync(i);
            } else {
                // It vanished again during the walk: drop what was added.
                self.unwatch_subtree(i, &PathBytes::root());
            }
        }
        Ok(())
    }

    fn unwatch_subtree(&mut self, root: RootIx, path: &PathBytes) {
        let wds = self.map.remove_subtree(root, path);
        self.rm_watches(&wds);
    }

    fn rm_watches(&mut self, wds: &[i32]) {
        self.status_dirty = true;
        for &wd in wds {
            // SAFETY: inotify_rm_watch takes two integers; a wrong wd yields EINVAL.
            let rc = unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
            if rc != 0 {
                // EINVAL: the kernel already dropped it (the directory is gone).
                trace!(wd, error = %io::Error::last_os_error(), "inotify_rm_watch");
            }
        }
    }

    /// Sends everything queued, at most [`MAX_BATCH`] events per message.
    fn flush(&mut self) -> Result<(), WatcherError> {
        self.post_status();
        while !self.out.is_empty() {
            let n = self.out.len().min(MAX_BATCH);
            let events: Vec<RawEvent> = self.out.drain(..n).collect();
            self.send(events)?;
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

    fn send(&mut self, events: Vec<RawEvent>) -> Result<(), WatcherError> {
        if self.abandoned {
            return Ok(());
        }
        self.seq += 1;
        let batch = RawBatch {
            version: wire::VERSION,
            epoch: self.epoch,
            seq: self.seq,
            time_us: protocol::now_us(),
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
                            seq = self.seq,
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

/// Adds a watch on `start` and every directory below it (never through a symlink) and
/// records them in `map`. The watch on a directory is added *before* it is listed, so an
/// entry created meanwhile is either listed or reported by that watch.
fn walk(
    watches: &mut Watches,
    map: &mut WatchMap,
    root: RootIx,
    root_name: &str,
    root_path: &Path,
    start: &PathBytes,
) -> Result<usize, WatcherError> {
    let mut stack = vec![start.clone()];
    let mut added = 0;
    while let Some(rel) = stack.pop() {
        let abs = rel.under(root_path);
        match watches.add(&abs, watch_mask()) {
            Ok(wd) => {
                map.insert(wd.get_watch_descriptor_id(), root, rel.clone());
                added += 1;
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) => {
                    return Err(WatcherError::WatchLimit {
                        limit: inotify_sysctl("max_user_watches"),
                        path: abs,
                    })
                }
                // Vanished meanwhile, or replaced by a non-directory / symlink.
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {
                    debug!(root = root_name, path = %rel, error = %e, "directory vanished before it could be watched");
                    continue;
                }
                _ => {
                    warn!(root = root_name, path = %rel, error = %e, "cannot watch directory; skipping it");
                    continue;
                }
            },
        }
        let entries = match std::fs::read_dir(&abs) {
            Ok(entries) => entries,
            Err(e) => {
                debug!(root = root_name, path = %rel, error = %e, "cannot list directory");
                continue;
            }
        };
        for entry in entries.flatten() {
            // DirEntry::file_type does not follow symlinks.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(rel.join(entry.file_name().as_bytes()));
            }
        }
    }
    Ok(added)
}

/// True when some directory's `MOVED_FROM` has no `MOVED_TO` with its cookie yet.
/// The cookies of every `moved_to` in `evs`: the `moved_from`s that have a partner.
fn moved_to_cookies(evs: &[Ev]) -> HashSet<u32> {
    evs.iter()
        .filter(|e| e.mask.contains(EventMask::MOVED_TO))
        .map(|e| e.cookie)
        .collect()
}

fn has_unpaired_dir_move(evs: &[Ev]) -> bool {
    let to = moved_to_cookies(evs);
    evs.iter().any(|e| {
        e.mask.contains(EventMask::MOVED_FROM | EventMask::ISDIR) && !to.contains(&e.cookie)
    })
}

fn poll_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_translate_to_wire_kinds() {
        let cases = [
            (EventMask::CREATE | EventMask::ISDIR, Some(RawKind::Create)),
            (EventMask::MODIFY, Some(RawKind::Modify)),
            (EventMask::CLOSE_WRITE, Some(RawKind::CloseWrite)),
            (EventMask::ATTRIB | EventMask::ISDIR, Some(RawKind::Attrib)),
            (EventMask::DELETE, Some(RawKind::Delete)),
            (EventMask::MOVED_FROM, Some(RawKind::MovedFrom)),
            (
                EventMask::MOVED_TO | EventMask::ISDIR,
                Some(RawKind::MovedTo),
            ),
            (EventMask::IGNORED, None),
            (EventMask::DELETE_SELF, None),
            (EventMask::MOVE_SELF, None),
            (EventMask::Q_OVERFLOW, None),
        ];
        for (mask, kind) in cases {
            assert_eq!(kind_of(mask), kind, "{mask:?}");
        }
    }

    #[test]
    fn limit_errors_name_the_sysctl_and_are_environment_errors() {
        let e = WatcherError::WatchLimit {
            limit: "8192".into(),
            path: "/srv/www/a".into(),
        };
        let msg = e.to_string();
        assert_eq!(
            msg,
            "inotify watch limit reached (fs.inotify.max_user_watches = 8192) while watching \
             `/srv/www/a`: raise it with `sysctl fs.inotify.max_user_watches=…`"
        );
        assert!(matches!(e.into_stage_error(), StageError::Environment(m) if m == msg));
        let e = WatcherError::InstanceLimit {
            limit: "128".into(),
        };
        assert!(e
            .to_string()
            .contains("fs.inotify.max_user_instances = 128"));
        assert!(matches!(e.into_stage_error(), StageError::Environment(_)));
    }

    #[test]
    fn a_directory_move_without_its_second_half_is_unpaired() {
        let ev = |mask, cookie| Ev {
            wd: 1,
            mask,
            cookie,
            name: Some(b"x".to_vec()),
        };
        let from_dir = ev(EventMask::MOVED_FROM | EventMask::ISDIR, 7);
        let from_file = ev(EventMask::MOVED_FROM, 8);
        let to = ev(EventMask::MOVED_TO | EventMask::ISDIR, 7);
        assert!(has_unpaired_dir_move(std::slice::from_ref(&from_dir)));
        assert!(!has_unpaired_dir_move(&[from_file]));
        assert!(!has_unpaired_dir_move(&[from_dir, to]));
    }

    #[test]
    fn walk_watches_every_directory_but_not_through_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("a/b\n/c")).unwrap();
        std::fs::create_dir_all(outside.join("deep")).unwrap();
        std::fs::write(root.join("a/file"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let inotify = Inotify::init().unwrap();
        let mut watches = inotify.watches();
        let mut map = WatchMap::new();
        let n = walk(&mut watches, &mut map, 0, "r", &root, &PathBytes::root()).unwrap();
        assert_eq!(n, 4, "root, a, a/b\\n, a/b\\n/c");
        for p in ["", "a", "a/b\n", "a/b\n/c"] {
            assert!(
                map.wd(0, &PathBytes::from(p)).is_some(),
                "{p:?} not watched"
            );
        }
        assert!(map.wd(0, &PathBytes::from("link")).is_none());
        // A symlink given as the start is refused, not followed.
        assert_eq!(
            walk(&mut watches, &mut map, 0, "r", &root, &"link".into()).unwrap(),
            0
        );
    }
}
