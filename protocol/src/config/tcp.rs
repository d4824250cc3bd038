//! `url = "tcp://host:port"` targets: each changed path pushed to a TCP listener, as
//! sersync's socket plugin did (`framing = "sersync"`) or as records with their
//! operation (`"json"`, `"nul"`).

use toml::Spanned;

use super::hook::path_target;
use super::raw::RawTarget;
use super::validate::Validator;
use super::{Endpoint, OnFailure, Target};

/// How a tcp target's records are framed on the connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Framing {
    /// One connection per path carrying its absolute path, raw bytes, no newline and no
    /// operation, then closed: what sersync's socket plugin sent to `<deshost>`.
    Sersync,
    /// One connection per batch; one JSON object per line,
    /// `{"op":"upsert|delete|resync","root":…,"path":"/abs/path","utf8":true}`.
    #[default]
    Json,
    /// One connection per batch; one `OP\tABSOLUTE-PATH\0` record per path (raw bytes).
    Nul,
}

/// Whether a target `url` names a TCP listener.
pub(super) fn is_tcp(url: &str) -> bool {
    url.starts_with("tcp://")
}

/// `host:port` of a `tcp://host:port` URL (a trailing `/` allowed), or why not.
pub(super) fn parse_addr(url: &str) -> Result<String, String> {
    let expected = "(expected tcp://host:port, e.g. tcp://192.168.1.20:8009)";
    let rest = url.strip_prefix("tcp://").unwrap_or(url);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "`{url}`: a tcp target has a host and a port only {expected}"
        ));
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("no port in `{url}` {expected}"));
    };
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.is_empty() {
        return Err(format!("no host in `{url}` {expected}"));
    }
    if bare.contains(':') && bare == host {
        return Err(format!(
            "`{url}`: an IPv6 address goes in brackets (tcp://[::1]:8009)"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(rest.to_string()),
        _ => Err(format!(
            "invalid port `{port}` in `{url}` (1-65535) {expected}"
        )),
    }
}

impl Validator<'_> {
    /// A `url = "tcp://host:port"` target: rsync's and webhooks' own keys are errors.
    pub(super) fn tcp_target(
        &mut self,
        i: usize,
        raw: &RawTarget,
        url: &Spanned<String>,
        name: String,
        bound: Vec<String>,
        kinds: &[(String, bool)],
    ) -> Option<Target> {
        let k = |f: &str| format!("target[{i}].{f}");
        let addr = parse_addr(url.get_ref()).unwrap_or_else(|msg| {
            self.error(url.span(), k("url"), msg);
            String::new()
        });
        let framing = match raw
            .framing
            .as_ref()
            .map(|f| (f.get_ref().as_str(), f.span()))
        {
            None | Some(("json", _)) => Framing::Json,
            Some(("sersync", _)) => Framing::Sersync,
            Some(("nul", _)) => Framing::Nul,
            Some((other, span)) => {
                self.error(
                    span,
                    k("framing"),
                    format!("`{other}`: `json` (a JSON object per line), `nul` (`OP\\tPATH\\0`) or `sersync` (a connection per path, the bare path)"),
                );
                Framing::Json
            }
        };
        let not_here = [
            raw.paths.as_ref().map(|p| ("paths", p.span())),
            raw.header_file.as_ref().map(|p| ("header_file", p.span())),
            raw.method.as_ref().map(|p| ("method", p.span())),
            raw.cdn_base_url
                .as_ref()
                .map(|p| ("cdn_base_url", p.span())),
        ];
        let not_here = raw
            .rsync_only_keys()
            .into_iter()
            .chain(not_here.into_iter().flatten());
        for (key, span) in not_here {
            self.error(span, k(key), "not for tcp targets");
        }
        let on_failure: OnFailure = self.on_failure(i, raw);
        let (include, exclude, after) = self.hook_keys(i, raw, kinds);
        Some(path_target(
            name,
            Endpoint::Tcp {
                addr,
                framing,
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

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::parse_addr;

    fn parse(extra: &str) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        let text = format!(
            "[[root]]\nname = \"www\"\npath = \"src\"\n\n[[target]]\nname = \"b\"\nurl = \"b\"\n\n{extra}"
        );
        Config::parse(&text, &dir.path().join("syncbus.toml"))
    }

    fn keys(extra: &str) -> Vec<String> {
        let mut k: Vec<String> = parse(extra)
            .expect_err("config should be rejected")
            .0
            .into_iter()
            .map(|e| format!("{}:{}", e.line, e.key))
            .collect();
        k.sort();
        k
    }

    #[test]
    fn a_tcp_url_makes_a_tcp_target_with_json_framing_by_default() {
        let c = parse(
            "[[target]]\nname = \"s\"\nurl = \"tcp://192.168.138.20:8009\"\nframing = \"sersync\"\n\
             after = [\"b\"]\non_failure = \"log\"\ntimeout = 5\n\
             [[target]]\nname = \"j\"\nurl = \"tcp://[::1]:9/\"\nexclude = [\"*.tmp\"]\n\
             [[target]]\nname = \"n\"\nurl = \"tcp://localhost:9\"\nframing = \"nul\"\n",
        )
        .unwrap();
        let s = c.target("s").unwrap();
        assert_eq!(
            s.endpoint,
            Endpoint::Tcp {
                addr: "192.168.138.20:8009".into(),
                framing: Framing::Sersync,
                include: vec![],
                exclude: vec![],
                after: vec!["b".into()],
            }
        );
        assert_eq!((s.on_failure, s.timeout), (OnFailure::Log, 5));
        assert!(!s.runs_rsync());
        assert_eq!(s.destination("www"), "");
        assert!(matches!(
            &c.target("j").unwrap().endpoint,
            Endpoint::Tcp { addr, framing: Framing::Json, exclude, .. }
                if addr == "[::1]:9" && exclude == &["*.tmp"]
        ));
        assert!(matches!(
            c.target("n").unwrap().endpoint,
            Endpoint::Tcp {
                framing: Framing::Nul,
                ..
            }
        ));
        // Work owed to one listener is not replayed to another, nor in another framing.
        assert_ne!(c.owed_to("www", "j"), c.owed_to("www", "n"));
    }

    #[test]
    fn tcp_targets_name_the_line_and_key_of_each_mistake() {
        // Line 11 is the first tcp target's `url`; target[0] is the rsync target `b`.
        let k = keys(
            "[[target]]\nname = \"a\"\nurl = \"tcp://host\"\n\
             [[target]]\nname = \"c\"\nurl = \"tcp://:80\"\n\
             [[target]]\nname = \"d\"\nurl = \"tcp://h:99999\"\n\
             [[target]]\nname = \"e\"\nurl = \"tcp://h:80/path\"\n\
             [[target]]\nname = \"f\"\nurl = \"tcp://::1:80\"\n\
             [[target]]\nname = \"g\"\nurl = \"tcp://h:1\"\nframing = \"lines\"\n\
             password_file = \"p\"\nextra_args = [\"-z\"]\npaths = \"each\"\nmethod = \"GET\"\n\
             [[target]]\nname = \"i\"\nurl = \"tcp://h:1\"\nafter = [\"a\"]\n\
             [[target]]\nname = \"x\"\nurl = \"dst\"\nframing = \"json\"\n",
        );
        assert_eq!(
            k,
            [
                "11:target[1].url",
                "14:target[2].url",
                "17:target[3].url",
                "20:target[4].url",
                "23:target[5].url",
                "27:target[6].framing",
                "28:target[6].password_file",
                "29:target[6].extra_args",
                "30:target[6].paths",
                "31:target[6].method",
                "35:target[7].after[0]",
                "39:target[8].framing",
            ]
        );
    }

    #[test]
    fn tcp_addresses_parse_like_connect_takes_them() {
        assert_eq!(
            parse_addr("tcp://127.0.0.1:8009").unwrap(),
            "127.0.0.1:8009"
        );
        assert_eq!(parse_addr("tcp://h.example:1/").unwrap(), "h.example:1");
        assert_eq!(
            parse_addr("tcp://[fe80::1]:8009").unwrap(),
            "[fe80::1]:8009"
        );
        for bad in [
            "tcp://h",
            "tcp://h:0",
            "tcp://h:x",
            "tcp://u@h:1",
            "tcp://[]:1",
        ] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }
}
