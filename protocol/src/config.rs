//! The configuration file (`syncbus.toml`): parsed into raw structs that keep every
//! value's position, then validated into [`Config`] with *all* errors at once, each
//! naming file, line and key. Unknown keys are errors. See README.md for every key.
//!
//! Here: the validated model and how to load it. `raw` holds the file as written,
//! `validate` the checks of the bus, roots, retry and schedules, `target` rsync
//! targets (URLs, password files, refused options), `hook` command and webhook
//! targets, `tcp` tcp targets, `error` the error type.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::rules::Rules;

mod error;
mod hook;
mod raw;
mod target;
mod tcp;
mod validate;

pub use error::{ConfigError, ConfigErrors};
pub use target::is_local_url;
pub use tcp::Framing;
pub use validate::check_cron;

/// How long a path must stay quiet before the filter publishes it (ms).
pub const DEFAULT_QUIET_MS: u64 = 10;
/// How long the filter holds a path that keeps changing, at most (ms).
pub const DEFAULT_MAX_HOLD_MS: u64 = 1000;
/// How long a file of a two-way root must be left alone before it is sent (ms).
pub const DEFAULT_STABLE_MS: u64 = 1000;
/// Where a two-way root keeps syncbus's own files, relative to the root: the peer's
/// rsync writes into `incoming/` and renames into place, and moves what it replaces or
/// deletes into `backup/`. Excluded from every sync.
pub const TWO_WAY_DIR: &str = ".syncbus";
/// Where the peer's rsync writes a file before renaming it into place.
pub const TWO_WAY_INCOMING: &str = ".syncbus/incoming";
/// Where the peer's rsync moves what it replaces or deletes.
pub const TWO_WAY_BACKUP: &str = ".syncbus/backup";
/// Seconds without I/O before an rsync run is killed and retried.
pub const DEFAULT_TIMEOUT_S: u64 = 30;
/// First retry delay after a failure (ms).
pub const DEFAULT_RETRY_INITIAL_MS: u64 = 1000;
/// Cap of the retry delay (s).
pub const DEFAULT_RETRY_MAX_S: u64 = 60;
/// Share of each retry delay added at random.
pub const DEFAULT_RETRY_JITTER: f64 = 0.25;
/// How often a failing target is probed (ms).
pub const DEFAULT_PROBE_MS: u64 = 1000;
/// A target's backlog above this many paths collapses to their directories.
pub const DEFAULT_MAX_PATHS: usize = 100_000;
/// Where `syncbus metrics` serves `/metrics` unless `[metrics] listen` says otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9477";

/// Which kinds of change a root mirrors (sersync's `<inotify>` toggles). All on by
/// default: sersync's defaults silently lose chmod and symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Events {
    /// Deletes.
    pub delete: bool,
    /// New directories.
    pub create_folder: bool,
    /// New files.
    pub create_file: bool,
    /// Files closed after writing.
    pub close_write: bool,
    /// Renames within the tree (`move` in the file).
    #[serde(rename = "move")]
    pub moves: bool,
    /// Changes of mode, owner or times (chmod, chown, touch).
    pub attrib: bool,
    /// Writes to an open file (before its close).
    pub modify: bool,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            delete: true,
            create_folder: true,
            create_file: true,
            close_write: true,
            moves: true,
            attrib: true,
            modify: true,
        }
    }
}

// ---------------------------------------------------------------- validated

/// A config file, validated: names unique, references resolved, defaults filled in.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (for messages and for the stages `syncbus run` spawns).
    pub file: PathBuf,
    /// Where the sockets and status files live (0700).
    pub runtime_dir: PathBuf,
    /// The change stream on TCP too (`tcp://host:port`), for subscribers elsewhere.
    pub tcp_changes: Option<String>,
    /// The delivery stream on TCP too.
    pub tcp_deliveries: Option<String>,
    /// The trees mirrored (`[[root]]`).
    pub roots: Vec<Root>,
    /// Where they are mirrored to (`[[target]]`).
    pub targets: Vec<Target>,
    /// The journal and the retry policy (`[retry]`).
    pub retry: Retry,
    /// Cron full syncs (`[[schedule]]`).
    pub schedules: Vec<Schedule>,
    /// Where `/metrics` is served (`None`: off).
    pub metrics: Option<std::net::SocketAddr>,
}

/// How failed work is kept and retried (`[retry]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// The journal (`journal.redb`) and the fail log (`rsync_fail_log.sh`) live here.
    pub state_dir: PathBuf,
    /// First delay after a failure; doubles per failed attempt…
    pub initial: Duration,
    /// …up to this cap.
    pub max: Duration,
    /// Each delay grows by a random share of itself up to this fraction.
    pub jitter: f64,
    /// How often a failing target is probed (a TCP connect, no rsync) to notice its
    /// return before the backoff is over.
    pub probe: Duration,
    /// A target's backlog above this many paths collapses to their directories.
    pub max_paths: usize,
}

/// A cron full sync (`[[schedule]]`, sersync's `crontab` + `crontabfilter`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// crontab(5) syntax, validated.
    pub cron: String,
    /// The roots this full sync compares (all when the file names none).
    pub roots: Vec<String>,
    /// rsync-style globs left out of this full sync only.
    pub exclude_glob: Vec<String>,
}

/// A tree mirrored (`[[root]]`).
#[derive(Debug, Clone)]
pub struct Root {
    /// Its name, unique among roots (used in topics, status and the journal).
    pub name: String,
    /// Its directory (canonical when it exists).
    pub path: PathBuf,
    /// What is never mirrored (its excludes and, unless turned off, the built-in ones).
    pub rules: Rules,
    /// Which kinds of change are mirrored.
    pub events: Events,
    /// How long a path must stay quiet before it is published.
    pub quiet: Duration,
    /// How long a path that keeps changing is held at most.
    pub max_hold: Duration,
    /// A file is sent only once no write, truncate or attribute change touched it for
    /// this long, and its size and mtime still match (0: off). Two-way roots default
    /// to [`DEFAULT_STABLE_MS`].
    pub stable: Duration,
    /// Bound to a two-way target: writes and deletes the peer made here are recognised
    /// and not sent back, and [`TWO_WAY_DIR`] is left out.
    pub two_way: bool,
    /// Two-way: a change made here that lost to a newer one of the peer is also kept
    /// as `NAME.conflict-<UTC time>` beside it (and synced), not only in the backup.
    pub conflict_copies: bool,
    /// A whole-root compare may delete on a target also when the root is empty or on
    /// another file system than at its last compare (see the dispatcher's guard).
    pub allow_wipe: bool,
}

/// A place the roots are mirrored to (`[[target]]`).
#[derive(Debug, Clone)]
pub struct Target {
    /// Its name, unique among targets.
    pub name: String,
    /// What it is and how it is reached.
    pub endpoint: Endpoint,
    /// Names of the roots mirrored to this target.
    pub roots: Vec<String>,
    /// Seconds without I/O before an rsync run is killed and retried (0: never).
    pub timeout: u64,
    /// rsync's `--bwlimit`, as written.
    pub bwlimit: Option<String>,
    /// Options added to every rsync run (those that change what a run means are refused).
    pub extra_args: Vec<String>,
    /// The other side of a two-way pair (it runs syncbus too, with this machine as
    /// its two-way target): newest wins (`--update`), whole-tree compares never
    /// delete, and what a run replaces or deletes is kept in the peer's backup dir.
    pub two_way: bool,
    /// `losers = "copy"`: see [`Root::conflict_copies`].
    pub conflict_copies: bool,
    /// See [`Root::allow_wipe`]: for every root this target mirrors.
    pub allow_wipe: bool,
    /// Files hard-linked in the source are hard-linked on the target too (`-H`), live
    /// as well: a batch holding a file with more than one link compares the whole root,
    /// where rsync sees every name of it. Also set by `-H` in `extra_args`.
    pub hard_links: bool,
    /// Command and webhook targets: what a failed run leads to.
    pub on_failure: OnFailure,
}

/// `on_failure` of a command or webhook target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// Handed to the retrier and run again (only what failed) until it succeeds.
    #[default]
    Retry,
    /// Logged at WARN and counted (`ignored_failures` in status and metrics), never
    /// retried: sersync's `ignoreError="true"`.
    Log,
}

/// How a target is reached, one variant per kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An rsync daemon: `rsync://[user@]host[:port]/module/path/` (always ends in `/`).
    Rsync {
        /// The daemon URL, ending in `/`.
        url: String,
        /// rsync's `--password-file` (private to its owner).
        password_file: Option<PathBuf>,
    },
    /// rsync over ssh: `[user@]host:path/`.
    Ssh {
        /// `[user@]host:path/`, as rsync takes it.
        dest: String,
        /// ssh's port, when not 22.
        port: Option<u16>,
        /// ssh's `-i`.
        identity_file: Option<PathBuf>,
        /// More `-o` options for ssh.
        options: Vec<String>,
    },
    /// A directory on this machine.
    Local {
        /// The directory (it need not exist yet).
        path: PathBuf,
    },
    /// A program run per batch (argv, never a shell), given the changed paths.
    Command {
        /// The program and its first arguments.
        argv: Vec<String>,
        /// Paths as arguments after `argv` (else NUL-separated on stdin).
        as_args: bool,
        /// `paths = "each"`: the program runs once per path, given as its last
        /// argument, so a failure is known per path and only failed paths are retried.
        each: bool,
        /// Only paths matching one of these globs (all when empty)…
        include: Vec<String>,
        /// …and none of these.
        exclude: Vec<String>,
        /// An after-sync hook: run on what reached these targets (the delivery
        /// stream), not on the raw changes.
        after: Vec<String>,
    },
    /// A webhook: each batch POSTed as JSON; or, with `{url}`/`{path}` in `url`, one
    /// request per path (a CDN refresh).
    Http {
        /// Where the requests go (`{url}`/`{path}` make one request per path).
        url: String,
        /// The HTTP method (`POST` unless told otherwise).
        method: String,
        /// Where the root is served: a path's public URL is this plus the path.
        base_url: Option<String>,
        /// `Name: value` lines sent as headers (credentials live here, never in the URL).
        header_file: Option<PathBuf>,
        /// Only paths matching one of these globs (all when empty)…
        include: Vec<String>,
        /// …and none of these.
        exclude: Vec<String>,
        /// An after-sync hook: run on what reached these targets.
        after: Vec<String>,
    },
    /// A TCP listener (`tcp://host:port`) given each changed path: with
    /// `framing = "sersync"` one connection per path carrying its absolute path and
    /// nothing else (sersync's socket plugin), else one connection per batch of
    /// records with their operation (see [`Framing`]).
    Tcp {
        /// `host:port` (`[v6]:port`), as `TcpStream::connect` takes it.
        addr: String,
        /// How paths are framed on the connection.
        framing: Framing,
        /// Only paths matching one of these globs (all when empty)…
        include: Vec<String>,
        /// …and none of these.
        exclude: Vec<String>,
        /// An after-sync hook: run on what reached these targets.
        after: Vec<String>,
    },
}

impl Endpoint {
    /// The `host:port` a target is reached at (a TCP connect there tells whether it is
    /// back), read from its URL the way it was validated; `None` for a local directory
    /// or a program.
    pub fn address(&self) -> Option<String> {
        // A port is there after `]:` for an IPv6 host in brackets, else after the one `:`.
        let with_port = |host: &str, default: u16| {
            let has_port = if host.starts_with('[') {
                host.contains("]:")
            } else {
                host.matches(':').count() == 1
            };
            if has_port {
                host.to_string()
            } else {
                format!("{host}:{default}")
            }
        };
        match self {
            Endpoint::Rsync { url, .. } => {
                let (host, port) = rsync_authority(url.trim_start_matches("rsync://"));
                Some(match port {
                    Some(p) if !p.is_empty() => format!("{host}:{p}"),
                    _ => with_port(host, 873),
                })
            }
            Endpoint::Ssh { dest, port, .. } => {
                let host = dest.split(':').next().unwrap_or("");
                let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
                Some(format!("{host}:{}", port.unwrap_or(22)))
            }
            Endpoint::Tcp { addr, .. } => Some(addr.clone()),
            Endpoint::Http { url, .. } => {
                let (default, rest) = match url.strip_prefix("https://") {
                    Some(r) => (443, r),
                    None => (80, url.trim_start_matches("http://")),
                };
                let host = rest.split(['/', '?', '#']).next().unwrap_or("");
                Some(with_port(host, default))
            }
            Endpoint::Local { .. } | Endpoint::Command { .. } => None,
        }
    }
}

/// The host and the port (`Some("")` for a bare `:`) of an rsync URL's authority, the
/// part after `rsync://`: `[user@]host[:port]/…`, IPv6 hosts in brackets.
fn rsync_authority(rest: &str) -> (&str, Option<&str>) {
    let hostport = rest.split('/').next().unwrap_or("");
    let host = hostport.rsplit_once('@').map_or(hostport, |(_, h)| h);
    match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') || host.starts_with('[') => {
            if h.starts_with('[') && !h.ends_with(']') {
                // `[::1]` without a port: the colons are the address's.
                (host, None)
            } else {
                (h, Some(port))
            }
        }
        _ => (host, None),
    }
}

impl Target {
    /// Whether runs to this target are rsync runs (daemon, ssh and local targets).
    pub fn runs_rsync(&self) -> bool {
        matches!(
            self.endpoint,
            Endpoint::Rsync { .. } | Endpoint::Ssh { .. } | Endpoint::Local { .. }
        )
    }

    /// The targets whose deliveries this one follows (an after-sync hook: `after` of a
    /// command, webhook or tcp target); empty for a target fed by the change stream.
    pub fn follows(&self) -> &[String] {
        match &self.endpoint {
            Endpoint::Command { after, .. }
            | Endpoint::Http { after, .. }
            | Endpoint::Tcp { after, .. } => after,
            _ => &[],
        }
    }

    /// Where `root` lands on this target, with a trailing `/`. A target that mirrors
    /// several roots keeps each in a subdirectory named after the root.
    pub fn destination(&self, root: &str) -> String {
        let base = match &self.endpoint {
            Endpoint::Rsync { url, .. } => url.clone(),
            Endpoint::Ssh { dest, .. } => dest.clone(),
            Endpoint::Local { path } => format!("{}/", path.display()),
            Endpoint::Command { .. } | Endpoint::Http { .. } | Endpoint::Tcp { .. } => {
                return String::new()
            }
        };
        if self.roots.len() > 1 {
            format!("{base}{root}/")
        } else {
            base
        }
    }
}

/// The largest config file read: far beyond any real one (a config of 1,000 roots is
/// about 100 KiB), small enough that a wrong file is refused at once.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

impl Config {
    /// The root named `name`.
    pub fn root(&self, name: &str) -> Option<&Root> {
        self.roots.iter().find(|r| r.name == name)
    }

    /// The target named `name`.
    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// What work owed to `target` for `root` is owed to, beyond their names: the root's
    /// path and where it lands on the target (for a command, its argv; for a webhook,
    /// its URL). Work journalled under another identity is not replayed (the names now
    /// mean another tree or another place). `None` if either is not configured.
    pub fn owed_to(&self, root: &str, target: &str) -> Option<String> {
        let r = self.root(root)?;
        let t = self.target(target)?;
        let place = match &t.endpoint {
            Endpoint::Command { argv, .. } => format!("command {argv:?}"),
            Endpoint::Http { url, .. } => format!("webhook {url}"),
            Endpoint::Tcp { addr, framing, .. } => format!("tcp {addr} {framing:?}"),
            _ => t.destination(root),
        };
        Some(format!("{} -> {place}", r.path.display()))
    }

    /// Reads and validates a config file.
    pub fn load(file: &Path) -> Result<Config, ConfigErrors> {
        Config::load_in(file, Environment::Checked)
    }

    /// Validates `text` as if read from `file` (relative paths resolve against its dir).
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigErrors> {
        Config::parse_in(text, file, Environment::Checked)
    }

    /// Reads and validates a config file, looking at this machine only as `environment` says.
    pub fn load_in(file: &Path, environment: Environment) -> Result<Config, ConfigErrors> {
        let error = |message: String| {
            ConfigErrors(vec![ConfigError {
                file: file.to_path_buf(),
                line: 0,
                column: 0,
                key: String::new(),
                message,
            }])
        };
        // Read at most one byte past the bound: `/dev/zero` or a wrong file must end.
        let mut bytes = Vec::new();
        std::fs::File::open(file)
            .and_then(|f| {
                use std::io::Read;
                f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)
            })
            .map_err(|e| error(format!("cannot read config file: {e}")))?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(error(format!(
                "larger than {} MiB: not a syncbus config",
                MAX_CONFIG_BYTES >> 20
            )));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            error(format!(
                "not UTF-8 text (byte {})",
                e.utf8_error().valid_up_to()
            ))
        })?;
        Config::parse_in(&text, file, environment)
    }

    /// [`Config::parse`], looking at this machine only as `environment` says.
    pub fn parse_in(
        text: &str,
        file: &Path,
        environment: Environment,
    ) -> Result<Config, ConfigErrors> {
        validate::validate(text, file, environment)
    }
}

/// How much of a config [`Config::parse_in`] checks beyond its syntax and meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    /// Also that roots are directories here, password and header files are private,
    /// and command programs are executable: what `syncbus run` needs.
    Checked,
    /// Syntax and meaning only, nothing on this machine is looked at: for a config
    /// written for another machine (`syncbus check-config --no-environment`).
    Ignored,
}

/// Where the journal lives unless `retry.state_dir` says otherwise.
pub fn default_state_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/var/lib/syncbus");
    }
    match (std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME")) {
        (Some(d), _) if !d.is_empty() => PathBuf::from(d).join("syncbus"),
        (_, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".local/state/syncbus"),
        _ => PathBuf::from(format!("/var/tmp/syncbus-{uid}")),
    }
}

/// `/run/syncbus` for root, `$XDG_RUNTIME_DIR/syncbus` or `/tmp/syncbus-UID` otherwise.
pub fn default_runtime_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/syncbus");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("syncbus"),
        _ => PathBuf::from(format!("/tmp/syncbus-{uid}")),
    }
}

#[cfg(test)]
mod tests;
