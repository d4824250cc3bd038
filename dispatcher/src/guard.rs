//! The root guard: an empty root, or one that is no longer on the file system it was
//! on, never wipes a full target by a whole-root compare.
//!
//! A disk that failed to mount under a root leaves an empty directory (or whatever lay
//! under the mount point) where the tree was; a compare of it with `--delete` would
//! empty every target. So before each whole-root compare (start compare, catch-up,
//! cron full sync, a compare the retrier orders) of an rsync target that compares with
//! deletes (not two-way, whose compares delete nothing), the full lane asks [`decide`]:
//!
//! - **another file system** than at the last successful compare of this root to this
//!   target ([`Mount`], read from `/proc/self/mountinfo` and kept in
//!   `<state_dir>/roots/<root>@<target>.mount`): the compare is refused whole, nothing
//!   is sent (what lies under a mount point may be stale files that would overwrite
//!   newer ones);
//! - **an empty root** (no entry the root's rules let through), or a refusal of that
//!   kind remembered from an earlier compare while no successful compare has proven
//!   the file system since: the compare runs without deletes. A dry run first tells
//!   whether it would delete anything; if so it is refused (status CRITICAL), and the
//!   real run gets `--max-delete=0` either way, so files are still sent.
//!
//! `allow_wipe` (the root's or the target's, or `syncbus run --allow-wipe`) lifts both.
//! A refusal does not make the target failing: live changes keep flowing beside it.
//!
//! # Invariants
//! - The record of a root's file system is written only after a compare that ran with
//!   deletes succeeded from a root that was not empty: an empty root proves nothing
//!   about which file system is the right one.
//! - A refusal is remembered in the same file until a compare succeeds without one, so
//!   a restart (or a catch-up, which would not look at old files) cannot forget it: a
//!   remembered refusal makes the next compare a full one.
//!
//! # Known problems
//! - The file system is told by its mount point, type, source and root within it: a
//!   block device renamed across boots (`/dev/sdb1` → `/dev/sdc1`) is refused once
//!   (safe, but needs `allow_wipe` or the record removed).
//! - A root whose record was never written (first run) cannot be told from an
//!   unmounted one unless it is empty.
//! - A mount *below* the root that failed is not guarded (its subtree compare deletes).

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use protocol::rules::Rules;
use protocol::PathBytes;

/// The file system a root is on: the mount that holds it, as mountinfo(5) tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
    /// The directory of that file system mounted there (`/` unless a bind mount).
    pub fs_root: String,
}

impl std::fmt::Display for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} `{}` at `{}`",
            self.fs_type, self.source, self.mount_point
        )?;
        if self.fs_root != "/" {
            write!(f, " (its `{}`)", self.fs_root)?;
        }
        Ok(())
    }
}

/// What was known of a root at its last successful compare to a target, and a
/// refusal still standing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Record {
    /// The root's path then (a record of another path is not this root's).
    pub path: String,
    pub mount: Option<Mount>,
    /// The reason of a refusal not yet cleared by a successful compare.
    pub refused: Option<String>,
}

/// What to do with a whole-root compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Compare as usual (with deletes).
    Plain,
    /// Compare without deleting; refused (the reason) if it would delete anything.
    NoDeletes(String),
    /// Do not compare at all.
    Refuse(String),
}

/// How the root looks now.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub path: String,
    pub mount: Option<Mount>,
    pub empty: bool,
}

/// The guard's decision for one compare of `root` to `target` (pure).
pub(crate) fn decide(
    root: &str,
    target: &str,
    allow_wipe: bool,
    record: Option<&Record>,
    now: &Seen,
) -> Verdict {
    if allow_wipe {
        return Verdict::Plain;
    }
    let record = record.filter(|r| r.path == now.path);
    let how = "an unmounted disk looks like this; set `allow_wipe = true` on the root or target, or run `syncbus run --allow-wipe`, to let it";
    if let (Some(was), Some(is)) = (record.and_then(|r| r.mount.as_ref()), &now.mount) {
        if was != is {
            return Verdict::Refuse(format!(
                "root `{root}` (`{}`) is on another file system than at its last compare to target `{target}` (now {is}, then {was}): not comparing ({how})",
                now.path
            ));
        }
    }
    if now.empty {
        return Verdict::NoDeletes(format!(
            "root `{root}` (`{}`) is empty and target `{target}` holds files: not deleting them ({how})",
            now.path
        ));
    }
    match record {
        // A refusal of an earlier run stands until a compare proves the file system:
        // with a file system on record that matches (checked above), it is proven.
        Some(r) if r.refused.is_some() && r.mount.is_none() => Verdict::NoDeletes(format!(
            "root `{root}` (`{}`) was empty at an earlier compare and target `{target}` holds files it lacks: not deleting them ({how})",
            now.path
        )),
        _ => Verdict::Plain,
    }
}

/// True when `dir` holds no entry the rules let through (what rsync would send).
pub(crate) fn is_empty(dir: &Path, rules: &Rules) -> std::io::Result<bool> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let rel = PathBytes::new(entry.file_name().as_bytes().to_vec());
        if !rules.excludes(&rel, is_dir) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The mount holding `path` (`None` when mountinfo cannot be read, e.g. no /proc).
pub(crate) fn mount_of(path: &Path) -> Option<Mount> {
    let canon = std::fs::canonicalize(path).ok()?;
    let dev = std::fs::metadata(&canon).ok()?.dev();
    let text = std::fs::read("/proc/self/mountinfo").ok()?;
    mount_in(&String::from_utf8_lossy(&text), &canon, dev)
}

/// The mount holding `path` (canonical, on device `dev`) among mountinfo(5) lines: the
/// longest mount point above it on that device; of several stacked, the last (the top).
pub(crate) fn mount_in(mountinfo: &str, path: &Path, dev: u64) -> Option<Mount> {
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let mut best: Option<(usize, Mount)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 6 || fields.len() < dash + 3 || fields[2] != want {
            continue;
        }
        let point = unescape(fields[4]);
        if !path.starts_with(&point) {
            continue;
        }
        let len = Path::new(&point).components().count();
        if best.as_ref().is_some_and(|(l, _)| *l > len) {
            continue;
        }
        best = Some((
            len,
            Mount {
                mount_point: point,
                fs_type: unescape(fields[dash + 1]),
                source: unescape(fields[dash + 2]),
                fs_root: unescape(fields[3]),
            },
        ));
    }
    best.map(|(_, m)| m)
}

/// mountinfo's `\ooo` escapes (space, tab, newline, backslash) undone.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the records of one target's roots live: `<state_dir>/roots/<root>@<target>.mount`.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    dir: PathBuf,
    target: String,
}

impl Store {
    pub(crate) fn new(state_dir: &Path, target: &str) -> Self {
        Store {
            dir: state_dir.join("roots"),
            target: target.to_string(),
        }
    }

    /// The record file of `root` (names hold no `@` or `/`: see the config's names).
    pub(crate) fn file(&self, root: &str) -> PathBuf {
        self.dir.join(format!("{root}@{}.mount", self.target))
    }

    /// The record of `root`; `None` when there is none (or it cannot be read, which
    /// is logged: a guard that cannot read its record checks emptiness only).
    pub(crate) fn load(&self, root: &str) -> Option<Record> {
        let file = self.file(root);
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "cannot read the root guard's record");
                return None;
            }
        };
        let table: toml::Table = match toml::from_str(&text) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "the root guard's record is unreadable; ignored");
                return None;
            }
        };
        let s = |k: &str| table.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let mount = match (s("mount_point"), s("fs_type"), s("source"), s("fs_root")) {
            (Some(mount_point), Some(fs_type), Some(source), Some(fs_root)) => Some(Mount {
                mount_point,
                fs_type,
                source,
                fs_root,
            }),
            _ => None,
        };
        Some(Record {
            path: s("path").unwrap_or_default(),
            mount,
            refused: s("refused"),
        })
    }

    /// Writes the record of `root` whole (a new file renamed over the old one).
    pub(crate) fn save(&self, root: &str, record: &Record) -> std::io::Result<()> {
        let mut t = toml::Table::new();
        t.insert("path".into(), record.path.clone().into());
        if let Some(m) = &record.mount {
            t.insert("mount_point".into(), m.mount_point.clone().into());
            t.insert("fs_type".into(), m.fs_type.clone().into());
            t.insert("source".into(), m.source.clone().into());
            t.insert("fs_root".into(), m.fs_root.clone().into());
        }
        if let Some(r) = &record.refused {
            t.insert("refused".into(), r.clone().into());
        }
        let text = format!(
            "# syncbus root guard: the file system root `{root}` was on at its last successful\n\
             # compare to target `{}`, and a refusal still standing. Removing this file makes\n\
             # the next compare trust the file system the root is on then.\n{}",
            self.target,
            toml::to_string(&t).map_err(std::io::Error::other)?
        );
        match std::fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let file = self.file(root);
        let tmp = self.dir.join(format!(
            ".{root}@{}.{}.{:x}",
            self.target,
            std::process::id(),
            rand::random::<u32>()
        ));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &file)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(point: &str, source: &str) -> Mount {
        Mount {
            mount_point: point.into(),
            fs_type: "ext4".into(),
            source: source.into(),
            fs_root: "/".into(),
        }
    }

    fn seen(mount: Option<Mount>, empty: bool) -> Seen {
        Seen {
            path: "/srv/www".into(),
            mount,
            empty,
        }
    }

    fn record(mount: Option<Mount>, refused: Option<&str>) -> Record {
        Record {
            path: "/srv/www".into(),
            mount,
            refused: refused.map(str::to_string),
        }
    }

    #[test]
    fn an_empty_root_or_another_file_system_is_refused_unless_allowed() {
        let disk = Some(mount("/srv", "/dev/sdb1"));
        let parent = Some(mount("/", "/dev/sda1"));
        let v = |allow, rec: Option<Record>, now| decide("www", "t", allow, rec.as_ref(), &now);
        // First run: nothing on record; only emptiness can tell.
        assert_eq!(v(false, None, seen(disk.clone(), false)), Verdict::Plain);
        assert!(
            matches!(v(false, None, seen(disk.clone(), true)), Verdict::NoDeletes(r) if r.contains("is empty"))
        );
        // The disk did not mount: the root is on the parent's file system.
        let rec = record(disk.clone(), None);
        match v(false, Some(rec.clone()), seen(parent.clone(), false)) {
            Verdict::Refuse(r) => {
                assert!(r.contains("another file system"), "{r}");
                assert!(
                    r.contains("`/dev/sdb1`") && r.contains("`/dev/sda1`"),
                    "{r}"
                );
                assert!(r.contains("allow_wipe"), "{r}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            v(false, Some(rec.clone()), seen(parent.clone(), true)),
            Verdict::Refuse(_)
        ));
        assert_eq!(
            v(true, Some(rec.clone()), seen(parent.clone(), true)),
            Verdict::Plain
        );
        // The same file system, full: as usual; empty: no deletes.
        assert_eq!(
            v(false, Some(rec.clone()), seen(disk.clone(), false)),
            Verdict::Plain
        );
        assert!(matches!(
            v(false, Some(rec), seen(disk.clone(), true)),
            Verdict::NoDeletes(_)
        ));
        // A record of another path is another root's.
        let mut other = record(parent.clone(), None);
        other.path = "/elsewhere".into();
        assert_eq!(
            v(false, Some(other), seen(disk.clone(), false)),
            Verdict::Plain
        );
        // A refusal from an empty root stands while no file system was ever proven…
        let standing = record(None, Some("was empty"));
        assert!(
            matches!(v(false, Some(standing.clone()), seen(disk.clone(), false)), Verdict::NoDeletes(r) if r.contains("earlier compare"))
        );
        assert_eq!(
            v(true, Some(standing), seen(disk.clone(), false)),
            Verdict::Plain
        );
        // …and falls once the root is back on the file system on record.
        let proven = record(disk.clone(), Some("was empty"));
        assert_eq!(v(false, Some(proven), seen(disk, false)), Verdict::Plain);
    }

    #[test]
    fn the_mount_is_the_longest_mount_point_above_the_path_on_its_device() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 8:17 / /srv rw,relatime shared:2 - ext4 /dev/sdb1 rw
31 30 8:17 /www /srv/my\\040site rw - ext4 /dev/sdb1 rw
40 22 0:50 / /srv/www rw - tmpfs tmpfs rw
";
        let dev = |ma, mi| libc::makedev(ma, mi);
        let m = mount_in(info, Path::new("/srv/www/x"), dev(0, 50)).unwrap();
        assert_eq!(
            (m.fs_type.as_str(), m.mount_point.as_str()),
            ("tmpfs", "/srv/www")
        );
        // Unmounted: the same path now lies on /srv's file system.
        let m = mount_in(info, Path::new("/srv/www"), dev(8, 17)).unwrap();
        assert_eq!(m, mount("/srv", "/dev/sdb1"));
        // Escapes undone; a bind mount names its own root.
        let m = mount_in(info, Path::new("/srv/my site/a"), dev(8, 17)).unwrap();
        assert_eq!(
            (m.mount_point.as_str(), m.fs_root.as_str()),
            ("/srv/my site", "/www")
        );
        // `/srvx` is not below `/srv`.
        let m = mount_in(info, Path::new("/srvx"), dev(8, 1)).unwrap();
        assert_eq!(m.mount_point, "/");
    }

    #[test]
    fn records_survive_a_round_trip_and_emptiness_follows_the_rules() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path(), "t");
        assert_eq!(store.load("www"), None);
        let rec = record(Some(mount("/srv/a b", "/dev/sdb1")), Some("why \"quoted\""));
        store.save("www", &rec).unwrap();
        assert_eq!(store.load("www"), Some(rec));
        assert!(store.file("www").ends_with("roots/www@t.mount"));

        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let rules = Rules::new(&[], &["*.tmp".to_string()], true).unwrap();
        assert!(is_empty(&root, &rules).unwrap());
        std::fs::write(root.join("x.tmp"), "").unwrap();
        assert!(is_empty(&root, &rules).unwrap(), "only excluded entries");
        std::fs::create_dir(root.join("d")).unwrap();
        assert!(!is_empty(&root, &rules).unwrap());
    }
}
