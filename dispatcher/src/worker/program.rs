//! Command targets: the user's program run with the batch's paths (as arguments, per
//! path, or on stdin), the include/exclude globs of command and webhook targets, and
//! the entries of a subtree for a hook.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use protocol::config::Endpoint;
use protocol::PathBytes;

use crate::command::{self, RunResult};
use ::rsync::Outcome;
use protocol::work::Touch;

use super::*;

/// Hook globs, rsync-style: names (no `/`) match the last component, the others the
/// path from the root (a leading `/` anchors nothing more).
pub(super) struct GlobPair {
    pub(super) names: globset::GlobSet,
    pub(super) paths: globset::GlobSet,
    /// How many patterns the config gave (none: an `include` lets everything through).
    pub(super) given: usize,
}

impl GlobPair {
    pub(super) fn is_empty(&self) -> bool {
        self.given == 0
    }
}

impl GlobPair {
    pub(super) fn new(globs: &[String]) -> Self {
        let (mut names, mut paths) = (
            globset::GlobSetBuilder::new(),
            globset::GlobSetBuilder::new(),
        );
        for g in globs {
            let anchored = g.contains('/');
            let pattern = g.trim_start_matches('/').trim_end_matches('/');
            let Ok(glob) = globset::GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
            else {
                continue;
            };
            if anchored {
                paths.add(glob);
            } else {
                names.add(glob);
            }
        }
        let empty = globset::GlobSet::empty;
        GlobPair {
            names: names.build().unwrap_or_else(|_| empty()),
            paths: paths.build().unwrap_or_else(|_| empty()),
            given: globs.len(),
        }
    }

    pub(super) fn matches(&self, p: &PathBytes) -> bool {
        use std::os::unix::ffi::OsStrExt;
        self.paths.is_match(p.as_os_str())
            || self
                .names
                .is_match(std::ffi::OsStr::from_bytes(p.file_name()))
    }
}

/// One path for a command or webhook target: the path, what the program is given
/// (`./path`, `./dir/`), and whether it stands for everything below it (the root, or a
/// subtree too large to list), which an `include` glob never holds back.
pub(super) type HookEntry = (PathBytes, Vec<u8>, bool);

/// Most bytes of paths given as arguments to one run of a command target.
pub(super) const ARGS_BYTES: usize = 64 * 1024;

/// Above this many entries, a command target gets a subtree as `./dir/` rather than
/// every path in it.
pub(super) const COMMAND_EXPAND_MAX: usize = 100_000;

/// What a command target is given for a subtree that changed as a whole (a new or
/// moved-in directory): the directory and every path in it (`./dir/`, `./dir/file`…),
/// or just `./dir/` — "everything below" — for the root or a very large subtree.
pub(super) fn command_entries(info: &RootInfo, sub: &PathBytes) -> Vec<HookEntry> {
    let entry = |p: &PathBytes, dir: bool| {
        let mut e = b"./".to_vec();
        if !p.is_root() {
            e.extend_from_slice(p.as_bytes());
            if dir {
                e.push(b'/');
            }
        }
        (p.clone(), e, false)
    };
    // The root, or a subtree too large to list: "everything below".
    let mut whole = entry(sub, true);
    whole.2 = true;
    if sub.is_root() {
        return vec![whole];
    }
    let mut out = vec![entry(sub, true)];
    let mut stack = vec![sub.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(list) = std::fs::read_dir(dir.under(&info.path)) else {
            continue;
        };
        for e in list.flatten() {
            use std::os::unix::ffi::OsStrExt;
            let path = dir.join(e.file_name().as_bytes());
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if info.rules.excludes(&path, is_dir) {
                continue;
            }
            out.push(entry(&path, is_dir));
            if out.len() > COMMAND_EXPAND_MAX {
                return vec![whole];
            }
            if is_dir {
                stack.push(path);
            }
        }
    }
    out
}

impl Runner {
    /// The entries that pass the target's include/exclude globs, read the way rsync
    /// reads its own: a pattern without `/` matches a name at any depth, one with `/`
    /// the path from the root. A path is excluded when it or a directory above it
    /// matches an `exclude`; `include` is checked on the path itself, and never holds
    /// back a directory entry or a path that is gone (a delete must reach the hook).
    pub(super) fn filtered(&self, info: &RootInfo, entries: Vec<HookEntry>) -> Vec<HookEntry> {
        let Some((inc, exc)) = &self.globs else {
            return entries;
        };
        let keep: Vec<bool> = entries
            .iter()
            .map(|(p, _, all_below)| {
                if p.is_root() {
                    return true;
                }
                let excluded = std::iter::once(p.as_bytes())
                    .chain(p.ancestors().filter(|a| !a.is_empty()))
                    .any(|a| exc.matches(&PathBytes::new(a.to_vec())));
                if excluded {
                    return false;
                }
                inc.is_empty()
                    || *all_below
                    || std::fs::symlink_metadata(p.under(&info.path)).is_err()
                    || inc.matches(p)
            })
            .collect();
        entries
            .into_iter()
            .zip(keep)
            .filter_map(|(e, k)| k.then_some(e))
            .collect()
    }

    /// A hook run on changed paths. On failure, `.1` names the paths that failed when
    /// the hook could tell them apart (`paths = "each"`, argument chunks, per-path
    /// webhooks): only those are owed again, and a hook that succeeded for a path is
    /// never run again for it.
    pub(super) fn hook_paths(
        &self,
        root: &str,
        info: &RootInfo,
        paths: &BTreeMap<PathBytes, Touch>,
        tick: &mut dyn FnMut(Duration),
    ) -> (RunResult, Option<Vec<PathBytes>>) {
        let entries = paths
            .keys()
            .map(|p| {
                let mut e = b"./".to_vec();
                e.extend_from_slice(p.as_bytes());
                (p.clone(), e, false)
            })
            .collect();
        self.run_hook_paths(root, info, entries, tick)
    }

    pub(super) fn run_hook(
        &self,
        root: &str,
        info: &RootInfo,
        entries: Vec<HookEntry>,
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
        self.run_hook_paths(root, info, entries, tick).0
    }

    pub(super) fn run_hook_paths(
        &self,
        root: &str,
        info: &RootInfo,
        entries: Vec<HookEntry>,
        tick: &mut dyn FnMut(Duration),
    ) -> (RunResult, Option<Vec<PathBytes>>) {
        let entries = self.filtered(info, entries);
        if entries.is_empty() {
            let ok = RunResult {
                outcome: Outcome::Success,
                error: String::new(),
            };
            return (ok, None);
        }
        let (result, failed) = match &self.target.endpoint {
            Endpoint::Http { .. } => self.post(root, &entries),
            Endpoint::Tcp { .. } => self.push(root, info, &entries),
            _ => self.run_command(root, info, entries, tick),
        };
        self.count_run(&result, 0);
        (result, failed)
    }

    /// A command target's run: its program with the entries (`./path`, `./dir/` for
    /// everything below) that pass its include/exclude globs, as NUL-separated stdin or
    /// as arguments; never a shell. It runs in the root with `SYNCBUS_TARGET`,
    /// `SYNCBUS_ROOT` and `SYNCBUS_ROOT_PATH` set; exit 0 is success, anything else is
    /// retried like a failed rsync (only the paths whose run failed, where known).
    pub(super) fn run_command(
        &self,
        root: &str,
        info: &RootInfo,
        entries: Vec<HookEntry>,
        tick: &mut dyn FnMut(Duration),
    ) -> (RunResult, Option<Vec<PathBytes>>) {
        let Endpoint::Command {
            argv,
            as_args,
            each,
            ..
        } = &self.target.endpoint
        else {
            unreachable!("only called for command targets")
        };
        let keys: Vec<PathBytes> = entries.iter().map(|(p, _, _)| p.clone()).collect();
        let entries: Vec<Vec<u8>> = entries.into_iter().map(|(_, e, _)| e).collect();
        use std::os::unix::ffi::OsStrExt;
        let program: std::ffi::OsString = argv[0].clone().into();
        let (target, root_path) = (self.target.name.clone(), info.path.clone());
        let setup = |cmd: &mut std::process::Command| {
            cmd.current_dir(&root_path)
                .env("SYNCBUS_TARGET", &target)
                .env("SYNCBUS_ROOT", root)
                .env("SYNCBUS_ROOT_PATH", &root_path);
        };
        // As arguments, a batch goes in runs of at most ARGS_BYTES (the kernel refuses
        // an argument list beyond about 2 MiB, environment included).
        let chunks: Vec<&[Vec<u8>]> = if *each {
            entries.chunks(1).collect()
        } else if *as_args {
            let mut out = Vec::new();
            let (mut start, mut bytes) = (0, 0);
            for (i, e) in entries.iter().enumerate() {
                if bytes + e.len() + 1 > ARGS_BYTES && i > start {
                    out.push(&entries[start..i]);
                    (start, bytes) = (i, 0);
                }
                bytes += e.len() + 1;
            }
            out.push(&entries[start..]);
            out
        } else {
            vec![&entries[..]]
        };
        let control = self.control.clone();
        // The target's timeout is a wall clock here: a program's I/O may happen in
        // children the I/O watchdog cannot see.
        let limit = (self.target.timeout > 0).then(|| Duration::from_secs(self.target.timeout));
        let mut first_failure: Option<RunResult> = None;
        let mut failed: Vec<PathBytes> = Vec::new();
        let mut start = 0;
        for chunk in chunks {
            let range = start..start + chunk.len();
            start = range.end;
            if control.must_stop() && first_failure.is_some() {
                failed.extend_from_slice(&keys[range]);
                continue;
            }
            let mut args: Vec<std::ffi::OsString> = argv[1..].iter().map(Into::into).collect();
            let mut stdin = Vec::new();
            for e in chunk {
                if *as_args {
                    args.push(std::ffi::OsStr::from_bytes(e).to_os_string());
                } else {
                    stdin.extend_from_slice(e);
                    stdin.push(0);
                }
            }
            let started = Instant::now();
            let mut timed_out = false;
            let mut r = command::run_user_program(&program, &args, &stdin, &setup, |wait| {
                tick(wait);
                timed_out = limit.is_some_and(|l| started.elapsed() >= l);
                timed_out || control.must_stop()
            });
            if timed_out {
                r.error = format!(
                    "still running after {} s (the target's timeout): killed",
                    self.target.timeout
                );
            }
            if r.outcome != Outcome::Success {
                if !*each {
                    // Chunks already run succeeded; this one and the rest are owed.
                    return (r, Some(keys[range.start..].to_vec()));
                }
                tracing::debug!(target = %self.target.name, root, path = %keys[range.start], error = %r.error, "hook failed for a path");
                failed.extend_from_slice(&keys[range]);
                first_failure.get_or_insert(r);
            }
        }
        match first_failure {
            Some(mut r) => {
                if failed.len() > 1 {
                    r.error = format!("{} (and {} more paths failed)", r.error, failed.len() - 1);
                }
                (r, Some(failed))
            }
            None => (
                RunResult {
                    outcome: Outcome::Success,
                    error: String::new(),
                },
                None,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hook globs matched one directory level only, and an excluded
    /// directory's content went through.
    #[test]
    fn hook_globs_read_like_rsync_globs() {
        let g = GlobPair::new(&["*.html".into(), "/cache/".into(), "docs/*.md".into()]);
        assert!(g.matches(&"index.html".into()));
        assert!(g.matches(&"sub/deep/a.html".into()));
        assert!(g.matches(&"cache".into()));
        assert!(
            !g.matches(&"x/cache".into()),
            "a leading / anchors at the root"
        );
        assert!(g.matches(&"docs/a.md".into()));
        assert!(!g.matches(&"docs/sub/a.md".into()));
        assert!(!g.matches(&"a.htm".into()));
    }
}
