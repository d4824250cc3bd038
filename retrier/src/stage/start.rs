//! The journal at start: opened (a moment's wait for `syncbus fail-log`, an unreadable
//! one moved aside), the journal id checked, the jobs taken in.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use protocol::stage::StageError;
use protocol::wire::Work;

use super::{Job, Retrier};
use crate::journal::{self, Journal, Record};

/// The file in the state dir that remembers which journal work is owed in.
const JOURNAL_ID_FILE: &str = "journal.id";

/// Opens the journal of `dir`. `Some(why)` beside it when work may have been lost: the
/// journal was missing, empty, replaced by another (its id is not the one the state dir
/// remembers) or unreadable (moved aside as `journal.redb.broken-<time>`, and a new one
/// made). Then only whole-root compares of every root to every target can make up for
/// it.
pub(super) fn open_journal(dir: &Path) -> Result<(Journal, Option<String>), StageError> {
    let path = dir.join("journal.redb");
    let id_path = dir.join(JOURNAL_ID_FILE);
    let remembered: Option<u64> = std::fs::read_to_string(&id_path)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    // `syncbus fail-log` may hold the journal for a moment: wait a little before
    // calling it a second instance.
    let give_up = Instant::now() + Duration::from_secs(5);
    let mut lost = None;
    let journal = loop {
        match Journal::open(&path) {
            Ok(j) => break j,
            Err(e @ journal::JournalError::Open { .. }) if Instant::now() >= give_up => {
                return Err(StageError::Unavailable(e.to_string()))
            }
            Err(journal::JournalError::Open { .. }) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e @ journal::JournalError::Broken { .. }) => {
                let aside = dir.join(format!(
                    "journal.redb.broken-{}",
                    protocol::now_us() / 1_000_000
                ));
                std::fs::rename(&path, &aside).map_err(|r| {
                    StageError::Environment(format!(
                        "{e}; it cannot be moved aside either ({r}): move or remove `{}` by hand",
                        path.display()
                    ))
                })?;
                tracing::error!(error = %e, moved_to = %aside.display(), "the journal cannot be read; moved aside, starting a new one");
                lost = Some(format!("unreadable, moved to {}", aside.display()));
            }
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(old) = remembered.filter(|old| *old != journal.id()) {
        lost.get_or_insert_with(|| {
            format!(
                "missing, emptied or replaced (it was journal {old:x}, this one is {:x})",
                journal.id()
            )
        });
    }
    if remembered != Some(journal.id()) {
        write_synced(&id_path, format!("{}\n", journal.id()).as_bytes()).map_err(|e| {
            StageError::Environment(format!("cannot write `{}`: {e}", id_path.display()))
        })?;
    }
    Ok((journal, lost))
}

/// Writes `path` whole and durably (a temp file, fsync, rename).
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Retrier<'_> {
    pub(super) fn owed_to(&self, root: &str, target: &str) -> String {
        self.config.owed_to(root, target).unwrap_or_default()
    }

    /// Takes in the journal. Work owed to another identity (the root's path or the
    /// target's place changed under the same names, or a journal from before identities
    /// were recorded) is not replayed: it is dropped, and replaced by a whole-root
    /// compare of that root to that target, since the tree is the truth.
    pub(super) fn load(&mut self) -> Result<(), StageError> {
        let all = self.journal.load()?;
        let mut per_target: BTreeMap<String, usize> = BTreeMap::new();
        let mut dropped = Vec::new();
        let mut compares: Vec<Record> = Vec::new();
        for (id, rec) in all {
            if !self.targets.contains_key(&rec.target) {
                tracing::warn!(job_id = id, target = %rec.target, "journal job for a target no longer configured; kept, not sent");
            } else if let Some(now) = self.config.owed_to(&rec.root, &rec.target) {
                if rec.owed_to != now {
                    tracing::warn!(
                        job_id = id,
                        target = %rec.target,
                        root = %rec.root,
                        owed_to = %rec.owed_to,
                        now = %now,
                        "journalled work was owed to another root path or target place; dropped, comparing the root in full instead"
                    );
                    dropped.push(id);
                    if !compares
                        .iter()
                        .any(|c| c.root == rec.root && c.target == rec.target)
                    {
                        compares.push(Record {
                            target: rec.target.clone(),
                            root: rec.root.clone(),
                            work: Work {
                                resyncs: [protocol::PathBytes::root()].into(),
                                ..Default::default()
                            },
                            attempt: 0,
                            since_us: protocol::now_us(),
                            error: String::new(),
                            owed_to: now,
                        });
                    }
                    continue;
                }
            }
            *per_target.entry(rec.target.clone()).or_default() += 1;
            self.jobs.insert(id, Job::of(&rec));
        }
        if !dropped.is_empty() {
            let ids = self.journal.replace(&dropped, &compares)?;
            for (id, rec) in ids.into_iter().zip(&compares) {
                *per_target.entry(rec.target.clone()).or_default() += 1;
                self.jobs.insert(id, Job::of(rec));
            }
        }
        for (target, jobs) in per_target {
            tracing::info!(target = %target, jobs, "resuming pending jobs from the journal");
        }
        Ok(())
    }

    /// The journal was lost (`why`): what it owed is unknown, so every root is compared
    /// in full with every target bound to it, through the journal like any other work.
    pub(super) fn compare_everything(&mut self, why: &str) -> Result<(), StageError> {
        let recs: Vec<Record> = self
            .config
            .targets
            .iter()
            .flat_map(|t| t.roots.iter().map(move |r| (t, r)))
            .map(|(t, r)| Record {
                target: t.name.clone(),
                root: r.clone(),
                work: Work {
                    resyncs: [protocol::PathBytes::root()].into(),
                    ..Default::default()
                },
                attempt: 0,
                since_us: protocol::now_us(),
                error: String::new(),
                owed_to: self.owed_to(r, &t.name),
            })
            .collect();
        tracing::warn!(
            why,
            compares = recs.len(),
            "the journal was lost: comparing every root with every target in full"
        );
        let ids = self.journal.replace(&[], &recs)?;
        for (id, rec) in ids.into_iter().zip(&recs) {
            self.jobs.insert(id, Job::of(rec));
        }
        self.fail_log_dirty = true;
        Ok(())
    }
}
