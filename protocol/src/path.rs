//! Root-relative paths as raw bytes.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A path relative to a watched root, as the bytes the kernel gave us.
///
/// The root itself is the empty path; components are joined by `/` and there is never a
/// leading `/` or `./`. Serialized as MessagePack `bin`, so a subscriber in any language
/// receives the exact bytes even when they are not UTF-8.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PathBytes(#[serde(with = "serde_bytes")] Vec<u8>);

impl PathBytes {
    /// A path from its bytes, relative to its root.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        PathBytes(bytes.into())
    }

    /// The root itself.
    pub fn root() -> Self {
        PathBytes(Vec::new())
    }

    /// True for the root itself (no bytes).
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The path's bytes, as the kernel gave them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The path as an `OsStr` (the same bytes).
    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }

    /// `self/name` (or `name` when `self` is the root).
    pub fn join(&self, name: &[u8]) -> PathBytes {
        if self.0.is_empty() {
            return PathBytes(name.to_vec());
        }
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        v.push(b'/');
        v.extend_from_slice(name);
        PathBytes(v)
    }

    /// The parent directory; `None` for the root.
    pub fn parent(&self) -> Option<PathBytes> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => PathBytes(self.0[..i].to_vec()),
            None => PathBytes::root(),
        })
    }

    /// The last component (the whole path for a top-level entry).
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// True when `self` is `dir` or lies below it. Every path lies below the root.
    pub fn is_within(&self, dir: &PathBytes) -> bool {
        dir.0.is_empty()
            || (self.0.starts_with(&dir.0)
                && (self.0.len() == dir.0.len() || self.0[dir.0.len()] == b'/'))
    }

    /// True when `self` lies strictly below `dir`.
    pub fn is_below(&self, dir: &PathBytes) -> bool {
        self.0.len() > dir.0.len() && self.is_within(dir)
    }

    /// Replaces the leading `from` with `to`; `self` must be within `from`.
    pub fn rebase(&self, from: &PathBytes, to: &PathBytes) -> PathBytes {
        debug_assert!(self.is_within(from));
        let rest = &self.0[from.0.len()..];
        let rest = rest.strip_prefix(b"/").unwrap_or(rest);
        if rest.is_empty() {
            to.clone()
        } else {
            to.join(rest)
        }
    }

    /// The absolute path of this entry under `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        if self.0.is_empty() {
            root.to_path_buf()
        } else {
            root.join(self.as_os_str())
        }
    }

    /// Every proper ancestor, nearest first, excluding the root.
    pub fn ancestors(&self) -> impl Iterator<Item = &[u8]> {
        let bytes = &self.0;
        bytes
            .iter()
            .enumerate()
            .rev()
            .filter(|&(_, &b)| b == b'/')
            .map(move |(i, _)| &bytes[..i])
    }
}

/// Bytes as text for machines that want UTF-8 (JSON): valid UTF-8 as is, every other
/// byte as `\xNN`. Unlike `Display` (for logs), nothing valid is altered.
pub fn escape_invalid_utf8(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

impl From<&str> for PathBytes {
    fn from(s: &str) -> Self {
        PathBytes(s.as_bytes().to_vec())
    }
}

impl fmt::Debug for PathBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for PathBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        // Escape what would make a log line ambiguous; non-UTF-8 shows as U+FFFD.
        for c in String::from_utf8_lossy(&self.0).chars() {
            match c {
                '\n' => f.write_str("\\n")?,
                '\t' => f.write_str("\\t")?,
                c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => write!(f, "{c}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_parent_and_name() {
        let p = PathBytes::root().join(b"a").join(b"b c");
        assert_eq!(p.as_bytes(), b"a/b c");
        assert_eq!(p.parent().unwrap().as_bytes(), b"a");
        assert_eq!(p.parent().unwrap().parent(), Some(PathBytes::root()));
        assert_eq!(PathBytes::root().parent(), None);
        assert_eq!(p.file_name(), b"b c");
    }

    #[test]
    fn within_respects_component_boundaries() {
        let a = PathBytes::from("a");
        assert!(PathBytes::from("a/b").is_within(&a));
        assert!(PathBytes::from("a").is_within(&a));
        assert!(!PathBytes::from("ab").is_within(&a));
        assert!(!PathBytes::from("a").is_below(&a));
        assert!(PathBytes::from("x").is_within(&PathBytes::root()));
    }

    #[test]
    fn rebase_moves_a_subtree() {
        let p = PathBytes::from("a/b/c");
        assert_eq!(p.rebase(&"a/b".into(), &"x".into()), PathBytes::from("x/c"));
        assert_eq!(
            PathBytes::from("a").rebase(&"a".into(), &"z/y".into()),
            PathBytes::from("z/y")
        );
    }

    #[test]
    fn ancestors_nearest_first() {
        let p = PathBytes::from("a/b/c");
        let v: Vec<&[u8]> = p.ancestors().collect();
        assert_eq!(v, vec![&b"a/b"[..], &b"a"[..]]);
    }

    #[test]
    fn display_escapes_newlines_and_keeps_non_utf8_visible() {
        let p = PathBytes::new(b"a\nb\xff".to_vec());
        assert_eq!(p.to_string(), "a\\nb\u{fffd}");
    }
}
