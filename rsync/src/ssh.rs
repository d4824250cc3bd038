//! rsync over ssh: the `-e` command, one shared connection per target, and the line
//! of a failed run that says why. Pure: nothing is spawned or read.
//!
//! Every run to an ssh target goes through OpenSSH's connection sharing: the first run
//! opens a *master* connection (`ControlMaster=auto`) whose socket lives in a private
//! directory under the runtime dir (`ControlPath=<runtime_dir>/ssh/<hash>`), and every
//! later run, whichever lane, logs in through it without a new login. The master stays
//! up `ControlPersist` seconds after its last run, so an idle target costs no
//! connection for long, and the dispatcher closes it when it stops ([`exit_args`]).
//! An option the user gives in `ssh_options` wins over each of these three.

use std::path::{Path, PathBuf};

use protocol::config::{Endpoint, Target};

use crate::argv::ArgError;

/// Seconds a master connection stays up after its last run: long enough to carry a
/// burst and the runs after it, short enough that one left by a killed dispatcher
/// goes away by itself.
pub const CONTROL_PERSIST_S: u64 = 300;

/// The longest path a unix socket can have (`sun_path` holds 108 bytes with the NUL).
const SOCKET_PATH_MAX: usize = 107;

/// What ssh adds to the ControlPath while a master binds it (`.` and 16 random
/// characters), and the 16 hex digits of our own name.
const SOCKET_NAME_LEN: usize = 1 + 16 + 1 + 16;

/// The directory of the master sockets under `runtime_dir`, or why there can be none:
/// ssh refuses (fatally, for the run) a ControlPath longer than a socket path can be.
pub fn control_dir(runtime_dir: &Path) -> Result<PathBuf, String> {
    let dir = runtime_dir.join("ssh");
    let len = dir.as_os_str().len() + SOCKET_NAME_LEN;
    if len > SOCKET_PATH_MAX {
        return Err(format!(
            "`{}` is too long for ssh's connection sockets ({len} bytes with their names, at most {SOCKET_PATH_MAX}): each run to an ssh target logs in anew; choose a shorter runtime_dir",
            dir.display()
        ));
    }
    Ok(dir)
}

/// rsync's `-e` value for an ssh target. rsync splits it on spaces honouring quotes, so
/// each word is single-quoted; a word with a `'` is refused rather than guessed at.
/// With `ssh_dir`, the connection to `host` (`[user@]host`) is shared (see the module
/// doc).
pub fn ssh_command(
    port: Option<u16>,
    identity: Option<&Path>,
    options: &[String],
    host: &str,
    ssh_dir: Option<&Path>,
) -> Result<String, ArgError> {
    let words = ssh_words(port, identity, options, host, ssh_dir)?;
    let mut out = String::new();
    for w in &words {
        if w.contains('\'') {
            return Err(ArgError(format!(
                "ssh word `{w}` contains a single quote, which rsync's -e splitting cannot carry"
            )));
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push('\'');
        out.push_str(w);
        out.push('\'');
    }
    Ok(out)
}

/// `ssh` and its options, as [`ssh_command`] quotes them. `host` (`[user@]host`, what
/// rsync will connect to) is part of the shared connection's socket name.
fn ssh_words(
    port: Option<u16>,
    identity: Option<&Path>,
    options: &[String],
    host: &str,
    ssh_dir: Option<&Path>,
) -> Result<Vec<String>, ArgError> {
    let mut words: Vec<String> = vec!["ssh".into()];
    if let Some(p) = port {
        words.push("-p".into());
        words.push(p.to_string());
    }
    if let Some(i) = identity {
        words.push("-i".into());
        words.push(i.to_str().map(str::to_string).ok_or_else(|| {
            ArgError(format!(
                "identity file `{}` is not UTF-8, which rsync's -e cannot carry",
                i.display()
            ))
        })?);
    }
    words.extend(options.iter().cloned());
    if let Some(dir) = ssh_dir {
        let set = user_sets(options);
        if !set.master {
            words.push("-o".into());
            words.push("ControlMaster=auto".into());
        }
        if !set.path {
            // Named after everything that picks the connection, so two targets share a
            // master only when they would open the same one.
            let name = socket_name(&words[1..], host);
            let path = dir.join(name);
            words.push("-o".into());
            words.push(format!(
                "ControlPath={}",
                path.to_str().ok_or_else(|| ArgError(format!(
                    "runtime dir `{}` is not UTF-8, which rsync's -e cannot carry",
                    dir.display()
                )))?
            ));
        }
        if !set.persist {
            words.push("-o".into());
            words.push(format!("ControlPersist={CONTROL_PERSIST_S}"));
        }
    }
    Ok(words)
}

/// Which of the sharing options the user's own `ssh_options` set.
#[derive(Debug, Default, PartialEq, Eq)]
struct UserSets {
    master: bool,
    path: bool,
    persist: bool,
}

fn user_sets(options: &[String]) -> UserSets {
    let mut set = UserSets::default();
    let mut see = |opt: &str| {
        let key = opt
            .trim_start()
            .split(|c: char| c == '=' || c.is_whitespace())
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        match key.as_str() {
            "controlmaster" => set.master = true,
            "controlpath" => set.path = true,
            "controlpersist" => set.persist = true,
            _ => {}
        }
    };
    let mut words = options.iter();
    while let Some(w) = words.next() {
        match w.as_str() {
            "-o" => {
                if let Some(opt) = words.next() {
                    see(opt);
                }
            }
            "-M" => see("ControlMaster"),
            "-S" => see("ControlPath"),
            _ if w.starts_with("-o") => see(&w[2..]),
            _ if w.starts_with("-S") => see("ControlPath"),
            _ => {}
        }
    }
    set
}

/// 16 hex digits of FNV-1a over the words and the host: stable across versions (a
/// master left running by a previous dispatcher is found again), short enough for a
/// socket path under most runtime dirs (ssh's own `%C` takes 40).
fn socket_name(words: &[String], host: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in words.iter().map(String::as_str).chain([host]) {
        for b in part.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// `[user@]host` of an ssh destination `[user@]host:path` (IPv6 brackets dropped, as
/// rsync drops them when it runs ssh).
pub fn ssh_host(dest: &str) -> String {
    let (user, rest) = match dest.split_once('@') {
        Some((u, r)) if !u.contains(':') && !u.contains('/') => (Some(u), r),
        _ => (None, dest),
    };
    let host = match rest.strip_prefix('[') {
        Some(inner) => inner.split(']').next().unwrap_or(inner),
        None => rest.split(':').next().unwrap_or(rest),
    };
    match user {
        Some(u) => format!("{u}@{host}"),
        None => host.to_string(),
    }
}

/// The argv (without the program, `ssh`) that closes `target`'s shared connection:
/// `ssh <the run's options> -O exit [user@]host`. `None` when the target is not ssh,
/// or when the user chose the ControlPath (their socket: theirs to close).
pub fn exit_args(target: &Target, ssh_dir: &Path) -> Option<Vec<String>> {
    let Endpoint::Ssh {
        dest,
        port,
        identity_file,
        options,
    } = &target.endpoint
    else {
        return None;
    };
    if user_sets(options).path {
        return None;
    }
    let host = ssh_host(dest);
    let mut words = ssh_words(
        *port,
        identity_file.as_deref(),
        options,
        &host,
        Some(ssh_dir),
    )
    .ok()?;
    words.remove(0);
    words.extend(["-O".into(), "exit".into(), host]);
    Some(words)
}

/// The line of a failed run's stderr that says why, when rsync's own lines do not:
/// on its exit 255 (ssh failed) or 12 (the stream broke: ssh or the remote shell gave
/// up) rsync says only "connection unexpectedly closed"; the cause is the last line
/// rsync did not write — ssh's (`ssh: connect to host … Connection refused`,
/// `Permission denied (publickey).`, `Host key verification failed.`) or the remote
/// shell's (`rsync: command not found`). ssh's notice that it added a host key is
/// not a cause.
pub fn failure_reason(code: Option<i32>, stderr: &str) -> Option<&str> {
    if !matches!(code, Some(12 | 255)) {
        return None;
    }
    stderr.lines().map(str::trim).rev().find(|l| {
        !l.is_empty()
            && !l.starts_with("rsync:")
            && !l.starts_with("rsync error:")
            && !l.starts_with("rsync warning:")
            && !l.starts_with("rsync(")
            && !l.starts_with("Warning: Permanently added")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|w| w.to_string()).collect()
    }

    fn words(options: &[&str]) -> Vec<String> {
        ssh_words(
            Some(2222),
            None,
            &s(options),
            "u@h",
            Some(Path::new("/run/sb/ssh")),
        )
        .unwrap()
    }

    #[test]
    fn a_shared_connection_is_asked_for_unless_the_user_set_each_option() {
        let ours = words(&[]);
        let path = ours
            .iter()
            .find_map(|w| w.strip_prefix("ControlPath="))
            .unwrap();
        assert!(path.starts_with("/run/sb/ssh/"), "{path}");
        assert_eq!(path.len(), "/run/sb/ssh/".len() + 16, "{path}");
        assert!(ours.contains(&"ControlMaster=auto".into()), "{ours:?}");
        assert!(ours.contains(&format!("ControlPersist={CONTROL_PERSIST_S}")));

        // Each option the user sets is theirs, in any of ssh's spellings.
        let table: &[(&[&str], UserSets)] = &[
            (&[], UserSets::default()),
            (
                &["-o", "ControlPath=none"],
                UserSets {
                    path: true,
                    ..Default::default()
                },
            ),
            (
                &["-ocontrolmaster=no"],
                UserSets {
                    master: true,
                    ..Default::default()
                },
            ),
            (
                &["-o", "ControlPersist 10"],
                UserSets {
                    persist: true,
                    ..Default::default()
                },
            ),
            (
                &["-M", "-S", "/tmp/c"],
                UserSets {
                    master: true,
                    path: true,
                    persist: false,
                },
            ),
            (&["-o", "StrictHostKeyChecking=no"], UserSets::default()),
        ];
        for (opts, want) in table {
            assert_eq!(&user_sets(&s(opts)), want, "{opts:?}");
        }
        let theirs = words(&["-o", "ControlPath=none", "-o", "ControlPersist=5"]);
        assert_eq!(
            theirs.iter().filter(|w| w.starts_with("ControlP")).count(),
            2,
            "only theirs: {theirs:?}"
        );
        assert!(theirs.contains(&"ControlPath=none".into()));
        assert!(theirs.contains(&"ControlMaster=auto".into()));
    }

    #[test]
    fn sockets_differ_by_connection_and_stay_put() {
        let path = |port: u16, host: &str| {
            ssh_words(Some(port), None, &[], host, Some(Path::new("/r/ssh")))
                .unwrap()
                .into_iter()
                .find(|w| w.starts_with("ControlPath="))
                .unwrap()
        };
        assert_eq!(path(22, "u@h"), path(22, "u@h"));
        assert_ne!(path(22, "u@h"), path(23, "u@h"));
        assert_ne!(path(22, "u@h"), path(22, "v@h"));
        // FNV-1a, fixed: a master left by an earlier dispatcher is found again.
        assert_eq!(path(22, "u@h"), "ControlPath=/r/ssh/0ad4f4c060d8456e");
    }

    #[test]
    fn a_runtime_dir_too_long_for_a_socket_gets_no_sharing() {
        assert!(control_dir(Path::new("/run/syncbus")).is_ok());
        let long = format!("/tmp/{}", "x".repeat(70));
        let e = control_dir(Path::new(&long)).unwrap_err();
        assert!(e.contains("too long"), "{e}");
    }

    #[test]
    fn hosts_of_destinations() {
        for (dest, host) in [
            ("u@h:/data/", "u@h"),
            ("h:/data/", "h"),
            ("h:", "h"),
            ("[::1]:/x/", "::1"),
            ("u@[::1]:/x/", "u@::1"),
        ] {
            assert_eq!(ssh_host(dest), host, "{dest}");
        }
    }

    #[test]
    fn exit_closes_the_socket_the_runs_use_and_leaves_the_users_alone() {
        let mut t = Target {
            name: "t".into(),
            endpoint: Endpoint::Ssh {
                dest: "u@h:/d/".into(),
                port: Some(2222),
                identity_file: None,
                options: s(&["-o", "BatchMode=yes"]),
            },
            roots: vec!["r".into()],
            timeout: 30,
            bwlimit: None,
            extra_args: vec![],
            two_way: false,
            conflict_copies: false,
            allow_wipe: false,
            hard_links: false,
            on_failure: Default::default(),
        };
        let dir = Path::new("/run/sb/ssh");
        let exit = exit_args(&t, dir).unwrap();
        assert_eq!(exit[exit.len() - 3..], s(&["-O", "exit", "u@h"]));
        let e = match &t.endpoint {
            Endpoint::Ssh {
                port,
                identity_file,
                options,
                dest,
            } => ssh_words(
                *port,
                identity_file.as_deref(),
                options,
                &ssh_host(dest),
                Some(dir),
            )
            .unwrap(),
            _ => unreachable!(),
        };
        assert_eq!(
            exit[..exit.len() - 3],
            e[1..],
            "the same options as the runs"
        );

        if let Endpoint::Ssh { options, .. } = &mut t.endpoint {
            options.extend(s(&["-o", "ControlPath=~/.ssh/cm-%C"]));
        }
        assert_eq!(exit_args(&t, dir), None);
        t.endpoint = Endpoint::Local { path: "/x".into() };
        assert_eq!(exit_args(&t, dir), None);
    }

    #[test]
    fn the_reason_of_a_failed_ssh_run_is_sshs_own_line() {
        let refused = "ssh: connect to host 127.0.0.1 port 40022: Connection refused\n\
            rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n\
            rsync error: error in rsync protocol data stream (code 12) at io.c(285) [sender=3.5.0]\n";
        let denied = "Warning: Permanently added '[127.0.0.1]:40022' (ED25519) to the list of known hosts.\n\
            root@127.0.0.1: Permission denied (publickey).\n\
            rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n\
            rsync error: unexplained error (code 255) at io.c(232) [sender=3.2.7]\n";
        let partial = "rsync: [sender] link_stat \"/x\" failed: No such file or directory (2)\n\
            rsync error: some files/attrs were not transferred (see previous errors) (code 23)\n";
        let table: &[(Option<i32>, &str, Option<&str>)] = &[
            (
                Some(12),
                refused,
                Some("ssh: connect to host 127.0.0.1 port 40022: Connection refused"),
            ),
            (
                Some(255),
                denied,
                Some("root@127.0.0.1: Permission denied (publickey)."),
            ),
            (
                Some(12),
                "bash: line 1: rsync: command not found\nrsync: connection unexpectedly closed\n",
                Some("bash: line 1: rsync: command not found"),
            ),
            // rsync's own lines only: nothing better to say than rsync did.
            (
                Some(12),
                "rsync: connection unexpectedly closed\nrsync error: (code 12)\n",
                None,
            ),
            (Some(23), partial, None),
            (Some(255), "", None),
            (None, refused, None),
        ];
        for (code, stderr, want) in table {
            assert_eq!(failure_reason(*code, stderr), *want, "{code:?} {stderr}");
        }
    }
}
