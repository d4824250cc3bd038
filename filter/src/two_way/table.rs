//! [`classify_peer`] as a table: an event, what is known about its path, the verdict.

use super::*;

/// What is known about the one path of a case; ages in ms before `now`.
#[derive(Clone, Copy)]
struct Facts {
    /// The root and age of a rename out of incoming with the event's cookie.
    incoming: Option<(&'static str, u64)>,
    backed_up: Option<u64>,
    holds_change: bool,
    pending_delete: bool,
    deleted_here: bool,
    /// The peer's last copy (as the stat it had) and its age.
    received: Option<(Option<Stat>, u64)>,
    undelivered: bool,
    delivered_at: Option<u64>,
    stat: Option<Stat>,
    mtime_us: Option<u64>,
}

struct Fake {
    facts: Facts,
    now: Instant,
}

impl Fake {
    fn ago(&self, ms: u64) -> Instant {
        self.now - Duration::from_millis(ms)
    }
}

impl Known for Fake {
    fn incoming(&self, _: u32) -> Option<(&str, Instant)> {
        self.facts.incoming.map(|(r, ms)| (r, self.ago(ms)))
    }
    fn backed_up(&self, _: &PathBytes) -> Option<Instant> {
        self.facts.backed_up.map(|ms| self.ago(ms))
    }
    fn holds_change(&self, _: &PathBytes) -> bool {
        self.facts.holds_change
    }
    fn pending_delete(&self, _: &PathBytes) -> bool {
        self.facts.pending_delete
    }
    fn deleted_here(&self, _: &PathBytes) -> bool {
        self.facts.deleted_here
    }
    fn received(&self, _: &PathBytes) -> Option<(Option<Stat>, Instant)> {
        self.facts.received.map(|(s, ms)| (s, self.ago(ms)))
    }
    fn undelivered(&self, _: &PathBytes) -> bool {
        self.facts.undelivered
    }
    fn delivered_at(&self, _: &PathBytes) -> Option<u64> {
        self.facts.delivered_at
    }
    fn stat(&self, _: &PathBytes) -> Option<Stat> {
        self.facts.stat
    }
    fn mtime_us(&self, _: &PathBytes) -> Option<u64> {
        self.facts.mtime_us
    }
}

const NONE: Facts = Facts {
    incoming: None,
    backed_up: None,
    holds_change: false,
    pending_delete: false,
    deleted_here: false,
    received: None,
    undelivered: false,
    delivered_at: None,
    stat: None,
    mtime_us: None,
};
const COPY: Option<Stat> = Some((5, 1_000, 0));
const OTHER_COPY: Option<Stat> = Some((5, 2_000, 0));
/// The peer's copy landing: a fresh incoming rename of this root.
const LANDING: Facts = Facts {
    incoming: Some(("r", 10)),
    stat: COPY,
    mtime_us: Some(1_000_000_000),
    ..NONE
};
/// …the same copy as the peer's last, deleted here since.
const REPEAT: Facts = Facts {
    received: Some((COPY, 1_000)),
    deleted_here: true,
    ..LANDING
};

fn wrote(conflict: bool) -> PeerVerdict {
    PeerVerdict::PeerWrote {
        conflict,
        copy: COPY,
    }
}

#[test]
fn the_verdict_for_each_case() {
    use PeerVerdict::*;
    use RawKind::*;
    let deleted = |raced| PeerDeleted { raced };
    #[rustfmt::skip]
    let cases: Vec<(&str, RawKind, bool, &str, Facts, PeerVerdict)> = vec![
        // what, event kind, dir, path, facts, verdict
        ("a local write", CloseWrite, false, "f", NONE, NotPeer),
        ("a local rename's target", MovedTo, false, "f", NONE, NotPeer),
        ("a local rename's source", MovedFrom, false, "f", NONE, NotPeer),
        ("a user's rename out of another hidden dir", MovedTo, false, "f", Facts { incoming: None, ..LANDING }, NotPeer),
        ("the own dir itself", Create, true, ".syncbus", NONE, OwnDir),
        ("the peer's rsync writing in incoming", CloseWrite, false, ".syncbus/incoming/f.Ab12", NONE, OwnDir),
        ("a rename out of incoming", MovedFrom, false, ".syncbus/incoming/f.Ab12", NONE, IncomingLeft),
        ("a rename into the backup", MovedTo, false, ".syncbus/backup/d/f", NONE, IntoBackup("d/f".into())),
        ("a kept version renamed in the backup", MovedTo, false, ".syncbus/backup/d/f~123", NONE, OwnDir),
        ("a directory made in the backup", Create, true, ".syncbus/backup/d", NONE, BackupDirMade("d".into())),
        ("a file made in the backup", Create, false, ".syncbus/backup/d", NONE, OwnDir),
        ("the backup dir itself", Create, true, ".syncbus/backup", NONE, OwnDir),
        ("the peer's copy lands", MovedTo, false, "f", LANDING, wrote(false)),
        ("…on a change held here", MovedTo, false, "f", Facts { holds_change: true, ..LANDING }, wrote(true)),
        ("…on a change not delivered yet", MovedTo, false, "f", Facts { undelivered: true, ..LANDING }, wrote(true)),
        ("…on a change delivered after the copy was made", MovedTo, false, "f", Facts { delivered_at: Some(2_000_000_000), ..LANDING }, wrote(true)),
        ("…on a change delivered before the copy was made", MovedTo, false, "f", Facts { delivered_at: Some(500_000_000), ..LANDING }, wrote(false)),
        ("an incoming rename too old to pair", MovedTo, false, "f", Facts { incoming: Some(("r", 2_000)), ..LANDING }, NotPeer),
        ("an incoming rename of another root", MovedTo, false, "f", Facts { incoming: Some(("s", 10)), ..LANDING }, NotPeer),
        ("the same copy again after a delete here", MovedTo, false, "f", REPEAT, StaleRepeat),
        ("…while the delete is still held", MovedTo, false, "f", Facts { deleted_here: false, pending_delete: true, ..REPEAT }, StaleRepeat),
        ("…but written here again since", MovedTo, false, "f", Facts { holds_change: true, ..REPEAT }, wrote(true)),
        ("…but the peer's last copy was another", MovedTo, false, "f", Facts { received: Some((OTHER_COPY, 1_000)), ..REPEAT }, wrote(false)),
        ("…but the peer's last copy is long ago", MovedTo, false, "f", Facts { received: Some((COPY, 30_000)), ..REPEAT }, wrote(false)),
        ("…but nothing landed (a directory)", MovedTo, false, "f", Facts { stat: None, received: Some((None, 1_000)), ..REPEAT }, PeerWrote { conflict: false, copy: None }),
        ("…but not deleted here", MovedTo, false, "f", Facts { deleted_here: false, ..REPEAT }, wrote(false)),
        ("a source found in the backup before", MovedFrom, false, "f", Facts { backed_up: Some(10), ..NONE }, deleted(false)),
        ("…with a change held here", MovedFrom, false, "f", Facts { backed_up: Some(10), holds_change: true, ..NONE }, deleted(true)),
        ("…with a change not delivered", MovedFrom, false, "f", Facts { backed_up: Some(10), undelivered: true, ..NONE }, deleted(true)),
        ("…found too long ago", MovedFrom, false, "f", Facts { backed_up: Some(2_000), holds_change: true, ..NONE }, NotPeer),
        ("a delete is never the peer's by itself", Delete, false, "f", Facts { backed_up: Some(10), ..NONE }, NotPeer),
    ];
    let now = Instant::now() + Duration::from_secs(60);
    for (what, kind, dir, path, facts, want) in cases {
        let ev = RawEvent {
            root: "r".into(),
            path: path.into(),
            kind,
            dir,
            cookie: 7,
        };
        let got = classify_peer(&ev, &Fake { facts, now }, now);
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn a_delete_of_the_peers_races_a_change_that_had_not_reached_it() {
    for (held, undelivered, raced) in [
        (false, false, false),
        (true, false, true),
        (false, true, true),
        (true, true, true),
    ] {
        assert_eq!(
            peer_deleted(held, undelivered),
            PeerVerdict::PeerDeleted { raced },
            "held {held}, undelivered {undelivered}"
        );
    }
}
