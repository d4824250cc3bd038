//! The fail log: the journal as a shell script of rsync commands, in the spirit of
//! sersync's `rsync_fail_log.sh`, for an operator who wants to push the backlog by hand.
//! Every word is single-quoted (file names are bytes and may hold anything), and the
//! file is written mode 0700, never world-writable.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use protocol::config::Config;
use protocol::PathBytes;

use crate::journal::Record;

/// `'word'` for sh: inside single quotes every byte is literal except `'` itself.
pub(crate) fn quote(word: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(word.len() + 2);
    out.push(b'\'');
    for &b in word {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

fn words(out: &mut Vec<u8>, args: &[OsString]) {
    for a in args {
        out.push(b' ');
        out.extend_from_slice(&quote(a.as_bytes()));
    }
}

/// A comment line: newlines in an error message must not end the comment.
fn comment(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(b"# ");
    out.extend(text.bytes().map(|b| if b == b'\n' { b' ' } else { b }));
    out.push(b'\n');
}

/// The script for `jobs` (id, record), as text to write.
pub(crate) fn render(config: &Config, jobs: &[(u64, Record)]) -> Vec<u8> {
    let mut out = b"#!/bin/sh\n".to_vec();
    comment(
        &mut out,
        "syncbus fail log: the work its journal still owes each target, as rsync commands.",
    );
    comment(
        &mut out,
        "Rewritten by the retrier whenever the journal changes; the retrier keeps retrying on its own.",
    );
    comment(&mut out, &format!("{} job(s) pending.", jobs.len()));
    for (id, r) in jobs {
        out.push(b'\n');
        comment(
            &mut out,
            &format!(
                "job {id}: target {}, root {}, attempt {}, last error: {}",
                r.target, r.root, r.attempt, r.error
            ),
        );
        let (Some(target), Some(root)) = (config.target(&r.target), config.root(&r.root)) else {
            comment(&mut out, "target or root no longer in the config: skipped");
            continue;
        };
        if matches!(
            target.endpoint,
            protocol::config::Endpoint::Command { .. }
                | protocol::config::Endpoint::Http { .. }
                | protocol::config::Endpoint::Tcp { .. }
        ) {
            comment(
                &mut out,
                "command, webhook or tcp target: no rsync command (the retrier runs it again)",
            );
            continue;
        }
        // No shared connection: the script runs on its own, maybe with syncbus stopped.
        let Ok(common) = rsync::common_args(target, None) else {
            comment(&mut out, "target options cannot be expressed: skipped");
            continue;
        };
        let dest = target.destination(&r.root);
        let mut excludes: Vec<OsString> = Vec::new();
        let rules = rsync::exclude_rules(&root.rules, &Default::default());
        for rule in rules.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            let mut f = OsString::from("--filter=");
            f.push(std::ffi::OsStr::from_bytes(rule));
            excludes.push(f);
        }
        excludes.extend(
            r.work
                .excludes
                .iter()
                .map(|g| format!("--exclude={g}").into()),
        );
        // The script cannot do a catch-up: it compares the whole root instead.
        let whole = [PathBytes::root()].into();
        let resyncs = if r.work.catch_up.is_some() {
            &whole
        } else {
            &r.work.resyncs
        };
        for sub in resyncs {
            let with_slash = |base: &[u8], p: &PathBytes| {
                let mut v = base.to_vec();
                if !p.is_root() {
                    v.extend_from_slice(p.as_bytes());
                    v.push(b'/');
                }
                OsString::from(std::ffi::OsStr::from_bytes(&v))
            };
            let mut src = root.path.as_os_str().as_bytes().to_vec();
            src.push(b'/');
            let mut args: Vec<OsString> = vec!["-a".into(), "--delete".into(), "--force".into()];
            args.extend(excludes.iter().cloned());
            args.extend(common.iter().cloned());
            args.push(with_slash(&src, sub));
            args.push(with_slash(dest.as_bytes(), sub));
            out.extend_from_slice(b"rsync");
            words(&mut out, &args);
            out.push(b'\n');
        }
        if !r.work.paths.is_empty() {
            out.extend_from_slice(b"printf '%s\\0'");
            for p in r.work.paths.keys() {
                let mut entry = b"./".to_vec();
                entry.extend_from_slice(p.as_bytes());
                out.push(b' ');
                out.extend_from_slice(&quote(&entry));
            }
            out.extend_from_slice(b" | rsync");
            let mut args: Vec<OsString> = vec![
                "-a".into(),
                "--force".into(),
                "--delete-missing-args".into(),
                "--files-from=-".into(),
                "--from0".into(),
            ];
            args.extend(excludes.iter().cloned());
            args.extend(common.iter().cloned());
            let mut src = root.path.as_os_str().to_os_string();
            src.push("/");
            args.push(src);
            args.push(dest.into());
            words(&mut out, &args);
            out.push(b'\n');
        }
    }
    out
}

/// Writes the script next to the journal, atomically (temp file + rename), mode 0700.
/// A failed write removes its temp file: on a full disk it would keep the space.
pub(crate) fn write(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("sh.tmp");
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o700)
            .open(&tmp)?;
        f.write_all(text)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests spawn the programs they check
mod tests {
    use super::*;
    use protocol::work::{Touch, Work};

    #[test]
    fn quoting_survives_quotes_newlines_and_non_utf8() {
        assert_eq!(quote(b"a b"), b"'a b'");
        assert_eq!(quote(b"it's"), b"'it'\\''s'");
        assert_eq!(quote(b"x\n`rm -rf`\xff"), b"'x\n`rm -rf`\xff'");
    }

    /// The script, run by sh, sends what the journal held: odd names arrive intact,
    /// nothing in a name is executed, and a resync deletes on the target.
    #[test]
    fn the_script_pushes_the_backlog_when_run_by_sh() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let dst = d.path().join("dst");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::create_dir_all(dst.join("sub")).unwrap();
        let odd: &[u8] = b"it's `touch PWNED` \n-x\xff";
        std::fs::write(src.join(std::ffi::OsStr::from_bytes(odd)), "odd").unwrap();
        std::fs::write(src.join("sub/keep"), "k").unwrap();
        std::fs::write(dst.join("sub/stale"), "s").unwrap();
        let text =
            "[[root]]\nname = \"r\"\npath = \"src\"\n[[target]]\nname = \"t\"\nurl = \"dst\"\n";
        let config = Config::parse(text, &d.path().join("c.toml")).unwrap();
        let rec = Record {
            target: "t".into(),
            root: "r".into(),
            work: {
                let mut w = Work::default();
                w.resync("sub".into());
                w.touch(PathBytes::new(odd.to_vec()), Touch::upsert(0));
                w.touch("gone".into(), Touch::delete(0));
                w
            },
            attempt: 2,
            since_us: 1,
            error: "line one\nline two".into(),
            owed_to: String::new(),
        };
        let script = d.path().join("rsync_fail_log.sh");
        write(&script, &render(&config, &[(7, rec)])).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&script).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let out = std::process::Command::new("sh")
            .arg(&script)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!d.path().join("PWNED").exists(), "a file name was executed");
        assert_eq!(
            std::fs::read(dst.join(std::ffi::OsStr::from_bytes(odd))).unwrap(),
            b"odd"
        );
        assert!(dst.join("sub/keep").exists());
        assert!(!dst.join("sub/stale").exists(), "resync deletes");
    }
}
