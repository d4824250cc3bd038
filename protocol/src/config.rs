//! The configuration file (`syncbus.toml`): parsed into raw structs that keep every
//! value's position, then validated into [`Config`] with *all* errors at once, each
//! naming file, line and key. Unknown keys are errors. See README.md for every key.

use std::fmt;
use std::ops::Range;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::rules::Rules;

mod tcp;
pub use tcp::Framing;

pub const DEFAULT_QUIET_MS: u64 = 10;
pub const DEFAULT_MAX_HOLD_MS: u64 = 1000;
/// How long a file of a two-way root must be left alone before it is sent (ms).
pub const DEFAULT_STABLE_MS: u64 = 1000;
/// Where a two-way root keeps syncbus's own files, relative to the root: the peer's
/// rsync writes into `incoming/` and renames into place, and moves what it replaces or
/// deletes into `backup/`. Excluded from every sync.
pub const TWO_WAY_DIR: &str = ".syncbus";
pub const TWO_WAY_INCOMING: &str = ".syncbus/incoming";
pub const TWO_WAY_BACKUP: &str = ".syncbus/backup";
pub const DEFAULT_TIMEOUT_S: u64 = 30;
pub const DEFAULT_RETRY_INITIAL_MS: u64 = 1000;
pub const DEFAULT_RETRY_MAX_S: u64 = 60;
pub const DEFAULT_RETRY_JITTER: f64 = 0.25;
pub const DEFAULT_PROBE_MS: u64 = 1000;
pub const DEFAULT_MAX_PATHS: usize = 100_000;
/// Where `syncbus metrics` serves `/metrics` unless `[metrics] listen` says otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9477";

// ---------------------------------------------------------------- raw, as written

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    bus: RawBus,
    #[serde(default)]
    root: Vec<Spanned<RawRoot>>,
    #[serde(default)]
    target: Vec<Spanned<RawTarget>>,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    schedule: Vec<Spanned<RawSchedule>>,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    state_dir: Option<Spanned<String>>,
    initial_ms: Option<Spanned<u64>>,
    max_s: Option<Spanned<u64>>,
    jitter: Option<Spanned<f64>>,
    probe_ms: Option<Spanned<u64>>,
    max_paths: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    cron: Spanned<String>,
    roots: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    exclude_glob: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBus {
    runtime_dir: Option<Spanned<String>>,
    tcp_changes: Option<Spanned<String>>,
    tcp_deliveries: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoot {
    name: Spanned<String>,
    path: Spanned<String>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    #[serde(default)]
    exclude_glob: Vec<Spanned<String>>,
    #[serde(default = "yes")]
    builtin_excludes: bool,
    quiet_ms: Option<Spanned<u64>>,
    max_hold_ms: Option<Spanned<u64>>,
    stable_ms: Option<Spanned<u64>>,
    #[serde(default)]
    events: Events,
    #[serde(default)]
    allow_wipe: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Spanned<String>,
    url: Option<Spanned<String>>,
    command: Option<Spanned<Vec<Spanned<String>>>>,
    webhook: Option<Spanned<String>>,
    header_file: Option<Spanned<String>>,
    method: Option<Spanned<String>>,
    cdn_base_url: Option<Spanned<String>>,
    paths: Option<Spanned<String>>,
    on_failure: Option<Spanned<String>>,
    #[serde(default)]
    after: Vec<Spanned<String>>,
    #[serde(default)]
    include: Vec<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    roots: Option<Spanned<Vec<Spanned<String>>>>,
    password_file: Option<Spanned<String>>,
    timeout: Option<Spanned<u64>>,
    bwlimit: Option<Spanned<String>>,
    #[serde(default)]
    extra_args: Vec<Spanned<String>>,
    port: Option<Spanned<u16>>,
    identity_file: Option<Spanned<String>>,
    #[serde(default)]
    ssh_options: Vec<Spanned<String>>,
    two_way: Option<Spanned<bool>>,
    losers: Option<Spanned<String>>,
    #[serde(default)]
    allow_wipe: bool,
    framing: Option<Spanned<String>>,
}

fn yes() -> bool {
    true
}

/// Which kinds of change a root mirrors (sersync's `<inotify>` toggles). All on by
/// default: sersync's defaults silently lose chmod and symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Events {
    pub delete: bool,
    pub create_folder: bool,
    pub create_file: bool,
    pub close_write: bool,
    #[serde(rename = "move")]
    pub moves: bool,
    pub attrib: bool,
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

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (for messages and for the stages `syncbus run` spawns).
    pub file: PathBuf,
    pub runtime_dir: PathBuf,
    /// The change stream on TCP too (`tcp://host:port`), for subscribers elsewhere.
    pub tcp_changes: Option<String>,
    /// The delivery stream on TCP too.
    pub tcp_deliveries: Option<String>,
    pub roots: Vec<Root>,
    pub targets: Vec<Target>,
    pub retry: Retry,
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
    pub roots: Vec<String>,
    /// rsync-style globs left out of this full sync only.
    pub exclude_glob: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Root {
    pub name: String,
    pub path: PathBuf,
    pub rules: Rules,
    pub events: Events,
    pub quiet: Duration,
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

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub endpoint: Endpoint,
    /// Names of the roots mirrored to this target.
    pub roots: Vec<String>,
    /// Seconds without I/O before an rsync run is killed and retried (0: never).
    pub timeout: u64,
    pub bwlimit: Option<String>,
    pub extra_args: Vec<String>,
    /// The other side of a two-way pair (it runs syncbus too, with this machine as
    /// its two-way target): newest wins (`--update`), whole-tree compares never
    /// delete, and what a run replaces or deletes is kept in the peer's backup dir.
    pub two_way: bool,
    /// `losers = "copy"`: see [`Root::conflict_copies`].
    pub conflict_copies: bool,
    /// See [`Root::allow_wipe`]: for every root this target mirrors.
    pub allow_wipe: bool,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An rsync daemon: `rsync://[user@]host[:port]/module/path/` (always ends in `/`).
    Rsync {
        url: String,
        password_file: Option<PathBuf>,
    },
    /// rsync over ssh: `[user@]host:path/`.
    Ssh {
        dest: String,
        port: Option<u16>,
        identity_file: Option<PathBuf>,
        options: Vec<String>,
    },
    /// A directory on this machine.
    Local { path: PathBuf },
    /// A program run per batch (argv, never a shell), given the changed paths.
    Command {
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
        url: String,
        /// The HTTP method (`POST` unless told otherwise).
        method: String,
        /// Where the root is served: a path's public URL is this plus the path.
        base_url: Option<String>,
        /// `Name: value` lines sent as headers (credentials live here, never in the URL).
        header_file: Option<PathBuf>,
        include: Vec<String>,
        exclude: Vec<String>,
        after: Vec<String>,
    },
    /// A TCP listener (`tcp://host:port`) given each changed path: with
    /// `framing = "sersync"` one connection per path carrying its absolute path and
    /// nothing else (sersync's socket plugin), else one connection per batch of
    /// records with their operation (see [`Framing`]).
    Tcp {
        /// `host:port` (`[v6]:port`), as `TcpStream::connect` takes it.
        addr: String,
        framing: Framing,
        include: Vec<String>,
        exclude: Vec<String>,
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
    pub fn root(&self, name: &str) -> Option<&Root> {
        self.roots.iter().find(|r| r.name == name)
    }

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
        let mut v = Validator {
            environment,
            text,
            file,
            base: file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            errors: Vec::new(),
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let (line, column) = e.span().map(|s| v.line_col(s.start)).unwrap_or((0, 0));
                return Err(ConfigErrors(vec![ConfigError {
                    file: file.to_path_buf(),
                    line,
                    column,
                    key: String::new(),
                    message: e.message().trim().to_string(),
                }]));
            }
        };
        let config = v.config(raw);
        if v.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(v.errors))
        }
    }
}

// ---------------------------------------------------------------- errors

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the error has no position (e.g. the file is unreadable).
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `target[1].password_file`; empty when not about one key.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------- validation

struct Validator<'a> {
    text: &'a str,
    file: &'a Path,
    base: PathBuf,
    errors: Vec<ConfigError>,
    /// Whether the files and programs the config names are looked at on this machine
    /// (root directories, password and header files, command programs).
    environment: Environment,
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

impl Validator<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        (line, column)
    }

    fn error(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = self.line_col(span.start);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn name(&mut self, name: &Spanned<String>, key: &str, seen: &mut Vec<String>) -> String {
        let n = name.get_ref();
        let ok = !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok {
            self.error(
                name.span(),
                key,
                format!("invalid name `{n}`: use letters, digits, `_`, `-` and `.`"),
            );
        } else if seen.contains(n) {
            self.error(name.span(), key, format!("duplicate name `{n}`"));
        }
        seen.push(n.clone());
        n.clone()
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let runtime_span = raw.bus.runtime_dir.as_ref().map(|d| d.span());
        let tcp_changes = raw
            .bus
            .tcp_changes
            .as_ref()
            .and_then(|t| self.tcp(t, "bus.tcp_changes"));
        let tcp_deliveries = raw
            .bus
            .tcp_deliveries
            .as_ref()
            .and_then(|t| self.tcp(t, "bus.tcp_deliveries"));
        let runtime_dir = match raw.bus.runtime_dir {
            Some(d) => self.resolve(d.get_ref()),
            None => default_runtime_dir(),
        };
        let mut names = Vec::new();
        let root_spans: Vec<Range<usize>> =
            raw.root.iter().map(|r| r.get_ref().path.span()).collect();
        let given: Vec<(bool, bool)> = raw
            .root
            .iter()
            .map(|r| {
                let r = r.get_ref();
                (r.stable_ms.is_some(), r.max_hold_ms.is_some())
            })
            .collect();
        let mut roots: Vec<Root> = raw
            .root
            .into_iter()
            .enumerate()
            .map(|(i, r)| self.root(i, r, &mut names))
            .collect();
        if roots.is_empty() {
            self.error(0..0, "root", "no `[[root]]` defined: nothing to mirror");
        }
        // inotify gives one watch per directory: overlapping roots would share them.
        for (i, (a, span)) in roots.iter().zip(&root_spans).enumerate() {
            if let Some(b) = roots[..i]
                .iter()
                .find(|b| a.path.starts_with(&b.path) || b.path.starts_with(&a.path))
            {
                self.error(
                    span.clone(),
                    format!("root[{i}].path"),
                    format!(
                        "`{}` overlaps root `{}` (`{}`): roots must not contain each other",
                        a.path.display(),
                        b.name,
                        b.path.display()
                    ),
                );
            }
        }
        // A Unix socket path holds at most 107 bytes.
        let longest = runtime_dir.join("changes.sock");
        if longest.as_os_str().len() > 107 {
            let span = runtime_span.clone().unwrap_or(0..0);
            self.error(
                span,
                "bus.runtime_dir",
                format!(
                    "`{}` is too long for a socket path ({} bytes, at most 107): choose a shorter runtime_dir",
                    longest.display(),
                    longest.as_os_str().len()
                ),
            );
        }
        let mut tnames = Vec::new();
        // (name, is a command target) of every target, for `after` lists.
        let kinds: Vec<(String, bool)> = raw
            .target
            .iter()
            .map(|t| {
                let t = t.get_ref();
                let tcp = t.url.as_ref().is_some_and(|u| tcp::is_tcp(u.get_ref()));
                (t.name.get_ref().clone(), t.command.is_some() || tcp)
            })
            .collect();
        let targets: Vec<Target> = raw
            .target
            .into_iter()
            .enumerate()
            .filter_map(|(i, t)| self.target(i, t, &roots, &mut tnames, &kinds))
            .collect();
        for (root, (stable_given, max_hold_given)) in roots.iter_mut().zip(given) {
            root.two_way = targets
                .iter()
                .any(|t| t.two_way && t.roots.contains(&root.name));
            root.conflict_copies = targets
                .iter()
                .any(|t| t.conflict_copies && t.roots.contains(&root.name));
            if root.two_way {
                if !stable_given {
                    root.stable = Duration::from_millis(DEFAULT_STABLE_MS);
                }
                // syncbus's own dir goes to no target, one-way ones included.
                if let Ok(rules) = root.rules.and_glob(&format!("/{TWO_WAY_DIR}/")) {
                    root.rules = rules;
                }
            }
            if !root.stable.is_zero() && !max_hold_given {
                // A file that must rest is not sent while it is still being written,
                // however long that takes (unless `max_hold_ms` says otherwise).
                root.max_hold = Duration::from_secs(365 * 86_400);
            }
        }
        let retry = self.retry(raw.retry);
        let metrics = self.metrics(raw.metrics);
        let schedules = raw
            .schedule
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.schedule(i, s.into_inner(), &roots))
            .collect();
        Config {
            file: self.file.to_path_buf(),
            runtime_dir,
            tcp_changes,
            tcp_deliveries,
            roots,
            targets,
            retry,
            schedules,
            metrics,
        }
    }

    fn metrics(&mut self, raw: RawMetrics) -> Option<std::net::SocketAddr> {
        let Some(listen) = raw.listen else {
            return DEFAULT_METRICS_LISTEN.parse().ok();
        };
        let v = listen.get_ref().trim();
        if v.is_empty() || v == "off" {
            return None;
        }
        let parsed = match v.parse::<u16>() {
            Ok(port) => Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
            Err(_) => v.parse::<std::net::SocketAddr>(),
        };
        match parsed {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    listen.span(),
                    "metrics.listen",
                    format!("`{v}` is not `PORT` (loopback), `IP:PORT` or `off`"),
                );
                None
            }
        }
    }

    /// `PORT` (loopback) or `HOST:PORT` as a ZeroMQ TCP endpoint.
    fn tcp(&mut self, raw: &Spanned<String>, key: &str) -> Option<String> {
        let v = raw.get_ref().trim();
        let (host, port) = match v.rsplit_once(':') {
            Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']'), p),
            None => ("127.0.0.1", v),
        };
        let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
        // libzmq binds addresses, not host names.
        let host_ok = host == "*" || host.parse::<std::net::IpAddr>().is_ok();
        if !port_ok || !host_ok {
            self.error(
                raw.span(),
                key,
                format!("`{v}` is not `PORT` (loopback) or `IP:PORT` (an address, not a name)"),
            );
            return None;
        }
        Some(if host.contains(':') {
            format!("tcp://[{host}]:{port}")
        } else {
            format!("tcp://{host}:{port}")
        })
    }

    fn retry(&mut self, raw: RawRetry) -> Retry {
        let get = |v: &Option<Spanned<u64>>, d: u64| v.as_ref().map_or(d, |v| *v.get_ref());
        let initial = get(&raw.initial_ms, DEFAULT_RETRY_INITIAL_MS);
        let max = get(&raw.max_s, DEFAULT_RETRY_MAX_S);
        let probe = get(&raw.probe_ms, DEFAULT_PROBE_MS);
        for (v, key, min) in [
            (&raw.initial_ms, "retry.initial_ms", 1),
            (&raw.max_s, "retry.max_s", 1),
            (&raw.probe_ms, "retry.probe_ms", 10),
        ] {
            if let Some(v) = v.as_ref().filter(|v| *v.get_ref() < min) {
                self.error(v.span(), key, format!("must be at least {min}"));
            }
        }
        if let Some(m) = raw
            .max_s
            .as_ref()
            .filter(|m| *m.get_ref() > 0 && *m.get_ref() * 1000 < initial)
        {
            self.error(
                m.span(),
                "retry.max_s",
                format!("below retry.initial_ms ({initial} ms)"),
            );
        }
        let jitter = raw
            .jitter
            .as_ref()
            .map_or(DEFAULT_RETRY_JITTER, |j| *j.get_ref());
        if let Some(j) = raw
            .jitter
            .as_ref()
            .filter(|j| !(0.0..=1.0).contains(j.get_ref()))
        {
            self.error(j.span(), "retry.jitter", "a fraction between 0 and 1");
        }
        let max_paths = raw
            .max_paths
            .as_ref()
            .map_or(DEFAULT_MAX_PATHS, |m| *m.get_ref());
        if let Some(m) = raw.max_paths.as_ref().filter(|m| *m.get_ref() == 0) {
            self.error(m.span(), "retry.max_paths", "must be at least 1");
        }
        Retry {
            state_dir: match raw.state_dir {
                Some(d) => self.resolve(d.get_ref()),
                None => default_state_dir(),
            },
            initial: Duration::from_millis(initial),
            max: Duration::from_secs(max),
            jitter,
            probe: Duration::from_millis(probe),
            max_paths,
        }
    }

    /// A `command = [...]` target: the program must exist; rsync's own keys are errors.
    fn command_target(
        &mut self,
        i: usize,
        raw: &RawTarget,
        command: &Spanned<Vec<Spanned<String>>>,
        name: String,
        bound: Vec<String>,
        kinds: &[(String, bool)],
    ) -> Option<Target> {
        let k = |f: &str| format!("target[{i}].{f}");
        let argv: Vec<String> = command
            .get_ref()
            .iter()
            .map(|a| a.get_ref().clone())
            .collect();
        match argv.first() {
            None => self.error(command.span(), k("command"), "empty: name a program"),
            Some(prog) => {
                let path = if prog.contains('/') {
                    Some(self.resolve(prog))
                } else {
                    std::env::var_os("PATH").and_then(|paths| {
                        std::env::split_paths(&paths)
                            .map(|d| d.join(prog))
                            .find(|p| p.is_file())
                    })
                };
                let runnable = path.as_ref().is_some_and(|p| {
                    std::fs::metadata(p)
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                });
                if !runnable && self.environment == Environment::Checked {
                    self.error(
                        command.get_ref()[0].span(),
                        format!("{}[0]", k("command")),
                        format!("`{prog}` is not an executable file (nor found in PATH)"),
                    );
                }
            }
        }
        let rsync_only = [
            raw.password_file
                .as_ref()
                .map(|p| ("password_file", p.span())),
            raw.bwlimit.as_ref().map(|p| ("bwlimit", p.span())),
            raw.extra_args.first().map(|p| ("extra_args", p.span())),
            raw.port.as_ref().map(|p| ("port", p.span())),
            raw.identity_file
                .as_ref()
                .map(|p| ("identity_file", p.span())),
            raw.ssh_options.first().map(|p| ("ssh_options", p.span())),
            raw.two_way.as_ref().map(|p| ("two_way", p.span())),
            raw.losers.as_ref().map(|p| ("losers", p.span())),
        ];
        for (key, span) in rsync_only.into_iter().flatten() {
            self.error(span, k(key), "not for command targets");
        }
        let (as_args, each) = match raw.paths.as_ref().map(|p| p.get_ref().as_str()) {
            None | Some("stdin") => (false, false),
            Some("args") => (true, false),
            Some("each") => (true, true),
            Some(other) => {
                let span = raw.paths.as_ref().map(|p| p.span()).unwrap_or(0..0);
                self.error(
                    span,
                    k("paths"),
                    format!(
                        "`{other}`: `stdin` (NUL-separated), `args` or `each` (one run per path)"
                    ),
                );
                (false, false)
            }
        };
        let on_failure = self.on_failure(i, raw);
        let (include, exclude, after) = self.hook_keys(i, raw, kinds);
        Some(Target {
            name,
            on_failure,
            endpoint: Endpoint::Command {
                argv,
                as_args,
                each,
                include,
                exclude,
                after,
            },
            roots: bound,
            timeout: raw
                .timeout
                .as_ref()
                .map(|t| *t.get_ref())
                .unwrap_or(DEFAULT_TIMEOUT_S),
            bwlimit: None,
            extra_args: Vec::new(),
            two_way: false,
            conflict_copies: false,
            allow_wipe: raw.allow_wipe,
        })
    }

    /// `include`, `exclude` and `after` of a command or webhook target.
    fn hook_keys(
        &mut self,
        i: usize,
        raw: &RawTarget,
        kinds: &[(String, bool)],
    ) -> (Vec<String>, Vec<String>, Vec<String>) {
        let k = |f: &str| format!("target[{i}].{f}");
        let mut globs = |list: &[Spanned<String>], key: &str| -> Vec<String> {
            for (j, g) in list.iter().enumerate() {
                if let Err(e) = globset::Glob::new(g.get_ref()) {
                    self.error(g.span(), format!("{}[{j}]", k(key)), e.to_string());
                }
            }
            list.iter().map(|g| g.get_ref().clone()).collect()
        };
        let include = globs(&raw.include, "include");
        let exclude = globs(&raw.exclude, "exclude");
        for (j, a) in raw.after.iter().enumerate() {
            let msg = match kinds.iter().find(|(n, _)| n == a.get_ref()) {
                None => Some(format!("no target named `{}`", a.get_ref())),
                Some((_, true)) => Some(format!(
                    "`{}` is a command or tcp target: a hook runs after an rsync target",
                    a.get_ref()
                )),
                Some(_) => None,
            };
            if let Some(m) = msg {
                self.error(a.span(), format!("{}[{j}]", k("after")), m);
            }
        }
        let after = raw.after.iter().map(|a| a.get_ref().clone()).collect();
        (include, exclude, after)
    }

    /// `on_failure = "retry" | "log"` of a command or webhook target.
    fn on_failure(&mut self, i: usize, raw: &RawTarget) -> OnFailure {
        match raw
            .on_failure
            .as_ref()
            .map(|v| (v.get_ref().as_str(), v.span()))
        {
            None | Some(("retry", _)) => OnFailure::Retry,
            Some(("log", _)) => OnFailure::Log,
            Some((other, span)) => {
                self.error(
                    span,
                    format!("target[{i}].on_failure"),
                    format!("`{other}`: `retry` (until it succeeds) or `log` (logged and counted, not retried)"),
                );
                OnFailure::Retry
            }
        }
    }

    /// A `webhook = "http(s)://…"` target: credentials only through `header_file`.
    fn webhook_target(
        &mut self,
        i: usize,
        raw: &RawTarget,
        url: &Spanned<String>,
        name: String,
        bound: Vec<String>,
        kinds: &[(String, bool)],
    ) -> Option<Target> {
        let k = |f: &str| format!("target[{i}].{f}");
        let u = url.get_ref();
        let rest = u
            .strip_prefix("http://")
            .or_else(|| u.strip_prefix("https://"));
        match rest {
            None => self.error(
                url.span(),
                k("webhook"),
                format!("`{u}` is not an http:// or https:// URL"),
            ),
            Some(r) if r.split('/').next().unwrap_or("").contains('@') => self.error(
                url.span(),
                k("webhook"),
                "credentials in the URL would end up in logs: put them in `header_file` (e.g. `Authorization: Bearer …`)",
            ),
            Some(r) if r.is_empty() || r.starts_with('/') => {
                self.error(url.span(), k("webhook"), format!("no host in `{u}`"))
            }
            Some(_) => {}
        }
        let header_file = raw.header_file.as_ref().map(|h| {
            let path = self.resolve(h.get_ref());
            let check = check_password_file(&path).and_then(|()| {
                let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
                match text
                    .lines()
                    .enumerate()
                    .find(|(_, l)| !l.trim().is_empty() && !l.contains(':'))
                {
                    Some((n, _)) => Err(format!(
                        "line {} of `{}` is not `Name: value`",
                        n + 1,
                        path.display()
                    )),
                    None => Ok(()),
                }
            });
            if let (Err(msg), Environment::Checked) = (check, self.environment) {
                self.error(
                    h.span(),
                    k("header_file"),
                    msg.replace("password file", "header file"),
                );
            }
            path
        });
        let not_here = [
            raw.password_file
                .as_ref()
                .map(|p| ("password_file", p.span())),
            raw.bwlimit.as_ref().map(|p| ("bwlimit", p.span())),
            raw.extra_args.first().map(|p| ("extra_args", p.span())),
            raw.port.as_ref().map(|p| ("port", p.span())),
            raw.identity_file
                .as_ref()
                .map(|p| ("identity_file", p.span())),
            raw.ssh_options.first().map(|p| ("ssh_options", p.span())),
            raw.two_way.as_ref().map(|p| ("two_way", p.span())),
            raw.losers.as_ref().map(|p| ("losers", p.span())),
            raw.paths.as_ref().map(|p| ("paths", p.span())),
        ];
        for (key, span) in not_here.into_iter().flatten() {
            self.error(span, k(key), "not for webhook targets");
        }
        let method = raw
            .method
            .as_ref()
            .map_or("POST".to_string(), |m| m.get_ref().clone());
        if let Some(m) = raw.method.as_ref() {
            if m.get_ref().is_empty() || !m.get_ref().bytes().all(|b| b.is_ascii_uppercase()) {
                self.error(
                    m.span(),
                    k("method"),
                    "an HTTP method in capitals (`POST`, `GET`, `PURGE`…)",
                );
            }
        }
        let base_url = raw.cdn_base_url.as_ref().map(|b| {
            let v = b.get_ref();
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                self.error(
                    b.span(),
                    k("cdn_base_url"),
                    format!("`{v}` is not an http:// or https:// URL"),
                );
            }
            if v.ends_with('/') {
                v.clone()
            } else {
                format!("{v}/")
            }
        });
        if u.contains("{url}") && base_url.is_none() {
            self.error(
                url.span(),
                k("webhook"),
                "`{url}` needs `cdn_base_url` (where the root is served)",
            );
        }
        let on_failure = self.on_failure(i, raw);
        let (include, exclude, after) = self.hook_keys(i, raw, kinds);
        Some(Target {
            name,
            on_failure,
            endpoint: Endpoint::Http {
                method,
                base_url,
                url: u.clone(),
                header_file,
                include,
                exclude,
                after,
            },
            roots: bound,
            timeout: raw
                .timeout
                .as_ref()
                .map(|t| *t.get_ref())
                .unwrap_or(DEFAULT_TIMEOUT_S),
            bwlimit: None,
            extra_args: Vec::new(),
            two_way: false,
            conflict_copies: false,
            allow_wipe: raw.allow_wipe,
        })
    }

    /// A `roots = [...]` list: every root when absent; each name must exist.
    fn root_names(
        &mut self,
        list: &Option<Spanned<Vec<Spanned<String>>>>,
        key: &str,
        roots: &[Root],
    ) -> Vec<String> {
        let Some(list) = list else {
            return roots.iter().map(|r| r.name.clone()).collect();
        };
        if list.get_ref().is_empty() {
            self.error(list.span(), key, "empty: name at least one root");
        }
        for (j, r) in list.get_ref().iter().enumerate() {
            if !roots.iter().any(|x| &x.name == r.get_ref()) {
                self.error(
                    r.span(),
                    format!("{key}[{j}]"),
                    format!("no root named `{}`", r.get_ref()),
                );
            }
        }
        list.get_ref().iter().map(|r| r.get_ref().clone()).collect()
    }

    fn schedule(&mut self, i: usize, raw: RawSchedule, roots: &[Root]) -> Schedule {
        let k = |f: &str| format!("schedule[{i}].{f}");
        let cron = raw.cron.get_ref().trim().to_string();
        if let Err(e) = check_cron(&cron) {
            self.error(raw.cron.span(), k("cron"), e);
        }
        let names = self.root_names(&raw.roots, &k("roots"), roots);
        for (j, g) in raw.exclude_glob.iter().enumerate() {
            if let Err(e) = Rules::new(&[], std::slice::from_ref(g.get_ref()), false) {
                self.error(
                    g.span(),
                    format!("{}[{j}]", k("exclude_glob")),
                    e.to_string(),
                );
            }
        }
        Schedule {
            cron,
            roots: names,
            exclude_glob: raw
                .exclude_glob
                .into_iter()
                .map(|g| g.into_inner())
                .collect(),
        }
    }

    fn root(&mut self, i: usize, raw: Spanned<RawRoot>, names: &mut Vec<String>) -> Root {
        let k = |f: &str| format!("root[{i}].{f}");
        let raw = raw.into_inner();
        let name = self.name(&raw.name, &k("name"), names);
        let path = self.resolve(raw.path.get_ref());
        match std::fs::metadata(&path) {
            _ if self.environment == Environment::Ignored => {}
            Ok(m) if m.is_dir() => {}
            Ok(_) => self.error(
                raw.path.span(),
                k("path"),
                format!("`{}` is not a directory", path.display()),
            ),
            Err(e) => self.error(
                raw.path.span(),
                k("path"),
                format!("cannot use `{}`: {e}", path.display()),
            ),
        }
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        // Compile each pattern alone first, so an error points at its own line.
        let mut regexes = Vec::new();
        for (j, r) in raw.exclude.iter().enumerate() {
            match Rules::new(std::slice::from_ref(r.get_ref()), &[], false) {
                Ok(_) => regexes.push(r.get_ref().clone()),
                Err(e) => self.error(r.span(), format!("{}[{j}]", k("exclude")), e.to_string()),
            }
        }
        let mut globs = Vec::new();
        for (j, g) in raw.exclude_glob.iter().enumerate() {
            match Rules::new(&[], std::slice::from_ref(g.get_ref()), false) {
                Ok(_) => globs.push(g.get_ref().clone()),
                Err(e) => self.error(
                    g.span(),
                    format!("{}[{j}]", k("exclude_glob")),
                    e.to_string(),
                ),
            }
        }
        let rules = Rules::new(&regexes, &globs, raw.builtin_excludes).unwrap_or_default();
        let quiet = raw
            .quiet_ms
            .as_ref()
            .map(|q| *q.get_ref())
            .unwrap_or(DEFAULT_QUIET_MS);
        let max_hold = match &raw.max_hold_ms {
            Some(m) if *m.get_ref() == 0 || *m.get_ref() < quiet => {
                self.error(
                    m.span(),
                    k("max_hold_ms"),
                    format!("must be at least quiet_ms ({quiet}) and above 0"),
                );
                DEFAULT_MAX_HOLD_MS
            }
            Some(m) => *m.get_ref(),
            None => DEFAULT_MAX_HOLD_MS.max(quiet),
        };
        Root {
            name,
            path,
            rules,
            events: raw.events,
            quiet: Duration::from_millis(quiet),
            max_hold: Duration::from_millis(max_hold),
            stable: Duration::from_millis(raw.stable_ms.map_or(0, |s| s.into_inner())),
            two_way: false,
            conflict_copies: false,
            allow_wipe: raw.allow_wipe,
        }
    }

    fn target(
        &mut self,
        i: usize,
        raw: Spanned<RawTarget>,
        roots: &[Root],
        names: &mut Vec<String>,
        kinds: &[(String, bool)],
    ) -> Option<Target> {
        let k = |f: &str| format!("target[{i}].{f}");
        let table = raw.span();
        let raw = raw.into_inner();
        let name = self.name(&raw.name, &k("name"), names);
        let bound = self.root_names(&raw.roots, &k("roots"), roots);
        let command_keys = [
            raw.paths.as_ref().map(|p| ("paths", p.span())),
            raw.after.first().map(|p| ("after", p.span())),
            raw.include.first().map(|p| ("include", p.span())),
            raw.exclude.first().map(|p| ("exclude", p.span())),
        ];
        let kinds_given = [
            raw.url.is_some(),
            raw.command.is_some(),
            raw.webhook.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if kinds_given > 1 {
            self.error(
                table,
                k("url"),
                "give one of `url`, `command` or `webhook`, not several",
            );
            return None;
        }
        if let Some(w) = &raw.webhook {
            return self.webhook_target(i, &raw, w, name, bound, kinds);
        }
        if let Some(u) = raw.url.as_ref().filter(|u| tcp::is_tcp(u.get_ref())) {
            return self.tcp_target(i, &raw, u, name, bound, kinds);
        }
        if let Some(f) = &raw.framing {
            self.error(f.span(), k("framing"), "only for tcp:// targets");
        }
        let webhook_only = [
            raw.header_file.as_ref().map(|p| ("header_file", p.span())),
            raw.method.as_ref().map(|p| ("method", p.span())),
            raw.cdn_base_url
                .as_ref()
                .map(|p| ("cdn_base_url", p.span())),
        ];
        for (key, span) in webhook_only.into_iter().flatten() {
            self.error(span, k(key), "only for webhook targets");
        }
        if let (Some(v), None) = (&raw.on_failure, &raw.command) {
            self.error(
                v.span(),
                k("on_failure"),
                "only for command and webhook targets (an rsync target is always retried)",
            );
        }
        let url = match (&raw.url, &raw.command) {
            (Some(_), Some(c)) => {
                self.error(
                    c.span(),
                    k("command"),
                    "give either `url` or `command`, not both",
                );
                return None;
            }
            (None, None) => {
                self.error(
                    table,
                    k("url"),
                    "missing: every target needs a `url` (rsync), a `command` or a `webhook`",
                );
                return None;
            }
            (None, Some(c)) => return self.command_target(i, &raw, c, name, bound, kinds),
            (Some(u), None) => u,
        };
        for (key, span) in command_keys.into_iter().flatten() {
            self.error(span, k(key), "only for command targets");
        }
        let endpoint = match parse_url(url.get_ref()) {
            Ok(Url::Rsync(url)) => Endpoint::Rsync {
                url,
                password_file: raw.password_file.as_ref().map(|p| {
                    let path = self.resolve(p.get_ref());
                    if self.environment == Environment::Checked {
                        if let Err(msg) = check_password_file(&path) {
                            self.error(p.span(), k("password_file"), msg);
                        }
                    }
                    path
                }),
            },
            Ok(Url::Ssh(dest)) => Endpoint::Ssh {
                dest,
                port: raw.port.as_ref().map(|p| *p.get_ref()),
                identity_file: raw
                    .identity_file
                    .as_ref()
                    .map(|p| self.resolve(p.get_ref())),
                options: raw
                    .ssh_options
                    .iter()
                    .map(|o| o.get_ref().clone())
                    .collect(),
            },
            Ok(Url::Local(p)) => {
                let path = self.resolve(&p);
                let canon = canonical_prefix(&path);
                for r in roots.iter().filter(|r| bound.contains(&r.name)) {
                    if canon.starts_with(&r.path) || r.path.starts_with(&canon) {
                        self.error(
                            url.span(),
                            k("url"),
                            format!(
                                "local target `{}` overlaps root `{}` (`{}`): it would mirror into itself",
                                path.display(),
                                r.name,
                                r.path.display()
                            ),
                        );
                    }
                }
                Endpoint::Local { path }
            }
            Err(msg) => {
                self.error(url.span(), k("url"), msg);
                Endpoint::Local {
                    path: PathBuf::new(),
                }
            }
        };
        let is_ssh = matches!(endpoint, Endpoint::Ssh { .. });
        if !matches!(endpoint, Endpoint::Rsync { .. }) {
            if let Some(p) = &raw.password_file {
                self.error(p.span(), k("password_file"), "only for rsync:// targets");
            }
        }
        if !is_ssh {
            let ssh_only = [
                raw.port.as_ref().map(|p| ("port", p.span())),
                raw.identity_file
                    .as_ref()
                    .map(|p| ("identity_file", p.span())),
                raw.ssh_options.first().map(|p| ("ssh_options", p.span())),
            ];
            for (key, span) in ssh_only.into_iter().flatten() {
                self.error(span, k(key), "only for ssh targets (`[user@]host:path`)");
            }
        }
        if let Some(b) = &raw.bwlimit {
            let s = b.get_ref();
            let digits = s.trim_end_matches(|c: char| "kKmMgGtTpPbB".contains(c));
            if digits.is_empty() || digits.parse::<f64>().is_err() {
                self.error(
                    b.span(),
                    k("bwlimit"),
                    format!("`{s}` is not a rate like `500`, `1.5M` or `20m` (KiB/s by default)"),
                );
            }
        }
        let two_way = raw.two_way.as_ref().is_some_and(|t| *t.get_ref());
        if let (true, Some(t)) = (two_way, &raw.two_way) {
            if bound.len() != 1 {
                self.error(
                    t.span(),
                    k("two_way"),
                    "a two-way target mirrors exactly one root (set `roots = [\"…\"]`): the peer's root is that one directory",
                );
            }
        }
        let conflict_copies = match &raw.losers {
            None => false,
            Some(l) if !two_way => {
                self.error(
                    l.span(),
                    k("losers"),
                    "only for two-way targets (`two_way = true`)",
                );
                false
            }
            Some(l) => match l.get_ref().as_str() {
                "backup" => false,
                "copy" => true,
                other => {
                    self.error(
                        l.span(),
                        k("losers"),
                        format!("`{other}`: `backup` (kept in .syncbus/backup/) or `copy` (also beside the file)"),
                    );
                    false
                }
            },
        };
        for (j, a) in raw.extra_args.iter().enumerate() {
            let arg = a.get_ref();
            const OURS: &[&str] = &[
                "--files-from",
                "--from0",
                "-0",
                "--delete-missing-args",
                "--exclude-from",
                "--rsh",
                "-e",
                "--password-file",
                "--timeout",
                "--bwlimit",
            ];
            if let Some(o) = OURS
                .iter()
                .find(|o| arg == *o || arg.starts_with(&format!("{o}=")))
            {
                self.error(
                    a.span(),
                    format!("{}[{j}]", k("extra_args")),
                    format!("`{o}` is set by syncbus itself (use the target's own key where there is one)"),
                );
            } else if let Some((o, why)) = changes_meaning(arg) {
                self.error(
                    a.span(),
                    format!("{}[{j}]", k("extra_args")),
                    format!("`{o}` would make a run report success without the target holding the source ({why}); syncbus refuses it"),
                );
            } else if !arg.starts_with('-') {
                self.error(
                    a.span(),
                    format!("{}[{j}]", k("extra_args")),
                    format!("`{arg}` is not an option: extra arguments must start with `-`"),
                );
            }
        }
        Some(Target {
            name,
            endpoint,
            roots: bound,
            timeout: raw
                .timeout
                .map(|t| t.into_inner())
                .unwrap_or(DEFAULT_TIMEOUT_S),
            bwlimit: raw.bwlimit.map(|b| b.into_inner()),
            extra_args: raw.extra_args.into_iter().map(|a| a.into_inner()).collect(),
            two_way,
            conflict_copies,
            allow_wipe: raw.allow_wipe,
            on_failure: OnFailure::Retry,
        })
    }
}

/// The longest existing ancestor canonicalized, with the rest appended (a local target
/// need not exist yet).
fn canonical_prefix(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut p = path.to_path_buf();
    loop {
        if let Ok(c) = std::fs::canonicalize(&p) {
            return rest
                .iter()
                .rev()
                .fold(c, |acc: PathBuf, part| acc.join(part));
        }
        match (p.file_name().map(|n| n.to_os_string()), p.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                p = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// True when rsync would read `url` as a directory on this machine.
pub fn is_local_url(url: &str) -> bool {
    matches!(parse_url(url), Ok(Url::Local(_)))
}

enum Url {
    Rsync(String),
    Ssh(String),
    Local(String),
}

/// Reads a target URL the way rsync does: `rsync://…` and `host::module` are daemons,
/// a `:` before the first `/` makes `[user@]host:path` (ssh), anything else is local.
fn parse_url(url: &str) -> Result<Url, String> {
    let with_slash = |s: String| if s.ends_with('/') { s } else { s + "/" };
    if let Some(rest) = url.strip_prefix("rsync://") {
        let path = rest.split_once('/').map_or("", |(_, p)| p);
        let (host_only, port) = rsync_authority(rest);
        if let Some(port) = port {
            if !port.is_empty() && port.parse::<u16>().is_err() && !host_only.contains(':') {
                return Err(format!("invalid port `{port}` in `{url}`"));
            }
        }
        if host_only.is_empty() {
            return Err(format!(
                "no host in `{url}` (expected rsync://[user@]host[:port]/module/path)"
            ));
        }
        if path.split('/').next().unwrap_or("").is_empty() {
            return Err(format!(
                "no module in `{url}` (expected rsync://[user@]host[:port]/module/path)"
            ));
        }
        return Ok(Url::Rsync(with_slash(url.to_string())));
    }
    if url.contains("://") {
        return Err(format!(
            "unsupported URL scheme in `{url}` (rsync://, tcp://, [user@]host:path or a directory)"
        ));
    }
    if let Some((host, module)) = url.split_once("::") {
        if !host.contains('/') {
            if host.is_empty() || module.is_empty() {
                return Err(format!(
                    "`{url}` needs a host and a module (host::module/path)"
                ));
            }
            return Ok(Url::Rsync(with_slash(format!("rsync://{host}/{module}"))));
        }
    }
    if let Some(colon) = url.find(':') {
        if !url[..colon].contains('/') {
            let host = url[..colon]
                .rsplit_once('@')
                .map(|(_, h)| h)
                .unwrap_or(&url[..colon]);
            if host.is_empty() {
                return Err(format!("no host in `{url}` (expected [user@]host:path)"));
            }
            let path = &url[colon + 1..];
            return Ok(Url::Ssh(if path.is_empty() {
                url.to_string()
            } else {
                with_slash(url.to_string())
            }));
        }
    }
    if url.is_empty() {
        return Err("empty url".into());
    }
    Ok(Url::Local(url.to_string()))
}

/// rsync itself refuses a password file others can read; say so before it does.
fn check_password_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read password file `{}`: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "password file `{}` has mode {mode:04o}, expected 0600 (chmod 600 it)",
            path.display()
        ));
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid != 0 && meta.uid() != uid {
        return Err(format!(
            "password file `{}` belongs to uid {}, not to the user running syncbus ({uid})",
            path.display(),
            meta.uid()
        ));
    }
    Ok(())
}

/// Checks a crontab(5) line's time fields (five fields, or an `@daily`-style alias).
pub fn check_cron(cron: &str) -> Result<(), String> {
    let fields = cron.split_whitespace().count();
    if !cron.starts_with('@') && fields != 5 {
        return Err(format!(
            "`{cron}` has {fields} fields; crontab(5) syntax has five: minute hour day-of-month month day-of-week (e.g. `30 3 * * *`)"
        ));
    }
    cron.parse::<croner::Cron>()
        .map(|_| ())
        .map_err(|e| format!("`{cron}` is not a valid crontab(5) schedule: {e}"))
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

/// rsync options that change what a run means: with them a run can exit 0 while the
/// target does not hold what the source holds (or the source loses files), so status
/// would say OK over a diverged mirror. Returns the option as written and why.
fn changes_meaning(arg: &str) -> Option<(&str, &'static str)> {
    const LONG: &[(&str, &str)] = &[
        ("--dry-run", "nothing is written"),
        ("--list-only", "nothing is written"),
        ("--only-write-batch", "nothing is written"),
        ("--write-batch", "a batch file is written beside the run"),
        ("--read-batch", "the source is not read"),
        ("--remove-source-files", "it deletes files from the source"),
        ("--existing", "new files are never sent"),
        ("--ignore-non-existing", "new files are never sent"),
        ("--ignore-existing", "changed files are never sent"),
        (
            "--update",
            "a newer file on the target is kept; use `two_way = true` for newest-wins",
        ),
        ("--size-only", "an edit that keeps the size is never sent"),
        (
            "--cvs-exclude",
            "it excludes ordinary files such as *.bak, *.o and core",
        ),
        (
            "--max-delete",
            "deletes stop part way; syncbus guards whole-root deletes itself",
        ),
    ];
    let name = arg.split_once('=').map_or(arg, |(n, _)| n);
    if arg.starts_with("--") {
        return LONG
            .iter()
            .find(|(o, _)| *o == name)
            .map(|(_, why)| (name, *why));
    }
    // A cluster of short options (`-avn`); the rest of the word after an option that
    // takes a value (`-T/tmp`) is that value, not options.
    const SHORT: &[(char, &str, &str)] = &[
        ('n', "-n", "nothing is written"),
        (
            'u',
            "-u",
            "a newer file on the target is kept; use `two_way = true` for newest-wins",
        ),
        (
            'C',
            "-C",
            "it excludes ordinary files such as *.bak, *.o and core",
        ),
    ];
    for c in arg.strip_prefix('-')?.chars() {
        if "BefTM@".contains(c) {
            break;
        }
        if let Some((_, o, why)) = SHORT.iter().find(|(s, _, _)| *s == c) {
            return Some((o, why));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_probed_at_the_host_and_port_its_url_names() {
        let rsync = |url: &str| Endpoint::Rsync {
            url: url.into(),
            password_file: None,
        };
        let table = [
            ("rsync://h/m/", "h:873"),
            ("rsync://u@h:8730/m/sub/", "h:8730"),
            ("rsync://h:/m/", "h:873"),
            ("rsync://[::1]:9/m/", "[::1]:9"),
            ("rsync://[::1]/m/", "[::1]:873"),
        ];
        for (url, want) in table {
            assert_eq!(rsync(url).address().as_deref(), Some(want), "{url}");
        }
        let web = Endpoint::Http {
            url: "https://cdn.example/purge?x".into(),
            method: "POST".into(),
            base_url: None,
            header_file: None,
            include: vec![],
            exclude: vec![],
            after: vec![],
        };
        assert_eq!(web.address().as_deref(), Some("cdn.example:443"));
        let local = Endpoint::Local { path: "/m".into() };
        assert_eq!(local.address(), None);
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("src")).unwrap();
            Fixture { dir }
        }
        fn file(&self) -> PathBuf {
            self.dir.path().join("syncbus.toml")
        }
        fn parse(&self, text: &str) -> Result<Config, ConfigErrors> {
            Config::parse(text, &self.file())
        }
        fn errors(&self, text: &str) -> Vec<ConfigError> {
            self.parse(text).expect_err("config should be rejected").0
        }
    }

    const MINIMAL: &str = "[[root]]\nname = \"www\"\npath = \"src\"\n";

    #[test]
    fn minimal_config_gets_the_defaults() {
        let f = Fixture::new();
        let c = f
            .parse(&format!(
                "{MINIMAL}[[target]]\nname = \"m\"\nurl = \"mirror\"\n"
            ))
            .unwrap();
        let r = &c.roots[0];
        assert_eq!(
            r.path,
            std::fs::canonicalize(f.dir.path().join("src")).unwrap()
        );
        assert_eq!(r.events, Events::default());
        assert!(
            r.events.attrib && r.events.create_file,
            "chmod and symlinks on by default"
        );
        assert_eq!(r.quiet, Duration::from_millis(DEFAULT_QUIET_MS));
        assert!(
            r.rules.excludes(&"x.swp".into(), false) || r.rules.excludes(&".x.swp".into(), false)
        );
        let t = &c.targets[0];
        assert_eq!(t.roots, vec!["www"]);
        assert_eq!(t.timeout, DEFAULT_TIMEOUT_S);
        assert_eq!(
            t.endpoint,
            Endpoint::Local {
                path: f.dir.path().join("mirror")
            }
        );
        assert_eq!(
            t.destination("www"),
            format!("{}/", f.dir.path().join("mirror").display())
        );
    }

    #[test]
    fn retry_and_schedule_defaults_and_values() {
        let f = Fixture::new();
        let c = f.parse(MINIMAL).unwrap();
        assert_eq!(
            c.retry.initial,
            Duration::from_millis(DEFAULT_RETRY_INITIAL_MS)
        );
        assert_eq!(c.retry.max, Duration::from_secs(DEFAULT_RETRY_MAX_S));
        assert!(c.schedules.is_empty());
        let c = f
            .parse(&format!(
                "{MINIMAL}[retry]\nstate_dir = \"state\"\nmax_s = 5\n\
                 [[schedule]]\ncron = \"30 3 * * 1-5\"\nexclude_glob = [\"*.log\"]\n\
                 [[schedule]]\ncron = \"@hourly\"\n"
            ))
            .unwrap();
        assert_eq!(c.retry.state_dir, f.dir.path().join("state"));
        assert_eq!(c.retry.max, Duration::from_secs(5));
        assert_eq!(c.schedules[0].roots, vec!["www"]);
        assert_eq!(c.schedules[0].exclude_glob, vec!["*.log"]);
        assert_eq!(c.schedules[1].cron, "@hourly");
    }

    #[test]
    fn command_targets_are_validated_like_the_others() {
        let f = Fixture::new();
        let c = f
            .parse(&format!(
                "{MINIMAL}[[target]]\nname = \"hook\"\ncommand = [\"true\", \"x\"]\n\
                 paths = \"args\"\ninclude = [\"*.html\"]\n"
            ))
            .unwrap();
        match &c.targets[0].endpoint {
            Endpoint::Command {
                argv,
                as_args,
                include,
                ..
            } => {
                assert_eq!(argv, &["true", "x"]);
                assert!(*as_args);
                assert_eq!(include, &["*.html"]);
            }
            other => panic!("{other:?}"),
        }
        let e = f.errors(&format!(
            "{MINIMAL}[[target]]\nname = \"a\"\ncommand = [\"/no/such/prog\"]\n\
             bwlimit = \"1M\"\npaths = \"pipe\"\n\
             [[target]]\nname = \"b\"\nurl = \"mirror\"\ninclude = [\"x\"]\n\
             [[target]]\nname = \"c\"\n"
        ));
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "target[0].command[0]",
                "target[0].bwlimit",
                "target[0].paths",
                "target[1].include",
                "target[2].url"
            ],
            "{e:?}"
        );
        assert!(
            e[0].message.contains("not an executable"),
            "{}",
            e[0].message
        );
    }

    #[test]
    fn on_failure_is_retry_or_log_and_only_for_hooks() {
        let f = Fixture::new();
        let c = f
            .parse(&format!(
                "{MINIMAL}[[target]]\nname = \"c\"\ncommand = [\"/bin/true\"]\npaths = \"each\"\n\
                 on_failure = \"log\"\n[[target]]\nname = \"w\"\nwebhook = \"https://x/\"\n"
            ))
            .unwrap();
        assert_eq!(c.targets[0].on_failure, OnFailure::Log);
        assert!(matches!(
            c.targets[0].endpoint,
            Endpoint::Command { each: true, .. }
        ));
        assert_eq!(c.targets[1].on_failure, OnFailure::Retry);
        let e = f.errors(&format!(
            "{MINIMAL}[[target]]\nname = \"c\"\ncommand = [\"/bin/true\"]\non_failure = \"ignore\"\n\
             [[target]]\nname = \"r\"\nurl = \"rsync://h/m/\"\non_failure = \"log\"\n"
        ));
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["target[0].on_failure", "target[1].on_failure"],
            "{e:?}"
        );
        assert!(e[0].message.contains("`retry`"), "{}", e[0].message);
        assert!(e.iter().all(|e| e.line > 0), "{e:?}");
    }

    #[test]
    fn webhook_targets_keep_credentials_out_of_the_url() {
        let f = Fixture::new();
        let hdr = f.dir.path().join("h");
        std::fs::write(&hdr, "Authorization: Bearer x\n").unwrap();
        std::fs::set_permissions(&hdr, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = f
            .parse(&format!(
                "{MINIMAL}[[target]]\nname = \"w\"\nwebhook = \"https://cdn.example/purge\"\n\
                 header_file = \"h\"\n"
            ))
            .unwrap();
        assert!(matches!(c.targets[0].endpoint, Endpoint::Http { .. }));
        std::fs::set_permissions(&hdr, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = f.errors(&format!(
            "{MINIMAL}[[target]]\nname = \"a\"\nwebhook = \"https://u:p@cdn.example/\"\n\
             [[target]]\nname = \"b\"\nwebhook = \"ftp://x/\"\nheader_file = \"h\"\n"
        ));
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "target[0].webhook",
                "target[1].webhook",
                "target[1].header_file"
            ],
            "{e:?}"
        );
        assert!(e[0].message.contains("header_file"), "{}", e[0].message);
        assert!(e[2].message.contains("0600"), "{}", e[2].message);
        // A CDN refresh: `{url}` needs the public base; the method is checked.
        let e = f.errors(&format!(
            "{MINIMAL}[[target]]\nname = \"c\"\nwebhook = \"https://api.cdn/purge?u={{url}}\"\n\
             method = \"purge\"\n[[target]]\nname = \"d\"\nurl = \"mirror\"\nmethod = \"GET\"\n"
        ));
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["target[0].method", "target[0].webhook", "target[1].method"],
            "{e:?}"
        );
    }

    #[test]
    fn the_metrics_endpoint_is_loopback_by_default_and_can_be_moved_or_turned_off() {
        let f = Fixture::new();
        let c = f.parse(MINIMAL).unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9477".parse().unwrap()));
        let listen = |v: &str| f.parse(&format!("[metrics]\nlisten = \"{v}\"\n{MINIMAL}"));
        assert_eq!(
            listen("9100").unwrap().metrics,
            Some("127.0.0.1:9100".parse().unwrap())
        );
        assert_eq!(
            listen("[::1]:9100").unwrap().metrics,
            Some("[::1]:9100".parse().unwrap())
        );
        assert_eq!(listen("off").unwrap().metrics, None);
        let e = f.errors(&format!("[metrics]\nlisten = \"localhost:1\"\n{MINIMAL}"));
        assert_eq!((e[0].key.as_str(), e[0].line), ("metrics.listen", 2));
    }

    #[test]
    fn tcp_endpoints_are_loopback_unless_a_host_is_given() {
        let f = Fixture::new();
        let c = f.parse(MINIMAL).unwrap();
        assert_eq!(c.tcp_changes, None);
        let c = f
            .parse(&format!(
                "[bus]\ntcp_changes = \"7600\"\ntcp_deliveries = \"0.0.0.0:7601\"\n{MINIMAL}"
            ))
            .unwrap();
        assert_eq!(c.tcp_changes.as_deref(), Some("tcp://127.0.0.1:7600"));
        assert_eq!(c.tcp_deliveries.as_deref(), Some("tcp://0.0.0.0:7601"));
        let e = f.errors(&format!("[bus]\ntcp_changes = \"host:\"\n{MINIMAL}"));
        assert_eq!((e[0].key.as_str(), e[0].line), ("bus.tcp_changes", 2));
    }

    #[test]
    fn bad_retry_and_schedule_values_name_line_and_key() {
        let f = Fixture::new();
        let e = f.errors(&format!(
            "{MINIMAL}[retry]\njitter = 2.0\nmax_s = 0\n\
             [[schedule]]\ncron = \"0 0 3 * * *\"\n\
             [[schedule]]\ncron = \"61 * * * *\"\nroots = [\"nope\"]\n"
        ));
        let keys: Vec<(&str, usize)> = e.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            keys,
            [
                ("retry.max_s", 6),
                ("retry.jitter", 5),
                ("schedule[0].cron", 8),
                ("schedule[1].cron", 10),
                ("schedule[1].roots[0]", 11),
            ],
            "{e:?}"
        );
        assert!(e[2].message.contains("has 6 fields"), "{}", e[2].message);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let f = Fixture::new();
        let e = f.errors(&format!("{MINIMAL}colour = \"red\"\n"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, 4);
        assert!(e[0].message.contains("colour"), "{}", e[0]);
        assert!(e[0]
            .to_string()
            .starts_with(&format!("{}:4:", f.file().display())));
    }

    #[test]
    fn all_errors_are_reported_at_once_with_their_lines() {
        let f = Fixture::new();
        let text = "\
[[root]]
name = \"www\"
path = \"nope\"
exclude = [\"(\"]
[[target]]
name = \"t\"
url = \"rsync://host\"
roots = [\"www\", \"other\"]
";
        let e = f.errors(text);
        let got: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (3, "root[0].path"),
                (4, "root[0].exclude[0]"),
                (8, "target[0].roots[1]"),
                (7, "target[0].url"),
            ]
        );
    }

    #[test]
    fn target_urls_are_classified_like_rsync_does() {
        let cases = [
            ("rsync://u@h:8730/mod/sub", "rsync://u@h:8730/mod/sub/"),
            ("h::mod/x", "rsync://h/mod/x/"),
            ("u@host:/srv/m", "u@host:/srv/m/"),
        ];
        for (url, want) in cases {
            let f = Fixture::new();
            let c = f
                .parse(&format!(
                    "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"{url}\"\n"
                ))
                .unwrap();
            assert_eq!(c.targets[0].destination("www"), want, "{url}");
        }
        for bad in ["rsync://h", "rsync:///m", "http://x/y", ""] {
            let f = Fixture::new();
            let e = f.errors(&format!(
                "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"{bad}\"\n"
            ));
            assert_eq!(e[0].key, "target[0].url", "{bad}");
        }
    }

    #[test]
    fn password_file_must_be_private() {
        let f = Fixture::new();
        let pw = f.dir.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"rsync://h/m\"\npassword_file = \"pw\"\n"
        );
        let e = f.errors(&text);
        assert_eq!(e[0].key, "target[0].password_file");
        assert_eq!(e[0].line, 7);
        assert!(
            e[0].message.contains("mode 0644, expected 0600"),
            "{}",
            e[0]
        );
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        f.parse(&text).unwrap();
    }

    #[test]
    fn a_local_target_inside_its_root_is_refused() {
        let f = Fixture::new();
        let e = f.errors(&format!(
            "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"src/mirror\"\n"
        ));
        assert!(e[0].message.contains("mirror into itself"), "{}", e[0]);
    }

    #[test]
    fn several_roots_on_one_target_get_subdirectories() {
        let f = Fixture::new();
        std::fs::create_dir(f.dir.path().join("b")).unwrap();
        let c = f
            .parse(&format!(
                "{MINIMAL}[[root]]\nname = \"b\"\npath = \"b\"\n[[target]]\nname = \"t\"\nurl = \"rsync://h/m\"\n"
            ))
            .unwrap();
        assert_eq!(c.targets[0].destination("b"), "rsync://h/m/b/");
    }

    #[test]
    fn misplaced_and_reserved_options_are_errors() {
        let f = Fixture::new();
        let e = f.errors(&format!(
            "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"/tmp/x\"\nport = 22\nextra_args = [\"--from0\", \"oops\"]\nbwlimit = \"fast\"\n"
        ));
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "target[0].port",
                "target[0].bwlimit",
                "target[0].extra_args[0]",
                "target[0].extra_args[1]"
            ]
        );
    }

    #[test]
    fn options_that_change_what_a_run_means_are_errors() {
        let f = Fixture::new();
        let e = f.errors(&format!(
            "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"/tmp/x\"\nextra_args = [\"-avn\", \"--dry-run\", \"--list-only\", \"--remove-source-files\", \"--existing\", \"-rtu\", \"--update\", \"--max-delete=5\", \"-T/tmp/nu\", \"-z\", \"--inplace\", \"--compress-level=3\"]\n"
        ));
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            (0..8)
                .map(|j| format!("target[0].extra_args[{j}]"))
                .collect::<Vec<_>>()
        );
        assert!(e[0].message.contains("`-n`"), "{}", e[0].message);
        assert!(e[3].message.contains("deletes files from the source"));
        assert!(e[6].message.contains("two_way"));
    }

    #[test]
    fn duplicate_and_invalid_names() {
        let f = Fixture::new();
        let e = f.errors(&format!("{MINIMAL}{}", MINIMAL.replace("www", "w w")));
        assert_eq!(e[0].key, "root[1].name");
        let e = f.errors(&format!("{MINIMAL}{MINIMAL}"));
        assert!(e[0].message.contains("duplicate"));
    }

    #[test]
    fn overlapping_roots_and_long_socket_paths_are_refused() {
        let f = Fixture::new();
        std::fs::create_dir(f.dir.path().join("src/inner")).unwrap();
        let e = f.errors(&format!(
            "{MINIMAL}[[root]]\nname = \"in\"\npath = \"src/inner\"\n"
        ));
        assert_eq!((e[0].key.as_str(), e[0].line), ("root[1].path", 6));
        assert!(e[0].message.contains("overlaps root `www`"), "{}", e[0]);
        let long = "x".repeat(120);
        let e = f.errors(&format!("[bus]\nruntime_dir = \"/tmp/{long}\"\n{MINIMAL}"));
        assert_eq!((e[0].key.as_str(), e[0].line), ("bus.runtime_dir", 2));
    }

    #[test]
    fn no_roots_is_an_error() {
        let f = Fixture::new();
        assert_eq!(f.errors("")[0].key, "root");
    }
}
