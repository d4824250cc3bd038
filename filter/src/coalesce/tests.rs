//! The coalescer's cases, time a parameter.

use super::*;

const Q: Duration = Duration::from_millis(10);
const HOLD: Duration = Duration::from_millis(100);

struct Sim {
    c: Coalescer,
    t0: Instant,
    now: Instant,
}

impl Sim {
    fn new() -> Self {
        let mut timing = HashMap::new();
        timing.insert(
            "r".to_string(),
            Timing {
                quiet: Q,
                max_hold: HOLD,
                closed_settle: true,
                forget_created: true,
                heat: true,
            },
        );
        let t0 = Instant::now();
        Sim {
            c: Coalescer::new(timing),
            t0,
            now: t0,
        }
    }
    fn ev(&mut self, kind: RawKind, path: &str, dir: bool, cookie: u32) -> &mut Self {
        let ev = RawEvent {
            root: "r".into(),
            path: path.into(),
            kind,
            dir,
            cookie,
        };
        self.c.push(&ev, 0, self.now);
        self
    }
    fn f(&mut self, kind: RawKind, path: &str) -> &mut Self {
        self.ev(kind, path, false, 0)
    }
    fn at_ms(&mut self, ms: u64) -> &mut Self {
        self.now = self.t0 + Duration::from_millis(ms);
        self
    }
    /// (op, path, from, recursive) of everything ready now.
    fn out(&mut self) -> Vec<(Op, String, Option<String>, bool)> {
        self.c
            .pop_ready(self.now)
            .into_iter()
            .map(|(_, c)| {
                (
                    c.op,
                    c.path.to_string(),
                    c.from.map(|f| f.to_string()),
                    c.recursive,
                )
            })
            .collect()
    }
}

use RawKind::*;

fn up(p: &str) -> (Op, String, Option<String>, bool) {
    (Op::Upsert, p.into(), None, false)
}
fn del(p: &str) -> (Op, String, Option<String>, bool) {
    (Op::Delete, p.into(), None, false)
}

#[test]
fn create_modify_is_one_upsert_after_the_quiet_window() {
    let mut s = Sim::new();
    s.f(Create, "a").f(Modify, "a");
    assert!(s.out().is_empty(), "held during the quiet window");
    s.at_ms(9);
    assert!(s.out().is_empty(), "held during the quiet window");
    s.at_ms(10);
    assert_eq!(s.out(), vec![up("a")]);
    s.at_ms(50);
    assert!(s.out().is_empty(), "emitted once");
}

#[test]
fn a_closed_file_goes_after_a_short_settle_unless_written_again() {
    let mut s = Sim::new();
    s.f(Create, "a").f(Modify, "a").f(CloseWrite, "a");
    s.at_ms(1);
    assert!(s.out().is_empty(), "a rename may follow at once");
    s.at_ms(2);
    assert_eq!(s.out(), vec![up("a")], "well before the 10 ms quiet window");
    // Opened and written again right after the close: the quiet window rules.
    s.f(CloseWrite, "b").f(Modify, "b").at_ms(4);
    assert!(s.out().is_empty(), "{:?}", s.out());
    s.at_ms(12);
    assert_eq!(s.out(), vec![up("b")]);
}

#[test]
fn a_temp_file_closed_and_renamed_at_once_reaches_the_targets_as_the_final_name() {
    let mut s = Sim::new();
    s.f(Create, "sedX1")
        .f(CloseWrite, "sedX1")
        .ev(MovedFrom, "sedX1", false, 9)
        .ev(MovedTo, "conf", false, 9)
        .at_ms(20);
    assert_eq!(s.out(), vec![up("conf")]);
}

#[test]
fn created_then_deleted_inside_the_window_is_nothing() {
    let mut s = Sim::new();
    s.f(Create, "tmp")
        .f(CloseWrite, "tmp")
        .f(Delete, "tmp")
        .at_ms(20);
    assert!(s.out().is_empty());
    assert_eq!(s.c.pending(), 0);
}

#[test]
fn existing_file_modified_then_deleted_is_a_delete() {
    let mut s = Sim::new();
    s.f(Modify, "a").f(Delete, "a").at_ms(20);
    assert_eq!(s.out(), vec![del("a")]);
}

#[test]
fn deleted_then_recreated_is_an_upsert() {
    let mut s = Sim::new();
    s.f(Delete, "a").f(Create, "a").f(CloseWrite, "a").at_ms(20);
    assert_eq!(s.out(), vec![up("a")]);
}

#[test]
fn a_file_written_forever_still_syncs_at_max_hold() {
    let mut s = Sim::new();
    let mut seen = Vec::new();
    for ms in (0..=250).step_by(5) {
        s.at_ms(ms).f(Modify, "log");
        seen.extend(s.out().into_iter().map(|_| ms));
    }
    assert_eq!(seen, vec![100, 205], "one upsert per max_hold, not never");
}

#[test]
fn paired_move_of_an_existing_file_is_one_move() {
    let mut s = Sim::new();
    s.ev(MovedFrom, "a", false, 7)
        .ev(MovedTo, "b", false, 7)
        .at_ms(10);
    assert_eq!(
        s.out(),
        vec![(Op::Move, "b".into(), Some("a".into()), false)]
    );
}

#[test]
fn unpaired_halves_are_a_delete_and_an_upsert() {
    let mut s = Sim::new();
    s.ev(MovedFrom, "out", false, 1)
        .ev(MovedTo, "in", true, 2)
        .at_ms(10);
    // The lone `moved_from` waits a little longer for a partner.
    assert_eq!(s.out(), vec![(Op::Upsert, "in".into(), None, true)]);
    s.at_ms(MOVE_HOLD.as_millis() as u64);
    assert_eq!(s.out(), vec![del("out")]);
}

#[test]
fn a_move_read_in_two_parts_is_still_a_move() {
    let mut s = Sim::new();
    s.ev(MovedFrom, "a", false, 4).at_ms(50);
    assert_eq!(s.out(), vec![], "the half waits for its partner");
    s.ev(MovedTo, "b", false, 4).at_ms(60);
    assert_eq!(
        s.out(),
        vec![(Op::Move, "b".into(), Some("a".into()), false)]
    );
}

#[test]
fn a_file_renamed_in_over_an_existing_one_then_deleted_is_a_delete() {
    // The `moved_from` half was excluded (e.g. `.goutputstream-X`): `doc` existed
    // before, so removing it must reach the targets.
    let mut s = Sim::new();
    s.ev(MovedTo, "doc", false, 8).f(Delete, "doc").at_ms(10);
    assert_eq!(s.out(), vec![del("doc")]);
}

#[test]
fn temp_file_renamed_over_the_target_is_an_upsert_of_the_target_only() {
    let mut s = Sim::new();
    s.f(Create, ".doc.1a2b.tmp")
        .f(CloseWrite, ".doc.1a2b.tmp")
        .ev(MovedFrom, ".doc.1a2b.tmp", false, 3)
        .ev(MovedTo, "doc", false, 3)
        .at_ms(10);
    assert_eq!(s.out(), vec![up("doc")]);
}

#[test]
fn vim_style_save_with_excluded_backup_is_an_upsert() {
    // rename doc -> doc~ (the `~` half is excluded upstream), write doc, delete doc~.
    let mut s = Sim::new();
    s.ev(MovedFrom, "doc", false, 9)
        .f(Create, "doc")
        .f(CloseWrite, "doc")
        .at_ms(10);
    assert_eq!(s.out(), vec![up("doc")]);
}

#[test]
fn directory_move_carries_pending_children_along() {
    let mut s = Sim::new();
    s.ev(Create, "d", true, 0)
        .f(Create, "d/f")
        .ev(MovedFrom, "d", true, 4)
        .ev(MovedTo, "e", true, 4)
        .at_ms(10);
    let out = s.out();
    assert_eq!(out, vec![(Op::Upsert, "e".into(), None, true), up("e/f")]);
}

#[test]
fn a_second_rename_over_a_moved_file_still_deletes_the_first_source() {
    let mut s = Sim::new();
    s.f(RawKind::CloseWrite, "a").at_ms(100);
    s.out();
    s.ev(RawKind::MovedFrom, "a", false, 1)
        .ev(RawKind::MovedTo, "b", false, 1)
        .ev(RawKind::MovedFrom, "c", false, 2)
        .ev(RawKind::MovedTo, "b", false, 2)
        .at_ms(200);
    let out = s.out();
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out.contains(&del("a")), "{out:?}");
    assert!(
        out.contains(&(Op::Move, "b".into(), Some("c".into()), false)),
        "{out:?}"
    );
}

#[test]
fn dropping_a_held_move_still_deletes_its_source() {
    let mut s = Sim::new();
    s.f(RawKind::CloseWrite, "a").at_ms(100);
    s.out();
    s.ev(RawKind::MovedFrom, "a", false, 1)
        .ev(RawKind::MovedTo, "b", false, 1);
    let now = s.now;
    s.c.take_held("r", &"b".into(), now);
    s.at_ms(200);
    assert_eq!(s.out(), vec![del("a")]);
}

#[test]
fn a_source_made_again_and_moved_away_after_its_move_was_dropped_is_deleted() {
    let mut s = Sim::new();
    s.f(RawKind::CloseWrite, "a").at_ms(100);
    s.out();
    s.ev(RawKind::MovedFrom, "a", false, 1)
        .ev(RawKind::MovedTo, "b", false, 1)
        .f(RawKind::Create, "a")
        .f(RawKind::CloseWrite, "a");
    let now = s.now;
    s.c.take_held("r", &"b".into(), now);
    s.ev(RawKind::MovedFrom, "a", false, 2)
        .ev(RawKind::MovedTo, "c", false, 2)
        .at_ms(200);
    let out = s.out();
    assert!(
        out.contains(&(Op::Move, "c".into(), Some("a".into()), false)) || out.contains(&del("a")),
        "the first a must go from the targets: {out:?}"
    );
}

#[test]
fn moved_file_then_deleted_deletes_both_names() {
    let mut s = Sim::new();
    s.ev(MovedFrom, "a", false, 5)
        .ev(MovedTo, "b", false, 5)
        .f(Delete, "b")
        .at_ms(10);
    let mut out = s.out();
    out.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(out, vec![del("a"), del("b")]);
}

#[test]
fn rename_churn_y_to_y2_and_back() {
    let mut s = Sim::new();
    s.ev(MovedFrom, "y", true, 1)
        .ev(MovedTo, "y2", true, 1)
        .ev(MovedFrom, "y2", true, 2)
        .ev(MovedTo, "y", true, 2)
        .at_ms(10);
    let out = s.out();
    // y2 never existed on the target; y is sent again whole. Nothing claims y is gone.
    assert!(
        out.iter().all(|c| !(c.1 == "y" && c.0 == Op::Delete)),
        "{out:?}"
    );
    assert!(out.iter().any(|c| c.1 == "y" && c.3), "{out:?}");
}

#[test]
fn resync_is_emitted_at_once() {
    let mut s = Sim::new();
    s.f(Resync, "");
    assert_eq!(s.c.next_deadline().map(|d| d <= Instant::now()), Some(true));
    let out = s.out();
    assert_eq!(out, vec![(Op::Resync, ".".into(), None, true)]);
}

#[test]
fn changes_keep_first_seen_order_and_flush_all_empties() {
    let mut s = Sim::new();
    s.f(Modify, "b").f(Modify, "a");
    let all: Vec<String> =
        s.c.flush_all()
            .into_iter()
            .map(|(_, c)| c.path.to_string())
            .collect();
    assert_eq!(all, vec!["b", "a"]);
    assert_eq!(s.c.pending(), 0);
    assert_eq!(s.c.next_deadline(), None);
}

#[test]
fn a_transient_name_made_and_removed_within_its_rest_never_goes_out() {
    // vim's probe, a backup made and dropped, rsync's temp renamed.
    let mut s = Sim::new();
    s.f(Create, "d/4913").f(CloseWrite, "d/4913");
    s.f(Create, "d/x~").f(CloseWrite, "d/x~");
    s.f(Create, "d/.f.Ab12Cd").f(CloseWrite, "d/.f.Ab12Cd");
    s.at_ms(500);
    assert!(s.out().is_empty(), "closed, but held until it rests");
    s.f(Delete, "d/4913").f(Delete, "d/x~");
    s.ev(MovedFrom, "d/.f.Ab12Cd", false, 9)
        .ev(MovedTo, "d/f", false, 9);
    s.at_ms(520);
    assert_eq!(s.out(), vec![up("d/f")]);
    // The unlinks still go (a full sync may have copied the file meanwhile); the
    // renamed temp file is forgotten.
    s.at_ms(1_500);
    assert_eq!(s.out(), vec![del("d/4913"), del("d/x~")]);
    s.at_ms(5_000);
    assert!(s.out().is_empty());
}

#[test]
fn a_transient_name_carried_by_its_new_directory_is_deleted_when_renamed_away() {
    let mut s = Sim::new();
    s.ev(Create, "new", true, 0);
    s.f(Create, "new/.f.Ab12Cd").f(CloseWrite, "new/.f.Ab12Cd");
    s.at_ms(10);
    assert_eq!(s.out(), vec![(Op::Upsert, "new".into(), None, true)]);
    s.ev(MovedFrom, "new/.f.Ab12Cd", false, 3)
        .ev(MovedTo, "new/f", false, 3);
    s.at_ms(20);
    assert_eq!(s.out(), vec![up("new/f")]);
    s.at_ms(1_020);
    assert_eq!(s.out(), vec![del("new/.f.Ab12Cd")]);
}

#[test]
fn a_transient_name_that_stays_is_sent_once_rested_or_after_the_maximum_hold() {
    let mut s = Sim::new();
    s.f(Create, "report.txt~").f(CloseWrite, "report.txt~");
    s.at_ms(999);
    assert!(s.out().is_empty());
    s.at_ms(1_000);
    assert_eq!(s.out(), vec![up("report.txt~")]);
    // A delete of one still goes (a real file may have had the name).
    s.f(Delete, "report.txt~");
    s.at_ms(2_000);
    assert_eq!(s.out(), vec![del("report.txt~")]);
    // Written without a second's pause: it goes after the maximum hold.
    let mut ms = 2_000;
    s.f(Modify, "4913");
    while ms + 500 < 2_000 + 30_000 {
        ms += 500;
        s.at_ms(ms).f(Modify, "4913");
        assert!(s.out().is_empty(), "at {ms} ms");
    }
    s.at_ms(2_000 + 30_000);
    assert_eq!(s.out(), vec![up("4913")]);
    // Directories and ordinary names keep the root's timing.
    s.ev(Create, "dir~", true, 0).f(CloseWrite, "plain");
    s.at_ms(32_000 + 10);
    assert_eq!(
        s.out(),
        vec![(Op::Upsert, "dir~".into(), None, true), up("plain")]
    );
}

/// Runs `events` (ms, kind, path) and returns (ms, path) of each publication, looking
/// every millisecond up to `until`.
fn publish_times(s: &mut Sim, events: &[(u64, RawKind, &str)], until: u64) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut next = 0;
    for ms in 0..=until {
        s.at_ms(ms);
        while next < events.len() && events[next].0 == ms {
            s.f(events[next].1, events[next].2);
            next += 1;
        }
        out.extend(s.out().into_iter().map(|c| (ms, c.1)));
    }
    out
}

#[test]
fn a_file_written_once_goes_at_once_and_a_file_written_on_goes_a_handful_of_times() {
    // A writer appending every 5 ms for 3 s and closing: today's rule (quiet 10 ms,
    // max hold 100 ms) would send it about 30 times.
    let mut events = vec![(0, CloseWrite, "once")];
    events.extend((0..3_000).step_by(5).map(|ms| (ms, Modify, "log")));
    events.push((3_000, CloseWrite, "log"));
    let mut s = Sim::new();
    let got = publish_times(&mut s, &events, 6_000);
    let want: Vec<(u64, String)> = [
        (2, "once"),
        (100, "log"),   // max hold: cold
        (205, "log"),   // back 5 ms after: held 50 ms, but max hold (105 + 100) is later
        (355, "log"),   // held 150 ms from 205
        (805, "log"),   // 450 ms
        (2_155, "log"), // 1.35 s
        (3_050, "log"), // held 4 s from 2155, but closed and left 50 ms
    ]
    .into_iter()
    .map(|(ms, p)| (ms, p.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn a_hot_file_is_held_by_growing_delays_up_to_the_bound_and_cools_when_left_alone() {
    // Written and closed every 20 ms: each close is followed by a new write before
    // HOT_FIRST, so only the growing hold sends it.
    let mut events: Vec<(u64, RawKind, &str)> = Vec::new();
    for ms in (0..8_000).step_by(20) {
        events.push((ms, Modify, "f"));
        events.push((ms, CloseWrite, "f"));
    }
    // Left alone for HOT_SOON and twice its delay, then written once: at once.
    events.push((20_000, Modify, "f"));
    events.push((20_000, CloseWrite, "f"));
    let mut s = Sim::new();
    let got: Vec<u64> = publish_times(&mut s, &events, 21_000)
        .into_iter()
        .map(|(ms, _)| ms)
        .collect();
    assert_eq!(
        got,
        // Each hold counts from the previous publication: +50, +150, +450, +1350,
        // then the bound of 4 s; the last close is followed by 50 ms of rest.
        vec![2, 52, 202, 652, 2_002, 6_002, 7_980 + 50, 20_002]
    );
}

#[test]
fn a_hot_file_deleted_or_moved_away_is_not_held() {
    let mut s = Sim::new();
    let events = [
        (0, CloseWrite, "a"),
        (0, CloseWrite, "b"),
        (10, Modify, "a"), // hot: held until 52
        (10, Modify, "b"),
        (20, Delete, "a"), // a delete goes after the quiet window
    ];
    let mut got = publish_times(&mut s, &events, 25);
    s.ev(MovedFrom, "b", false, 4).ev(MovedTo, "c", false, 4);
    got.extend(
        publish_times(&mut s, &[], 40)
            .into_iter()
            .filter(|(ms, _)| *ms > 25),
    );
    let ms: Vec<(u64, &str)> = got.iter().map(|(m, p)| (*m, p.as_str())).collect();
    assert_eq!(ms, vec![(2, "a"), (2, "b"), (30, "a"), (35, "c")]);
}

#[test]
fn heat_is_bounded_and_forgotten_once_paths_are_cold() {
    let mut s = Sim::new();
    for i in 0..HEAT_CAP + 10 {
        s.f(CloseWrite, &format!("f{i}"));
    }
    s.at_ms(10);
    assert_eq!(s.out().len(), HEAT_CAP + 10);
    assert_eq!(s.c.remembered(), HEAT_CAP);
    s.at_ms(10 + HOT_SOON.as_millis() as u64);
    s.out();
    assert_eq!(s.c.remembered(), 0);
}

#[test]
fn roots_whose_files_must_rest_keep_their_own_rule() {
    let mut s = Sim::new();
    let t = s.c.timing["r"];
    s.c.timing.insert("r".into(), Timing { heat: false, ..t });
    let events = [(0, CloseWrite, "a"), (10, CloseWrite, "a")];
    let got = publish_times(&mut s, &events, 100);
    assert_eq!(got, vec![(2, "a".to_string()), (12, "a".to_string())]);
    assert_eq!(s.c.remembered(), 0);
}
