//! Which directory each inotify watch stands for, kept right across renames.
//!
//! Pure bookkeeping, no system calls: the caller adds and removes the kernel watches and
//! tells this map what happened. Watch descriptors are plain `i32`s (the kernel's ids).

use std::collections::{BTreeMap, HashMap};

use protocol::PathBytes;

/// Index of a root in `Config::roots`.
pub(crate) type RootIx = usize;

/// wd → (root, path) and (root, path) → wd, the second ordered so that a subtree is one
/// range.
///
/// # Invariants
/// - Every reverse entry `(root, path) → wd` has the forward entry `wd → (root, path)`.
/// - A forward entry may lack its reverse entry when another watch took its path (a
///   directory replaced by a rename); it leaves with its `IN_IGNORED`.
#[derive(Debug, Default, Clone)]
pub(crate) struct WatchMap {
    by_wd: HashMap<i32, (RootIx, PathBytes)>,
    by_path: BTreeMap<(RootIx, PathBytes), i32>,
}

impl WatchMap {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records that `wd` watches `path` of `root`. `inotify_add_watch` returns the same wd
    /// for an inode it already watches, so an existing entry for `wd` is always
    /// overwritten: the new path is the current one.
    pub(crate) fn insert(&mut self, wd: i32, root: RootIx, path: PathBytes) {
        if let Some(old) = self.by_wd.get(&wd) {
            if self.by_path.get(old) == Some(&wd) {
                let old = old.clone();
                self.by_path.remove(&old);
            }
        }
        self.by_path.insert((root, path.clone()), wd);
        self.by_wd.insert(wd, (root, path));
    }

    /// The directory `wd` stands for.
    pub(crate) fn get(&self, wd: i32) -> Option<(RootIx, &PathBytes)> {
        self.by_wd.get(&wd).map(|(r, p)| (*r, p))
    }

    /// The watch on `path` of `root`.
    pub(crate) fn wd(&self, root: RootIx, path: &PathBytes) -> Option<i32> {
        self.by_path.get(&(root, path.clone())).copied()
    }

    /// The keys of `path` and everything below it, in order.
    fn subtree(&self, root: RootIx, path: &PathBytes) -> Vec<(RootIx, PathBytes)> {
        if path.is_root() {
            return self
                .by_path
                .range((root, PathBytes::root())..)
                .take_while(|((r, _), _)| *r == root)
                .map(|(k, _)| k.clone())
                .collect();
        }
        let mut keys = Vec::new();
        let exact = (root, path.clone());
        if self.by_path.contains_key(&exact) {
            keys.push(exact);
        }
        // Everything strictly below `p` sorts in [`p/`, `p0`): `0` is the byte after `/`.
        let mut lo = path.as_bytes().to_vec();
        lo.push(b'/');
        let mut hi = path.as_bytes().to_vec();
        hi.push(b'/' + 1);
        keys.extend(
            self.by_path
                .range((root, PathBytes::new(lo))..(root, PathBytes::new(hi)))
                .map(|(k, _)| k.clone()),
        );
        keys
    }

    /// Forgets the watches on `path` and below (both directions) and returns their wds,
    /// for a directory that left the tree or a root that is gone.
    pub(crate) fn remove_subtree(&mut self, root: RootIx, path: &PathBytes) -> Vec<i32> {
        let mut wds = Vec::new();
        for key in self.subtree(root, path) {
            if let Some(wd) = self.by_path.remove(&key) {
                if self.by_wd.get(&wd) == Some(&key) {
                    self.by_wd.remove(&wd);
                }
                wds.push(wd);
            }
        }
        wds
    }

    /// A directory moved from `from` to `to` inside `root`: every watch on `from` or below
    /// now stands for the same place under `to`. Watches that were on `to` or below (an
    /// empty directory the rename replaced) are forgotten and returned as `displaced`.
    pub(crate) fn rename(&mut self, root: RootIx, from: &PathBytes, to: &PathBytes) -> Renamed {
        if from == to {
            return Renamed::default();
        }
        let displaced = self.remove_subtree(root, to);
        let mut moved = 0;
        for key in self.subtree(root, from) {
            if let Some(wd) = self.by_path.remove(&key) {
                let new = key.1.rebase(from, to);
                self.by_path.insert((root, new.clone()), wd);
                self.by_wd.insert(wd, (root, new));
                moved += 1;
            }
        }
        Renamed { moved, displaced }
    }

    /// The kernel dropped `wd` (`IN_IGNORED`). Its path is forgotten only if it still
    /// points at `wd`: another watch may have taken it meanwhile.
    pub(crate) fn remove_wd(&mut self, wd: i32) -> Option<(RootIx, PathBytes)> {
        let key = self.by_wd.remove(&wd)?;
        if self.by_path.get(&key) == Some(&wd) {
            self.by_path.remove(&key);
        }
        Some(key)
    }

    /// Every wd in the map.
    pub(crate) fn wds(&self) -> impl Iterator<Item = i32> + '_ {
        self.by_wd.keys().copied()
    }

    pub(crate) fn contains_wd(&self, wd: i32) -> bool {
        self.by_wd.contains_key(&wd)
    }

    /// Number of watched directories of `root` (a walk of its range, no copies).
    pub(crate) fn count(&self, root: RootIx) -> usize {
        self.by_path
            .range((root, PathBytes::root())..)
            .take_while(|((r, _), _)| *r == root)
            .count()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_wd.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.by_wd.is_empty()
    }
}

/// What [`WatchMap::rename`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Renamed {
    /// Watches whose path was rewritten.
    pub moved: usize,
    /// Watches that sat on the destination and were forgotten.
    pub displaced: Vec<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBytes {
        PathBytes::from(s)
    }

    fn map(entries: &[(i32, RootIx, &str)]) -> WatchMap {
        let mut m = WatchMap::new();
        for &(wd, r, path) in entries {
            m.insert(wd, r, p(path));
        }
        m
    }

    fn path_of(m: &WatchMap, wd: i32) -> Option<(RootIx, String)> {
        m.get(wd)
            .map(|(r, p)| (r, String::from_utf8_lossy(p.as_bytes()).into_owned()))
    }

    fn consistent(m: &WatchMap) {
        for (key, wd) in &m.by_path {
            assert_eq!(
                m.by_wd.get(wd),
                Some(key),
                "reverse entry {key:?} without forward"
            );
        }
    }

    #[test]
    fn rename_rewrites_the_subtree_and_respects_component_boundaries() {
        let mut m = map(&[
            (1, 0, ""),
            (2, 0, "a"),
            (3, 0, "a/b"),
            (4, 0, "a/b/c"),
            (5, 0, "a!"),
            (6, 0, "ab"),
            (7, 0, "a0"),
            (8, 1, "a/b"),
        ]);
        let r = m.rename(0, &p("a"), &p("x/y"));
        assert_eq!(r.moved, 3);
        assert!(r.displaced.is_empty());
        assert_eq!(path_of(&m, 2), Some((0, "x/y".into())));
        assert_eq!(path_of(&m, 3), Some((0, "x/y/b".into())));
        assert_eq!(path_of(&m, 4), Some((0, "x/y/b/c".into())));
        assert_eq!(path_of(&m, 5), Some((0, "a!".into())));
        assert_eq!(path_of(&m, 6), Some((0, "ab".into())));
        assert_eq!(path_of(&m, 7), Some((0, "a0".into())));
        assert_eq!(
            path_of(&m, 8),
            Some((1, "a/b".into())),
            "other root untouched"
        );
        assert_eq!(m.wd(0, &p("x/y/b")), Some(3));
        assert_eq!(m.wd(0, &p("a/b")), None);
        consistent(&m);
    }

    #[test]
    fn rename_onto_an_existing_directory_displaces_its_watches() {
        let mut m = map(&[(1, 0, "a"), (2, 0, "a/s"), (3, 0, "b"), (4, 0, "b/t")]);
        let r = m.rename(0, &p("a"), &p("b"));
        assert_eq!(r.moved, 2);
        let mut d = r.displaced;
        d.sort();
        assert_eq!(d, vec![3, 4]);
        assert_eq!(m.wd(0, &p("b")), Some(1));
        assert_eq!(m.wd(0, &p("b/s")), Some(2));
        assert_eq!(m.wd(0, &p("b/t")), None);
        assert!(!m.contains_wd(3));
        consistent(&m);
    }

    #[test]
    fn same_wd_added_again_takes_the_new_path() {
        // `mkdir a; mv b a/b`: the walk of `a` finds `a/b` and gets b's wd back.
        let mut m = map(&[(1, 0, ""), (2, 0, "b"), (3, 0, "b/c")]);
        m.insert(4, 0, p("a"));
        m.insert(2, 0, p("a/b"));
        m.insert(3, 0, p("a/b/c"));
        assert_eq!(path_of(&m, 2), Some((0, "a/b".into())));
        assert_eq!(m.wd(0, &p("b")), None);
        assert_eq!(m.wd(0, &p("b/c")), None);
        // The late unpaired MOVED_FROM of `b` then finds nothing left to remove.
        assert!(m.remove_subtree(0, &p("b")).is_empty());
        assert_eq!(m.len(), 4);
        consistent(&m);
    }

    #[test]
    fn ignored_keeps_a_path_that_another_watch_took() {
        // `b` replaced by a new directory: the new watch owns the path, then the old
        // watch's IN_IGNORED arrives.
        let mut m = map(&[(2, 0, "b")]);
        m.insert(5, 0, p("b"));
        assert_eq!(m.remove_wd(2), Some((0, p("b"))));
        assert_eq!(m.wd(0, &p("b")), Some(5));
        assert_eq!(m.remove_wd(5), Some((0, p("b"))));
        assert_eq!(m.wd(0, &p("b")), None);
        assert_eq!(m.remove_wd(5), None);
        assert!(m.is_empty());
    }

    #[test]
    fn remove_subtree_of_the_root_takes_only_that_root() {
        let mut m = map(&[(1, 0, ""), (2, 0, "a"), (3, 1, ""), (4, 1, "a"), (5, 2, "")]);
        let mut wds = m.remove_subtree(1, &PathBytes::root());
        wds.sort();
        assert_eq!(wds, vec![3, 4]);
        assert_eq!(m.count(0), 2);
        assert_eq!(m.count(1), 0);
        assert_eq!(m.count(2), 1);
        consistent(&m);
    }

    #[test]
    fn non_utf8_and_newline_names_are_plain_bytes() {
        let odd = PathBytes::new(b"d\xff\nx".to_vec());
        let mut m = WatchMap::new();
        m.insert(1, 0, odd.clone());
        m.insert(2, 0, odd.join(b"sub\xfe"));
        let to = PathBytes::new(b"e\n".to_vec());
        assert_eq!(m.rename(0, &odd, &to).moved, 2);
        assert_eq!(m.get(2).unwrap().1.as_bytes(), b"e\n/sub\xfe");
    }
}
