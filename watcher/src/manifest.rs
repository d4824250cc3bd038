//! At a clean stop, each two-way root's manifest (see [`protocol::manifest`]): every
//! path under it, `.syncbus/` aside, written into the runtime dir for `syncbus run` to
//! keep beside its checkpoint.
//!
//! The walk comes after the kernel queue was drained: a path created between the stop
//! time and the walk is listed though its creation was not read (its delete while
//! stopped then goes to a peer that may not have it: nothing happens), one deleted in
//! between is not listed (it comes back from the peer). Neither loses a file.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use protocol::config::{Config, TWO_WAY_DIR};
use protocol::manifest;
use protocol::PathBytes;

/// Writes the manifest of every two-way root that exists. False when one could not be
/// written (the next start then brings what is missing here back from the peer).
pub(crate) fn write_all(config: &Config) -> bool {
    let mut ok = true;
    for root in config.roots.iter().filter(|r| r.two_way) {
        let dest = config.runtime_dir.join(manifest::file_name(&root.name));
        let written = walk(&root.path).and_then(|entries| {
            let bytes = manifest::encode(entries.iter().map(|(p, d)| (p, *d)));
            write_new(&dest, &bytes)
        });
        match written {
            Ok(()) => {
                tracing::debug!(root = %root.name, path = %dest.display(), "manifest written")
            }
            Err(e) => {
                ok = false;
                let _ = std::fs::remove_file(&dest);
                tracing::warn!(root = %root.name, error = %e, "cannot write the two-way manifest; the next start brings what is missing here back from the peer instead of deleting it there");
            }
        }
    }
    ok
}

/// Every entry under `root` (never through a symlink), with whether it is a directory.
fn walk(root: &Path) -> std::io::Result<Vec<(PathBytes, bool)>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBytes::root()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(dir.under(root)) {
            Ok(e) => e,
            Err(e) if !dir.is_root() && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if dir.is_root() && name.as_bytes() == TWO_WAY_DIR.as_bytes() {
                continue;
            }
            let path = dir.join(name.as_bytes());
            // DirEntry::file_type does not follow symlinks.
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir {
                stack.push(path.clone());
            }
            out.push((path, is_dir));
        }
    }
    Ok(out)
}

/// Writes `bytes` to `dest` whole (a new temp file, synced, renamed over it).
fn write_new(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = PathBuf::from(dest);
    tmp.set_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let r = f
        .write_all(bytes)
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, dest));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_lists_everything_but_syncbus_own_dir() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join(".syncbus/backup")).unwrap();
        std::fs::write(r.join(".syncbus/backup/old"), "x").unwrap();
        std::fs::create_dir_all(r.join("d/e")).unwrap();
        std::fs::write(r.join("d/e/f"), "x").unwrap();
        std::os::unix::fs::symlink("d", r.join("link")).unwrap();
        let mut got: Vec<(String, bool)> = walk(r)
            .unwrap()
            .into_iter()
            .map(|(p, d)| (p.to_string(), d))
            .collect();
        got.sort();
        let want = [
            ("d", true),
            ("d/e", true),
            ("d/e/f", false),
            ("link", false),
        ];
        let want: Vec<(String, bool)> = want.iter().map(|(p, d)| (p.to_string(), *d)).collect();
        assert_eq!(got, want);
    }
}
