//! The retrier's pure decisions: when to try again, and how to keep a backlog bounded.

use std::time::Duration;

use protocol::config::Retry;
use protocol::work::Work;

/// The delay before the next try after `attempt` consecutive failures (1-based):
/// `initial`, doubling per attempt up to `max`, plus up to `jitter` of itself
/// (`unit` in `[0, 1)` is the random draw).
pub(crate) fn next_attempt(policy: &Retry, attempt: u32, unit: f64) -> Duration {
    protocol::backoff::delay(policy.initial, policy.max, attempt, policy.jitter, unit)
}

/// Merges `parts` into one piece of work by [`Work::merge`]'s rule, for a target
/// whose compares make no deletes when `keep_deletes` (two-way).
pub(crate) fn merge(parts: impl IntoIterator<Item = Work>, keep_deletes: bool) -> Work {
    parts
        .into_iter()
        .fold(Work::keeping_deletes(keep_deletes), |mut w, part| {
            w.merge(part);
            w
        })
}

/// Bounds a backlog to `max` paths and subtrees ([`Work::collapse`]).
pub(crate) fn collapse(work: Work, max: usize) -> Work {
    work.collapse(max)
}

#[cfg(test)]
mod tests {
    use protocol::work::Touch;
    use protocol::PathBytes;

    use super::*;

    fn policy() -> Retry {
        Retry {
            state_dir: Default::default(),
            initial: Duration::from_millis(1000),
            max: Duration::from_secs(60),
            jitter: 0.25,
            probe: Duration::from_secs(1),
            max_paths: 10,
        }
    }

    fn p(s: &str) -> PathBytes {
        s.into()
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let ms = |a, u| next_attempt(&policy(), a, u).as_millis();
        assert_eq!(ms(1, 0.0), 1000);
        assert_eq!(ms(2, 0.0), 2000);
        assert_eq!(ms(4, 0.0), 8000);
        assert_eq!(ms(7, 0.0), 60_000);
        assert_eq!(ms(u32::MAX, 0.0), 60_000);
        assert_eq!(ms(1, 0.999_999), 1249);
        assert_eq!(ms(7, 1.0), 75_000);
    }

    /// Work as it arrives in reports: subtrees, sent paths and deleted ones.
    fn work(resyncs: &[&str], upserts: &[&str], deletes: &[&str]) -> Work {
        let mut w = Work::default();
        for r in resyncs {
            w.resync(p(r));
        }
        for u in upserts {
            w.touch(p(u), Touch::upsert(1));
        }
        for d in deletes {
            w.touch(p(d), Touch::delete(1));
        }
        w
    }

    fn names<'a>(it: impl IntoIterator<Item = &'a PathBytes>) -> Vec<String> {
        it.into_iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn merge_lets_subtrees_absorb_what_lies_inside() {
        let parts = || {
            [
                work(&[], &["a/x", "b/y"], &["a/gone"]),
                work(&["a", "a/deep"], &["b/y", "c"], &[]),
            ]
        };
        let w = merge(parts(), false);
        assert_eq!(names(&w.resyncs), ["a"]);
        assert_eq!(names(w.paths.keys()), ["b/y", "c"]);
        // A two-way target's compares make no deletes: its deletes stay listed.
        let w = merge(parts(), true);
        assert_eq!(names(&w.resyncs), ["a"]);
        assert_eq!(names(w.paths.keys()), ["a/gone", "b/y", "c"]);
        assert!(w.paths[&p("a/gone")].deleted);
    }

    #[test]
    fn merge_keeps_cron_excludes_only_when_all_parts_share_them() {
        let cron = Work {
            excludes: vec!["*.log".into()],
            ..work(&[""], &[], &[])
        };
        assert_eq!(
            merge([cron.clone(), cron.clone()], false).excludes,
            vec!["*.log"]
        );
        let live = work(&[], &["x.log"], &[]);
        assert!(merge([cron, live], false).excludes.is_empty());
    }

    #[test]
    fn catch_ups_merge_to_the_earliest_and_yield_to_a_whole_root_resync() {
        let c = |t| {
            let mut w = Work::default();
            if t != 0 {
                w.catch_up(t);
            }
            w
        };
        assert_eq!(merge([c(5), c(0), c(3)], false).catch_up, Some(3));
        assert_eq!(merge([c(5), work(&[""], &[], &[])], false).catch_up, None);
    }

    #[test]
    fn a_large_backlog_collapses_to_dirty_directories() {
        let mut files: Vec<String> = (0..50).map(|i| format!("d1/sub/f{i}")).collect();
        files.extend((0..5).map(|i| format!("d2/g{i}")));
        files.push("top".into());
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        let w = collapse(work(&[], &files, &[]), 10);
        assert_eq!(names(&w.resyncs), ["d1/sub"]);
        assert_eq!(w.paths.len(), 6, "{w:?}");
        // Even a backlog of one directory's worth of files stays bounded.
        let files: Vec<String> = (0..1000).map(|i| format!("f{i}")).collect();
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        let w = collapse(work(&[], &files, &[]), 10);
        assert_eq!(names(&w.resyncs), ["."], "the root");
        assert!(w.paths.is_empty());
    }
}
