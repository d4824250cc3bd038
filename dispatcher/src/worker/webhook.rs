//! Webhook targets: the batch as one JSON request (or one per path), headers from a
//! file, a 2xx answer is success.

use protocol::config::Endpoint;
use protocol::PathBytes;

use crate::command::RunResult;
use ::rsync::Outcome;

use super::*;

/// Percent-encodes `bytes` for a URL: unreserved characters stay, `/` too when
/// `keep_slash` (a path), everything else (non-UTF-8 bytes included) becomes `%XX`.
pub(super) fn percent(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Runner {
    /// A webhook target's run: the batch as one JSON POST (paths as `./path`, with
    /// `\xNN` for bytes that are not UTF-8 and `utf8: false`), headers from its
    /// `header_file`; a 2xx answer is success, anything else is retried.
    pub(super) fn post(
        &self,
        root: &str,
        entries: &[HookEntry],
    ) -> (RunResult, Option<Vec<PathBytes>>) {
        let Endpoint::Http {
            url,
            method,
            base_url,
            header_file,
            ..
        } = &self.target.endpoint
        else {
            unreachable!("only called for webhook targets")
        };
        let fail = |error: String| RunResult {
            outcome: Outcome::Retry,
            error,
        };
        // A path's public URL: the base plus the path, each byte but `/` and the
        // unreserved ones percent-encoded.
        let public = |e: &[u8]| {
            base_url
                .as_ref()
                .map(|b| format!("{b}{}", percent(e.strip_prefix(b"./").unwrap_or(e), true)))
        };
        let paths: Vec<serde_json::Value> = entries
            .iter()
            .map(|(_, e, _)| {
                let utf8 = std::str::from_utf8(e).is_ok();
                let shown = protocol::path::escape_invalid_utf8(e);
                let mut v = serde_json::json!({"path": shown, "utf8": utf8});
                if let Some(u) = public(e) {
                    v["url"] = u.into();
                }
                v
            })
            .collect();
        let body = serde_json::json!({
            "version": 1,
            "target": self.target.name,
            "root": root,
            "time_us": protocol::now_us(),
            "paths": paths,
        })
        .to_string();
        let headers = match header_file
            .as_deref()
            .map(std::fs::read_to_string)
            .transpose()
        {
            Ok(h) => h.unwrap_or_default(),
            Err(e) => return (fail(format!("cannot read the header file: {e}")), None),
        };
        let Some(agent) = &self.agent else {
            unreachable!("webhook runners have an agent")
        };
        let send = |to: &str, body: Option<String>| -> Result<(), String> {
            if self.control.must_stop() {
                return Err("stopped by the shutdown deadline".into());
            }
            let mut req = ureq::http::Request::builder()
                .method(method.as_str())
                .uri(to)
                .header("User-Agent", "syncbus");
            if body.is_some() {
                req = req.header("Content-Type", "application/json");
            }
            for line in headers.lines().filter(|l| !l.trim().is_empty()) {
                if let Some((name, value)) = line.split_once(':') {
                    req = req.header(name.trim(), value.trim());
                }
            }
            let answer = match body {
                Some(b) => req
                    .body(b)
                    .map_err(|e| e.to_string())
                    .and_then(|r| agent.run(r).map_err(|e| e.to_string())),
                None => req
                    .body(ureq::SendBody::none())
                    .map_err(|e| e.to_string())
                    .and_then(|r| agent.run(r).map_err(|e| e.to_string())),
            };
            // The URL is the config's; headers (credentials) never go in errors.
            match answer {
                Ok(resp) if resp.status().is_success() => Ok(()),
                Ok(resp) => Err(format!("webhook answered HTTP {}", resp.status().as_u16())),
                Err(e) => Err(format!("webhook: {e}")),
            }
        };
        let per_path = url.contains("{url}") || url.contains("{path}");
        let mut failed = None;
        let result = if per_path {
            // A CDN refresh: one request per path, the placeholders filled in. What
            // was refreshed before a failure is not owed again.
            entries.iter().enumerate().try_for_each(|(i, (_, e, _))| {
                let rel = e.strip_prefix(b"./").unwrap_or(e);
                let to = url.replace("{path}", &percent(rel, true)).replace(
                    "{url}",
                    &percent(public(e).unwrap_or_default().as_bytes(), false),
                );
                send(&to, None).inspect_err(|_| {
                    failed = Some(entries[i..].iter().map(|(p, _, _)| p.clone()).collect());
                })
            })
        } else {
            send(url, Some(body))
        };
        match result {
            Ok(()) => (
                RunResult {
                    outcome: Outcome::Success,
                    error: String::new(),
                },
                None,
            ),
            Err(e) => (fail(e), failed),
        }
    }
}
