//! Raw config → [`Config`]: every value checked, every error kept.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawConfig, RawMetrics, RawRetry, RawRoot, RawSchedule};
use super::*;
use crate::rules::Rules;

/// Parses and validates `text` as the config file `file`.
pub(super) fn validate(
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

/// The state of one validation: the text for positions, the errors so far.
pub(super) struct Validator<'a> {
    text: &'a str,
    file: &'a Path,
    base: PathBuf,
    errors: Vec<ConfigError>,
    /// Whether the files and programs the config names are looked at on this machine
    /// (root directories, password and header files, command programs).
    pub(super) environment: Environment,
}

impl Validator<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        (line, column)
    }

    pub(super) fn error(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let (line, column) = self.line_col(span.start);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }

    pub(super) fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    pub(super) fn name(
        &mut self,
        name: &Spanned<String>,
        key: &str,
        seen: &mut Vec<String>,
    ) -> String {
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

    /// A `roots = [...]` list: every root when absent; each name must exist.
    pub(super) fn root_names(
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
