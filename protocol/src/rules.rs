//! Exclude rules of one root: regular expressions with sersync's semantics, globs with
//! rsync's semantics, and a built-in set of swap and lock-file names; and the shapes of
//! usually transient names ([`transient_name`]), which the filter holds instead.
//!
//! A path is excluded when it, or any directory above it, matches. The filter asks
//! [`Rules::excludes`] for every event; the dispatcher hands the globs to rsync as they
//! are ([`Rules::rsync_globs`]) and, for regexes, lists the excluded names it finds
//! ([`Rules::excluded_below`]) so a full sync honours the same rules.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::{Candidate, GlobBuilder, GlobSet, GlobSetBuilder};
use regex::bytes::{Regex, RegexSet};
use thiserror::Error;

use crate::PathBytes;

/// Names that only ever hold editor swap, lock and temp state, never a user's data:
/// excluded everywhere, live and in full syncs. Documented in README.md; off with
/// `builtin_excludes = false`.
///
/// Names that are *usually* transient but may be a real file (`*~`, `4913`, `#*#`,
/// rsync's `.name.XXXXXX`) are not here: the filter holds them until they rest
/// ([`transient_name`]), so a temp file renamed or deleted at once never goes out and
/// One that stays in the tree is data, mirrored like any other.
pub const BUILTIN_EXCLUDES: &[&str] = &[
    ".*.sw[a-p]",       // vim swap: .name.swp, .swo, … (always hidden)
    ".*.swx",           // vim swap of a second session
    ".sw[a-p]",         // vim swap of an unnamed buffer
    ".#*",              // emacs lock (a dangling symlink)
    ".~lock.*#",        // LibreOffice lock
    ".goutputstream-*", // GIO / gedit atomic-save temp
    "*.kate-swp",       // Kate swap
    ".nfs*",            // NFS silly-rename of an open, deleted file
];

/// True when a file name (the last component) has a shape that editors and tools use
/// for files they create and then rename or delete within moments: backups `name~`,
/// vim's write probe `4913`, emacs autosave `#name#`, rsync's temp `.name.XXXXXX` (six
/// letters or digits) and `sed -i`'s `sedXXXXXX`. Such a name is held until it rests
/// instead of being sent at once; it is never dropped, since a real file may have it.
pub fn transient_name(name: &[u8]) -> bool {
    let alnum6 = |s: &[u8]| s.len() == 6 && s.iter().all(u8::is_ascii_alphanumeric);
    let rsync_temp = name.first() == Some(&b'.')
        && name.len() > 8
        && name[name.len() - 7] == b'.'
        && alnum6(&name[name.len() - 6..]);
    (name.len() > 1 && name.ends_with(b"~"))
        || name == b"4913"
        || (name.len() > 2 && name.starts_with(b"#") && name.ends_with(b"#"))
        || rsync_temp
        || (name.len() == 9 && name.starts_with(b"sed") && alnum6(&name[3..]))
}

/// An exclude pattern that does not compile.
#[derive(Debug, Error)]
pub enum RuleError {
    /// A sersync-style regex that does not compile.
    #[error("invalid regex `{pattern}`: {source}")]
    Regex {
        /// The pattern as written.
        pattern: String,
        /// The regex crate's reason.
        #[source]
        source: regex::Error,
    },
    /// An rsync-style glob that does not compile.
    #[error("invalid glob `{pattern}`: {source}")]
    Glob {
        /// The pattern as written.
        pattern: String,
        /// globset's reason.
        #[source]
        source: globset::Error,
    },
}

/// A root's exclude rules: regexes (full match) and globs, compiled once.
#[derive(Debug, Clone)]
pub struct Rules {
    regexes: Option<RegexSet>,
    /// Globs that match files and directories.
    any: GlobSet,
    /// Globs written with a trailing `/`: they match directories only.
    dirs: GlobSet,
    /// The globs as written, for rsync.
    globs: Vec<String>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules::new(&[], &[], false).expect("no rules always compile")
    }
}

impl Rules {
    /// `regexes` must match the whole root-relative path (sersync's `<exclude
    /// expression>`); `globs` follow rsync's `--exclude` pattern rules.
    pub fn new(regexes: &[String], globs: &[String], builtin: bool) -> Result<Self, RuleError> {
        for r in regexes {
            check_regex(r)?;
        }
        let regexes = if regexes.is_empty() {
            None
        } else {
            let anchored: Vec<String> = regexes.iter().map(|r| format!("^(?:{r})$")).collect();
            Some(RegexSet::new(&anchored).map_err(|source| RuleError::Regex {
                pattern: regexes.join(" | "),
                source,
            })?)
        };
        let mut all: Vec<String> = Vec::new();
        if builtin {
            all.extend(BUILTIN_EXCLUDES.iter().map(|s| s.to_string()));
        }
        all.extend(globs.iter().cloned());
        let (any, dirs) = compile_globs(&all)?;
        Ok(Rules {
            regexes,
            any,
            dirs,
            globs: all,
        })
    }

    /// These rules and one more rsync-style glob (a two-way root's own `/.syncbus/`).
    pub fn and_glob(&self, glob: &str) -> Result<Rules, RuleError> {
        let mut all = self.globs.clone();
        all.push(glob.to_string());
        let (any, dirs) = compile_globs(&all)?;
        Ok(Rules {
            regexes: self.regexes.clone(),
            any,
            dirs,
            globs: all,
        })
    }

    /// True when `path` (a directory if `dir`) or one of the directories above it is
    /// excluded. The root itself is never excluded.
    pub fn excludes(&self, path: &PathBytes, dir: bool) -> bool {
        if path.is_root() {
            return false;
        }
        self.matches(path.as_bytes(), dir) || path.ancestors().any(|a| self.matches(a, true))
    }

    /// True when this entry itself matches, not looking at its ancestors (for walks that
    /// stop descending at an excluded directory).
    pub fn matches(&self, path: &[u8], dir: bool) -> bool {
        if let Some(set) = &self.regexes {
            if set.is_match(path) {
                return true;
            }
        }
        let cand = Candidate::new(Path::new(OsStr::from_bytes(path)));
        self.any.is_match_candidate(&cand) || (dir && self.dirs.is_match_candidate(&cand))
    }

    /// True when some rule is a sersync-style regex.
    pub fn has_regexes(&self) -> bool {
        self.regexes.is_some()
    }

    /// The glob rules, to pass to rsync as `--exclude=PATTERN` (same semantics).
    pub fn rsync_globs(&self) -> &[String] {
        &self.globs
    }

    /// Walks `root/subtree` and returns the paths (relative to `subtree`) that a regex
    /// excludes, without descending into them. Globs are left to rsync. Unreadable
    /// entries are skipped: rsync reports them itself.
    pub fn excluded_below(&self, root: &Path, subtree: &PathBytes) -> Vec<PathBytes> {
        let mut out = Vec::new();
        if self.regexes.is_none() {
            return out;
        }
        let mut stack = vec![subtree.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(dir.under(root)) else {
                continue;
            };
            for entry in entries.flatten() {
                let rel = dir.join(entry.file_name().as_bytes());
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if self
                    .regexes
                    .as_ref()
                    .is_some_and(|s| s.is_match(rel.as_bytes()))
                {
                    out.push(PathBytes::new(
                        rel.as_bytes()[subtree.as_bytes().len()..]
                            .strip_prefix(b"/")
                            .unwrap_or(&rel.as_bytes()[subtree.as_bytes().len()..])
                            .to_vec(),
                    ));
                } else if is_dir {
                    stack.push(rel);
                }
            }
        }
        out
    }
}

fn check_regex(r: &str) -> Result<(), RuleError> {
    Regex::new(r).map(drop).map_err(|source| RuleError::Regex {
        pattern: r.to_string(),
        source,
    })
}

/// rsync pattern → globset pattern. rsync matches a pattern without `/` against the last
/// component, an unanchored pattern with `/` against the end of the path at a component
/// boundary, and a pattern starting with `/` from the transfer root; a trailing `/`
/// restricts it to directories.
fn translate_glob(pattern: &str) -> (String, bool) {
    let (p, dir_only) = match pattern.strip_suffix('/') {
        Some(p) => (p, true),
        None => (pattern, false),
    };
    let glob = match p.strip_prefix('/') {
        Some(anchored) => anchored.to_string(),
        None => format!("**/{p}"),
    };
    (glob, dir_only)
}

/// The two glob sets of `all`: patterns for any entry, and those written with a
/// trailing `/` (directories only).
fn compile_globs(all: &[String]) -> Result<(GlobSet, GlobSet), RuleError> {
    let (mut any, mut dirs) = (GlobSetBuilder::new(), GlobSetBuilder::new());
    for g in all {
        let (glob, dir_only) = translate_glob(g);
        let compiled = GlobBuilder::new(&glob)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|source| RuleError::Glob {
                pattern: g.clone(),
                source,
            })?;
        if dir_only {
            dirs.add(compiled);
        } else {
            any.add(compiled);
        }
    }
    let build = |b: GlobSetBuilder| {
        b.build().map_err(|source| RuleError::Glob {
            pattern: all.join(" "),
            source,
        })
    };
    Ok((build(any)?, build(dirs)?))
}

/// Escapes a literal path for an anchored rsync exclude rule: rsync treats a pattern
/// with `*`, `?` or `[` as a wildcard pattern (where `\` escapes), and any other
/// pattern as a literal string.
pub fn rsync_literal_rule(path: &PathBytes) -> Vec<u8> {
    let wild = path
        .as_bytes()
        .iter()
        .any(|b| matches!(b, b'*' | b'?' | b'['));
    anchored(path, wild)
}

/// `/path` escaped for a pattern that the caller makes a wildcard pattern (e.g. by
/// appending `/***`), so every `*?[\` of the name is escaped.
pub fn rsync_wildcard_prefix(path: &PathBytes) -> Vec<u8> {
    anchored(path, true)
}

fn anchored(path: &PathBytes, escape: bool) -> Vec<u8> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.push(b'/');
    for &b in bytes {
        if escape && matches!(b, b'*' | b'?' | b'[' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(regexes: &[&str], globs: &[&str], builtin: bool) -> Rules {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Rules::new(&s(regexes), &s(globs), builtin).unwrap()
    }

    #[test]
    fn regex_is_a_full_match_on_the_relative_path() {
        let r = rules(&[r"(.*)\.svn", "tmp/.*"], &[], false);
        assert!(r.excludes(&"a/.svn".into(), true));
        assert!(
            r.excludes(&"a/.svn/entries".into(), false),
            "below an excluded dir"
        );
        assert!(!r.excludes(&"a/.svnx".into(), false), "anchored at the end");
        assert!(r.excludes(&"tmp/x".into(), false));
        assert!(
            !r.excludes(&"x/tmp/y".into(), false),
            "anchored at the start"
        );
    }

    #[test]
    fn regex_matches_non_utf8_bytes() {
        let r = rules(&[r"(?-u:\xff).*"], &[], false);
        assert!(r.excludes(&PathBytes::new(b"\xffname".to_vec()), false));
        assert!(!r.excludes(&"name".into(), false));
    }

    #[test]
    fn globs_follow_rsync_rules() {
        let r = rules(&[], &["*.log", "/build", "cache/", "docs/*.tmp"], false);
        assert!(
            r.excludes(&"a/b/x.log".into(), false),
            "no slash: any depth"
        );
        assert!(r.excludes(&"build".into(), true));
        assert!(
            !r.excludes(&"src/build".into(), true),
            "leading slash anchors"
        );
        assert!(r.excludes(&"x/cache".into(), true));
        assert!(
            !r.excludes(&"x/cache".into(), false),
            "trailing slash: dirs only"
        );
        assert!(
            r.excludes(&"x/cache/f".into(), false),
            "below an excluded dir"
        );
        assert!(r.excludes(&"p/docs/a.tmp".into(), false));
        assert!(!r.excludes(&"docs/sub/a.tmp".into(), false), "* stops at /");
    }

    #[test]
    fn builtin_set_catches_swap_and_lock_files_and_nothing_that_may_be_data() {
        let r = rules(&[], &[], true);
        for temp in [
            ".doc.txt.swp",
            ".doc.txt.swx",
            ".#doc.txt",
            ".goutputstream-ABC123",
            ".~lock.report.odt#",
            "doc.kate-swp",
            ".nfs000000001234",
        ] {
            assert!(
                r.excludes(&PathBytes::from("d").join(temp.as_bytes()), false),
                "{temp}"
            );
        }
        // Real files with names of usually transient shapes are data.
        for ok in [
            "doc.txt",
            ".bashrc",
            ".config",
            "movie.swf",
            "a.swp.txt",
            "4913",
            "49130",
            "report.txt~",
            "#doc.txt#",
            ".env.sample",
            ".env.docker",
            ".htaccess.backup",
            ".vimrc.before",
            ".doc.txt.Ab3xZ9",
            "x.tar.gz",
        ] {
            assert!(
                !r.excludes(&PathBytes::from("d").join(ok.as_bytes()), false),
                "{ok}"
            );
        }
        assert!(!rules(&[], &[], false).excludes(&".x.swp".into(), false));
    }

    #[test]
    fn transient_shapes_are_told_from_ordinary_names() {
        for t in [
            "report.txt~",
            "4913",
            "#doc.txt#",
            ".doc.txt.Ab3xZ9",
            ".env.sample",
            ".htaccess.backup",
            "sedAb3xZ9",
        ] {
            assert!(transient_name(t.as_bytes()), "{t}");
        }
        for ok in [
            "~",
            "#",
            "##",
            "49130",
            "doc.txt",
            ".bashrc",
            ".a.b",
            ".Ab3xZ9",
            ".x.Ab3-Z9",
            "sed",
            "sedimentary",
            "x.tar.gz",
            ".vimrc.before1",
        ] {
            assert!(!transient_name(ok.as_bytes()), "{ok}");
        }
    }

    #[test]
    fn root_is_never_excluded() {
        assert!(!rules(&[".*"], &["*"], true).excludes(&PathBytes::root(), true));
    }

    #[test]
    fn bad_patterns_are_errors() {
        assert!(Rules::new(&["(".into()], &[], false).is_err());
        assert!(Rules::new(&[], &["a[".into()], false).is_err());
    }

    #[test]
    fn literal_rules_escape_only_in_wildcard_mode() {
        assert_eq!(rsync_literal_rule(&"a b\\c".into()), b"/a b\\c");
        assert_eq!(rsync_literal_rule(&"x*y\\".into()), b"/x\\*y\\\\");
    }

    #[test]
    fn excluded_below_lists_regex_matches_without_descending() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("s/.svn/deep")).unwrap();
        std::fs::write(t.path().join("s/keep"), b"").unwrap();
        std::fs::write(t.path().join("s/.svn/deep/x"), b"").unwrap();
        let r = rules(&[r"(.*)\.svn"], &[], false);
        assert_eq!(
            r.excluded_below(t.path(), &"s".into()),
            vec![PathBytes::from(".svn")]
        );
        assert_eq!(
            r.excluded_below(t.path(), &PathBytes::root()),
            vec![PathBytes::from("s/.svn")]
        );
    }
}
