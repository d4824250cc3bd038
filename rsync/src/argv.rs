//! The rsync command line per target kind and per kind of run, built whole here: no
//! caller adds or patches an argument by position. Pure: nothing is spawned or read.

use std::ffi::OsString;
use std::path::Path;

use protocol::config::{Endpoint, Target};

use crate::ssh::{ssh_command, ssh_host};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// `--files-from=-` with the touched paths; `-r` when a directory appeared whole.
    Incremental,
    /// Delete the listed paths on the target: run from a scratch source that holds
    /// only their parent directories, so each listed path is a missing argument.
    DeleteOnly,
    /// `--delete` of the whole transfer, restricted by the rules file.
    Resync,
    /// The listings of a catch-up: `--dirs --delete` of the `./DIR/.` on stdin.
    Listing,
    /// Two-way targets only: the listed files *from* the peer, where its copy is newer
    /// (a file dated older than the peer's was written here, by a rename or a restore:
    /// the push kept the peer's, so newest wins on this side too).
    Pull,
    /// Two-way targets only, a dry run: what a whole-root run *from* the peer would
    /// bring here (the peer's copy newer or missing here; never deleting), itemized
    /// with size and mtime so that files the peer is still writing can be told apart.
    PullList,
    /// A moved file or directory built on the target from what it still holds at the
    /// old place, before the old place is deleted: `--copy-dest` (relative to the
    /// destination) copies there what is unchanged, and `--fuzzy --fuzzy` takes a
    /// renamed file's old copy (same size and time) as the basis of its delta. With
    /// `list`, the names on stdin (`--files-from`), else the whole source directory.
    Seed { basis: Option<String>, list: bool },
}

/// A command line that cannot be built (a retryable failure: the config may be fixed).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ArgError(pub(crate) String);

/// The program to run: `$SYNCBUS_RSYNC` or `rsync` from PATH.
pub fn rsync_program() -> OsString {
    std::env::var_os("SYNCBUS_RSYNC")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "rsync".into())
}

/// The arguments every run to `target` shares, after the mode's own. `ssh_dir`: where
/// runs to an ssh target share one connection ([`crate::ssh`]; `None`: each run logs in).
pub fn common_args(target: &Target, ssh_dir: Option<&Path>) -> Result<Vec<OsString>, ArgError> {
    // No `--timeout`: with it, every run to a daemon without TCP_NODELAY on its side
    // costs ~20 ms more (measured: 33 → 52 ms per run on loopback). `run` enforces the
    // same I/O-inactivity limit from outside instead.
    let mut a: Vec<OsString> = Vec::new();
    if let Some(b) = &target.bwlimit {
        a.push(format!("--bwlimit={b}").into());
    }
    // The destination directory may not exist yet (first run, new root subdirectory).
    a.push("--mkpath".into());
    match &target.endpoint {
        Endpoint::Rsync { password_file, .. } => {
            // Nagle + delayed ACK cost 90–170 ms per run on loopback; 5 ms without.
            a.push("--sockopts=TCP_NODELAY".into());
            a.push("--contimeout=10".into());
            if let Some(f) = password_file {
                let mut s = OsString::from("--password-file=");
                s.push(f);
                a.push(s);
            }
        }
        Endpoint::Ssh {
            dest,
            port,
            identity_file,
            options,
        } => {
            a.push("-e".into());
            let host = ssh_host(dest);
            a.push(ssh_command(*port, identity_file.as_deref(), options, &host, ssh_dir)?.into());
        }
        Endpoint::Local { .. }
        | Endpoint::Command { .. }
        | Endpoint::Http { .. }
        | Endpoint::Tcp { .. } => {}
    }
    if target.hard_links {
        a.push("-H".into());
    }
    a.extend(target.extra_args.iter().map(OsString::from));
    Ok(a)
}

/// What rsync prints for the caller, besides its summary (`--info=stats1`, read for the
/// bytes sent; always on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The summary only.
    Summary,
    /// Each name sent (`%n`): a full sync's progress.
    Names,
    /// Each change itemized (`%i %n`): the catch-up's follow-ups, a dry run's deletes.
    Itemized,
    /// Itemized with size and mtime (`%i %l %M %n`): a two-way pull's listing.
    ItemizedSized,
}

/// One run: what it does, from where to where, and what the caller reads of it.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    pub mode: &'a Mode,
    /// The merged filter rules (NUL-separated), if any.
    pub rules_file: Option<&'a Path>,
    /// The local side, sent with a trailing `/` (its content, not itself).
    pub root: &'a Path,
    pub dest: &'a str,
    pub output: Output,
    /// Options the root guard adds to every run for a while (`--dry-run` for its
    /// probe, `--max-delete=0` for a compare that must not delete).
    pub guard: &'a [&'static str],
}

/// The full argv (without the program) of one run; `ssh_dir` as in [`common_args`].
pub fn build_args(
    target: &Target,
    run: &Run,
    ssh_dir: Option<&Path>,
) -> Result<Vec<OsString>, ArgError> {
    let Run {
        mode,
        rules_file,
        root,
        dest,
        output,
        guard,
    } = *run;
    let mut a: Vec<OsString> = vec!["-a".into()];
    match mode {
        Mode::Incremental => {
            a.push("--force".into());
            a.push("--delete-missing-args".into());
            // Every listed path is known to have changed: rsync's quick check (same
            // size, same mtime second) would skip a quick rewrite, so skip the check.
            a.push("--ignore-times".into());
            // Directory times to the nanosecond too (else a directory created within
            // the second of its source's mtime keeps its own): the catch-up reads a
            // directory whose time differs on the target as "another directory".
            a.push("--modify-window=-1".into());
            a.push("--files-from=-".into());
        }
        Mode::DeleteOnly => {
            a.push("--force".into());
            a.push("--delete-missing-args".into());
            // The scratch parents must not overwrite the target's directories.
            a.push("--no-implied-dirs".into());
            a.push("--files-from=-".into());
        }
        Mode::Listing => {
            // The direct entries of the listed directories (`./DIR/.`), no deeper (see
            // catchup.rs). Times to the second on purpose: changed files go in their
            // own run, and a child directory whose time differs by less is the same.
            a.push("--no-recursive".into());
            a.push("--dirs".into());
            a.push("--delete".into());
            a.push("--force".into());
            a.push("--files-from=-".into());
        }
        Mode::Pull => {
            a.push("--ignore-missing-args".into());
            a.push("--files-from=-".into());
        }
        Mode::PullList => {
            a.push("--dry-run".into());
            a.push("--modify-window=-1".into());
        }
        Mode::Seed { basis, list } => {
            // The basis is used only if rsync computes deltas, which it does not
            // between local directories by default.
            a.push("--no-whole-file".into());
            a.push("--fuzzy".into());
            a.push("--fuzzy".into());
            a.push("--modify-window=-1".into());
            // `--copy-dest`, not `--link-dest`: an unchanged file is copied on the
            // target from its old place, never linked to it, so no two places there
            // ever share one file (with `--inplace` a write to one would change both).
            if let Some(b) = basis {
                a.push(format!("--copy-dest={b}").into());
            }
            // The moved place's name is on the command line here: over ssh, rsync
            // must not hand it to the remote shell as words (rsync < 3.2.4 does by
            // default).
            if matches!(target.endpoint, Endpoint::Ssh { .. }) {
                a.push("--protect-args".into());
            }
            if *list {
                // A listed file is known to have changed, like an incremental run's.
                a.push("--ignore-times".into());
                a.push("--ignore-missing-args".into());
                a.push("--files-from=-".into());
            }
        }
        Mode::Resync => {
            a.push("--delete".into());
            a.push("--force".into());
            // Compare mtimes to the nanosecond (rsync >= 3.1.3): a rewrite of the same
            // size within the same second, made while no event could be seen, must
            // not pass the quick check.
            a.push("--modify-window=-1".into());
        }
    }
    if target.two_way {
        two_way_args(&mut a);
    }
    // Also makes rsync read the merged rules file NUL-separated.
    a.push("--from0".into());
    if let Some(f) = rules_file {
        let mut s = OsString::from("--filter=merge ");
        s.push(f);
        a.push(s);
    }
    a.extend(common_args(target, ssh_dir)?);
    // After the user's `extra_args`: the summary in plain digits even if they ask for
    // `-h`.
    a.push("--info=stats1".into());
    a.push("--no-human-readable".into());
    a.extend(guard.iter().map(OsString::from));
    match output {
        Output::Summary => {}
        Output::Names => a.push("--out-format=%n".into()),
        Output::Itemized => a.push("--out-format=%i %n".into()),
        Output::ItemizedSized => a.push("--out-format=%i %l %M %n".into()),
    }
    let mut local = root.as_os_str().to_os_string();
    local.push("/");
    if matches!(mode, Mode::Pull | Mode::PullList) {
        a.push(dest.into());
        a.push(local);
    } else {
        a.push(local);
        a.push(dest.into());
    }
    Ok(a)
}

/// A run to the other side of a two-way pair. The peer's watcher must be able to tell
/// what this run did from what its users do, and nothing newer over there may be lost:
/// - newest wins: `--update` keeps a file that is newer on the peer (its own syncbus
///   brings it here), and the quick check (to the nanosecond) replaces `--ignore-times`,
///   so a file that is already the same over there is not written again;
/// - files are written in the peer's `.syncbus/incoming/` and renamed into place, and
///   what a run replaces or deletes is moved into its `.syncbus/backup/`: the peer sees
///   renames from and into its own `.syncbus/`, which it does not send back;
/// - compares never delete (the peer may hold new files this side has not seen yet):
///   deletes travel only as deletes of named paths;
/// - directory times are not set: each setting would be an attribute change over there,
///   sent back here by the peer.
fn two_way_args(a: &mut Vec<OsString>) {
    a.retain(|o| o != "--ignore-times" && o != "--delete");
    a.push("--update".into());
    a.push("--omit-dir-times".into());
    a.push(format!("--temp-dir={}", protocol::config::TWO_WAY_INCOMING).into());
    a.push("--backup".into());
    a.push(format!("--backup-dir={}", protocol::config::TWO_WAY_BACKUP).into());
    a.push(format!("--exclude=/{}/", protocol::config::TWO_WAY_DIR).into());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn run<'a>(mode: &'a Mode, rules: Option<&'a Path>, root: &'a Path, dest: &'a str) -> Run<'a> {
        Run {
            mode,
            rules_file: rules,
            root,
            dest,
            output: Output::Summary,
            guard: &[],
        }
    }

    fn target(endpoint: Endpoint) -> Target {
        Target {
            name: "t".into(),
            endpoint,
            roots: vec!["www".into()],
            timeout: 30,
            bwlimit: None,
            extra_args: vec!["--chmod=D755".into()],
            two_way: false,
            conflict_copies: false,
            allow_wipe: false,
            hard_links: false,
            on_failure: Default::default(),
        }
    }

    fn strings(a: Vec<OsString>) -> Vec<String> {
        a.into_iter()
            .map(|s| s.into_string().unwrap())
            .collect::<Vec<_>>()
    }

    #[test]
    fn argv_for_an_rsync_daemon() {
        let mut t = target(Endpoint::Rsync {
            url: "rsync://h:8730/m/".into(),
            password_file: Some(PathBuf::from("/etc/p w")),
        });
        t.bwlimit = Some("2M".into());
        let a = build_args(
            &t,
            &run(
                &Mode::Incremental,
                Some(Path::new("/run/x/rules")),
                Path::new("/srv/www"),
                &t.destination("www"),
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            strings(a),
            [
                "-a",
                "--force",
                "--delete-missing-args",
                "--ignore-times",
                "--modify-window=-1",
                "--files-from=-",
                "--from0",
                "--filter=merge /run/x/rules",
                "--bwlimit=2M",
                "--mkpath",
                "--sockopts=TCP_NODELAY",
                "--contimeout=10",
                "--password-file=/etc/p w",
                "--chmod=D755",
                "--info=stats1",
                "--no-human-readable",
                "/srv/www/",
                "rsync://h:8730/m/",
            ]
        );
    }

    #[test]
    fn argv_for_ssh_quotes_every_word() {
        let t = target(Endpoint::Ssh {
            dest: "u@h:/data/".into(),
            port: Some(2222),
            identity_file: Some(PathBuf::from("/k/id ed")),
            options: vec!["-o".into(), "StrictHostKeyChecking=yes".into()],
        });
        let a = build_args(
            &t,
            &run(&Mode::Resync, None, Path::new("/srv"), "u@h:/data/"),
            None,
        )
        .unwrap();
        assert_eq!(
            strings(a),
            [
                "-a",
                "--delete",
                "--force",
                "--modify-window=-1",
                "--from0",
                "--mkpath",
                "-e",
                "'ssh' '-p' '2222' '-i' '/k/id ed' '-o' 'StrictHostKeyChecking=yes'",
                "--chmod=D755",
                "--info=stats1",
                "--no-human-readable",
                "/srv/",
                "u@h:/data/",
            ]
        );
        let e = ssh_command(
            None,
            None,
            &["-o".into(), "ProxyCommand=it's".into()],
            "h",
            None,
        );
        assert!(e.unwrap_err().to_string().contains("single quote"));
    }

    #[test]
    fn what_the_caller_reads_and_the_guards_options_come_after_the_users() {
        let mut t = target(Endpoint::Local {
            path: PathBuf::from("/backup"),
        });
        t.extra_args = vec!["-h".into()];
        let table = [
            (Output::Summary, None),
            (Output::Names, Some("--out-format=%n")),
            (Output::Itemized, Some("--out-format=%i %n")),
            (Output::ItemizedSized, Some("--out-format=%i %l %M %n")),
        ];
        for (output, format) in table {
            let r = Run {
                output,
                guard: &["--dry-run"],
                ..run(&Mode::Resync, None, Path::new("/srv"), "/backup/")
            };
            let a = strings(build_args(&t, &r, None).unwrap());
            let at = |w: &str| a.iter().position(|x| x == w);
            let user = at("-h").unwrap();
            assert!(at("--no-human-readable").unwrap() > user, "{a:?}");
            assert!(at("--dry-run").unwrap() > user, "{a:?}");
            assert_eq!(format.map(|f| at(f).is_some()), format.map(|_| true));
            assert_eq!(
                a.iter().filter(|x| x.starts_with("--out-format")).count(),
                usize::from(format.is_some())
            );
            assert_eq!(&a[a.len() - 2..], ["/srv/", "/backup/"]);
        }
    }

    #[test]
    fn argv_for_a_local_dir_has_nothing_extra() {
        let mut t = target(Endpoint::Local {
            path: PathBuf::from("/backup"),
        });
        t.timeout = 0;
        t.extra_args.clear();
        let a = build_args(
            &t,
            &run(&Mode::Incremental, None, Path::new("/srv"), "/backup/"),
            None,
        )
        .unwrap();
        assert_eq!(
            strings(a),
            [
                "-a",
                "--force",
                "--delete-missing-args",
                "--ignore-times",
                "--modify-window=-1",
                "--files-from=-",
                "--from0",
                "--mkpath",
                "--info=stats1",
                "--no-human-readable",
                "/srv/",
                "/backup/"
            ]
        );
    }

    #[test]
    fn two_way_runs_keep_what_is_newer_and_never_delete_in_a_compare() {
        let mut t = target(Endpoint::Local {
            path: PathBuf::from("/peer"),
        });
        t.two_way = true;
        t.extra_args.clear();
        let own = [
            "--update",
            "--omit-dir-times",
            "--temp-dir=.syncbus/incoming",
            "--backup",
            "--backup-dir=.syncbus/backup",
            "--exclude=/.syncbus/",
        ];
        for mode in [
            Mode::Incremental,
            Mode::Resync,
            Mode::Listing,
            Mode::DeleteOnly,
            Mode::Pull,
            Mode::PullList,
        ] {
            let a = strings(
                build_args(&t, &run(&mode, None, Path::new("/srv"), "/peer/"), None).unwrap(),
            );
            for want in own {
                assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
            }
            for never in ["--delete", "--ignore-times"] {
                assert!(!a.iter().any(|x| x == never), "{never} in {a:?}");
            }
        }
    }

    #[test]
    fn delete_only_runs_never_touch_the_parents_on_the_target() {
        let t = target(Endpoint::Local {
            path: PathBuf::from("/backup"),
        });
        let a = strings(
            build_args(
                &t,
                &run(&Mode::DeleteOnly, None, Path::new("/scratch"), "/backup/"),
                None,
            )
            .unwrap(),
        );
        for want in [
            "--delete-missing-args",
            "--no-implied-dirs",
            "--files-from=-",
            "--force",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        assert!(!a.iter().any(|x| x == "--delete" || x == "-r"), "{a:?}");
    }
}
