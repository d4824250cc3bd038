//! The catch-up: bringing a target up to date after syncbus was stopped, without a full
//! compare. Every change to an inode sets its ctime (users cannot set it), so what
//! changed since a checkpoint is what has a ctime at or after it:
//!
//! - a file (or symlink…) with a new ctime is sent as it is now;
//! - a directory with a new ctime had entries added, removed or renamed, or was itself
//!   renamed or chmod'ed: its *listing* is compared (`--delete` of its direct entries,
//!   deeper content left alone);
//! - a child directory that this listing run creates on the target, or finds different
//!   there (rsync's itemized output says so), was moved in or swapped: it is compared
//!   in full (a subtree resync), because its content kept old ctimes.
//!
//! [`scan`] walks the source (stat only), [`listing_entries`] and [`listing_rules`] make
//! the input and filter of the listing run, [`follow_ups`] reads its itemized output.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use protocol::rules::{rsync_literal_rule, Rules};
use protocol::PathBytes;

use protocol::work::Touch;

/// What changed under a root since a checkpoint.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Non-directories with a ctime at or after the checkpoint.
    pub files: BTreeMap<PathBytes, Touch>,
    /// Directories with a ctime at or after the checkpoint (the root as `""`).
    pub dirs: BTreeSet<PathBytes>,
    /// Excluded direct entries of `dirs` (kept off the target and never deleted there).
    pub excluded: BTreeSet<PathBytes>,
    /// Directories on another filesystem than their parent: a mount keeps its files'
    /// ctimes, so these are compared in full.
    pub mounts: Vec<PathBytes>,
    /// Entries looked at.
    pub seen: u64,
}

fn ctime_us(m: &std::fs::Metadata) -> u64 {
    (m.ctime().max(0) as u64) * 1_000_000 + (m.ctime_nsec().max(0) as u64) / 1000
}

/// Walks `root` and collects what changed at or after `since_us` (µs since the Unix
/// epoch). Excluded entries are not descended into.
pub(crate) fn scan(root: &Path, rules: &Rules, since_us: u64) -> std::io::Result<Scan> {
    let mut out = Scan::default();
    let top = std::fs::symlink_metadata(root)?;
    if ctime_us(&top) >= since_us {
        out.dirs.insert(PathBytes::root());
    }
    let mut stack = vec![(PathBytes::root(), top.dev())];
    while let Some((dir, dev)) = stack.pop() {
        let changed_dir = out.dirs.contains(&dir);
        let entries = match std::fs::read_dir(dir.under(root)) {
            Ok(e) => e,
            // Gone or replaced since it was listed: its parent's ctime tells.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = dir.join(entry.file_name().as_bytes());
            let Ok(meta) = entry.metadata() else { continue };
            out.seen += 1;
            let is_dir = meta.is_dir();
            if rules.excludes(&path, is_dir) {
                if changed_dir {
                    out.excluded.insert(path);
                }
                continue;
            }
            if is_dir {
                if meta.dev() != dev {
                    out.mounts.push(path);
                    continue;
                }
                if ctime_us(&meta) >= since_us {
                    out.dirs.insert(path.clone());
                }
                stack.push((path, dev));
            } else if ctime_us(&meta) >= since_us {
                out.files.insert(path, Touch::default());
            }
        }
    }
    Ok(out)
}

/// Strict ancestors of the changed directories that are not changed themselves (rsync
/// sends them as implied directories; their itemized lines are not follow-ups).
fn ancestors(dirs: &BTreeSet<PathBytes>) -> BTreeSet<PathBytes> {
    let mut out = BTreeSet::new();
    for d in dirs.iter().filter(|d| !d.is_root()) {
        out.insert(PathBytes::root());
        for a in d.ancestors() {
            let a = PathBytes::new(a.to_vec());
            if &a != d {
                out.insert(a);
            }
        }
    }
    out.retain(|a| !dirs.contains(a));
    out
}

/// The `--files-from=- --from0` input of the listing run: `./DIR/.` per changed
/// directory (`./.` for the root). With `--dirs` and no `--recursive`, rsync compares
/// exactly the direct entries of each (deleting what the target has extra, whole
/// directories included) and creates new child directories without entering them.
pub(crate) fn listing_entries(scan: &Scan) -> Vec<u8> {
    let mut out = Vec::new();
    for d in &scan.dirs {
        out.extend_from_slice(b"./");
        if !d.is_root() {
            out.extend_from_slice(d.as_bytes());
            out.push(b'/');
        }
        out.extend_from_slice(b".\0");
    }
    out
}

/// The filter of the listing run: the root's `excludes`, and each excluded entry the
/// scan met (regex excludes as literal paths): neither sent nor deleted.
pub(crate) fn listing_rules(excludes: &[u8], scan: &Scan) -> Vec<u8> {
    let mut out = excludes.to_vec();
    for p in &scan.excluded {
        out.extend_from_slice(b"- ");
        out.extend_from_slice(&rsync_literal_rule(p));
        out.push(0);
    }
    out
}

/// A two-way root's paths that its last clean stop's manifest (`manifest`, see
/// [`protocol::manifest`]) lists and that are gone now, topmost only and excluded ones
/// left out: deleted here while syncbus was stopped, so deleted on the peer too. No
/// manifest (none was kept, or the checkpoint was not used) or an unreadable one proves
/// nothing: then nothing is deleted, and the compare brings those files back.
pub(crate) fn deleted_while_stopped(
    root: &Path,
    rules: &Rules,
    manifest: &Path,
) -> BTreeMap<PathBytes, Touch> {
    let bytes = match std::fs::read(manifest) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            tracing::warn!(path = %manifest.display(), error = %e, "cannot read the two-way manifest; what is missing here comes back from the peer");
            return BTreeMap::new();
        }
    };
    let Some(listed) = protocol::manifest::decode(&bytes) else {
        tracing::warn!(path = %manifest.display(), "not a two-way manifest; what is missing here comes back from the peer");
        return BTreeMap::new();
    };
    let gone = protocol::manifest::gone(&listed, |p| {
        std::fs::symlink_metadata(p.under(root)).is_ok()
    });
    gone.into_iter()
        .filter(|(p, dir)| {
            let two_way_dir = p
                .as_bytes()
                .split(|&b| b == b'/')
                .next()
                .is_some_and(|first| first == protocol::config::TWO_WAY_DIR.as_bytes());
            !two_way_dir
                && !rules.excludes(p, *dir)
                && !p
                    .ancestors()
                    .any(|a| rules.excludes(&PathBytes::new(a.to_vec()), true))
        })
        .map(|(p, _)| {
            (
                p,
                Touch {
                    deleted: true,
                    since_us: 0,
                },
            )
        })
        .collect()
}

/// rsync's `\#ooo` escapes (octal) in its output, undone.
pub(crate) fn unescape(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    let mut i = 0;
    while i < name.len() {
        if name[i..].starts_with(b"\\#")
            && name.len() >= i + 5
            && name[i + 2..i + 5].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = name[i + 2..i + 5]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(v as u8);
            i += 5;
        } else {
            out.push(name[i]);
            i += 1;
        }
    }
    out
}

/// The child directories to compare in full, from the listing run's `%i %n` lines: a
/// directory created on the target, or one whose attributes differed there (another
/// directory was at that name), unless it is a changed directory or an ancestor itself.
pub(crate) fn follow_ups(itemized: &[u8], scan: &Scan) -> Vec<PathBytes> {
    let anc = ancestors(&scan.dirs);
    let mut out = Vec::new();
    for line in itemized.split(|&b| b == b'\n') {
        if line.len() < 13 || line[11] != b' ' {
            continue;
        }
        let (flags, name) = (&line[..11], &line[12..]);
        let dir = flags[1] == b'd' && (flags[0] == b'c' || flags[0] == b'.');
        let changed = flags[2..].iter().any(|&b| b != b'.' && b != b' ');
        if !dir || !changed {
            continue;
        }
        let name = unescape(name.strip_suffix(b"/").unwrap_or(name));
        if name.is_empty() || name == b"." {
            continue;
        }
        let p = PathBytes::new(name);
        if !scan.dirs.contains(&p) && !anc.contains(&p) {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itemized_lines_name_new_and_different_child_directories() {
        let mut scan = Scan::default();
        scan.dirs.insert("L".into());
        let out = b"cd+++++++++ L/new/\n.d..t...... L/\n.d..t...... L/swapped/\n\
                    .d          L/same/\n>f+++++++++ L/file\n*deleting   L/old/\n\
                    cd+++++++++ L/odd\\#012name/\n.d..t...... ./\n";
        let got: Vec<Vec<u8>> = follow_ups(out, &scan)
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect();
        let want: Vec<&[u8]> = vec![b"L/new", b"L/swapped", b"L/odd\nname"];
        assert_eq!(got, want);
    }

    #[test]
    fn deletes_while_stopped_are_what_the_manifest_proves_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("kept")).unwrap();
        let manifest = d.path().join("manifest-r.paths");
        let rules = Rules::new(&[], &["*.tmp".to_string()], false).unwrap();
        // No manifest proves nothing.
        assert!(deleted_while_stopped(&root, &rules, &manifest).is_empty());
        let listed: Vec<(PathBytes, bool)> = vec![
            ("kept".into(), true),
            ("gone".into(), false),
            ("gone-dir".into(), true),
            ("gone-dir/inner".into(), false),
            ("scratch.tmp".into(), false),
            (".syncbus/backup/x".into(), false),
        ];
        std::fs::write(
            &manifest,
            protocol::manifest::encode(listed.iter().map(|(p, d)| (p, *d))),
        )
        .unwrap();
        let got: Vec<String> = deleted_while_stopped(&root, &rules, &manifest)
            .into_iter()
            .map(|(p, t)| {
                assert!(t.deleted);
                p.to_string()
            })
            .collect();
        assert_eq!(got, vec!["gone", "gone-dir"]);
        std::fs::write(&manifest, b"garbage\0gone\0").unwrap();
        assert!(deleted_while_stopped(&root, &rules, &manifest).is_empty());
    }

    #[test]
    fn ancestors_exclude_the_changed_directories() {
        let dirs: BTreeSet<PathBytes> = ["a/b/c".into(), "a".into()].into();
        let anc = ancestors(&dirs);
        let got: Vec<&[u8]> = anc.iter().map(|p| p.as_bytes()).collect();
        assert_eq!(got, vec![&b""[..], b"a/b"]);
    }
}
