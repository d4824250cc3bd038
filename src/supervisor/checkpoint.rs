//! The checkpoint, which lets the next start compare only what changed since: written
//! at a clean stop, and every few seconds while running (so a crash costs a catch-up
//! too); and the two-way manifests kept beside it.

use super::*;

/// The file in the state dir that holds the last clean stop's checkpoint.
const CHECKPOINT_FILE: &str = "checkpoint.toml";
/// The checkpoint's `kind` when it was kept while running (a clean stop's says `stop`).
const RUNNING: &str = "running";
/// Taken off a checkpoint. The kernel stamps ctimes with a coarse clock, and stamps a
/// write's ctime when the `write()` begins but reports it when the call returns: a
/// single call slowed down (one huge buffer, dirty-page throttling on a slow disk) can
/// be reported seconds after its ctime, after the watcher vouched for that time. What
/// changed in this margin before the checkpoint is sent again, a small price.
const CHECKPOINT_MARGIN_US: u64 = 30_000_000;

/// Reads and removes the checkpoint of the last clean stop (so a crash after this start
/// can never reuse it). Usable only if the roots and targets are the ones it was taken
/// with: a new target has never seen a full compare.
///
/// The two-way manifests beside it are kept for the dispatcher's catch-up only when the
/// checkpoint is used: a manifest of another stop would delete on the peer what was
/// never deleted here.
pub(super) fn take_checkpoint(config: &Config, now: &toml::Table) -> Option<u64> {
    let _ = std::fs::remove_file(config.runtime_dir.join(watcher::STOPPED_FILE));
    clear_manifests(&config.runtime_dir);
    let taken = take_checkpoint_file(config, now);
    if taken.is_none() {
        clear_manifests(&config.retry.state_dir);
    }
    taken
}

fn take_checkpoint_file(config: &Config, now: &toml::Table) -> Option<u64> {
    let path = config.retry.state_dir.join(CHECKPOINT_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove the checkpoint; comparing in full");
        return None;
    }
    // The checkpoint vouches only for what was read before the stop; what was owed then
    // is in the journal. Without one (removed, emptied) the owed work is unknown.
    let journal = config.retry.state_dir.join("journal.redb");
    if std::fs::metadata(&journal).map_or(true, |m| m.len() == 0) {
        tracing::warn!(journal = %journal.display(), "the journal is missing or empty: comparing in full");
        return None;
    }
    let saved: toml::Table = toml::from_str(&text).ok()?;
    let same = ["root", "target"]
        .iter()
        .all(|k| saved.get(*k) == now.get(*k));
    let since = saved.get("since_us")?.as_integer()?;
    if since.max(0) as u64 > protocol::now_us() {
        // The clock went back: ctimes cannot be compared with it.
        tracing::info!("the clock is behind the last stop: comparing in full");
        return None;
    }
    let at_stop = Clocks {
        boot_id: saved.get("boot_id")?.as_str()?.to_string(),
        boottime_us: saved.get("boottime_us")?.as_integer()?.max(0) as u64,
        realtime_us: saved.get("realtime_us")?.as_integer()?.max(0) as u64,
    };
    if let Err(why) = at_stop.still_trusted(&Clocks::now()) {
        tracing::warn!(
            "{why} since the checkpoint: file times cannot be compared with it; comparing in full"
        );
        return None;
    }
    if !same {
        tracing::info!("roots or targets changed since the checkpoint: comparing in full");
        return None;
    }
    match saved.get("kind").and_then(|k| k.as_str()) {
        Some(RUNNING) => tracing::warn!(
            since_us = since,
            "the last run did not stop cleanly: catching up from the checkpoint it kept while running"
        ),
        _ => tracing::info!(since_us = since, "the last run stopped cleanly: catching up from its stop"),
    }
    Some((since.max(0) as u64).saturating_sub(CHECKPOINT_MARGIN_US))
}

/// Removes every two-way manifest (`protocol::manifest`) from `dir`.
pub(super) fn clear_manifests(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if protocol::manifest::is_manifest_name(e.file_name().as_bytes()) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a two-way manifest");
            }
        }
    }
}

/// Moves the manifests the watcher wrote at its stop from the runtime dir into the state
/// dir (another file system, maybe: copied, synced, then removed), replacing those of
/// the last stop. One that cannot be moved is left out: without it the next start brings
/// what is missing here back from the peer rather than deleting it there.
fn keep_manifests(runtime_dir: &Path, state_dir: &Path) {
    clear_manifests(state_dir);
    let Ok(entries) = std::fs::read_dir(runtime_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !protocol::manifest::is_manifest_name(name.as_bytes()) {
            continue;
        }
        let dest = state_dir.join(&name);
        let tmp = state_dir.join(format!("{}.tmp", name.to_string_lossy()));
        let moved = std::fs::copy(e.path(), &tmp)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &dest));
        if let Err(err) = moved {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&dest);
            tracing::warn!(path = %e.path().display(), error = %err, "cannot keep the two-way manifest; the next start brings what is missing here back from the peer");
        }
        let _ = std::fs::remove_file(e.path());
    }
}

/// The clocks at one moment: enough to tell later whether the wall clock, which stamps
/// ctimes, may have gone back since (a checkpoint's time is then ahead of changes made
/// after it, and a catch-up would miss them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Clocks {
    /// `/proc/sys/kernel/random/boot_id`: the boot clock means nothing across boots.
    boot_id: String,
    /// CLOCK_BOOTTIME: monotonic, counts suspend too.
    boottime_us: u64,
    /// CLOCK_REALTIME: what ctimes are stamped with.
    realtime_us: u64,
}

impl Clocks {
    fn now() -> Clocks {
        let read = |clock| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes one timespec we own.
            unsafe { libc::clock_gettime(clock, &mut ts) };
            ts.tv_sec.max(0) as u64 * 1_000_000 + ts.tv_nsec.max(0) as u64 / 1_000
        };
        Clocks {
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            boottime_us: read(libc::CLOCK_BOOTTIME),
            realtime_us: read(libc::CLOCK_REALTIME),
        }
    }

    /// `Err(why)` unless the wall clock provably never went back between `self` and
    /// `now`: the same boot, and the wall clock advanced as much as the boot clock, less
    /// what NTP may slew (500 ppm) and half a second.
    fn still_trusted(&self, now: &Clocks) -> Result<(), &'static str> {
        if self.boot_id.is_empty() || self.boot_id != now.boot_id {
            return Err("the machine restarted");
        }
        let elapsed = now.boottime_us.saturating_sub(self.boottime_us);
        let slack = 500_000 + elapsed / 2_000;
        if now.realtime_us + slack < self.realtime_us + elapsed {
            return Err("the wall clock was set back");
        }
        Ok(())
    }
}

/// How often, at most, the crash checkpoint is written (each write is an fsync).
const CRASH_CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// The checkpoint kept while running, for a start after a crash (kill -9, an OOM
/// kill): the dispatcher's say that every change before a time is on its targets or
/// in the journal (`TargetStatus::safe_us`, built from the filter's and the watcher's).
pub(super) struct CrashCheckpoint {
    /// `Err(why)` when this config gets none: a crash costs a full compare.
    allowed: Result<(), &'static str>,
    /// The time of the last one written.
    written_us: u64,
    next_at: Instant,
    /// The clocks when it began: a wall clock set back since makes changes older
    /// than times already vouched for.
    began: Clocks,
}

impl CrashCheckpoint {
    pub(super) fn new(config: &Config) -> CrashCheckpoint {
        let allowed =
            if config.roots.iter().any(|r| r.two_way) || config.targets.iter().any(|t| t.two_way) {
                // Its catch-up needs the manifest of the moment, which only a stop writes.
                Err("two-way roots")
            } else if config.targets.iter().any(|t| !t.follows().is_empty()) {
                // A hook follows deliveries, which a crash loses on the way.
                Err("after-sync hooks")
            } else if config.roots.iter().any(|r| !r.events.modify) {
                // A write then travels only with its close, which may come any time
                // after its ctime: the watcher vouches for times whose writes it has
                // not passed on.
                Err("`modify = false` roots")
            } else {
                Ok(())
            };
        if let Err(why) = allowed {
            tracing::info!(
                "no crash checkpoint with {why}: a start after a crash compares in full"
            );
        }
        CrashCheckpoint {
            allowed,
            written_us: 0,
            next_at: Instant::now(),
            began: Clocks::now(),
        }
    }
}

impl Supervisor {
    /// While running: records the dispatcher's say as the checkpoint a start after a
    /// crash catches up from, when it moved on. Only the running dispatcher's (its pid
    /// in the file, every target of the config in it) counts: an earlier one's speaks
    /// for other roots and targets, maybe.
    pub(super) fn record_crash_checkpoint(&mut self) {
        let now = Instant::now();
        if self.crash.allowed.is_err() || now < self.crash.next_at {
            return;
        }
        self.crash.next_at = now + CRASH_CHECKPOINT_EVERY;
        if let Err(why) = self.crash.began.still_trusted(&Clocks::now()) {
            // Changes made since carry ctimes before times already vouched for: the
            // checkpoint written before would skip them.
            tracing::warn!("{why} while running: no crash checkpoint for the rest of this run; a start after a crash compares in full");
            let _ = std::fs::remove_file(self.state_dir.join(CHECKPOINT_FILE));
            self.crash.allowed = Err("the clock set back");
            return;
        }
        let Some(pid) = self
            .stages
            .iter()
            .find(|s| s.name == "dispatcher")
            .and_then(|s| s.child.as_ref())
            .map(|c| c.id())
        else {
            return;
        };
        let Ok(files) = status::read_all(&status::dir(&self.runtime_dir)) else {
            return;
        };
        let Some(said) = files.get("dispatcher").filter(|s| s.pid == pid) else {
            return;
        };
        let safe = self
            .config
            .targets
            .iter()
            .map(|t| said.targets.get(&t.name).map_or(0, |s| s.safe_us))
            .min()
            .unwrap_or(0);
        if safe == 0 || safe <= self.crash.written_us || safe > protocol::now_us() {
            return;
        }
        if self.store_checkpoint(safe, RUNNING) {
            self.crash.written_us = safe;
            tracing::debug!(since_us = safe, "crash checkpoint recorded");
        }
    }

    /// After a clean stop: every change read by the watcher up to its stop time is on a
    /// target or in the journal. Records that time with the roots and targets it holds
    /// for, so the next start can compare only what changed since.
    pub(super) fn write_checkpoint(&self) {
        let stopped = self.runtime_dir.join(watcher::STOPPED_FILE);
        let Some(since) = std::fs::read_to_string(&stopped)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
        else {
            return;
        };
        let _ = std::fs::remove_file(&stopped);
        // Before the checkpoint that vouches for them (a crash in between leaves new
        // manifests without a checkpoint, which the next start removes).
        keep_manifests(&self.runtime_dir, &self.state_dir);
        if self.store_checkpoint(since, "stop") {
            tracing::info!(
                since_us = since,
                "clean stop: the next start compares only what changed since"
            );
        }
    }

    /// Writes the checkpoint file (synced, then renamed into place): `since`, what kind
    /// of checkpoint it is, the clocks of now and the `root` and `target` sections the
    /// stages ran with.
    fn store_checkpoint(&self, since: u64, kind: &str) -> bool {
        let mut table = toml::Table::new();
        table.insert("since_us".into(), toml::Value::Integer(since as i64));
        table.insert("kind".into(), kind.into());
        let clocks = Clocks::now();
        table.insert("boot_id".into(), clocks.boot_id.into());
        table.insert(
            "boottime_us".into(),
            toml::Value::Integer(clocks.boottime_us as i64),
        );
        table.insert(
            "realtime_us".into(),
            toml::Value::Integer(clocks.realtime_us as i64),
        );
        // The sections the stages ran with, not the file as it is now: an edit not yet
        // applied (no SIGHUP) must make the next start compare in full.
        for (k, v) in &self.loaded {
            if k == "root" || k == "target" {
                table.insert(k.clone(), v.clone());
            }
        }
        let Ok(text) = toml::to_string(&table) else {
            return false;
        };
        let path = self.state_dir.join(CHECKPOINT_FILE);
        let tmp = self.state_dir.join("checkpoint.toml.tmp");
        let written = std::fs::create_dir_all(&self.state_dir)
            .and_then(|_| {
                let mut f = std::fs::File::create(&tmp)?;
                use std::io::Write;
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|_| std::fs::rename(&tmp, &path))
            .and_then(|_| std::fs::File::open(&self.state_dir)?.sync_all());
        if let Err(e) = &written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the checkpoint; the next start compares in full");
        }
        written.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(boot_id: &str, boottime_s: u64, realtime_s: u64) -> Clocks {
        Clocks {
            boot_id: boot_id.into(),
            boottime_us: boottime_s * 1_000_000,
            realtime_us: realtime_s * 1_000_000,
        }
    }

    #[test]
    fn a_checkpoint_is_trusted_only_while_the_wall_clock_never_went_back() {
        let stop = at("b1", 100, 1_000_000);
        // An hour later, both clocks moved alike.
        assert_eq!(stop.still_trusted(&at("b1", 3_700, 1_003_600)), Ok(()));
        // The wall clock set forward meanwhile: changes still have later ctimes.
        assert_eq!(stop.still_trusted(&at("b1", 3_700, 1_009_000)), Ok(()));
        // Set back by 10 s within the hour (the clock was fast at the stop).
        assert!(stop.still_trusted(&at("b1", 3_700, 1_003_590)).is_err());
        // NTP's slew over a day (500 ppm, ~43 s) is not a step.
        assert_eq!(
            stop.still_trusted(&at("b1", 86_500, 1_086_400 - 40)),
            Ok(())
        );
        // Another boot, or no boot id: the boot clock says nothing.
        assert!(stop.still_trusted(&at("b2", 3_700, 1_003_600)).is_err());
        assert!(at("", 100, 1_000_000)
            .still_trusted(&at("", 3_700, 1_003_600))
            .is_err());
    }
}
