//! The manifest of a two-way root: the paths it held at a clean stop, so that the next
//! start can tell a file deleted while syncbus was stopped (listed, gone now: the delete
//! goes to the peer) from one this side never had (not listed: it comes from the peer).
//!
//! The watcher writes one per two-way root (`manifest-<root>.paths`) into the runtime
//! dir when it stops cleanly; `syncbus run` moves it beside `checkpoint.toml` in the
//! state dir before it writes the checkpoint, and removes it whenever the checkpoint is
//! not used (a stale manifest must never drive deletes); the dispatcher's catch-up reads
//! it. This module is the format and the comparison; the walking and the moving are the
//! watcher's and the supervisor's.
//!
//! Format: the line `syncbus-manifest 1\n`, then each path relative to the root,
//! NUL-terminated (names may hold newlines, never NULs), a directory with a trailing `/`.
//!
//! # Invariants
//! - An entry without its terminating NUL (a cut-short file) is not an entry: a lost
//!   entry can only bring a file back from the peer, never delete one.
//! - A file without the header is no manifest at all ([`decode`] says `None`).

use std::collections::BTreeMap;

use crate::PathBytes;

const HEADER: &[u8] = b"syncbus-manifest 1\n";
const PREFIX: &str = "manifest-";
const SUFFIX: &str = ".paths";

/// The file name of `root`'s manifest (root names are `[A-Za-z0-9_.-]`).
pub fn file_name(root: &str) -> String {
    format!("{PREFIX}{root}{SUFFIX}")
}

/// True for a name [`file_name`] makes (to clear them all from a directory).
pub fn is_manifest_name(name: &[u8]) -> bool {
    name.starts_with(PREFIX.as_bytes())
        && name.ends_with(SUFFIX.as_bytes())
        && name.len() > PREFIX.len() + SUFFIX.len()
}

/// The manifest of these entries: `(path, is_dir)`.
pub fn encode<'a>(entries: impl IntoIterator<Item = (&'a PathBytes, bool)>) -> Vec<u8> {
    let mut out = HEADER.to_vec();
    for (p, dir) in entries {
        if p.is_root() {
            continue;
        }
        out.extend_from_slice(p.as_bytes());
        if dir {
            out.push(b'/');
        }
        out.push(0);
    }
    out
}

/// The entries of a manifest, `path → is_dir`; `None` when it is not one.
pub fn decode(bytes: &[u8]) -> Option<BTreeMap<PathBytes, bool>> {
    let body = bytes.strip_prefix(HEADER)?;
    let mut out = BTreeMap::new();
    let mut rest = body;
    while let Some(end) = rest.iter().position(|&b| b == 0) {
        let entry = &rest[..end];
        rest = &rest[end + 1..];
        let (path, dir) = match entry.strip_suffix(b"/") {
            Some(p) => (p, true),
            None => (entry, false),
        };
        if path.is_empty() || path.starts_with(b"/") {
            continue;
        }
        out.insert(PathBytes::new(path.to_vec()), dir);
    }
    Some(out)
}

/// What the manifest lists and `exists` says is gone now, topmost only (a directory
/// gone stands for everything listed below it), with whether each was a directory.
pub fn gone(
    listed: &BTreeMap<PathBytes, bool>,
    mut exists: impl FnMut(&PathBytes) -> bool,
) -> BTreeMap<PathBytes, bool> {
    let mut out: BTreeMap<PathBytes, bool> = BTreeMap::new();
    for (p, &dir) in listed {
        if p.ancestors()
            .any(|a| out.contains_key(&PathBytes::new(a.to_vec())))
        {
            continue;
        }
        if !exists(p) {
            out.insert(p.clone(), dir);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[(&str, bool)]) -> BTreeMap<PathBytes, bool> {
        list.iter()
            .map(|(p, d)| (PathBytes::from(*p), *d))
            .collect()
    }

    #[test]
    fn odd_names_survive_the_round_trip() {
        let odd = PathBytes::new(b"new\nline/-- dash \xff".to_vec());
        let dir = PathBytes::from("d");
        let bytes = encode([(&odd, false), (&dir, true), (&PathBytes::root(), true)]);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back.get(&odd), Some(&false));
        assert_eq!(back.get(&dir), Some(&true));
    }

    #[test]
    fn a_cut_short_manifest_loses_entries_and_never_makes_one_up() {
        let long = PathBytes::from("dir/a-long-name");
        let bytes = encode([(&PathBytes::from("first"), false), (&long, false)]);
        let cut = &bytes[..bytes.len() - 6];
        assert_eq!(decode(cut).unwrap(), entries(&[("first", false)]));
        assert_eq!(decode(b"something else\0a\0"), None);
        assert_eq!(decode(b""), None);
    }

    #[test]
    fn gone_names_the_topmost_of_what_went() {
        let listed = entries(&[
            ("d", true),
            ("d/x", false),
            ("d/sub", true),
            ("d/sub/y", false),
            ("kept", false),
            ("e", true),
            ("e/z", false),
        ]);
        let now = ["kept", "e"];
        let got = gone(&listed, |p| {
            now.iter().any(|n| p.as_bytes() == n.as_bytes())
        });
        assert_eq!(got, entries(&[("d", true), ("e/z", false)]));
    }

    #[test]
    fn manifest_names_are_recognised() {
        assert!(is_manifest_name(file_name("www").as_bytes()));
        assert!(!is_manifest_name(b"manifest-.paths"));
        assert!(!is_manifest_name(b"checkpoint.toml"));
    }
}
