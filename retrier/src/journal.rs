//! The journal: every job the retrier owes a target, on disk in one `redb` file. A
//! write returns only after its transaction is committed with `Durability::Immediate`
//! (fsync'd), so what the retrier acknowledges survives a crash of the process or the
//! machine.
//!
//! The record format is this crate's own (MessagePack with named fields, like the
//! wire); `FORMAT` changes only when a field changes meaning.

use std::path::{Path, PathBuf};

use protocol::wire::Work;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use thiserror::Error;

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";
/// A random number given to a journal when it is made: a journal found with another
/// one (or none) than the state dir remembers is not the one work was owed in.
const JOURNAL_ID: &str = "journal_id";

/// One unit of owed work: a target, a root, what to send, and its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub target: String,
    pub root: String,
    pub work: Work,
    /// Failed attempts so far (0 for a scheduled full sync not yet tried).
    pub attempt: u32,
    /// When the work first failed or was requested (µs since the Unix epoch).
    pub since_us: u64,
    #[serde(default)]
    pub error: String,
    /// The root path and target place this work is owed to
    /// ([`protocol::config::Config::owed_to`]); empty in journals written before it
    /// was recorded, which is treated as another identity.
    #[serde(default)]
    pub owed_to: String,
}

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("journal `{path}`: {message}")]
    Open { path: PathBuf, message: String },
    /// The file is not a journal that can be read (garbage, a torn page, another format).
    #[error("journal `{path}` cannot be read: {message}")]
    Broken { path: PathBuf, message: String },
    #[error("journal write: {0}")]
    Write(String),
    #[error("journal read: {0}")]
    Read(String),
    #[error("the journal is closed until it can be opened again")]
    Closed,
}

/// The stage's exit for a journal it cannot go on with: another retrier holds it
/// (exit 69, as for any second instance); anything else (a write or read that failed,
/// a journal closed until it reopens, one that cannot be read) exits 1 and the
/// supervisor starts the retrier again, which reopens it or moves it aside.
impl From<JournalError> for protocol::stage::StageError {
    fn from(e: JournalError) -> Self {
        use protocol::stage::{error_chain, StageError};
        match e {
            JournalError::Open { .. } => StageError::Unavailable(error_chain(&e)),
            _ => StageError::Failed(error_chain(&e)),
        }
    }
}

pub(crate) struct Journal {
    /// `None` only inside [`Journal::reopen`].
    db: Option<Database>,
    id: u64,
    path: PathBuf,
}

fn write_err(e: impl std::fmt::Display) -> JournalError {
    JournalError::Write(e.to_string())
}

fn read_err(e: impl std::fmt::Display) -> JournalError {
    JournalError::Read(e.to_string())
}

impl Journal {
    /// Opens (or creates) the journal and checks that all of it can be read. A second
    /// retrier on the same file is refused (`Open`); a file that is not a readable
    /// journal is `Broken` (redb may panic on a garbage page: that is caught here, once,
    /// instead of in a restart loop later).
    pub(crate) fn open(path: &Path) -> Result<Journal, JournalError> {
        let broken = |message: String| JournalError::Broken {
            path: path.to_path_buf(),
            message,
        };
        // A panic here is an answer ("broken"), reported by the caller: keep the
        // default hook from printing it as a crash meanwhile.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(|| {
            let journal = Journal::open_unchecked(path)?;
            // Every page of the jobs table is read once now: a bad one fails here.
            journal.load().map_err(|e| broken(e.to_string()))?;
            Ok(journal)
        });
        std::panic::set_hook(hook);
        opened.unwrap_or_else(|panic| Err(broken(panic_message(&*panic))))
    }

    fn open_unchecked(path: &Path) -> Result<Journal, JournalError> {
        let err = |message: String| JournalError::Open {
            path: path.to_path_buf(),
            message,
        };
        let broken = |e: &dyn std::fmt::Display| JournalError::Broken {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => err(
                "in use by another retrier (one journal per syncbus instance: give each its own `retry.state_dir`)".into(),
            ),
            redb::DatabaseError::Storage(redb::StorageError::Io(io)) => err(io.to_string()),
            e => broken(&e),
        })?;
        if !db.check_integrity().map_err(|e| broken(&e))? {
            return Err(broken(&"its integrity check failed"));
        }
        let txn = db.begin_write().map_err(|e| broken(&e))?;
        let id = {
            txn.open_table(JOBS).map_err(|e| broken(&e))?;
            let mut meta = txn.open_table(META).map_err(|e| broken(&e))?;
            let id = meta
                .get(JOURNAL_ID)
                .map_err(|e| broken(&e))?
                .map(|v| v.value());
            match id {
                Some(id) => id,
                None => {
                    let id = rand::random::<u64>() | 1;
                    meta.insert(JOURNAL_ID, id).map_err(|e| broken(&e))?;
                    id
                }
            }
        };
        txn.commit().map_err(|e| broken(&e))?;
        Ok(Journal {
            db: Some(db),
            id,
            path: path.to_path_buf(),
        })
    }

    /// Closes and opens the file again: after a failed write (a full disk, say) redb
    /// refuses every later one until then. The same journal must come back.
    pub(crate) fn reopen(&mut self) -> Result<(), JournalError> {
        self.db = None;
        let fresh = Journal::open(&self.path)?;
        if fresh.id != self.id {
            return Err(JournalError::Broken {
                path: self.path.clone(),
                message: format!(
                    "it was replaced (journal {:x} became {:x})",
                    self.id, fresh.id
                ),
            });
        }
        *self = fresh;
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `Closed` after a [`Journal::reopen`] that failed, until one succeeds.
    fn db(&self) -> Result<&Database, JournalError> {
        self.db.as_ref().ok_or(JournalError::Closed)
    }

    /// This journal's own random number (see `JOURNAL_ID`).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Every job on disk, oldest id first.
    pub(crate) fn load(&self) -> Result<Vec<(u64, Record)>, JournalError> {
        let txn = self.db()?.begin_read().map_err(read_err)?;
        let table = txn.open_table(JOBS).map_err(read_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(read_err)? {
            let (k, v) = item.map_err(read_err)?;
            match rmp_serde::from_slice::<Record>(v.value()) {
                Ok(r) => out.push((k.value(), r)),
                // Never silently: a record we cannot read is work we cannot do.
                Err(e) => {
                    tracing::error!(job_id = k.value(), error = %e, "unreadable journal record skipped")
                }
            }
        }
        Ok(out)
    }

    /// In one durable transaction: forgets `covers` and stores `new`, returning the new
    /// records' ids. Either all of it is on disk when this returns `Ok`, or none of it.
    pub(crate) fn replace(&self, covers: &[u64], new: &[Record]) -> Result<Vec<u64>, JournalError> {
        let txn = self.db()?.begin_write().map_err(write_err)?;
        let mut ids = Vec::with_capacity(new.len());
        {
            let mut jobs = txn.open_table(JOBS).map_err(write_err)?;
            let mut meta = txn.open_table(META).map_err(write_err)?;
            for id in covers {
                jobs.remove(id).map_err(write_err)?;
            }
            let mut next = meta
                .get(NEXT_ID)
                .map_err(write_err)?
                .map_or(1, |v| v.value());
            for r in new {
                let bytes = rmp_serde::to_vec_named(r).map_err(write_err)?;
                jobs.insert(next, &bytes[..]).map_err(write_err)?;
                ids.push(next);
                next += 1;
            }
            meta.insert(NEXT_ID, next).map_err(write_err)?;
        }
        txn.commit().map_err(write_err)?;
        Ok(ids)
    }

    /// Reads one record (for publishing it).
    pub(crate) fn get(&self, id: u64) -> Result<Option<Record>, JournalError> {
        let txn = self.db()?.begin_read().map_err(read_err)?;
        let table = txn.open_table(JOBS).map_err(read_err)?;
        let v = table.get(id).map_err(read_err)?;
        Ok(v.and_then(|v| rmp_serde::from_slice(v.value()).ok()))
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    format!("the database library failed on it: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::work::Touch;
    use protocol::PathBytes;

    fn rec(path: &str) -> Record {
        Record {
            target: "t".into(),
            root: "r".into(),
            work: {
                let mut w = Work::default();
                w.touch(PathBytes::new(path.as_bytes().to_vec()), Touch::delete(3));
                w
            },
            attempt: 1,
            since_us: 5,
            error: "down".into(),
            owed_to: "/src -> rsync://h/m/".into(),
        }
    }

    #[test]
    fn records_survive_reopening_and_replace_is_atomic() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("journal.redb");
        let ids = {
            let j = Journal::open(&path).unwrap();
            let ids = j.replace(&[], &[rec("a"), rec("b")]).unwrap();
            assert_eq!(ids, vec![1, 2]);
            let more = j.replace(&[1], &[rec("c")]).unwrap();
            assert_eq!(more, vec![3], "ids never reused");
            more
        };
        let j = Journal::open(&path).unwrap();
        let all = j.load().unwrap();
        let paths: Vec<(u64, String)> = all
            .iter()
            .map(|(id, r)| (*id, r.work.paths.keys().next().unwrap().to_string()))
            .collect();
        assert_eq!(paths, vec![(2, "b".into()), (3, "c".into())]);
        assert_eq!(j.get(ids[0]).unwrap().unwrap(), rec("c"));
        assert_eq!(j.replace(&[2, 3], &[]).unwrap(), Vec::<u64>::new());
        assert!(j.load().unwrap().is_empty());
        assert_eq!(j.replace(&[], &[rec("d")]).unwrap(), vec![4]);
    }

    #[test]
    fn a_second_opener_gets_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("journal.redb");
        let _j = Journal::open(&path).unwrap();
        let e = Journal::open(&path).err().unwrap().to_string();
        assert!(e.contains("in use by another retrier"), "{e}");
    }
}
