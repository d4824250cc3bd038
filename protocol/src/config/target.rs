//! rsync targets (daemon, ssh, local): the URL read as rsync reads it, the password
//! file, and the options refused.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::raw::RawTarget;
use super::validate::Validator;
use super::*;

impl Validator<'_> {
    pub(super) fn target(
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
        let h_arg = raw.extra_args.iter().find(|a| asks_hard_links(a.get_ref()));
        let hard_links = raw.hard_links.as_ref().is_some_and(|h| *h.get_ref()) || h_arg.is_some();
        if two_way && hard_links {
            let (span, key) = match (&raw.hard_links, h_arg) {
                (Some(h), _) if *h.get_ref() => (h.span(), k("hard_links")),
                (_, Some(a)) => (a.span(), k("extra_args")),
                (Some(h), None) => (h.span(), k("hard_links")),
                (None, None) => unreachable!("hard_links is set by one of them"),
            };
            self.error(
                span,
                key,
                "hard links are not kept on two-way targets (their runs write through the peer's temp and backup dirs, which break links)",
            );
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
            hard_links,
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
pub(super) fn check_password_file(path: &Path) -> Result<(), String> {
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

/// rsync options that change what a run means: with them a run can exit 0 while the
/// target does not hold what the source holds (or the source loses files), so status
/// would say OK over a diverged mirror. Returns the option as written and why.
/// Whether an `extra_args` word asks rsync to keep hard links: `--hard-links`, or `H`
/// in a cluster of short options (`-aH`, `-aHAX`) before any option that takes a value.
fn asks_hard_links(arg: &str) -> bool {
    if arg == "--hard-links" {
        return true;
    }
    let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.starts_with('-')) else {
        return false;
    };
    cluster
        .chars()
        .take_while(|c| !"BefTM@".contains(*c))
        .any(|c| c == 'H')
}

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
