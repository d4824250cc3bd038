//! rsync targets: the runs of each kind (incremental batch, subtree and whole-root
//! resync, catch-up listing, deletes) and what one run's output says (bytes sent).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocol::PathBytes;

use crate::command::{self, RunResult};
use crate::plan;
use ::rsync::{Mode, Outcome, Output, Run};
use protocol::work::Touch;

use super::*;

/// The byte count of rsync's summary line `sent 1,234 bytes  received …` (digit
/// grouping as rsync prints it; `None` for any other line).
pub(super) fn sent_bytes(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"sent ")?;
    let end = rest.iter().position(|&b| b == b' ')?;
    if !rest[end..].starts_with(b" bytes") {
        return None;
    }
    let digits: Vec<u8> = rest[..end]
        .iter()
        .copied()
        .filter(|b| !matches!(b, b',' | b'.' | b'\''))
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// A catch-up that finds more than one entry in this many changed compares the whole
/// root instead. Measured on 100,000 small files over loopback (BENCHMARKS.md): the
/// full compare took 0.5 s, the catch-up 0.2 s for its walk plus about 50 µs per
/// changed file, so they meet near one file in 16. Below `CATCH_UP_MIN` changed
/// entries either is quick: the catch-up stays, and leaves the rest alone.
const CATCH_UP_SHARE: u64 = 16;
const CATCH_UP_MIN: u64 = 1000;

impl Runner {
    /// Compares `subtrees` of `root` in full (`--delete`), leaving out `extra` globs
    /// too. Regex-excluded paths that went over in a race are deleted again.
    pub(super) fn resync(
        &self,
        root: &str,
        info: &RootInfo,
        subtrees: &[PathBytes],
        extra: &[String],
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
        if self.is_hook() {
            let entries = subtrees
                .iter()
                .flat_map(|s| command_entries(info, s))
                .collect();
            return self.run_hook(root, info, entries, tick);
        }
        let src = &info.path;
        let dest = self.target.destination(root);
        let subtrees = plan::resync_subtrees(src, subtrees);
        let excluded = plan::regex_excluded(&info.rules, src, &subtrees);
        let mut excludes = ::rsync::exclude_rules(&info.rules, &excluded);
        for g in extra {
            excludes.extend_from_slice(b"- ");
            excludes.extend_from_slice(g.as_bytes());
            excludes.push(0);
        }
        let rules = ::rsync::resync_rules(&excludes, &subtrees);
        let result = self.rsync(Mode::Resync, &rules, src, &dest, b"", tick, None);
        if result.outcome != Outcome::Success {
            return result;
        }
        if self.target.two_way && subtrees.iter().any(|s| s.is_root()) {
            // A two-way compare never deletes: what the peer holds and this side does
            // not (a file deleted here while syncbus was stopped and not proven so by
            // the manifest, or one the peer made) comes here, where the peer's is newer
            // or missing, so both sides agree once it is done.
            let pulled = self.pull_all(root, &rules, src, &dest, tick);
            if pulled.outcome != Outcome::Success {
                return pulled;
            }
        }
        // A regex-excluded path created between the walk and the run went over:
        // take it off the target again.
        let late: Vec<PathBytes> = plan::regex_excluded(&info.rules, src, &subtrees)
            .difference(&excluded)
            .cloned()
            .collect();
        if !late.is_empty() {
            return self.delete_on_target(&late, &dest, tick);
        }
        result
    }

    /// Whether the whole-root compare of `root` would delete on the target, and how
    /// many entries (a dry run of it, its itemized `*deleting` lines counted: rsync
    /// reports deletes a daemon makes this way reliably, unlike the warning of
    /// `--max-delete`).
    pub(super) fn would_delete(
        &self,
        root: &str,
        info: &RootInfo,
        extra: &[String],
        tick: &mut dyn FnMut(Duration),
    ) -> Result<usize, RunResult> {
        let src = &info.path;
        let dest = self.target.destination(root);
        let whole = [PathBytes::root()];
        let excluded = plan::regex_excluded(&info.rules, src, &whole);
        let mut excludes = ::rsync::exclude_rules(&info.rules, &excluded);
        for g in extra {
            excludes.extend_from_slice(b"- ");
            excludes.extend_from_slice(g.as_bytes());
            excludes.push(0);
        }
        let rules = ::rsync::resync_rules(&excludes, &whole);
        self.set_guard_args(&["--dry-run"]);
        let mut itemized = Vec::new();
        let r = self.rsync(
            Mode::Resync,
            &rules,
            src,
            &dest,
            b"",
            tick,
            Some(&mut itemized),
        );
        self.set_guard_args(&[]);
        if r.outcome != Outcome::Success {
            return Err(r);
        }
        Ok(itemized
            .split(|&b| b == b'\n')
            .filter(|l| l.starts_with(b"*deleting"))
            .count())
    }

    /// A whole-root compare that deletes nothing (`--max-delete=0`); rsync's exit
    /// 25 (deletes skipped) is success here: the caller already knows what was kept.
    pub(super) fn resync_without_deletes(
        &self,
        root: &str,
        info: &RootInfo,
        extra: &[String],
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
        self.set_guard_args(&["--max-delete=0"]);
        let mut r = self.resync(root, info, &[PathBytes::root()], extra, tick);
        self.set_guard_args(&[]);
        if r.outcome == Outcome::Fatal && r.error.contains("max-delete") {
            r = RunResult {
                outcome: Outcome::Success,
                error: String::new(),
            };
        }
        r
    }

    /// Brings the target up to what changed since `since_us` (see [`crate::catchup`]):
    /// a listing run for changed directories, the changed files, then a subtree
    /// resync of each directory the listing run found new or different on the target.
    /// On failure, `.1` tells whether the listing run already changed the target: then
    /// a retry must compare in full (a child directory it created would now look the
    /// same on both sides and never be followed up).
    pub(super) fn catch_up(
        &self,
        root: &str,
        info: &RootInfo,
        since_us: u64,
        tick: &mut dyn FnMut(Duration),
    ) -> (RunResult, bool) {
        if self.is_hook() {
            // A program cannot be asked what it missed: it gets the whole root.
            return (
                self.resync(root, info, &[PathBytes::root()], &[], tick),
                false,
            );
        }
        if self.target.two_way {
            return self.two_way_catch_up(root, info, tick);
        }
        let src = &info.path;
        let scan = match crate::catchup::scan(src, &info.rules, since_us) {
            Ok(s) => s,
            Err(e) => {
                let r = RunResult {
                    outcome: Outcome::Retry,
                    error: format!("cannot scan `{}` for the catch-up: {e}", src.display()),
                };
                return (r, false);
            }
        };
        let changed = (scan.files.len() + scan.dirs.len()) as u64;
        if changed > CATCH_UP_MIN && changed > scan.seen / CATCH_UP_SHARE {
            // Most of the tree changed (a deploy just before the stop, or within the
            // checkpoint's margin): each changed file would be read whole on both
            // sides (`--ignore-times`), where a full compare skips what matches.
            tracing::info!(target = %self.target.name, root = %root, changed, entries = scan.seen, "catch-up found much of the tree changed; comparing in full instead");
            return (
                self.resync(root, info, &[PathBytes::root()], &[], tick),
                true,
            );
        }
        // A changed directory inside a changed directory may have been renamed over
        // another one (a deploy swap): its children could match by name and time and
        // still differ, so it is compared in full.
        let mut follow_ups: Vec<PathBytes> = scan
            .dirs
            .iter()
            .filter(|d| d.parent().is_some_and(|p| scan.dirs.contains(&p)))
            .cloned()
            .collect();
        if !scan.dirs.is_empty() {
            let excludes = ::rsync::exclude_rules(&info.rules, &Default::default());
            let rules = crate::catchup::listing_rules(&excludes, &scan);
            let dest = self.target.destination(root);
            let mut itemized = Vec::new();
            let list = crate::catchup::listing_entries(&scan);
            let r = self.rsync(
                Mode::Listing,
                &rules,
                src,
                &dest,
                &list,
                tick,
                Some(&mut itemized),
            );
            if r.outcome != Outcome::Success {
                return (r, !itemized.is_empty());
            }
            follow_ups.extend(crate::catchup::follow_ups(&itemized, &scan));
        }
        if !scan.files.is_empty() {
            let r = self.incremental(root, info, &scan.files, tick);
            if r.outcome != Outcome::Success {
                return (r, true);
            }
        }
        follow_ups.extend(scan.mounts.iter().cloned());
        if !follow_ups.is_empty() {
            let r = self.resync(root, info, &follow_ups, &[], tick);
            if r.outcome != Outcome::Success {
                return (r, true);
            }
        }
        tracing::info!(
            target = %self.target.name,
            root = %root,
            entries = scan.seen,
            changed_files = scan.files.len(),
            changed_dirs = scan.dirs.len(),
            subtree_resyncs = follow_ups.len(),
            "catch-up compared what changed since the checkpoint"
        );
        let ok = RunResult {
            outcome: Outcome::Success,
            error: String::new(),
        };
        (ok, true)
    }

    pub(super) fn incremental(
        &self,
        root: &str,
        info: &RootInfo,
        paths: &BTreeMap<PathBytes, Touch>,
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
        if self.is_hook() {
            return self.hook_paths(root, info, paths, tick).0;
        }
        let entries = plan::incremental_entries(&info.path, paths);
        // Nothing is sent whole here (new directories are subtree resyncs), so the
        // globs are all the rules an incremental run needs.
        let rules = ::rsync::exclude_rules(&info.rules, &Default::default());
        let list = plan::files_from(entries.keys());
        let dest = self.target.destination(root);
        let pushed = self.rsync(
            Mode::Incremental,
            &rules,
            &info.path,
            &dest,
            &list,
            tick,
            None,
        );
        if !self.target.two_way || pushed.outcome != Outcome::Success {
            return pushed;
        }
        // `--update` kept the peer's copy of a file dated older here than there (a
        // rename or a restore of an old file): newest wins here too, so fetch it.
        let old = old_dated(&info.path, paths);
        if tracing::enabled!(tracing::Level::TRACE) {
            for (p, t) in paths {
                tracing::trace!(target = %self.target.name, root, path = %p, since_us = t.since_us, old_dated = old.contains_key(p), "fetch-back check");
            }
        }
        if old.is_empty() {
            return pushed;
        }
        tracing::debug!(target = %self.target.name, root, files = old.len(), "fetching what may be newer on the peer");
        let list = plan::files_from(old.keys());
        self.rsync(Mode::Pull, &rules, &info.path, &dest, &list, tick, None)
    }

    /// One rsync run. With `capture`, its itemized output (`%i %n` lines) lands there.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rsync(
        &self,
        mode: Mode,
        rules: &[u8],
        src: &Path,
        dest: &str,
        stdin: &[u8],
        tick: &mut dyn FnMut(Duration),
        capture: Option<&mut Vec<u8>>,
    ) -> RunResult {
        let rules_file = if rules.is_empty() {
            None
        } else {
            match self.write_rules(rules) {
                Ok(p) => Some(p),
                Err(e) => {
                    return RunResult {
                        outcome: Outcome::Retry,
                        error: format!("cannot write rules file: {e}"),
                    }
                }
            }
        };
        let guard = self
            .guard_args
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        let dry_run = guard.contains(&"--dry-run");
        let keep = capture.is_some();
        let count = !keep && self.progress.is_some() && mode == Mode::Resync;
        let output = match (keep, &mode) {
            (true, Mode::PullList) => Output::ItemizedSized,
            (true, _) => Output::Itemized,
            (false, _) if count => Output::Names,
            (false, _) => Output::Summary,
        };
        let run = Run {
            mode: &mode,
            rules_file: rules_file.as_deref(),
            root: src,
            dest,
            output,
            guard: &guard,
        };
        let args = match ::rsync::build_args(&self.target, &run, self.control.ssh_dir.as_deref()) {
            Ok(a) => a,
            Err(e) => {
                return RunResult {
                    outcome: Outcome::Retry,
                    error: e.to_string(),
                }
            }
        };
        #[derive(Default)]
        struct Out {
            partial: Vec<u8>,
            kept: Vec<u8>,
            sent: u64,
        }
        let out: std::sync::Mutex<Out> = Default::default();
        let sink = |chunk: &[u8]| {
            let Ok(mut o) = out.lock() else { return };
            o.partial.extend_from_slice(chunk);
            while let Some(end) = o.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = o.partial.drain(..=end).collect();
                let line = &line[..end];
                if let Some(n) = sent_bytes(line) {
                    o.sent = n;
                } else if line.is_empty() || line.starts_with(b"total size is ") {
                } else if keep {
                    o.kept.extend_from_slice(line);
                    o.kept.push(b'\n');
                } else if let (true, Some(p)) = (count, &self.progress) {
                    p.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let control = self.control.clone();
        let idle = (self.target.timeout > 0).then(|| Duration::from_secs(self.target.timeout));
        let result = command::run(
            &::rsync::rsync_program(),
            &args,
            stdin,
            idle,
            Some(&sink),
            &|_| {},
            |wait| {
                tick(wait);
                control.must_stop()
            },
        );
        let out = out.into_inner().unwrap_or_default();
        let mut result = result;
        if self.target.two_way {
            result.outcome = ::rsync::classify_two_way(result.outcome, &result.error);
        }
        if !dry_run {
            self.count_run(&result, out.sent);
        }
        if let Some(c) = capture {
            *c = out.kept;
        }
        result
    }

    /// Deletes `paths` (root-relative) on the target, whatever the source holds.
    pub(super) fn delete_on_target(
        &self,
        paths: &[PathBytes],
        dest: &str,
        tick: &mut dyn FnMut(Duration),
    ) -> RunResult {
        let scratch = tempfile::tempdir_in(self.tmp.path()).and_then(|d| {
            for p in paths {
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent.under(d.path()))?;
                }
            }
            Ok(d)
        });
        let scratch = match scratch {
            Ok(d) => d,
            Err(e) => {
                return RunResult {
                    outcome: Outcome::Retry,
                    error: format!("cannot prepare the scratch source for deletes: {e}"),
                }
            }
        };
        let entries: BTreeMap<PathBytes, Touch> = paths
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    Touch {
                        deleted: true,
                        since_us: 0,
                    },
                )
            })
            .collect();
        tracing::debug!(target = %self.target.name, paths = paths.len(), "deleting regex-excluded paths that raced a resync");
        self.rsync(
            Mode::DeleteOnly,
            b"",
            scratch.path(),
            dest,
            &plan::files_from(entries.keys()),
            tick,
            None,
        )
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests spawn the programs they check
mod tests {
    use super::*;

    #[test]
    fn rsyncs_summary_gives_the_bytes_sent() {
        let cases: [(&[u8], Option<u64>); 6] = [
            (
                b"sent 100,134 bytes  received 35 bytes  200,338.00 bytes/sec",
                Some(100_134),
            ),
            (
                b"sent 67 bytes  received 12 bytes  158.00 bytes/sec",
                Some(67),
            ),
            (b"sent 1.234.567 bytes  received 1 bytes", Some(1_234_567)),
            (b"total size is 100,000  speedup is 1.00", None),
            (b">f+++++++++ sent 5 bytes", None),
            (b"sent 3.00M bytes  received 1 bytes", None),
        ];
        for (line, want) in cases {
            assert_eq!(sent_bytes(line), want, "{}", String::from_utf8_lossy(line));
        }
    }

    /// A catch-up of `src` into the local directory `dst` since `since`.
    fn catch_up_locally(work: &Path, src: &Path, dst: &Path, since: u64) -> RunResult {
        let text = format!(
            "[[root]]\nname = \"r\"\npath = {:?}\n[[target]]\nname = \"t\"\nurl = {:?}\n",
            src.display().to_string(),
            dst.display().to_string(),
        );
        let config = protocol::config::Config::parse(&text, &work.join("c.toml")).unwrap();
        let runner = Runner::new(
            config.targets[0].clone(),
            work,
            "test",
            Arc::new(Control::default()),
        )
        .unwrap();
        let info = RootInfo {
            path: config.roots[0].path.clone(),
            rules: config.roots[0].rules.clone(),
            allow_wipe: false,
            manifest: work.join("no-manifest"),
        };
        runner
            .catch_up("r", &info, since, &mut |w| std::thread::sleep(w))
            .0
    }

    fn ctime_us(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(p).unwrap();
        m.ctime() as u64 * 1_000_000 + m.ctime_nsec() as u64 / 1000
    }

    /// A checkpoint time later than `before`, by the ctime clock (the kernel's coarse
    /// one: a file in `dir` is written until its ctime moves past, never a fixed wait).
    fn ctime_after(dir: &Path, before: u64) -> u64 {
        let marker = dir.join("marker");
        loop {
            std::fs::write(&marker, "m").unwrap();
            let t = ctime_us(&marker);
            if t > before {
                return t;
            }
        }
    }

    /// Everything users do to a tree while syncbus is stopped reaches the target
    /// through the catch-up, and nothing it did not need to look at is compared (an
    /// extra file on the target in an untouched directory survives: no full compare).
    #[test]
    fn a_catch_up_brings_every_kind_of_change_since_the_checkpoint() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        let w = |rel: &str, text: &str| {
            let p = src.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        for (rel, text) in [
            ("a/f1", "one"),
            ("a/sub/deep/g", "g"),
            ("b/inner/keep", "b"),
            ("c/h", "h"),
            ("site/old/z", "old site"),
            ("site.new/x/y", "new site"),
            ("gone/inner/i", "i"),
            ("perm", "p"),
            ("swap/x/file", "v1"),
        ] {
            w(rel, text);
        }
        // A prepared copy whose child directory keeps the original's times (found in
        // review: swapped in while stopped, it matched the old one by name and time).
        let cp = std::process::Command::new("cp")
            .arg("-a")
            .arg(src.join("swap"))
            .arg(src.join("swap.new"))
            .status()
            .unwrap();
        assert!(cp.success());
        std::fs::write(src.join("swap.new/x/file"), "v2 prepared").unwrap();
        let copy = std::process::Command::new("rsync")
            .args(["-a", "--delete"])
            .arg(format!("{}/", src.display()))
            .arg(&dst)
            .status()
            .unwrap();
        assert!(copy.success());
        // Inside b/inner, so b's own attributes on the target stay those of the source (a
        // directory that differs on the target is compared in full, on purpose).
        std::fs::write(dst.join("b/inner/untouched-extra"), "only on the target").unwrap();
        // The checkpoint: a ctime later than every change above (ctime has the kernel's
        // coarse clock, so wait for it to move on rather than for a fixed time).
        let before = [
            "a",
            "a/sub",
            "b",
            "b/inner",
            "c",
            "site",
            "site.new",
            "gone",
            "perm",
            "swap",
            "swap.new",
            "swap.new/x",
            "swap.new/x/file",
            "",
        ]
        .iter()
        .map(|r| ctime_us(&src.join(r)))
        .max()
        .unwrap();
        let since = ctime_after(d.path(), before);
        w("a/f1", "changed");
        std::fs::remove_file(src.join("c/h")).unwrap();
        std::fs::rename(src.join("site"), src.join("site.old")).unwrap();
        std::fs::rename(src.join("site.new"), src.join("site")).unwrap();
        std::fs::rename(src.join("swap"), src.join("swap.old")).unwrap();
        std::fs::rename(src.join("swap.new"), src.join("swap")).unwrap();
        w("n/new", "new dir");
        std::fs::rename(src.join("a/sub"), src.join("a/moved")).unwrap();
        std::fs::remove_dir_all(src.join("gone")).unwrap();
        std::fs::set_permissions(src.join("perm"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("a", src.join("link")).unwrap();
        let odd = src
            .join("a")
            .join(std::ffi::OsStr::from_bytes(b"odd\nname\xff"));
        std::fs::create_dir(&odd).unwrap();
        std::fs::write(odd.join("f"), "odd").unwrap();

        let r = catch_up_locally(d.path(), &src, &dst, since);
        assert_eq!(r.outcome, Outcome::Success, "{}", r.error);
        let diff = testkit::tree_diff(&src, &dst);
        assert_eq!(
            diff,
            vec!["only in mirror: b/inner/untouched-extra".to_string()]
        );
    }

    /// A catch-up that finds most of a big tree changed compares it in full instead
    /// (cheaper than reading each changed file whole on both sides): an extra file on
    /// the target in a directory nothing touched is deleted, as only a full compare does.
    #[test]
    fn a_catch_up_that_finds_most_of_the_tree_changed_compares_it_in_full() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        std::fs::create_dir_all(src.join("keep")).unwrap();
        std::fs::create_dir_all(dst.join("keep")).unwrap();
        std::fs::write(dst.join("keep/extra"), "only on the target").unwrap();
        // The checkpoint: after `keep` last changed (the coarse ctime clock moved on).
        let before = ctime_us(&src.join("keep"));
        let since = ctime_after(d.path(), before);
        std::fs::create_dir_all(src.join("many")).unwrap();
        for i in 0..(CATCH_UP_MIN + 10) {
            std::fs::write(src.join(format!("many/f{i}")), "new").unwrap();
        }
        let r = catch_up_locally(d.path(), &src, &dst, since);
        assert_eq!(r.outcome, Outcome::Success, "{}", r.error);
        assert!(testkit::tree_diff(&src, &dst).is_empty());
    }

    /// A filesystem mounted while syncbus was stopped keeps its files' old ctimes: the
    /// catch-up compares it in full.
    #[test]
    fn a_catch_up_compares_a_filesystem_mounted_since_the_checkpoint_in_full() {
        use std::process::{Command, Stdio};
        let d = tempfile::tempdir().unwrap();
        let (src, dst, stage) = (
            d.path().join("src"),
            d.path().join("dst"),
            d.path().join("stage"),
        );
        for p in [src.join("m"), dst.join("m"), stage.clone()] {
            std::fs::create_dir_all(p).unwrap();
        }
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
            .arg(&stage)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (mount(2) needs root)");
            return;
        }
        let unmount = |p: &Path| {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        };
        std::fs::write(stage.join("old"), "written before the checkpoint").unwrap();
        let before = ctime_us(&stage.join("old"))
            .max(ctime_us(&src))
            .max(ctime_us(&src.join("m")));
        let since = ctime_after(d.path(), before);
        let moved = Command::new("mount")
            .arg("--move")
            .arg(&stage)
            .arg(src.join("m"))
            .status()
            .is_ok_and(|s| s.success());
        if !moved {
            unmount(&stage);
            eprintln!("skipped: cannot move a mount here");
            return;
        }
        let r = catch_up_locally(d.path(), &src, &dst, since);
        unmount(&src.join("m"));
        assert_eq!(r.outcome, Outcome::Success, "{}", r.error);
        assert_eq!(
            std::fs::read_to_string(dst.join("m/old")).unwrap(),
            "written before the checkpoint"
        );
    }
}
