//! The messages on the bus. See docs/wire-format.md for the outsider's view.
//!
//! Every message is a ZeroMQ multipart `[topic, payload]`; the payload is MessagePack
//! with named fields (`rmp_serde::to_vec_named`), so readers in any language find fields
//! by name and ignore the ones they do not know. `version` changes only when a field
//! changes meaning; adding a field does not bump it.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

pub use crate::work::{Touch, Work};
use crate::PathBytes;

/// The version of the streams (raw, changes, deliveries) this build writes and reads.
pub const VERSION: u16 = 1;
/// The version of the messages carrying owed work ([`Report`], [`JobMsg`]) this build
/// writes. Version 2 lists the work's paths as records that keep deletes and change
/// times ([`Work`]); version 1, bare paths, is still read.
pub const WORK_VERSION: u16 = 2;

/// Topic prefix of the public change stream; the full topic is `changes/<root>/`.
pub const CHANGES_TOPIC: &str = "changes/";
/// Topic of the watcher → filter stream (internal).
pub const RAW_TOPIC: &str = "raw/";

/// The change stream's topic of `root`.
pub fn changes_topic(root: &str) -> String {
    format!("{CHANGES_TOPIC}{root}/")
}

/// Topic of everything sent to the retrier (dispatchers and the scheduler → retrier).
pub const REPORT_TOPIC: &str = "report/";
/// Topic prefix of the retrier's job stream; the full topic is `jobs/<target>/`.
pub const JOBS_TOPIC: &str = "jobs/";

/// The job stream's topic of `target`.
pub fn jobs_topic(target: &str) -> String {
    format!("{JOBS_TOPIC}{target}/")
}

/// Topic prefix of the public delivery stream; the full topic is `deliveries/<target>/`.
pub const DELIVERIES_TOPIC: &str = "deliveries/";

/// The delivery stream's topic of `target`.
pub fn deliveries_topic(target: &str) -> String {
    format!("{DELIVERIES_TOPIC}{target}/")
}

/// What inotify saw, translated to root-relative paths (watcher → filter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawBatch {
    /// The shape of this message ([`VERSION`]).
    pub version: u16,
    /// Random per start of the sender: a new one means it restarted.
    pub epoch: u64,
    /// Gap-free from 1 within the epoch.
    pub seq: u64,
    /// When the watcher read these events (µs since the Unix epoch); rises with `seq`.
    pub time_us: u64,
    /// Every change whose ctime is before this time (µs since the Unix epoch) is in
    /// this batch or an earlier one: the watcher found the kernel queue empty then.
    /// 0: it cannot say. The crash checkpoint starts here (ARCHITECTURE.md).
    #[serde(default)]
    pub read_to_us: u64,
    /// In the order inotify gave them.
    pub events: Vec<RawEvent>,
}

/// One inotify event on a watched root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawEvent {
    /// The root's name in the config.
    pub root: String,
    /// Relative to the root.
    pub path: PathBytes,
    /// What happened.
    pub kind: RawKind,
    /// The entry is a directory.
    #[serde(default)]
    pub dir: bool,
    /// Pairs a `moved_from` with its `moved_to`; 0 otherwise.
    #[serde(default)]
    pub cookie: u32,
}

/// The inotify event kinds the watcher passes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawKind {
    /// `IN_CREATE`.
    Create,
    /// `IN_MODIFY`.
    Modify,
    /// `IN_CLOSE_WRITE`: a writer closed the file.
    CloseWrite,
    /// `IN_ATTRIB`.
    Attrib,
    /// `IN_DELETE` (and `IN_DELETE_SELF` of a watched directory).
    Delete,
    /// `IN_MOVED_FROM`: the old name of a rename.
    MovedFrom,
    /// `IN_MOVED_TO`: the new name of a rename.
    MovedTo,
    /// The watcher cannot vouch for `path` (a subtree; the root when empty): its watches
    /// just went live, the kernel queue overflowed, or the root came back.
    Resync,
}

/// One message of the public change stream (filter → dispatchers and anyone else).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeBatch {
    /// The shape of this message ([`VERSION`]).
    pub version: u16,
    /// Random per start of the sender: a new one means it restarted.
    pub epoch: u64,
    /// Gap-free per topic (per root), starting at 1. An empty `changes` is a heartbeat.
    pub seq: u64,
    /// The root's name in the config.
    pub root: String,
    /// When the filter published this batch (µs since the Unix epoch).
    pub time_us: u64,
    /// Every change of this root whose ctime is before this time (µs since the Unix
    /// epoch) was published in this batch or an earlier one; 0: the filter cannot say.
    /// It never goes back within an epoch. A dispatcher's crash checkpoint is built
    /// from it.
    #[serde(default)]
    pub safe_us: u64,
    /// In the order they began.
    pub changes: Vec<Change>,
}

/// One coalesced change of a path: what the targets must follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// What happened to it.
    pub op: Op,
    /// Relative to the root.
    pub path: PathBytes,
    /// The old path of a `move`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBytes>,
    /// The entry is a directory.
    #[serde(default)]
    pub dir: bool,
    /// The directory appeared as a whole (created or moved in): send its content too.
    #[serde(default)]
    pub recursive: bool,
    /// When the first event behind this change was read (µs since the Unix epoch).
    #[serde(default)]
    pub since_us: u64,
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The entry exists (new, content or attributes changed).
    Upsert,
    /// The entry no longer exists.
    Delete,
    /// The entry at `from` is now at `path`.
    Move,
    /// Everything under `path` must be compared in full (the root when empty).
    Resync,
}

/// What a report tells the retrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportKind {
    /// `work` failed on `target` (or was not tried because the target is failing):
    /// journal it in place of the `covers` jobs and acknowledge.
    Failed,
    /// The `covers` jobs reached `target`: forget them.
    Delivered,
    /// The scheduler asks for `work` (a full sync) on every target bound to `root`
    /// (`target` empty) or on `target`: journal it and send it out.
    Request,
    /// A dispatcher serving `target` (re)joined the job stream: send it every job of
    /// that target that is out, again.
    Ready,
}

/// Dispatchers and the scheduler → retrier (PUSH → PULL, topic `report/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The shape of this message ([`WORK_VERSION`]).
    pub version: u16,
    /// Random per start of the sender: a new one means it restarted.
    pub epoch: u64,
    /// Gap-free from 1 within the epoch.
    pub seq: u64,
    /// Echoed by the retrier's acknowledgement; random per report.
    pub report_id: u64,
    /// What the retrier is to do with it.
    pub kind: ReportKind,
    /// The target's name (empty in a `request` for every target of the root).
    pub target: String,
    /// The root's name.
    pub root: String,
    /// Journal jobs this report settles (replaces, for `failed`).
    #[serde(default)]
    pub covers: Vec<u64>,
    /// The work owed (`failed`, `request`).
    #[serde(default)]
    pub work: Work,
    /// Why it failed (`failed` only).
    #[serde(default)]
    pub error: String,
    /// When it was sent (µs since the Unix epoch).
    pub time_us: u64,
}

/// What a job message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Report `report_id` is on disk: the dispatcher may forget its work.
    Ack,
    /// Run `work` for `root` now; report `delivered` or `failed` covering `job_ids`.
    Run,
    /// Nothing to do; sent every second so a subscriber notices a new epoch or a gap.
    Heartbeat,
}

/// Retrier → dispatchers (PUB → SUB, topic `jobs/<target>/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMsg {
    /// The shape of this message ([`WORK_VERSION`]).
    pub version: u16,
    /// Random per start of the sender: a new one means it restarted.
    pub epoch: u64,
    /// Gap-free per topic; a lost job is sent again when its result does not come.
    pub seq: u64,
    /// What the dispatcher is to do.
    pub kind: JobKind,
    /// The target's name (also in the topic).
    pub target: String,
    /// The report acknowledged (`ack`).
    #[serde(default)]
    pub report_id: u64,
    /// The root whose work this is (`run`).
    #[serde(default)]
    pub root: String,
    /// The journal jobs `work` merges (`run`): the report on the run covers them.
    #[serde(default)]
    pub job_ids: Vec<u64>,
    /// The failed attempts behind this run so far.
    #[serde(default)]
    pub attempt: u32,
    /// What to run (`run`).
    #[serde(default)]
    pub work: Work,
    /// When it was sent (µs since the Unix epoch).
    pub time_us: u64,
}

/// What one rsync run brought to a target, or failed to (the delivery stream,
/// dispatchers → anyone, relayed by the retrier on `deliveries.sock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The shape of this message ([`VERSION`]).
    pub version: u16,
    /// Random per dispatcher worker start.
    pub epoch: u64,
    /// Gap-free per target within one epoch: a gap means deliveries were not seen.
    pub seq: u64,
    /// The target's name.
    pub target: String,
    /// The root's name.
    pub root: String,
    /// True when everything below is on the target now.
    pub ok: bool,
    /// When the run ended (µs since the Unix epoch).
    pub time_us: u64,
    /// Single paths (a missing one was deleted on the target).
    #[serde(default)]
    pub paths: Vec<Delivered>,
    /// Subtrees compared in full (`""` for the whole root).
    #[serde(default)]
    pub resyncs: Vec<PathBytes>,
    /// Failed runs in a row for this root before this one.
    #[serde(default)]
    pub attempt: u32,
    /// Why it failed (`ok` false); the work is journalled and retried.
    #[serde(default)]
    pub error: String,
    /// When the run began (µs since the Unix epoch; 0 unknown): a change published
    /// after it is not in it.
    #[serde(default)]
    pub started_us: u64,
}

/// One path a run brought to its target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// Relative to the root.
    pub path: PathBytes,
    /// When the first change behind it was seen (µs; 0 unknown): `time_us - since_us`
    /// is the replication lag.
    #[serde(default)]
    pub since_us: u64,
}

/// A message that cannot be taken.
#[derive(Debug, Error)]
pub enum WireError {
    /// Not MessagePack of the expected shape.
    #[error("cannot decode message: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// A version of its shape this build does not read.
    #[error("unsupported wire version {0}")]
    Version(u16),
}

/// The payload of `msg`: MessagePack with named fields.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(msg).expect("wire types always serialize")
}

/// Decodes a message and rejects versions this build does not understand.
pub fn decode<T: DeserializeOwned + Versioned>(bytes: &[u8]) -> Result<T, WireError> {
    let msg: T = rmp_serde::from_slice(bytes)?;
    if !T::READS.contains(&msg.version()) {
        return Err(WireError::Version(msg.version()));
    }
    Ok(msg)
}

/// A message that says which version of its shape it is.
pub trait Versioned {
    /// The versions of this message this build reads.
    const READS: std::ops::RangeInclusive<u16>;
    /// The version this message says it is.
    fn version(&self) -> u16;
}

impl Versioned for RawBatch {
    const READS: std::ops::RangeInclusive<u16> = VERSION..=VERSION;
    fn version(&self) -> u16 {
        self.version
    }
}

impl Versioned for ChangeBatch {
    const READS: std::ops::RangeInclusive<u16> = VERSION..=VERSION;
    fn version(&self) -> u16 {
        self.version
    }
}

impl Versioned for Report {
    const READS: std::ops::RangeInclusive<u16> = 1..=WORK_VERSION;
    fn version(&self) -> u16 {
        self.version
    }
}

impl Versioned for Delivery {
    const READS: std::ops::RangeInclusive<u16> = VERSION..=VERSION;
    fn version(&self) -> u16 {
        self.version
    }
}

impl Versioned for JobMsg {
    const READS: std::ops::RangeInclusive<u16> = 1..=WORK_VERSION;
    fn version(&self) -> u16 {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChangeBatch {
        ChangeBatch {
            version: VERSION,
            epoch: 0x1234_5678_9abc_def0,
            seq: 7,
            root: "www".into(),
            time_us: 1_700_000_000_000_000,
            safe_us: 1_699_999_999_000_000,
            changes: vec![
                Change {
                    op: Op::Upsert,
                    path: PathBytes::new(b"dir/caf\xc3\xa9 \xff.txt".to_vec()),
                    from: None,
                    dir: false,
                    recursive: false,
                    since_us: 1_699_999_999_990_000,
                },
                Change {
                    op: Op::Move,
                    path: "new".into(),
                    from: Some("old".into()),
                    dir: true,
                    recursive: true,
                    since_us: 1_699_999_999_995_000,
                },
            ],
        }
    }

    /// A report of failed work: the owed work's shape on the wire and in the journal.
    fn sample_report() -> Report {
        let mut work = Work::default();
        work.touch(
            PathBytes::new(b"sent/again.txt".to_vec()),
            Touch::upsert(1_699_999_999_990_000),
        );
        work.touch(
            PathBytes::new(b"gone".to_vec()),
            Touch::delete(1_699_999_999_991_000),
        );
        work.resync("dir".into());
        work.catch_up(1_699_999_000_000_000);
        Report {
            version: WORK_VERSION,
            epoch: 7,
            seq: 3,
            report_id: 11,
            kind: ReportKind::Failed,
            target: "backup".into(),
            root: "www".into(),
            covers: vec![5],
            work,
            error: "rsync exited with code 10".into(),
            time_us: 1_700_000_000_000_000,
        }
    }

    /// The golden fixtures pin the bytes on the wire: a change here must be deliberate
    /// (regenerate with `SYNCBUS_BLESS=1 cargo test -p syncbus-protocol`).
    fn golden<T>(name: &str, msg: &T)
    where
        T: Serialize + DeserializeOwned + Versioned + PartialEq + std::fmt::Debug,
    {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let bytes = encode(msg);
        let json = serde_json::to_string_pretty(msg).unwrap() + "\n";
        if std::env::var_os("SYNCBUS_BLESS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("{name}.msgpack")), &bytes).unwrap();
            std::fs::write(dir.join(format!("{name}.json")), &json).unwrap();
        }
        let golden = std::fs::read(dir.join(format!("{name}.msgpack"))).unwrap();
        assert_eq!(bytes, golden, "{name}: wire bytes changed");
        let from_golden: T = decode(&golden).unwrap();
        assert_eq!(&from_golden, msg);
        let golden_json = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
        assert_eq!(json, golden_json, "{name}: readable twin out of date");
    }

    #[test]
    fn change_batch_matches_golden_fixture() {
        golden("change_batch", &sample());
    }

    /// A filter of an earlier build says no `safe_us`: read as 0, "cannot say".
    #[test]
    fn a_change_batch_without_safe_us_reads_as_vouching_for_nothing() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let old = std::fs::read(dir.join("change_batch_without_safe_us.msgpack")).unwrap();
        let msg: ChangeBatch = decode(&old).unwrap();
        assert_eq!(
            msg,
            ChangeBatch {
                safe_us: 0,
                ..sample()
            }
        );
    }

    #[test]
    fn report_matches_golden_fixture() {
        golden("report", &sample_report());
    }

    #[test]
    fn raw_batch_round_trips_with_non_utf8_paths() {
        let msg = RawBatch {
            version: VERSION,
            epoch: 1,
            seq: 2,
            time_us: 3,
            read_to_us: 2,
            events: vec![RawEvent {
                root: "r".into(),
                path: PathBytes::new(b"\xfe\n-x".to_vec()),
                kind: RawKind::MovedTo,
                dir: true,
                cookie: 99,
            }],
        };
        assert_eq!(decode::<RawBatch>(&encode(&msg)).unwrap(), msg);
    }

    #[test]
    fn report_and_job_round_trip_with_non_utf8_paths() {
        let mut work = Work::default();
        work.resync(PathBytes::root());
        work.touch(PathBytes::new(b"a\n\xff".to_vec()), Touch::delete(0));
        work.excludes = vec!["*.tmp".into()];
        let r = Report {
            version: WORK_VERSION,
            epoch: 1,
            seq: 2,
            report_id: 3,
            kind: ReportKind::Failed,
            target: "t".into(),
            root: "r".into(),
            covers: vec![4, 5],
            work: work.clone(),
            error: "rsync exit 10".into(),
            time_us: 6,
        };
        assert_eq!(decode::<Report>(&encode(&r)).unwrap(), r);
        let j = JobMsg {
            version: WORK_VERSION,
            epoch: 1,
            seq: 2,
            kind: JobKind::Run,
            target: "t".into(),
            report_id: 0,
            root: "r".into(),
            job_ids: vec![7],
            attempt: 3,
            work,
            time_us: 8,
        };
        assert_eq!(decode::<JobMsg>(&encode(&j)).unwrap(), j);
    }

    #[test]
    fn unknown_version_is_rejected() {
        let mut msg = sample();
        msg.version = VERSION + 1;
        assert!(matches!(
            decode::<ChangeBatch>(&encode(&msg)),
            Err(WireError::Version(_))
        ));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        #[derive(Serialize)]
        struct Newer<'a> {
            #[serde(flatten)]
            base: &'a ChangeBatch,
            added_later: u32,
        }
        let s = sample();
        let bytes = rmp_serde::to_vec_named(&Newer {
            base: &s,
            added_later: 5,
        })
        .unwrap();
        assert_eq!(decode::<ChangeBatch>(&bytes).unwrap(), s);
    }
}
