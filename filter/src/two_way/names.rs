//! Names in a two-way root: where a path lies in syncbus's own dir, the names of the
//! backup's versions and of conflict copies. Pure.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use protocol::config::TWO_WAY_DIR;
use protocol::PathBytes;

/// Where `path` lies below a two-way root's own dir: `Some("")` for the dir itself.
pub(crate) fn own_dir_part(path: &PathBytes) -> Option<&[u8]> {
    let rest = path.as_bytes().strip_prefix(TWO_WAY_DIR.as_bytes())?;
    match rest {
        [] => Some(rest),
        [b'/', tail @ ..] => Some(tail),
        _ => None,
    }
}

/// The part of `own` (a path below [`TWO_WAY_DIR`]) below `dir`, one of its
/// subdirectories; `None` for `dir` itself and anything outside it.
pub(crate) fn below<'a>(own: &'a [u8], dir: &str) -> Option<&'a [u8]> {
    let dir = &dir.as_bytes()[TWO_WAY_DIR.len() + 1..];
    match own.strip_prefix(dir)? {
        [b'/', rest @ ..] if !rest.is_empty() => Some(rest),
        _ => None,
    }
}

/// `DIR/NAME.conflict-<UTC time>` for `DIR/NAME` (bytes kept as they are).
pub(crate) fn conflict_name(file: &Path, at: SystemTime) -> PathBuf {
    let stamp = chrono::DateTime::<chrono::Utc>::from(at).format("%Y%m%dT%H%M%SZ");
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".conflict-{stamp}"));
    file.with_file_name(name)
}

/// `NAME~<ns since the Unix epoch>`: the name a backup copy is kept under, so the
/// peer's next replace or delete of the same path does not overwrite it.
pub(crate) fn version_name(kept: &Path, at: SystemTime) -> PathBuf {
    let ns = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut name = kept.file_name().unwrap_or_default().to_os_string();
    name.push(format!("~{ns}"));
    kept.with_file_name(name)
}

/// A name made by [`version_name`]: `~` and digits at the end.
pub(crate) fn is_version(path: &[u8]) -> bool {
    let digits = path.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && path.len() > digits && path[path.len() - digits - 1] == b'~'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_dir_parts() {
        let cases: &[(&str, Option<&str>)] = &[
            (".syncbus", Some("")),
            (".syncbus/incoming/f.Ab12", Some("incoming/f.Ab12")),
            (".syncbusx/f", None),
            ("d/.syncbus/f", None),
            ("f", None),
        ];
        for (path, want) in cases {
            let path = PathBytes::from(*path);
            assert_eq!(own_dir_part(&path), want.map(str::as_bytes), "{path}");
        }
    }

    #[test]
    fn below_a_subdirectory_of_the_own_dir() {
        let backup = protocol::config::TWO_WAY_BACKUP;
        let cases: &[(&str, Option<&str>)] = &[
            ("backup/d/f", Some("d/f")),
            ("backup", None),
            ("backup/", None),
            ("backupx/f", None),
            ("incoming/f", None),
        ];
        for (own, want) in cases {
            assert_eq!(
                below(own.as_bytes(), backup),
                want.map(str::as_bytes),
                "{own}"
            );
        }
    }

    #[test]
    fn versions_are_recognised_and_only_they() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(1_234);
        let v = version_name(Path::new("/b/d/f.txt"), at);
        assert_eq!(v, Path::new("/b/d/f.txt~1234"));
        use std::os::unix::ffi::OsStrExt;
        assert!(is_version(v.as_os_str().as_bytes()));
        for plain in ["f", "f~", "~12x", "12", "f.txt~1a"] {
            assert!(!is_version(plain.as_bytes()), "{plain}");
        }
    }

    #[test]
    fn conflict_copies_are_named_beside_the_file() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400);
        let c = conflict_name(Path::new("/r/d/f.txt"), at);
        assert_eq!(c, Path::new("/r/d/f.txt.conflict-19700102T000000Z"));
    }
}
