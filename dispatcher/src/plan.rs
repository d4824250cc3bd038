//! What one rsync run is given: the file list of an incremental batch and the filter
//! rules of either kind of run. Reads the source tree (existence, regex excludes), never
//! spawns anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use protocol::rules::Rules;
use protocol::PathBytes;

use protocol::work::Touch;

/// True when nothing exists at `path` under `root` (a dangling symlink exists).
fn missing(root: &Path, path: &PathBytes) -> bool {
    match std::fs::symlink_metadata(path.under(root)) {
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
        ),
    }
}

/// The nearest directory above `path` that exists under `root` (the root at worst).
pub(crate) fn nearest_dir(root: &Path, path: &PathBytes) -> PathBytes {
    path.ancestors()
        .map(|a| PathBytes::new(a.to_vec()))
        .find(|a| std::fs::symlink_metadata(a.under(root)).is_ok_and(|m| m.is_dir()))
        .unwrap_or_else(PathBytes::root)
}

/// The highest missing ancestor-or-self of a missing `path` (its parent exists).
fn topmost_missing(root: &Path, path: &PathBytes) -> PathBytes {
    let mut top = path.clone();
    for a in path.ancestors() {
        let a = PathBytes::new(a.to_vec());
        if !missing(root, &a) {
            break;
        }
        top = a;
    }
    top
}

/// The entries of an incremental run. A path that no longer exists is replaced by its
/// topmost missing ancestor: rsync's `--delete-missing-args` does not delete `a/b` when
/// `a` is missing too ("parent dir is absent in the file list"), but listing `a` deletes
/// the whole directory (with `--force`). Entries inside another missing entry go.
pub(crate) fn incremental_entries(
    root: &Path,
    paths: &BTreeMap<PathBytes, Touch>,
) -> BTreeMap<PathBytes, Touch> {
    let mut out: BTreeMap<PathBytes, Touch> = BTreeMap::new();
    let mut gone: BTreeSet<Vec<u8>> = BTreeSet::new();
    for p in paths.keys() {
        if !p.is_root() && missing(root, p) {
            let top = topmost_missing(root, p);
            let since_us = paths.get(p).map_or(0, |t| t.since_us);
            let parent = top.ancestors().next().map(|a| PathBytes::new(a.to_vec()));
            if let Some(file) = parent.filter(|a| !a.under(root).is_dir()) {
                // A directory became a file (or a link) here. Sending that replaces the
                // directory and all in it on the target (`--force`); its old entries
                // named alone would fail with "Not a directory" (rsync's 23), forever.
                out.entry(file).or_insert(Touch {
                    deleted: false,
                    since_us,
                });
                continue;
            }
            gone.insert(top.as_bytes().to_vec());
            out.insert(
                top,
                Touch {
                    deleted: true,
                    since_us,
                },
            );
        } else {
            out.entry(p.clone()).or_default();
        }
    }
    // One lookup per ancestor, not one comparison per missing path: a mass delete in
    // a directory that stays lists tens of thousands of entries.
    out.retain(|p, _| !p.ancestors().any(|a| gone.contains(a)));
    out
}

/// The `--files-from=- --from0` input: `./path\0` per entry. The `./` is required:
/// rsync silently skips entries starting with `#` or `;` as comments, even with
/// `--from0`.
pub(crate) fn files_from<'a>(paths: impl IntoIterator<Item = &'a PathBytes>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in paths {
        out.extend_from_slice(b"./");
        out.extend_from_slice(p.as_bytes());
        out.push(0);
    }
    out
}

/// The missing subtrees of a resync replaced by their topmost missing ancestor, so
/// that the parent of every subtree exists on the source and `--delete` removes it.
pub(crate) fn resync_subtrees<'a>(
    root: &Path,
    subtrees: impl IntoIterator<Item = &'a PathBytes>,
) -> Vec<PathBytes> {
    let mut out: Vec<PathBytes> = Vec::new();
    for s in subtrees {
        let s = if !s.is_root() && missing(root, s) {
            topmost_missing(root, s)
        } else {
            s.clone()
        };
        if !out.iter().any(|o| s.is_within(o)) {
            out.retain(|o| !o.is_within(&s));
            out.push(s);
        }
    }
    out.sort();
    out
}

/// The paths a regex of `rules` excludes inside `dirs`, as the tree is now (rsync has
/// no regexes, so they are handed over as literal paths).
pub(crate) fn regex_excluded(
    rules: &Rules,
    root: &Path,
    dirs: &[PathBytes],
) -> BTreeSet<PathBytes> {
    let mut out = BTreeSet::new();
    if rules.has_regexes() {
        for d in dirs {
            for rel in rules.excluded_below(root, d) {
                out.insert(d.join(rel.as_bytes()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(deleted: bool) -> Touch {
        Touch {
            deleted,
            since_us: 0,
        }
    }

    #[test]
    fn missing_paths_collapse_to_their_topmost_missing_ancestor() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("keep/sub")).unwrap();
        std::fs::write(d.path().join("keep/f"), b"").unwrap();
        std::fs::create_dir_all(d.path().join("here")).unwrap();
        std::os::unix::fs::symlink("nowhere", d.path().join("dangling")).unwrap();
        let mut paths = BTreeMap::new();
        paths.insert("gone/a/b".into(), t(true));
        paths.insert("gone/a".into(), t(false));
        paths.insert("gone/c".into(), t(false));
        paths.insert("keep/sub/x/y".into(), t(true));
        paths.insert("keep/f".into(), t(false));
        paths.insert("keep/f/below-a-file".into(), t(true));
        paths.insert("here".into(), t(false));
        paths.insert("dangling".into(), t(false));
        let got: Vec<(String, bool)> = incremental_entries(d.path(), &paths)
            .into_iter()
            .map(|(p, t)| (p.to_string(), t.deleted))
            .collect();
        assert_eq!(
            got,
            vec![
                ("dangling".into(), false),
                ("gone".into(), true),
                ("here".into(), false),
                // A directory that became a file: the file is sent, which replaces it.
                ("keep/f".into(), false),
                ("keep/sub/x".into(), true),
            ]
        );
        let list = files_from(incremental_entries(d.path(), &paths).keys());
        assert!(list.starts_with(b"./dangling\0./gone\0./here\0"));
    }

    #[test]
    fn missing_resync_subtrees_collapse_too() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        let s = [
            PathBytes::from("a/x/y"),
            PathBytes::from("a/x/z"),
            PathBytes::from("a"),
        ];
        assert_eq!(resync_subtrees(d.path(), &s[..2]), vec!["a/x".into()]);
        assert_eq!(resync_subtrees(d.path(), &s), vec!["a".into()]);
    }

    #[test]
    fn regex_excludes_become_anchored_literals_below_recursive_dirs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("new/.svn/x")).unwrap();
        std::fs::create_dir_all(d.path().join("old/.svn")).unwrap();
        let rules = Rules::new(&[r"(.*/)?\.svn".into()], &[], false).unwrap();
        let found = regex_excluded(&rules, d.path(), &["new".into()]);
        assert_eq!(rsync::exclude_rules(&rules, &found), b"- /new/.svn\0");
    }
}
