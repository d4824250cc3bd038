//! `syncbus import-sersync`: a sersync 2.5 `confxml.xml` in, an equivalent `syncbus.toml`
//! out, plus a report of what was mapped, what was changed on purpose and what has no
//! equivalent.
//!
//! [`convert`] is pure (bytes in, text out); `main.rs` reads the file and prints. The
//! mapping follows what sersync 2.5.4 *did* with each element, not only what its comments
//! say: only `start="true"` switches a feature on, `<commonParams>` went into a shell
//! command line, the command plugin ran `prefix path suffix` through `/bin/sh` once per
//! file, a plugin named in `<sersync><plugin start="true">` ran after each file's rsync.
//!
//! # Invariants
//! - Every element of the stock sersync 2.5.4 file ends up in the TOML or in the report;
//!   an element this module does not know is reported, never dropped silently.
//! - Values reach the TOML only through the `toml` crate's own quoting.
//! - No password is written: refreshCDN's `passwd` is only mentioned in the report.
//! - Malformed input is an [`ImportError`] naming file, line and column, never a panic.
//!
//! # Known problems
//! - sersync matched `<filter>` regexes against `name` at the top of the tree, `/dir/name`
//!   below it (a leading slash) and `dir/` when it added watches at start; syncbus matches
//!   `dir/name` everywhere. Regexes are kept as written except for a leading `/` (removed)
//!   and a trailing `/` (made optional), which the report names.

use std::fmt::Write as _;

use protocol::rules::Rules;
mod parse;
#[cfg(test)]
mod tests;

use parse::{declared_encoding, parse, Node};

/// A converted config and the report that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Conversion {
    /// The syncbus config, with comments at each decision.
    pub toml: String,
    /// sersync settings carried over with the same meaning.
    pub mapped: Vec<String>,
    /// Behaviour that differs on purpose, and why.
    pub changed: Vec<String>,
    /// Settings with no syncbus equivalent (left out, or left commented out).
    pub unsupported: Vec<String>,
}

impl Conversion {
    /// The three lists as text for a terminal.
    pub(crate) fn report(&self) -> String {
        let mut out = String::new();
        for (title, items) in [
            ("mapped", &self.mapped),
            ("changed on purpose", &self.changed),
            ("no equivalent", &self.unsupported),
        ] {
            let _ = writeln!(out, "{title}:");
            if items.is_empty() {
                out.push_str("  (none)\n");
            }
            for item in items {
                let _ = writeln!(out, "  - {item}");
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ImportError {
    #[error("cannot read `{file}`: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// Converts the bytes of a sersync config read from `file` (named in messages only).
pub(crate) fn convert(bytes: &[u8], file: &str) -> Result<Conversion, ImportError> {
    let mut c = Ctx {
        file,
        latin1: false,
        out: Conversion {
            toml: String::new(),
            mapped: Vec::new(),
            changed: Vec::new(),
            unsupported: Vec::new(),
        },
        root_names: Vec::new(),
        target_names: Vec::new(),
        trailer: Vec::new(),
    };
    let text = c.decode(bytes)?;
    let head = parse(&text, file)?;
    let tables = c.head(&head)?;
    let _ = writeln!(
        c.out.toml,
        "# Converted from the sersync config `{}` by `syncbus import-sersync`.\n\
         # The report it printed lists every decision; check this file with\n\
         # `syncbus check-config FILE`. Every key is described in the README.",
        clean(file)
    );
    for t in &tables {
        t.render(&mut c.out.toml);
    }
    if !c.trailer.is_empty() {
        c.out.toml.push('\n');
    }
    for line in &c.trailer {
        let _ = writeln!(c.out.toml, "# {}", clean(line));
    }
    Ok(c.out)
}

// ---------------------------------------------------------------- the output

/// One TOML table, rendered with its comments; `disabled` renders it commented out.
struct Table {
    header: &'static str,
    notes: Vec<String>,
    entries: Vec<(&'static str, toml::Value, Option<String>)>,
    disabled: bool,
}

impl Table {
    fn new(header: &'static str) -> Self {
        Table {
            header,
            notes: Vec::new(),
            entries: Vec::new(),
            disabled: false,
        }
    }

    fn set(&mut self, key: &'static str, value: impl Into<toml::Value>) -> &mut Self {
        self.entries.push((key, value.into(), None));
        self
    }

    fn note(&mut self, key: &'static str, value: impl Into<toml::Value>, note: String) {
        self.entries.push((key, value.into(), Some(note)));
    }

    fn render(&self, out: &mut String) {
        if self.header.starts_with("[[") {
            out.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(out, "# {}", clean(n));
        }
        let p = if self.disabled { "# " } else { "" };
        let _ = writeln!(out, "{p}{}", self.header);
        for (key, value, note) in &self.entries {
            // A multi-line string must stay inside the comment line by line.
            let value = value.to_string().replace('\n', &format!("\n{p}"));
            let _ = match note {
                Some(n) => writeln!(out, "{p}{key} = {value}  # {}", clean(n)),
                None => writeln!(out, "{p}{key} = {value}"),
            };
        }
    }
}

fn strings<S: AsRef<str>>(list: &[S]) -> toml::Value {
    toml::Value::Array(
        list.iter()
            .map(|s| toml::Value::String(s.as_ref().to_string()))
            .collect(),
    )
}

/// Text safe inside a one-line TOML comment.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `name` as a syncbus name (letters, digits, `_-.`), unique among `taken`.
fn unique_name(name: &str, fallback: &str, taken: &mut Vec<String>) -> String {
    let mut base: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    base = base.trim_matches(|c| c == '-' || c == '.').to_string();
    if base.is_empty() {
        base = fallback.to_string();
    }
    let mut candidate = base.clone();
    let mut n = 2;
    while taken.contains(&candidate) {
        candidate = format!("{base}-{n}");
        n += 1;
    }
    taken.push(candidate.clone());
    candidate
}

// ---------------------------------------------------------------- the mapping

struct Ctx<'a> {
    file: &'a str,
    /// The file was read as ISO-8859-1 (its bytes were not UTF-8).
    latin1: bool,
    out: Conversion,
    root_names: Vec<String>,
    target_names: Vec<String>,
    /// Comment lines closing the TOML (decisions that have no key of their own).
    trailer: Vec<String>,
}

/// What `<rsync>` and `<commonParams>` say about every remote.
#[derive(Default)]
struct RsyncOpts {
    ssh: bool,
    user: Option<String>,
    password_file: Option<String>,
    port: Option<u16>,
    timeout: Option<u64>,
    bwlimit: Option<String>,
    extra_args: Vec<String>,
    exclude_glob: Vec<String>,
    /// A one-line summary of commonParams for the TOML.
    params_note: Option<String>,
}

/// One `<localpath>` after mapping: its root and the rsync targets made from its remotes.
struct Mapped {
    root: String,
    watch: String,
    targets: Vec<String>,
}

impl Ctx<'_> {
    fn mapped(&mut self, s: String) {
        self.out.mapped.push(s);
    }
    fn changed(&mut self, s: String) {
        self.out.changed.push(s);
    }
    fn unsupported(&mut self, s: String) {
        self.out.unsupported.push(s);
    }

    fn err(&self, node: &Node, message: String) -> ImportError {
        ImportError::Invalid {
            file: self.file.to_string(),
            line: node.line,
            column: node.column,
            message,
        }
    }

    /// UTF-8 when the bytes are UTF-8, else ISO-8859-1 (byte → U+00XX). A file that says
    /// ISO-8859-1 but is valid UTF-8 is read as UTF-8: that is what an editor saving in
    /// UTF-8 leaves (sersync's stock file keeps its Latin-1 declaration), and pure
    /// Latin-1 text with accents is almost never valid UTF-8.
    fn decode(&mut self, bytes: &[u8]) -> Result<String, ImportError> {
        let at_start = |message: String| ImportError::Invalid {
            file: self.file.to_string(),
            line: 1,
            column: 1,
            message,
        };
        if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
            return Err(at_start(
                "the file is UTF-16: convert it first (`iconv -f UTF-16 -t UTF-8`)".into(),
            ));
        }
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let declared = declared_encoding(bytes);
        let latin1_declared = matches!(
            declared.as_deref(),
            Some("iso-8859-1" | "iso8859-1" | "iso_8859-1" | "latin1" | "latin-1" | "l1")
        );
        let known = latin1_declared
            || matches!(
                declared.as_deref(),
                None | Some("utf-8" | "utf8" | "us-ascii" | "ascii")
            );
        if !known && !bytes.is_ascii() {
            let d = declared.unwrap_or_default();
            return Err(at_start(format!(
                "the file is declared `{d}`, which this import does not read: convert it first (`iconv -f {d} -t UTF-8`)"
            )));
        }
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                if latin1_declared && !s.is_ascii() {
                    self.changed(
                        "the file declares ISO-8859-1 but its bytes are valid UTF-8 (as an editor saving in UTF-8 leaves them): it was read as UTF-8".into(),
                    );
                }
                Ok(s.to_string())
            }
            Err(e) if matches!(declared.as_deref(), Some("utf-8" | "utf8")) => {
                // Declared UTF-8 and is not: say where, as sersync's parser did.
                let good = &bytes[..e.valid_up_to()];
                let line = 1 + good.iter().filter(|&&b| b == b'\n').count();
                let column =
                    1 + good.len() - good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                Err(ImportError::Invalid {
                    file: self.file.to_string(),
                    line,
                    column,
                    message: "the file is declared UTF-8 but this byte is not UTF-8".into(),
                })
            }
            Err(_) => {
                self.latin1 = true;
                Ok(bytes.iter().map(|&b| char::from(b)).collect())
            }
        }
    }

    /// A path from a Latin-1 file with accents names other bytes once written as UTF-8.
    fn check_latin1_path(&mut self, what: &str, value: &str) {
        if self.latin1 && !value.is_ascii() {
            self.changed(format!(
                "{what} `{value}` was ISO-8859-1 in the XML; a syncbus config is UTF-8, so it now names the UTF-8 spelling: if the name on disk is ISO-8859-1, rename it (e.g. `convmv -f latin1 -t utf8`)"
            ));
        }
    }

    fn head(&mut self, head: &Node) -> Result<Vec<Table>, ImportError> {
        if head.name != "head" {
            return Err(self.err(
                head,
                format!(
                    "the root element is `<{}>`, not sersync's `<head>`",
                    head.name
                ),
            ));
        }
        let Some(sersync) = head.child("sersync") else {
            return Err(self.err(
                head,
                "no `<sersync>` element: nothing says what to watch or where to send it".into(),
            ));
        };
        self.report_unknown(head, "");
        self.host_debug_fs(head);
        let regexes = self.filter(head.child("filter"));
        let events = self.events(head.child("inotify"));
        let opts = self.rsync(sersync.child("rsync"))?;

        let localpaths: Vec<&Node> = sersync.all("localpath").collect();
        if localpaths.is_empty() {
            return Err(self.err(
                sersync,
                "no `<localpath watch=\"…\">` in `<sersync>`: nothing to watch".into(),
            ));
        }
        // Fail on a bad <localpath> or <remote> before mapping anything.
        for lp in &localpaths {
            if lp.value("watch").is_none() {
                return Err(self.err(
                    lp,
                    "`<localpath>` has no `watch` attribute: which directory should be mirrored?"
                        .into(),
                ));
            }
            for r in lp.all("remote") {
                for key in ["ip", "name"] {
                    if r.value(key).is_none() {
                        let what = if key == "ip" {
                            "the host to send to"
                        } else if opts.ssh {
                            "the remote directory"
                        } else {
                            "the rsync daemon module"
                        };
                        return Err(
                            self.err(r, format!("`<remote>` has no `{key}` attribute ({what})"))
                        );
                    }
                }
            }
        }
        if localpaths.len() > 1 {
            self.changed(format!(
                "{} `<localpath>` elements: sersync 2.5 used only the first and ignored the rest; the others are written here commented out (enabling one mirrors, with deletes, a directory sersync never mirrored: check that its targets do not share a module)",
                localpaths.len()
            ));
        }

        let mut roots = Vec::new();
        let mut targets = Vec::new();
        let mut mapped = Vec::new();
        for (i, lp) in localpaths.into_iter().enumerate() {
            let ignored = i > 0;
            let (root, mut root_tables) = self.root(lp, &regexes, &events, &opts);
            for t in &mut root_tables {
                t.disabled |= ignored;
            }
            roots.extend(root_tables);
            let mut names = Vec::new();
            for r in lp.all("remote") {
                let (name, mut table) = self.remote(r, &root, &opts);
                table.disabled |= ignored;
                if !ignored {
                    names.push(name);
                }
                targets.push(table);
            }
            if ignored {
                continue;
            }
            let watch = lp.value("watch").unwrap_or_default().to_string();
            mapped.push(Mapped {
                root,
                watch,
                targets: names,
            });
        }

        let plugin_targets = self.plugins(head, sersync, &mapped)?;
        if targets.is_empty() && plugin_targets.is_empty() {
            return Err(self.err(
                sersync,
                "no `<remote ip=\"…\" name=\"…\">` in `<localpath>` and no plugin enabled: nothing to mirror to"
                    .into(),
            ));
        }
        targets.extend(plugin_targets);
        let schedule = self.crontab(sersync.child("crontab"), !regexes.is_empty())?;
        self.fail_log(sersync.child("failLog"));
        self.always();

        let mut tables = roots;
        tables.extend(targets);
        tables.extend(schedule);
        Ok(tables)
    }

    /// Elements sersync 2.5 does not read are reported, not dropped silently.
    fn report_unknown(&mut self, node: &Node, path: &str) {
        const KNOWN: &str = "host debug fileSystem filter filter/exclude inotify \
            inotify/delete inotify/createFolder inotify/createFile inotify/closeWrite \
            inotify/moveFrom inotify/moveTo inotify/attrib inotify/modify sersync \
            sersync/localpath sersync/localpath/remote sersync/rsync sersync/rsync/commonParams \
            sersync/rsync/auth sersync/rsync/userDefinedPort sersync/rsync/timeout \
            sersync/rsync/ssh sersync/failLog sersync/crontab sersync/crontab/crontabfilter \
            sersync/crontab/crontabfilter/exclude sersync/plugin plugin plugin/param \
            plugin/filter plugin/filter/include plugin/localpath plugin/localpath/deshost \
            plugin/localpath/cdninfo plugin/localpath/sendurl plugin/localpath/regexurl";
        for c in &node.children {
            let p = if path.is_empty() {
                c.name.clone()
            } else {
                format!("{path}/{}", c.name)
            };
            if KNOWN.split_whitespace().any(|k| k == p) {
                self.report_unknown(c, &p);
            } else {
                self.unsupported(format!(
                    "`<{}>` (line {}): not a sersync 2.5 element; ignored, as sersync ignored it",
                    c.name, c.line
                ));
            }
        }
    }

    fn host_debug_fs(&mut self, head: &Node) {
        if let Some(h) = head.child("host") {
            self.unsupported(format!(
                "`<host hostip=\"{}\" port=\"{}\">`: sersync 2.5 read it but ran nothing with it (its http interface was compiled out); no equivalent",
                h.attr("hostip").unwrap_or(""),
                h.attr("port").unwrap_or("")
            ));
        }
        match head.child("debug") {
            Some(d) if d.on() => self.mapped(
                "`<debug start=\"true\">` → not in the config: run syncbus with `RUST_LOG=debug` for its debug log, and `syncbus tail` to see each change".into(),
            ),
            Some(_) => self.mapped("`<debug start=\"false\">`: off (syncbus logs at `info` unless `RUST_LOG` says otherwise)".into()),
            None => {}
        }
        match head.child("fileSystem") {
            Some(f) if f.attr("xfs") == Some("true") => self.mapped(
                "`<fileSystem xfs=\"true\">`: nothing to set; syncbus asks the file system for an entry's type whenever the directory listing does not give it (what `xfs` switched on)".into(),
            ),
            Some(_) => self.mapped("`<fileSystem xfs=\"false\">`: off; nothing to set (syncbus always handles file systems whose listings give no entry type)".into()),
            None => {}
        }
    }

    /// `<filter>` → the root's `exclude` regexes.
    fn filter(&mut self, filter: Option<&Node>) -> Vec<String> {
        let Some(filter) = filter else {
            return Vec::new();
        };
        let n = filter.all("exclude").count();
        if !filter.on() {
            self.mapped(format!(
                "`<filter start=\"false\">`: off; its {n} exclude pattern(s) are not carried over"
            ));
            return Vec::new();
        }
        let mut out = Vec::new();
        for e in filter.all("exclude") {
            let Some(expr) = e.value("expression") else {
                continue;
            };
            let (regex, notes) = filter_regex(expr);
            if let Err(err) = Rules::new(std::slice::from_ref(&regex), &[], false) {
                self.unsupported(format!(
                    "`<filter>` regex `{expr}` left out: {err} (sersync used boost's regex syntax; syncbus's has no look-around or back-references)"
                ));
                continue;
            }
            for note in notes {
                self.changed(format!("`<filter>` regex `{expr}` → `{regex}`: {note}"));
            }
            self.check_latin1_path("the `<filter>` regex", expr);
            out.push(regex);
        }
        self.mapped(format!(
            "`<filter start=\"true\">` → the root's `exclude` ({} regex(es)); like sersync's, each must match the whole root-relative path",
            out.len()
        ));
        self.changed(
            "`<filter>` regexes: sersync matched `name` at the top of the tree but `/dir/name` below it; syncbus matches `dir/name` everywhere, and a matching directory excludes everything below it (sersync's startup scan did the same, its live events not always)".into(),
        );
        out
    }

    /// `<inotify>` → `[root.events]`.
    fn events(&mut self, inotify: Option<&Node>) -> Vec<(&'static str, bool, Option<String>)> {
        let Some(inotify) = inotify else {
            self.changed(
                "no `<inotify>`: sersync then watched no event at all; syncbus's defaults (every kind of change) are used".into(),
            );
            return Vec::new();
        };
        let on = |name: &str| inotify.child(name).is_some_and(Node::on);
        let (from, to) = (on("moveFrom"), on("moveTo"));
        if from != to {
            self.changed(format!(
                "`<moveFrom start=\"{from}\">` and `<moveTo start=\"{to}\">` differ: syncbus has one `move` toggle, set to true (a rename is mirrored on both sides)"
            ));
        }
        let mut events = vec![
            ("delete", on("delete"), None),
            ("create_folder", on("createFolder"), None),
            ("create_file", on("createFile"), None),
            ("close_write", on("closeWrite"), None),
            ("move", from || to, None),
            ("attrib", on("attrib"), None),
            ("modify", on("modify"), None),
        ];
        for (key, value, note) in &mut events {
            if *value {
                continue;
            }
            *note = match *key {
                "create_file" => Some("off as in sersync: a symlink, or a file created empty and never written, is not mirrored live (syncbus's default is true)".to_string()),
                "attrib" => Some("off as in sersync: chmod, chown and touch are not mirrored live (syncbus's default is true)".to_string()),
                "delete" => Some("off as in sersync: deletes are not mirrored live".to_string()),
                _ => None,
            };
        }
        if !on("delete") {
            self.changed(
                "`<delete start=\"false\">`: deletes are not mirrored live, as in sersync; but syncbus's full compares (at start, and by `[[schedule]]`) always delete on the target what the source lacks, where sersync's full syncs then passed no `--delete`".into(),
            );
        }
        let summary: Vec<String> = events.iter().map(|(k, v, _)| format!("{k}={v}")).collect();
        self.mapped(format!(
            "`<inotify>` → `[root.events]`: {} (moveFrom/moveTo → `move`)",
            summary.join(", ")
        ));
        events
    }

    /// `<rsync>`: the options every remote shares.
    fn rsync(&mut self, rsync: Option<&Node>) -> Result<RsyncOpts, ImportError> {
        let mut o = RsyncOpts::default();
        let Some(rsync) = rsync else {
            self.changed(
                "no `<rsync>`: sersync then ran `rsync -R` with no other option; syncbus always runs `rsync -a` (recursive, keeping links, permissions, times, owner and group)".into(),
            );
            return Ok(o);
        };
        o.ssh = rsync.child("ssh").is_some_and(Node::on);
        self.mapped(if o.ssh {
            "`<ssh start=\"true\">` → each remote is an ssh target `[user@]ip:name` (`name` is the remote directory)".into()
        } else {
            "`<ssh start=\"false\">` → each remote is an rsync daemon target `rsync://[user@]ip[:port]/name` (`name` is the module)".into()
        });

        let params = rsync
            .child("commonParams")
            .and_then(|p| p.attr("params"))
            .unwrap_or("");
        self.params(params, &mut o);

        match rsync.child("auth") {
            Some(a) if a.on() => {
                o.user = a.value("users").map(str::to_string);
                let pw = a.value("passwordfile").map(str::to_string);
                if o.ssh {
                    self.mapped(format!(
                        "`<auth users=\"{}\">` → the user in each ssh URL",
                        o.user.as_deref().unwrap_or("")
                    ));
                    if let Some(pw) = pw {
                        self.unsupported(format!(
                            "`<auth passwordfile=\"{pw}\">` with ssh: a password file is for rsync daemons only (rsync refuses it over ssh); ssh logs in with a key: set `identity_file` on the target"
                        ));
                    }
                } else {
                    self.mapped(format!(
                        "`<auth users=\"{}\" passwordfile=\"{}\">` → the user in each `rsync://` URL and `password_file` (it must be mode 0600, which rsync required too)",
                        o.user.as_deref().unwrap_or(""),
                        pw.as_deref().unwrap_or("")
                    ));
                    if let Some(pw) = &pw {
                        self.check_latin1_path("the password file", pw);
                    }
                    o.password_file = pw.or(o.password_file.take());
                }
            }
            Some(_) => {
                self.mapped("`<auth start=\"false\">`: off; no user or password file".into())
            }
            None => {}
        }

        match rsync.child("userDefinedPort") {
            Some(p) if p.on() => {
                let port = p
                    .value("port")
                    .and_then(|v| v.parse::<u16>().ok())
                    .filter(|&v| v > 0)
                    .ok_or_else(|| {
                        self.err(
                            p,
                            format!(
                                "`<userDefinedPort>` port `{}` is not a TCP port (1-65535)",
                                p.attr("port").unwrap_or("")
                            ),
                        )
                    })?;
                if o.ssh {
                    self.unsupported(format!(
                        "`<userDefinedPort port=\"{port}\">` with ssh: sersync passed `--port`, which rsync ignores over ssh; if sshd listens there, set `port = {port}` on the target"
                    ));
                } else {
                    self.mapped(format!(
                        "`<userDefinedPort port=\"{port}\">` → the port in each `rsync://` URL"
                    ));
                    o.port = Some(port);
                }
            }
            Some(_) if o.ssh => self.mapped("`<userDefinedPort start=\"false\">`: off".into()),
            Some(_) => self.mapped(
                "`<userDefinedPort start=\"false\">`: off; the rsync daemon's default port (873)"
                    .into(),
            ),
            None => {}
        }

        match rsync.child("timeout") {
            Some(t) if t.on() => {
                let secs = t
                    .value("time")
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|&v| v <= i64::MAX as u64)
                    .ok_or_else(|| {
                        self.err(
                            t,
                            format!(
                                "`<timeout>` time `{}` is not a number of seconds",
                                t.attr("time").unwrap_or("")
                            ),
                        )
                    })?;
                self.mapped(format!(
                    "`<timeout time=\"{secs}\">` → `timeout = {secs}` on each rsync target (seconds without I/O, as rsync's `--timeout`)"
                ));
                o.timeout = Some(secs);
            }
            _ if o.timeout.is_some() => {}
            _ => self.changed(format!(
                "`<timeout start=\"false\">`: sersync let a stalled rsync hang forever; syncbus kills a run after {} s without I/O and retries it (its default `timeout`)",
                protocol::config::DEFAULT_TIMEOUT_S
            )),
        }
        Ok(o)
    }

    /// `<commonParams params>`: the words sersync put into its rsync command line.
    fn params(&mut self, params: &str, o: &mut RsyncOpts) {
        let p = parse_params(params);
        if params.trim().is_empty() {
            self.changed(
                "`<commonParams>` is empty: sersync then ran `rsync -R` with no other option; syncbus always runs `rsync -a`".into(),
            );
        }
        let mut summary = Vec::new();
        // What `-a` copies that these options did not ask for.
        let archive: Vec<&str> = ["-r", "-l", "-p", "-t", "-g", "-o", "-D"]
            .into_iter()
            .filter(|f| {
                !p.implied
                    .iter()
                    .any(|i| i == f || i == "-a" || i == "--archive")
            })
            .collect();
        if !params.trim().is_empty() && !archive.is_empty() {
            self.changed(format!(
                "`<commonParams params=\"{params}\">` has no {}: syncbus always runs `rsync -a`, so those ({}) are copied too",
                archive.join(" "),
                "recursion, links, permissions, times, group, owner, devices"
            ));
        }
        if !p.implied.is_empty() {
            summary.push(format!("{} implied", p.implied.join(" ")));
            self.mapped(format!(
                "`<commonParams params=\"{params}\">`: {} dropped as implied (syncbus always runs `rsync -a`, sends paths relative to the root and deletes what was deleted)",
                p.implied.join(" ")
            ));
        }
        if !p.kept.is_empty() {
            summary.push(format!("{} kept", p.kept.join(" ")));
            self.mapped(format!(
                "`<commonParams params=\"{params}\">`: {} → `extra_args`",
                p.kept.join(" ")
            ));
        }
        if p.update {
            summary.push("-u dropped".into());
            self.changed(
                "`-u` (`--update`) dropped: a mirror's target must follow its source; with `-u` rsync keeps every target file that is newer than the source's (edited there, or a clock ahead), and no full sync would ever repair it".into(),
            );
        }
        if !p.quiet.is_empty() {
            summary.push(format!("{} dropped", p.quiet.join(" ")));
            self.changed(format!(
                "{} dropped: output options, and nobody reads rsync's output per run (syncbus logs a failed run with rsync's error output)",
                p.quiet.join(" ")
            ));
        }
        for (opt, value) in [
            ("--bwlimit", p.bwlimit.clone()),
            ("--timeout", p.timeout.map(|t| t.to_string())),
            ("--port", p.port.map(|t| t.to_string())),
            ("--password-file", p.password_file.clone()),
        ] {
            let Some(v) = value else { continue };
            let key = match opt {
                "--bwlimit" => "`bwlimit`",
                "--timeout" => "`timeout`",
                "--port" if o.ssh => {
                    self.unsupported(format!("`--port={v}` in `<commonParams>` with ssh: rsync ignores it over ssh; set the target's `port` if sshd listens there"));
                    continue;
                }
                "--port" => "the port in the URL",
                _ if o.ssh => {
                    self.unsupported(format!("`--password-file={v}` in `<commonParams>` with ssh: rsync refuses it over ssh; set `identity_file` for an ssh key"));
                    continue;
                }
                _ => "`password_file`",
            };
            self.mapped(format!("`{opt}={v}` in `<commonParams>` → {key}"));
        }
        if !p.exclude.is_empty() {
            self.mapped(format!(
                "`--exclude` in `<commonParams>` → the root's `exclude_glob` (same rsync pattern rules): {}",
                p.exclude.join(" ")
            ));
        }
        for r in &p.refused {
            self.unsupported(format!("`<commonParams>`: {r}"));
        }
        o.bwlimit = p.bwlimit;
        o.timeout = p.timeout;
        o.port = p.port.filter(|_| !o.ssh);
        o.password_file = p.password_file.filter(|_| !o.ssh);
        o.extra_args = p.kept;
        o.exclude_glob = p.exclude;
        o.params_note = (!summary.is_empty()).then(|| {
            format!(
                "from commonParams `{}`: {}",
                params.trim(),
                summary.join(", ")
            )
        });
    }

    /// One `<localpath>` → a `[[root]]` and its `[root.events]`.
    fn root(
        &mut self,
        lp: &Node,
        regexes: &[String],
        events: &[(&'static str, bool, Option<String>)],
        opts: &RsyncOpts,
    ) -> (String, Vec<Table>) {
        let watch = lp.value("watch").unwrap_or_default();
        // sersync cut one trailing slash; a path of `/` alone stays `/`.
        let path = match watch.strip_suffix('/') {
            Some(p) if !p.is_empty() => p,
            _ => watch,
        };
        let base = path.rsplit('/').next().unwrap_or("");
        let name = unique_name(base, "root", &mut self.root_names);
        self.check_latin1_path("the watched directory", path);
        if !path.starts_with('/') {
            self.changed(format!(
                "`<localpath watch=\"{watch}\">` is relative: syncbus reads it from the config file's directory, sersync from its working directory"
            ));
        }
        self.mapped(format!(
            "`<localpath watch=\"{watch}\">` → `[[root]]` `{name}` (`path = \"{path}\"`)"
        ));
        let mut root = Table::new("[[root]]");
        root.notes.push(
            "dotfiles are mirrored (sersync dropped them live); editor swap and lock files are not (builtin_excludes); `name~`, `4913` and `.name.XXXXXX` are mirrored once they rest 1 s".into(),
        );
        root.set("name", name.as_str()).set("path", path);
        if !regexes.is_empty() {
            root.note(
                "exclude",
                strings(regexes),
                "sersync's <filter> (full match on the root-relative path)".into(),
            );
        }
        if !opts.exclude_glob.is_empty() {
            root.note(
                "exclude_glob",
                strings(&opts.exclude_glob),
                "--exclude from sersync's commonParams".into(),
            );
        }
        let mut tables = vec![root];
        if !events.is_empty() {
            let mut t = Table::new("[root.events]");
            t.notes
                .push("sersync's <inotify> toggles (moveFrom/moveTo are one `move`)".into());
            for (key, value, note) in events {
                match note {
                    Some(n) => t.note(key, *value, n.clone()),
                    None => {
                        t.set(key, *value);
                    }
                }
            }
            tables.push(t);
        }
        (name, tables)
    }

    /// One `<remote ip name>` → an rsync `[[target]]` for `root`.
    fn remote(&mut self, r: &Node, root: &str, o: &RsyncOpts) -> (String, Table) {
        let ip = r.value("ip").unwrap_or_default();
        let module = r.value("name").unwrap_or_default();
        let host = if ip.contains(':') && !ip.starts_with('[') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let user = o.user.as_deref().map_or(String::new(), |u| format!("{u}@"));
        let url = if o.ssh {
            format!("{user}{host}:{module}")
        } else {
            let port = o.port.map_or(String::new(), |p| format!(":{p}"));
            let trimmed = module.trim_start_matches('/');
            if trimmed != module {
                self.changed(format!(
                    "`<remote name=\"{module}\">`: an rsync daemon module is a name, so the leading `/` is dropped (`{trimmed}`); if you meant a directory over ssh, set `<ssh start=\"true\">` and import again"
                ));
            }
            format!("rsync://{user}{host}{port}/{trimmed}")
        };
        let name = unique_name(module, "target", &mut self.target_names);
        self.mapped(format!(
            "`<remote ip=\"{ip}\" name=\"{module}\">` → `[[target]]` `{name}` (`url = \"{url}\"`)"
        ));
        let mut t = Table::new("[[target]]");
        t.set("name", name.as_str())
            .set("url", url)
            .set("roots", strings(&[root]));
        if let Some(pw) = &o.password_file {
            t.set("password_file", pw.as_str());
        }
        match o.timeout {
            Some(secs) => {
                t.set("timeout", secs as i64);
            }
            None => t.notes.push(format!(
                "timeout: syncbus's default, {} s without I/O (sersync had none)",
                protocol::config::DEFAULT_TIMEOUT_S
            )),
        }
        if let Some(b) = &o.bwlimit {
            t.set("bwlimit", b.as_str());
        }
        match (&o.params_note, o.extra_args.is_empty()) {
            (Some(n), false) => t.note("extra_args", strings(&o.extra_args), n.clone()),
            (Some(n), true) => t.notes.push(n.clone()),
            (None, false) => {
                t.set("extra_args", strings(&o.extra_args));
            }
            (None, true) => {}
        }
        (name, t)
    }

    /// `<sersync><plugin start="true" name>` and the `<plugin name>` definitions.
    fn plugins(
        &mut self,
        head: &Node,
        sersync: &Node,
        mapped: &[Mapped],
    ) -> Result<Vec<Table>, ImportError> {
        // sersync read the first <plugin> of <sersync> only.
        let switch = sersync.child("plugin");
        let enabled = switch
            .filter(|p| p.on())
            .map(|p| p.attr("name").unwrap_or("").trim().to_string());
        if let (Some(name), Some(s)) = (&enabled, switch) {
            if !matches!(name.as_str(), "command" | "socket" | "refreshCDN") {
                return Err(self.err(
                    s,
                    format!("`<plugin start=\"true\" name=\"{name}\">`: sersync 2.5 has no such plugin (command, socket, refreshCDN); it refused to start too"),
                ));
            }
            if !head
                .all("plugin")
                .any(|p| p.attr("name") == Some(name.as_str()))
            {
                return Err(self.err(
                    s,
                    format!("`<plugin start=\"true\" name=\"{name}\">` is enabled, but no `<plugin name=\"{name}\">` under `<head>` says how it runs"),
                ));
            }
        } else if let Some(s) = switch {
            self.mapped(format!(
                "`<sersync><plugin start=\"false\" name=\"{}\">`: off; no plugin runs after a sync",
                s.attr("name").unwrap_or("")
            ));
        }
        let first = &mapped[0];
        let mut tables = Vec::new();
        let mut seen = Vec::new();
        for def in head.all("plugin") {
            let name = def.attr("name").unwrap_or("").trim();
            // sersync used the first definition of each name.
            if seen.contains(&name) {
                self.unsupported(format!(
                    "a second `<plugin name=\"{name}\">` (line {}): sersync used only the first; ignored",
                    def.line
                ));
                continue;
            }
            seen.push(name);
            if enabled.as_deref() != Some(name) {
                let how = match name {
                    "command" | "socket" | "refreshCDN" => format!(
                        "not enabled by `<sersync><plugin start=\"true\" name=\"{name}\">`, so not carried over (if you ran it alone with `sersync -m {name}`, enable it there and import again, then drop its `after`)"
                    ),
                    _ => "sersync 2.5 never ran it".to_string(),
                };
                self.mapped(format!("`<plugin name=\"{name}\">`: {how}"));
                continue;
            }
            match name {
                "command" => tables.push(self.command_plugin(def, first)?),
                "refreshCDN" => tables.push(self.cdn_plugin(def, first)?),
                _ => tables.push(self.socket_plugin(def, first)?),
            }
        }
        Ok(tables)
    }

    /// The hook's `after`: sersync ran a plugin once each file's rsync to every remote
    /// had been tried.
    fn after(&mut self, t: &mut Table, plugin: &str, m: &Mapped) {
        if m.targets.is_empty() {
            self.mapped(format!(
                "the {plugin} plugin runs on the changes themselves (there is no rsync target to run after)"
            ));
            return;
        }
        t.set("after", strings(&m.targets));
        let mut s = format!(
            "the {plugin} plugin runs on what reached {} (`after`); sersync ran it once each file's rsync had been tried, succeeded or not",
            m.targets.join(", ")
        );
        if m.targets.len() > 1 {
            s.push_str("; with several targets it runs once per target that received the path");
        }
        self.changed(s);
    }

    /// `<plugin name="command">` → a `command` target.
    fn command_plugin(&mut self, def: &Node, m: &Mapped) -> Result<Table, ImportError> {
        let param = def.child("param");
        let Some(prefix) = param.and_then(|p| p.value("prefix")) else {
            return Err(self.err(
                param.unwrap_or(def),
                "the command plugin is enabled but `<param>` has no `prefix`: which program should run?".into(),
            ));
        };
        let suffix = param.and_then(|p| p.value("suffix")).unwrap_or("");
        let ignore_error = param.and_then(|p| p.attr("ignoreError")) == Some("true");
        self.check_latin1_path("the command", prefix);
        let (argv, shell) = command_argv(prefix, suffix);
        let name = unique_name("command", "command", &mut self.target_names);
        let mut t = Table::new("[[target]]");
        t.notes.push(format!(
            "sersync's command plugin: `{prefix} PATH {suffix}` through /bin/sh, once per file"
        ));
        t.set("name", name.as_str())
            .set("command", strings(&argv))
            .set("paths", "each")
            .set("roots", strings(&[m.root.as_str()]));
        if ignore_error {
            t.note(
                "on_failure",
                "log",
                "ignoreError=\"true\": a failed run is logged and counted, never retried".into(),
            );
        }
        if shell {
            self.changed(format!(
                "the command plugin `{prefix} PATH {suffix}` → `/bin/sh -c` with a loop that runs it once per path, each path given as \"$f\": a bare shell, a suffix or shell syntax cannot be an argv; the file names are arguments, never part of the shell text (sersync pasted them in unquoted)"
            ));
        } else {
            self.mapped(format!(
                "the command plugin `{prefix} PATH` → `[[target]]` `{name}` with `command = {argv:?}` and `paths = \"each\"` (once per path, as sersync; argv: no shell)"
            ));
            self.changed(format!(
                "the command plugin: sersync ran `{prefix} PATH` once per file through a shell; syncbus runs `{} PATH` once per path too, without a shell",
                argv.join(" ")
            ));
        }
        self.changed(
            "the command plugin's paths are `./dir/file`, relative to the root (it runs there), where sersync gave the absolute path".into(),
        );
        if ignore_error {
            self.changed(
                "the command plugin's exit status: sersync never looked at it (ignoreError=\"true\" threw its output away); syncbus maps ignoreError=\"true\" to `on_failure = \"log\"`: a run that exits non-zero is logged at WARN and counted (`ignored_failures` in `syncbus status --json`, `syncbus_target_ignored_failures_total`), never retried; a path whose run succeeded is never run again".into(),
            );
        } else {
            self.changed(
                "the command plugin's exit status: sersync never looked at it (ignoreError=\"false\" only kept its output); syncbus retries the run of a path that exits non-zero, that path only (a path whose run succeeded is never run again), so the program should exit 0 for what it should not retry, or set `on_failure = \"log\"`".into(),
            );
        }
        match def.child("filter") {
            Some(f) if f.on() => {
                let mut globs = Vec::new();
                for inc in f.all("include") {
                    let expr = inc.value("expression").unwrap_or("");
                    match regex_to_glob(expr) {
                        Some(g) => {
                            self.mapped(format!(
                                "command `<include expression=\"{expr}\">` → `include = \"{g}\"`"
                            ));
                            globs.push(g);
                        }
                        None => {
                            t.disabled = true;
                            self.unsupported(format!(
                                "command `<include expression=\"{expr}\">`: only regexes of the form `(.*)\\.ext` (a name ending) become globs; the command target is left commented out so it does not run on every path: write its `include` globs and uncomment it"
                            ));
                        }
                    }
                }
                if globs.is_empty() && !t.disabled {
                    // sersync ran nothing with an empty include list; `include = []`
                    // would mean every path.
                    t.disabled = true;
                    self.unsupported(
                        "the command plugin's `<filter start=\"true\">` has no `<include>`: sersync ran it on nothing; the target is left commented out".into(),
                    );
                }
                t.note(
                    "include",
                    strings(&globs),
                    "from the plugin's <filter> regexes".into(),
                );
            }
            Some(_) => self.mapped(
                "the command plugin's `<filter start=\"false\">`: off; it runs on every path"
                    .into(),
            ),
            None => {}
        }
        self.after(&mut t, "command", m);
        Ok(t)
    }

    /// `<plugin name="refreshCDN">` → a `webhook` target with `cdn_base_url`.
    fn cdn_plugin(&mut self, def: &Node, m: &Mapped) -> Result<Table, ImportError> {
        let Some(lp) = def.child("localpath") else {
            return Err(self.err(
                def,
                "the refreshCDN plugin is enabled but has no `<localpath>`".into(),
            ));
        };
        let info = lp.child("cdninfo");
        let Some(domain) = info.and_then(|i| i.value("domainname")) else {
            return Err(self.err(
                info.unwrap_or(lp),
                "the refreshCDN plugin is enabled but `<cdninfo>` has no `domainname`".into(),
            ));
        };
        let port = match info.and_then(|i| i.value("port")) {
            None => 80,
            Some(p) => p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| {
                self.err(
                    info.unwrap_or(lp),
                    format!("`<cdninfo>` port `{p}` is not a TCP port (1-65535)"),
                )
            })?,
        };
        let sendurl = lp.child("sendurl");
        let Some(base) = sendurl.and_then(|s| s.value("base")) else {
            return Err(self.err(
                sendurl.unwrap_or(lp),
                "the refreshCDN plugin is enabled but `<sendurl>` has no `base`".into(),
            ));
        };
        let base = if base.starts_with("http://") || base.starts_with("https://") {
            base.to_string()
        } else {
            self.changed(format!(
                "refreshCDN `<sendurl base=\"{base}\">` has no scheme: `http://` was added"
            ));
            format!("http://{base}")
        };
        let watch = lp.value("watch").unwrap_or("");
        if watch.trim_end_matches('/') != m.watch.trim_end_matches('/') {
            self.changed(format!(
                "refreshCDN watches `{watch}`, `<sersync>` watches `{}`: sersync then watched the plugin's directory for everything; syncbus keeps root `{}` and refreshes its paths (check that `cdn_base_url` serves that directory)",
                m.watch, m.root
            ));
        }
        let port_part = if port == 80 {
            String::new()
        } else {
            format!(":{port}")
        };
        let url = format!("http://{domain}{port_part}/index.jsp?ok=ok&urls={{url}}");
        let name = unique_name("cdn", "cdn", &mut self.target_names);
        let header = format!("/etc/syncbus/{name}.header");
        let mut t = Table::new("[[target]]");
        t.notes.push(
            "sersync's refreshCDN plugin: one HEAD request per path; the credentials are NOT here"
                .into(),
        );
        t.set("name", name.as_str())
            .set("webhook", url.as_str())
            .set("method", "HEAD")
            .set("cdn_base_url", base.as_str())
            .set("roots", strings(&[m.root.as_str()]));
        t.note(
            "header_file",
            header.as_str(),
            "create it (mode 0600): `Name: value` lines with the CDN credentials".into(),
        );
        self.mapped(format!(
            "refreshCDN `<cdninfo domainname=\"{domain}\" port=\"{port}\">` and `<sendurl base>` → `[[target]]` `{name}`: `webhook = \"{url}\"`, `method = \"HEAD\"`, `cdn_base_url = \"{base}\"`"
        ));
        let has_credentials =
            info.is_some_and(|i| i.value("username").is_some() || i.value("passwd").is_some());
        if has_credentials {
            self.unsupported(format!(
                "refreshCDN `username`/`passwd`: not written anywhere; sersync sent them in the query string, and syncbus keeps secrets out of its config and URLs. Put them in `{header}` (mode 0600) as headers your CDN accepts; ChinaCache's old `index.jsp` took them only as query parameters, so check its current purge API. `syncbus check-config` fails until that file exists"
            ));
        }
        self.unsupported(
            "refreshCDN's `&dirs=DIR/` for a directory: syncbus sends each path as `{url}` the same way, file or directory".into(),
        );
        match lp.child("regexurl") {
            Some(r) if r.attr("regex") == Some("true") => {
                t.disabled = true;
                self.unsupported(format!(
                    "refreshCDN `<regexurl regex=\"true\" match=\"{}\">`: rewriting a path into its URL with a regex is not supported (a URL is `cdn_base_url` + the path); the target is left commented out: check the URLs and uncomment it",
                    r.attr("match").unwrap_or("")
                ));
            }
            Some(_) => self.mapped(
                "refreshCDN `<regexurl regex=\"false\">`: off; a path's URL is the base + the path, as in syncbus".into(),
            ),
            None => {}
        }
        self.after(&mut t, "refreshCDN", m);
        Ok(t)
    }

    /// `<plugin name="socket">` → a `tcp://` target with sersync's framing: one
    /// connection per path carrying its absolute path, so the receiver runs unchanged.
    fn socket_plugin(&mut self, def: &Node, m: &Mapped) -> Result<Table, ImportError> {
        let Some(lp) = def.child("localpath") else {
            return Err(self.err(
                def,
                "the socket plugin is enabled but has no `<localpath>`".into(),
            ));
        };
        let host = lp.child("deshost");
        let Some(ip) = host.and_then(|h| h.value("ip")) else {
            return Err(self.err(
                host.unwrap_or(lp),
                "the socket plugin is enabled but `<deshost>` has no `ip`: where should the paths go?".into(),
            ));
        };
        let port = host
            .and_then(|h| h.value("port"))
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|&p| p > 0)
            .ok_or_else(|| {
                self.err(
                    host.unwrap_or(lp),
                    format!(
                        "`<deshost>` port `{}` is not a TCP port (1-65535)",
                        host.and_then(|h| h.value("port")).unwrap_or("")
                    ),
                )
            })?;
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        let url = if ip.contains(':') {
            format!("tcp://[{ip}]:{port}")
        } else {
            format!("tcp://{ip}:{port}")
        };
        let watch = lp.value("watch").unwrap_or("");
        if watch.trim_end_matches('/') != m.watch.trim_end_matches('/') {
            self.changed(format!(
                "the socket plugin watches `{watch}`, `<sersync>` watches `{}`: sersync then watched the plugin's directory for everything; syncbus keeps root `{}` and sends its paths (absolute paths under `{}`)",
                m.watch, m.root, m.watch
            ));
        }
        let name = unique_name("socket", "socket", &mut self.target_names);
        let mut t = Table::new("[[target]]");
        t.notes.push(
            "sersync's socket plugin: each changed path on a TCP connection of its own".into(),
        );
        t.set("name", name.as_str()).set("url", url.as_str());
        t.note(
            "framing",
            "sersync",
            "the absolute path, no newline, no operation, then close; `json` or `nul` add the operation (upsert, delete) on one connection per batch".into(),
        );
        t.set("roots", strings(&[m.root.as_str()]));
        self.mapped(format!(
            "the socket plugin `<deshost ip=\"{ip}\" port=\"{port}\">` → `[[target]]` `{name}` with `url = \"{url}\"` and `framing = \"sersync\"`: each changed path on a connection of its own, its absolute path and nothing else, as sersync sent it; the receiver runs unchanged"
        ));
        self.changed(
            "the socket plugin: a path the receiver cannot take (down, refusing) is journalled and sent again until it connects, where sersync dropped it; a path whose connection succeeded is not sent again. A compare of the whole root (at start) sends the root's own path: everything below it may have changed".into(),
        );
        self.after(&mut t, "socket", m);
        Ok(t)
    }

    /// `<crontab>` → a `[[schedule]]`; `<crontabfilter>` → its `exclude_glob`.
    fn crontab(
        &mut self,
        crontab: Option<&Node>,
        filter_on: bool,
    ) -> Result<Option<Table>, ImportError> {
        let Some(c) = crontab else { return Ok(None) };
        if !c.on() {
            self.mapped(
                "`<crontab start=\"false\">`: off, and its `<crontabfilter>` with it; no `[[schedule]]` (syncbus still compares every root in full at start)".into(),
            );
            return Ok(None);
        }
        let given = c.attr("schedule").unwrap_or("").trim();
        // sersync read it with atoi: the leading digits count (`600min` is 600), and
        // anything that gives 0 meant its default of 600.
        let digits: String = given.chars().take_while(char::is_ascii_digit).collect();
        let minutes = match digits.parse::<u64>() {
            Ok(m) if m > 0 => {
                if digits != given {
                    self.changed(format!(
                        "`<crontab schedule=\"{given}\">`: read as {m} minutes, as sersync's atoi did"
                    ));
                }
                m
            }
            _ => {
                self.changed(format!(
                    "`<crontab schedule=\"{given}\">`: sersync ran its crontab every 600 min for this; so does this import"
                ));
                600
            }
        };
        let (cron, every) = cron_for(minutes);
        let mut t = Table::new("[[schedule]]");
        if every == minutes {
            t.note(
                "cron",
                cron.as_str(),
                format!("sersync's crontab: every {minutes} min"),
            );
            self.mapped(format!(
                "`<crontab schedule=\"{minutes}\">` → `[[schedule]]` `cron = \"{cron}\"` (every {minutes} min, at clock times rather than counted from sersync's start)"
            ));
        } else {
            t.note(
                "cron",
                cron.as_str(),
                format!("sersync: every {minutes} min, which cron cannot repeat evenly"),
            );
            self.changed(format!(
                "`<crontab schedule=\"{minutes}\">`: cron cannot repeat every {minutes} min evenly (it does not divide an hour, a day or a week), so `cron = \"{cron}\"`, every {every} min: the longest even interval not longer than sersync's, so the full sync never runs less often than before"
            ));
        }
        let mut globs = Vec::new();
        match c.child("crontabfilter") {
            Some(f) if f.on() => {
                for e in f.all("exclude") {
                    let Some(g) = e.value("expression") else {
                        continue;
                    };
                    match Rules::new(&[], &[g.to_string()], false) {
                        Ok(_) => globs.push(g.to_string()),
                        Err(err) => self.unsupported(format!(
                            "`<crontabfilter>` pattern `{g}` left out: {err}"
                        )),
                    }
                }
                self.mapped(format!(
                    "`<crontabfilter start=\"true\">` → the schedule's `exclude_glob` ({}): rsync patterns in both",
                    globs.join(" ")
                ));
            }
            Some(_) => self.mapped(
                "`<crontabfilter start=\"false\">`: off; its patterns are not carried over".into(),
            ),
            None => {}
        }
        if filter_on && globs.is_empty() {
            self.changed(
                "sersync switched its crontab off when `<filter>` was on without a `<crontabfilter>`; syncbus's full syncs honour the root's `exclude` regexes, so the schedule is kept".into(),
            );
        }
        if !globs.is_empty() {
            t.set("exclude_glob", strings(&globs));
        }
        Ok(Some(t))
    }

    fn fail_log(&mut self, fail_log: Option<&Node>) {
        let Some(f) = fail_log else { return };
        self.trailer.extend([
            "sersync's <failLog> script is replaced by the retry journal: failed work is".into(),
            "retried with backoff until delivered ([retry], defaults kept here);".into(),
            "`syncbus fail-log --config FILE` prints what is pending as rsync commands.".into(),
        ]);
        self.changed(format!(
            "`<failLog path=\"{}\" timeToExecute=\"{}\">` → the retry journal: failed work is retried per target with backoff (1 s doubling to 60 s, `[retry]`) and a probe, until delivered, instead of a script run every {} min; `syncbus fail-log --config FILE` prints what is pending as rsync commands, like that script (kept in `retry.state_dir`, not at that path)",
            f.attr("path").unwrap_or(""),
            f.attr("timeToExecute").unwrap_or(""),
            f.attr("timeToExecute").unwrap_or("60"),
        ));
    }

    /// What differs whatever the file says.
    fn always(&mut self) {
        self.changed(
            "dotfiles: sersync dropped every live event for a file whose name starts with `.` or ends with `~`, and vim's `4913`, though its full syncs copied them; syncbus mirrors dotfiles and leaves out only its built-in set of swap and lock files (vim swap, emacs `.#*`, LibreOffice locks, `.goutputstream-*`, `*.kate-swp`, `.nfs*`; `builtin_excludes = false` turns it off); a file named like a temp file (`*~`, `4913`, emacs `#*#`, rsync's `.name.XXXXXX` such as `.env.sample`) is held until it has rested 1 s, so one renamed or deleted at once never goes out and one that stays is mirrored, live and by full syncs".into(),
        );
        self.changed(
            "at every start syncbus compares each root with its targets in full (deleting on a target what the source lacks), or after a clean stop catches up on what changed since; sersync did a full sync only when started with `-r`".into(),
        );
    }
}

// ---------------------------------------------------------------- pure helpers

/// What `<commonParams>` says, sorted by what becomes of it.
#[derive(Debug, Default, PartialEq)]
struct Params {
    /// Already part of every syncbus run.
    implied: Vec<String>,
    /// Passed on as `extra_args`.
    kept: Vec<String>,
    /// Output-only options, dropped.
    quiet: Vec<String>,
    /// `-u`, dropped on purpose.
    update: bool,
    bwlimit: Option<String>,
    timeout: Option<u64>,
    port: Option<u16>,
    password_file: Option<String>,
    exclude: Vec<String>,
    /// Options that cannot be carried over, each with the reason.
    refused: Vec<String>,
}

/// Sorts the words of `<commonParams params>` (sersync pasted them into a shell command
/// line; quoting and other shell syntax are refused rather than guessed at).
fn parse_params(params: &str) -> Params {
    let mut p = Params::default();
    let mut words = params.split_whitespace().peekable();
    while let Some(w) = words.next() {
        if w.contains(['"', '\'', '`', '$', ';', '|', '&', '<', '>', '\\', '(', ')']) {
            p.refused.push(format!(
                "`{w}`: shell syntax; give the option in `extra_args` by hand"
            ));
            continue;
        }
        if let Some(long) = w.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let takes_value = matches!(
                name,
                "bwlimit" | "timeout" | "port" | "password-file" | "exclude"
            );
            let value = if takes_value {
                inline.or_else(|| words.next().map(str::to_string))
            } else {
                inline
            };
            match (name, value) {
                (
                    "archive" | "recursive" | "links" | "perms" | "times" | "group" | "owner"
                    | "devices" | "specials" | "relative" | "from0" | "force" | "del" | "delete"
                    | "delete-before" | "delete-during" | "delete-delay" | "delete-after",
                    _,
                ) => p.implied.push(w.to_string()),
                ("update", _) => p.update = true,
                (
                    "verbose" | "quiet" | "progress" | "stats" | "human-readable"
                    | "itemize-changes" | "no-motd" | "8-bit-output",
                    _,
                ) => p.quiet.push(w.to_string()),
                ("dry-run", _) => p
                    .refused
                    .push("`--dry-run`: nothing would reach the target".into()),
                ("bwlimit", Some(v)) => p.bwlimit = Some(v),
                ("timeout", Some(v)) => match v.parse::<u64>() {
                    Ok(t) if t <= i64::MAX as u64 => p.timeout = Some(t),
                    _ => p.refused.push(format!("`--timeout={v}`: not a number")),
                },
                ("port", Some(v)) => match v.parse() {
                    Ok(t) => p.port = Some(t),
                    Err(_) => p.refused.push(format!("`--port={v}`: not a port")),
                },
                ("password-file", Some(v)) => p.password_file = Some(v),
                ("exclude", Some(v)) => p.exclude.push(v),
                (n, None) if takes_value => p.refused.push(format!("`--{n}` without a value")),
                (
                    "rsh" | "files-from" | "exclude-from" | "include-from" | "include" | "filter"
                    | "delete-missing-args" | "contimeout" | "sockopts" | "mkpath",
                    _,
                ) => p.refused.push(format!(
                    "`{w}`: syncbus sets the file list, the filter rules and the transport itself; use the target's keys (`ssh_options`, `exclude_glob`…)"
                )),
                // sersync appended the paths itself, so a bare word after a long option
                // is its value (`--temp-dir /var/tmp`): keep the two as one word, or
                // rsync would take the source directory for that value.
                (n, None) => match words.peek() {
                    Some(v) if !v.starts_with('-') => {
                        let v = words.next().unwrap_or_default();
                        p.kept.push(format!("--{n}={v}"));
                    }
                    _ => p.kept.push(w.to_string()),
                },
                _ => p.kept.push(w.to_string()),
            }
        } else if let Some(short) = w.strip_prefix('-').filter(|s| !s.is_empty()) {
            for (i, c) in short.char_indices() {
                match c {
                    'a' | 'r' | 'l' | 'p' | 't' | 'g' | 'o' | 'D' | 'R' | '0' => {
                        p.implied.push(format!("-{c}"))
                    }
                    'u' => p.update = true,
                    'v' | 'q' | 'h' | 'i' => p.quiet.push(format!("-{c}")),
                    'P' => {
                        p.kept.push("--partial".into());
                        p.quiet.push("--progress (of -P)".into());
                    }
                    'n' => p
                        .refused
                        .push("`-n` (dry run): nothing would reach the target".into()),
                    'e' | 'B' | 'T' | 'f' | 'M' | '@' => {
                        p.refused.push(format!(
                            "`-{}`: an option with a value; give it as `--name=value` in `extra_args` by hand (for `-e`, the ssh target keys)",
                            &short[i..]
                        ));
                        break;
                    }
                    _ => p.kept.push(format!("-{c}")),
                }
            }
        } else {
            p.refused.push(format!("`{w}`: not an option; left out"));
        }
    }
    p
}

/// sersync's `<crontab schedule>` means "every N minutes, counted from sersync's start";
/// cron fires at clock times, so only intervals that divide an hour, a day or a week
/// repeat evenly. Returns the longest such interval not longer than N (a full sync is a
/// safety net: it should not run less often than before) and its length in minutes.
fn cron_for(minutes: u64) -> (String, u64) {
    const EVEN: [u64; 20] = [
        1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60, 120, 180, 240, 360, 480, 720, 1440, 10080,
    ];
    let every = EVEN
        .into_iter()
        .rev()
        .find(|&m| m <= minutes.max(1))
        .unwrap_or(1);
    let cron = match every {
        1 => "* * * * *".to_string(),
        m if m < 60 => format!("*/{m} * * * *"),
        60 => "0 * * * *".to_string(),
        m if m < 1440 => format!("0 */{} * * *", m / 60),
        1440 => "0 0 * * *".to_string(),
        _ => "0 0 * * 0".to_string(),
    };
    (cron, every)
}

/// A `<filter>` regex for syncbus, and what was changed in it. sersync matched a leading
/// `/` below the top of the tree and a trailing `/` on directories at start; syncbus
/// matches `dir/name`, without either.
fn filter_regex(r: &str) -> (String, Vec<&'static str>) {
    let mut notes = Vec::new();
    let (anchor, body) = match r.strip_prefix('^') {
        Some(b) => ("^", b),
        None => ("", r),
    };
    let mut out = match body.strip_prefix('/') {
        Some(rest) => {
            notes.push("leading `/` removed (syncbus's paths have none)");
            format!("{anchor}{rest}")
        }
        None => r.to_string(),
    };
    // sersync saw paths below the top with a leading `/` (`/runtime/x`), so a regex
    // starting `(.*)/` also matched a top-level `runtime/x`; syncbus's paths have no
    // leading `/`, so that `/` becomes optional at the start.
    for lead in ["(.*)/", ".*/"] {
        if let Some(rest) = out.strip_prefix(lead) {
            out = format!("(?:.*/)?{rest}");
            notes.push("leading `(.*)/` made to match at the top level too (sersync's paths began with `/`)");
            break;
        }
    }
    if out.ends_with('/') && !out.ends_with("\\/") {
        out.push('?');
        notes.push("trailing `/` made optional (syncbus's directory paths have none)");
    }
    (out, notes)
}

/// The command plugin's include regexes were matched against the whole absolute path;
/// the ones that say "ends with" (`(.*)\.php`, `.*\.sh$`) become the glob `*.php` (a name
/// at any depth). Nothing else has a faithful glob.
fn regex_to_glob(r: &str) -> Option<String> {
    let r = r.strip_prefix('^').unwrap_or(r);
    let r = r.strip_suffix('$').unwrap_or(r);
    let tail = r.strip_prefix("(.*)").or_else(|| r.strip_prefix(".*"))?;
    let mut glob = String::from("*");
    let mut chars = tail.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                c @ ('.' | '-' | '_' | '~' | '+' | '#' | '@') => glob.push(c),
                _ => return None,
            },
            c if c.is_alphanumeric() || matches!(c, '_' | '-' | '~' | '@' | '#') => glob.push(c),
            _ => return None,
        }
    }
    (glob.len() > 1).then_some(glob)
}

/// The command plugin as syncbus argv (paths appended as arguments), and whether that
/// needed `/bin/sh -c` to keep sersync's meaning: a suffix after the path, shell syntax
/// in the prefix, or a bare shell (given several scripts it would run only the first).
fn command_argv(prefix: &str, suffix: &str) -> (Vec<String>, bool) {
    let words: Vec<String> = prefix.split_whitespace().map(str::to_string).collect();
    let shell_syntax = |s: &str| {
        s.contains([
            '|', '&', ';', '<', '>', '(', ')', '$', '`', '\\', '"', '\'', '*', '?', '[', '#', '~',
            '=', '{', '}',
        ])
    };
    // A shell, with or without options (`/bin/sh -e`): given several scripts it would
    // run only the first.
    let bare_shell = words.first().is_some_and(|w| {
        matches!(
            w.rsplit('/').next(),
            Some("sh" | "bash" | "dash" | "ash" | "ksh" | "zsh")
        )
    });
    if suffix.trim().is_empty() && !shell_syntax(prefix) && !bare_shell {
        return (words, false);
    }
    // The command on a line of its own inside a group, so that a suffix ending in `&`,
    // `;` or a `# comment` still parses; the loop's own names start with `_` so that a
    // `$f` or `$s` of the user's is not ours. Paths only ever arrive as "$_f".
    let script = format!(
        "_s=0\nfor _f do\n{{ {} \"$_f\" {}\n}} || _s=$?\ndone\nwait\nexit $_s",
        prefix.trim(),
        suffix.trim()
    );
    (
        vec!["/bin/sh".into(), "-c".into(), script, "sh".into()],
        true,
    )
}
