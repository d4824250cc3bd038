//! `command = [...]` and `webhook = "..."` targets, and the keys only they take.

use std::os::unix::fs::PermissionsExt;

use toml::Spanned;

use super::raw::RawTarget;
use super::target::check_password_file;
use super::validate::Validator;
use super::*;

/// A target that takes paths, not data (command, webhook, tcp): none of an rsync
/// target's own settings apply to it.
pub(super) fn path_target(
    name: String,
    endpoint: Endpoint,
    roots: Vec<String>,
    raw: &RawTarget,
    on_failure: OnFailure,
) -> Target {
    Target {
        name,
        on_failure,
        endpoint,
        roots,
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
        hard_links: false,
    }
}

impl Validator<'_> {
    /// A `command = [...]` target: the program must exist; rsync's own keys are errors.
    pub(super) fn command_target(
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
        for (key, span) in raw.rsync_only_keys() {
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
        Some(path_target(
            name,
            Endpoint::Command {
                argv,
                as_args,
                each,
                include,
                exclude,
                after,
            },
            bound,
            raw,
            on_failure,
        ))
    }

    /// `include`, `exclude` and `after` of a command or webhook target.
    pub(super) fn hook_keys(
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
    pub(super) fn on_failure(&mut self, i: usize, raw: &RawTarget) -> OnFailure {
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
    pub(super) fn webhook_target(
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
        let paths = raw.paths.as_ref().map(|p| ("paths", p.span()));
        for (key, span) in raw.rsync_only_keys().into_iter().chain(paths) {
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
        Some(path_target(
            name,
            Endpoint::Http {
                method,
                base_url,
                url: u.clone(),
                header_file,
                include,
                exclude,
                after,
            },
            bound,
            raw,
            on_failure,
        ))
    }
}
