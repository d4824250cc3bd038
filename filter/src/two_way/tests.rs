//! The two-way part of the [`Filter`] on real files: the peer's renames in, what goes
//! out and what the repairs leave in the tree.

use std::time::{Duration, Instant};

use protocol::wire::{self, Op, RawEvent, RawKind};

use crate::filter::tests::{config, ev, paths, raw};
use crate::filter::Filter;

const PEER: &str =
    "[[target]]\nname = \"peer\"\nurl = \"rsync://127.0.0.1:9/m/\"\ntwo_way = true\n";

/// A filter for a two-way root (no rest time), its dir, and the root's path.
fn two_way() -> (tempfile::TempDir, Filter, std::path::PathBuf) {
    let (t, c) = config(&format!("stable_ms = 0\n{PEER}"));
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join(".syncbus/backup")).unwrap();
    (t, Filter::new(&c), src)
}

/// The peer's report that `path` reached it, by a run that began at `started_us`.
fn delivery(path: &str, started_us: u64) -> wire::Delivery {
    wire::Delivery {
        version: wire::VERSION,
        epoch: 1,
        seq: 1,
        target: "peer".into(),
        root: "r".into(),
        ok: true,
        time_us: 0,
        paths: vec![wire::Delivered {
            path: path.into(),
            since_us: 0,
        }],
        resyncs: Vec::new(),
        attempt: 0,
        error: String::new(),
        started_us,
    }
}

fn mv(kind: RawKind, path: &str, cookie: u32) -> RawEvent {
    RawEvent {
        cookie,
        ..ev(kind, path)
    }
}

#[test]
fn the_peers_writes_and_deletes_are_not_sent_back() {
    let (_t, mut f, _) = two_way();
    let t0 = Instant::now();
    f.push_batch(
        &raw(
            1,
            vec![
                // The peer's rsync: a new file, a replaced one, a deleted one.
                ev(RawKind::Create, ".syncbus/incoming/new.Ab12Cd"),
                ev(RawKind::CloseWrite, ".syncbus/incoming/new.Ab12Cd"),
                mv(RawKind::MovedFrom, ".syncbus/incoming/new.Ab12Cd", 1),
                mv(RawKind::MovedTo, "d/new", 1),
                ev(RawKind::Modify, "old"), // a local change, then the peer's newer one
                mv(RawKind::MovedFrom, ".syncbus/incoming/old.Xy34Zw", 2),
                mv(RawKind::MovedTo, "old", 2),
                mv(RawKind::MovedFrom, "gone", 3),
                mv(RawKind::MovedTo, ".syncbus/backup/gone", 3),
                // A user's own rename out of an unrelated hidden dir still counts.
                mv(RawKind::MovedFrom, ".cache/x", 4),
                mv(RawKind::MovedTo, "x", 4),
                ev(RawKind::CloseWrite, "mine"),
            ],
        ),
        t0,
    );
    let out = f.ready(t0 + Duration::from_secs(2));
    assert_eq!(paths(&out), vec!["x", "mine"]);
    assert_eq!(f.take_echoes().get("r"), Some(&3));
}

#[test]
fn a_file_made_and_removed_inside_the_window_is_still_a_delete_on_a_two_way_root() {
    // The peer may have fetched it meanwhile (a fetch-back of its own).
    let (_t, mut f, _) = two_way();
    let t0 = Instant::now();
    f.push_batch(
        &raw(
            1,
            vec![
                ev(RawKind::Create, "brief"),
                ev(RawKind::CloseWrite, "brief"),
                ev(RawKind::Delete, "brief"),
            ],
        ),
        t0,
    );
    let out = f.ready(t0 + Duration::from_secs(1));
    assert_eq!(paths(&out), vec!["brief"]);
    assert_eq!(out[0].1[0].op, Op::Delete);
}

#[test]
fn a_delete_into_a_backup_dir_not_watched_yet_is_still_the_peers() {
    let (_t, mut f, src) = two_way();
    let backup = src.join(".syncbus/backup");
    std::fs::create_dir_all(backup.join("d/e")).unwrap();
    std::fs::write(backup.join("d/e/g"), "g").unwrap();
    std::fs::write(backup.join("d/h"), "h").unwrap();
    let t0 = Instant::now();
    let mut dir = ev(RawKind::Create, ".syncbus/backup/d");
    dir.dir = true;
    f.push_batch(
        &raw(
            1,
            vec![
                // The `moved_to` into the new, unwatched dir is never seen: one
                // `moved_from` is read before the directory is, one after.
                mv(RawKind::MovedFrom, "d/e/g", 11),
                dir,
                mv(RawKind::MovedFrom, "d/h", 12),
            ],
        ),
        t0,
    );
    assert!(paths(&f.ready(t0 + Duration::from_secs(2))).is_empty());
    assert_eq!(f.take_echoes().get("r"), Some(&2));
}

#[test]
fn a_replaced_file_in_a_new_backup_dir_is_not_a_delete() {
    // rsync hard-links what it replaces into the backup: the path stays in the
    // tree, and a later move of it here is the user's.
    let (_t, mut f, src) = two_way();
    std::fs::create_dir_all(src.join(".syncbus/backup/d")).unwrap();
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join(".syncbus/backup/d/f"), "old").unwrap();
    std::fs::write(src.join("d/f"), "new").unwrap();
    let t0 = Instant::now();
    let mut dir = ev(RawKind::Create, ".syncbus/backup/d");
    dir.dir = true;
    f.push_batch(&raw(1, vec![dir]), t0);
    f.push_batch(
        &raw(
            2,
            vec![
                mv(RawKind::MovedFrom, "d/f", 21),
                mv(RawKind::MovedTo, "d/g", 21),
            ],
        ),
        t0 + Duration::from_millis(10),
    );
    let out = f.ready(t0 + Duration::from_secs(1));
    assert_eq!(out[0].1.len(), 1, "{out:?}");
    assert_eq!(out[0].1[0].op, Op::Move);
    assert_eq!(out[0].1[0].from, Some("d/f".into()));
}

#[test]
fn a_change_made_while_the_peers_copy_was_in_flight_goes_back_if_newer() {
    let (_t, mut f, src) = two_way();
    let at = |secs| std::time::UNIX_EPOCH + Duration::from_secs(secs);
    // The peer's copy (older) replaced this side's edit (newer), which rsync
    // hard-linked into the backup.
    std::fs::write(src.join("f"), "theirs").unwrap();
    std::fs::File::options()
        .write(true)
        .open(src.join("f"))
        .unwrap()
        .set_modified(at(1_000_000))
        .unwrap();
    std::fs::write(src.join(".syncbus/backup/f"), "ours").unwrap();
    let t0 = Instant::now();
    f.push_batch(
        &raw(
            1,
            vec![
                ev(RawKind::CloseWrite, "f"),
                mv(RawKind::MovedFrom, ".syncbus/incoming/f.Ab12Cd", 31),
                mv(RawKind::MovedTo, "f", 31),
            ],
        ),
        t0,
    );
    assert_eq!(std::fs::read(src.join("f")).unwrap(), b"ours");
}

#[test]
fn a_copy_the_peer_sends_again_after_a_delete_here_is_deleted_again() {
    let (_t, mut f, src) = two_way();
    let file = src.join("twice");
    let land = |f: &mut Filter, seq: u64, cookie: u32, at: Instant| {
        std::fs::write(&file, "the peer's copy").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();
        f.push_batch(
            &raw(
                seq,
                vec![
                    mv(RawKind::MovedFrom, ".syncbus/incoming/twice.Ab12Cd", cookie),
                    mv(RawKind::MovedTo, "twice", cookie),
                ],
            ),
            at,
        );
    };
    let t0 = Instant::now();
    land(&mut f, 1, 51, t0);
    assert!(f.ready(t0 + Duration::from_millis(50)).is_empty());
    // Deleted here; the peer's second run brings the same copy again.
    std::fs::remove_file(&file).unwrap();
    f.push_batch(&raw(2, vec![ev(RawKind::Delete, "twice")]), t0);
    land(&mut f, 3, 52, t0 + Duration::from_millis(5));
    assert!(!file.exists(), "the delete made here stands");
    let out = f.ready(t0 + Duration::from_millis(100));
    assert_eq!(out[0].1[0].op, Op::Delete);
    // Written here again (and published) before a third repeat lands: no longer
    // deleted here, so the copy is the peer's and the file stays.
    std::fs::write(&file, "mine again").unwrap();
    f.push_batch(&raw(4, vec![ev(RawKind::CloseWrite, "twice")]), t0);
    assert_eq!(
        paths(&f.ready(t0 + Duration::from_millis(150))),
        vec!["twice"]
    );
    land(&mut f, 5, 54, t0 + Duration::from_millis(160));
    assert!(file.exists(), "a file written here again is not deleted");
    // A new copy from the peer (another mtime) is a change of its own: it stays.
    std::fs::write(&file, "new").unwrap();
    f.push_batch(
        &raw(
            6,
            vec![
                mv(RawKind::MovedFrom, ".syncbus/incoming/twice.Zz99Yy", 53),
                mv(RawKind::MovedTo, "twice", 53),
            ],
        ),
        t0 + Duration::from_millis(200),
    );
    assert!(file.exists());
}

#[test]
fn the_delivery_of_an_earlier_version_does_not_cover_a_later_one() {
    let (_t, mut f, src) = two_way();
    let t0 = Instant::now();
    f.push_batch(&raw(1, vec![ev(RawKind::CloseWrite, "v")]), t0);
    assert_eq!(paths(&f.ready(t0 + Duration::from_millis(50))), vec!["v"]);
    let started_us = protocol::now_us();
    while protocol::now_us() <= started_us {}
    let t1 = t0 + Duration::from_millis(100);
    f.push_batch(&raw(2, vec![ev(RawKind::CloseWrite, "v")]), t1);
    assert_eq!(paths(&f.ready(t1 + Duration::from_millis(50))), vec!["v"]);
    // The run that began before the second version was published reports.
    f.delivered(&delivery("v", started_us));
    std::fs::write(src.join(".syncbus/backup/v"), "second").unwrap();
    let t2 = t1 + Duration::from_millis(200);
    f.push_batch(
        &raw(
            3,
            vec![
                mv(RawKind::MovedFrom, "v", 41),
                mv(RawKind::MovedTo, ".syncbus/backup/v", 41),
            ],
        ),
        t2,
    );
    assert_eq!(std::fs::read(src.join("v")).unwrap(), b"second");
}

#[test]
fn a_delete_from_the_peer_that_races_a_local_change_is_taken_back() {
    let (_t, mut f, src) = two_way();
    let t0 = Instant::now();
    // Changed here and published: then the peer's delete arrives (its rsync moved
    // the file into the backup dir).
    f.push_batch(&raw(1, vec![ev(RawKind::CloseWrite, "edited")]), t0);
    assert_eq!(
        paths(&f.ready(t0 + Duration::from_millis(50))),
        vec!["edited"]
    );
    std::fs::write(src.join(".syncbus/backup/edited"), "mine").unwrap();
    let t1 = t0 + Duration::from_millis(100);
    f.push_batch(
        &raw(
            2,
            vec![
                mv(RawKind::MovedFrom, "edited", 7),
                mv(RawKind::MovedTo, ".syncbus/backup/edited", 7),
            ],
        ),
        t1,
    );
    assert_eq!(std::fs::read(src.join("edited")).unwrap(), b"mine");
    // A delete of a change the peer already had is the peer's to make.
    f.push_batch(&raw(3, vec![ev(RawKind::CloseWrite, "old")]), t1);
    assert_eq!(paths(&f.ready(t1 + Duration::from_millis(50))), vec!["old"]);
    f.delivered(&delivery("old", 0));
    std::fs::write(src.join(".syncbus/backup/old"), "old").unwrap();
    let late = t1 + Duration::from_millis(100);
    f.push_batch(
        &raw(
            4,
            vec![
                mv(RawKind::MovedFrom, "old", 8),
                mv(RawKind::MovedTo, ".syncbus/backup/old", 8),
            ],
        ),
        late,
    );
    assert!(!src.join("old").exists());
    assert!(paths(&f.ready(late + Duration::from_secs(1))).is_empty());
}
