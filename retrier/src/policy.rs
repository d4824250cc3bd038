//! The retrier's pure decisions: when to try again, and how to keep a backlog bounded.

use std::collections::BTreeSet;
use std::time::Duration;

use protocol::config::Retry;
use protocol::wire::Work;
use protocol::PathBytes;

/// The delay before the next try after `attempt` consecutive failures (1-based):
/// `initial`, doubling per attempt up to `max`, plus up to `jitter` of itself
/// (`unit` in `[0, 1)` is the random draw).
pub fn next_attempt(policy: &Retry, attempt: u32, unit: f64) -> Duration {
    protocol::backoff::delay(policy.initial, policy.max, attempt, policy.jitter, unit)
}

/// Merges `parts` into one piece of work: subtrees absorb the paths and subtrees
/// inside them — unless `keep_paths` (a two-way target, whose compares never delete:
/// a path may be a delete). Cron excludes are kept only when every part is the same
/// full sync.
pub fn merge(parts: impl IntoIterator<Item = Work>, keep_paths: bool) -> Work {
    let mut resyncs: BTreeSet<PathBytes> = BTreeSet::new();
    let mut paths: BTreeSet<PathBytes> = BTreeSet::new();
    let mut excludes: Option<Vec<String>> = None;
    let mut catch_up = 0u64;
    let mut since = 0u64;
    for w in parts {
        since = protocol::earliest_us(since, w.since_us);
        if w.catch_up_us != 0 && (catch_up == 0 || w.catch_up_us < catch_up) {
            catch_up = w.catch_up_us;
        }
        // A plain piece (no excludes of its own) needs everything sent: drop them.
        excludes = match excludes {
            None => Some(w.excludes.clone()),
            Some(e) if e == w.excludes => Some(e),
            Some(_) => Some(Vec::new()),
        };
        resyncs.extend(w.resyncs);
        paths.extend(w.paths);
    }
    let top: Vec<PathBytes> = resyncs
        .iter()
        .filter(|s| !resyncs.iter().any(|o| o != *s && s.is_within(o)))
        .cloned()
        .collect();
    if !keep_paths {
        paths.retain(|p| !top.iter().any(|s| p.is_within(s)));
    }
    // A resync of the whole root covers a catch-up.
    if top.iter().any(PathBytes::is_root) {
        catch_up = 0;
    }
    Work {
        resyncs: top,
        paths: paths.into_iter().collect(),
        excludes: excludes.unwrap_or_default(),
        catch_up_us: catch_up,
        since_us: since,
    }
}

/// Bounds a backlog: while it holds more than `max` paths and subtrees, the deepest
/// paths are replaced by a resync of their directory ("this directory is dirty"). The
/// tree is the truth, so a resync of the directory covers whatever happened in it.
pub fn collapse(work: Work, max: usize) -> Work {
    let mut work = work;
    while work.len() > max.max(1) {
        let depth = |p: &PathBytes| p.as_bytes().iter().filter(|&&b| b == b'/').count();
        let deepest = work
            .paths
            .iter()
            .chain(work.resyncs.iter())
            .filter(|p| !p.is_root())
            .map(depth)
            .max();
        let Some(d) = deepest else { break };
        let mut dirs = Vec::new();
        for p in work.paths.iter().chain(work.resyncs.iter()) {
            if !p.is_root() && depth(p) == d {
                dirs.push(p.parent().unwrap_or_default());
            }
        }
        let keep_paths = work.paths.into_iter().filter(|p| depth(p) != d);
        let keep_resyncs = work.resyncs.into_iter().filter(|p| depth(p) != d);
        work = merge(
            [Work {
                resyncs: keep_resyncs.chain(dirs).collect(),
                paths: keep_paths.collect(),
                excludes: work.excludes,
                catch_up_us: work.catch_up_us,
                since_us: work.since_us,
            }],
            false,
        );
    }
    work
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn merge_lets_subtrees_absorb_what_lies_inside() {
        let parts = || {
            [
                Work {
                    paths: vec![p("a/x"), p("b/y")],
                    ..Default::default()
                },
                Work {
                    resyncs: vec![p("a"), p("a/deep")],
                    paths: vec![p("b/y"), p("c")],
                    ..Default::default()
                },
            ]
        };
        let w = merge(parts(), false);
        assert_eq!(w.resyncs, vec![p("a")]);
        assert_eq!(w.paths, vec![p("b/y"), p("c")]);
        // A two-way target's: a path may be a delete, which its compares do not make.
        let w = merge(parts(), true);
        assert_eq!(w.resyncs, vec![p("a")]);
        assert_eq!(w.paths, vec![p("a/x"), p("b/y"), p("c")]);
    }

    #[test]
    fn merge_keeps_cron_excludes_only_when_all_parts_share_them() {
        let cron = Work {
            resyncs: vec![PathBytes::root()],
            excludes: vec!["*.log".into()],
            ..Default::default()
        };
        assert_eq!(
            merge([cron.clone(), cron.clone()], false).excludes,
            vec!["*.log"]
        );
        let live = Work {
            paths: vec![p("x.log")],
            ..Default::default()
        };
        assert!(merge([cron, live], false).excludes.is_empty());
    }

    #[test]
    fn catch_ups_merge_to_the_earliest_and_yield_to_a_whole_root_resync() {
        let c = |t| Work {
            catch_up_us: t,
            since_us: 0,
            ..Default::default()
        };
        assert_eq!(merge([c(5), c(0), c(3)], false).catch_up_us, 3);
        let whole = Work {
            resyncs: vec![PathBytes::root()],
            ..Default::default()
        };
        assert_eq!(merge([c(5), whole], false).catch_up_us, 0);
    }

    #[test]
    fn a_large_backlog_collapses_to_dirty_directories() {
        let mut paths: Vec<PathBytes> = (0..50).map(|i| p(&format!("d1/sub/f{i}"))).collect();
        paths.extend((0..5).map(|i| p(&format!("d2/g{i}"))));
        paths.push(p("top"));
        let w = collapse(
            Work {
                paths,
                ..Default::default()
            },
            10,
        );
        assert_eq!(w.resyncs, vec![p("d1/sub")]);
        assert_eq!(w.paths.len(), 6, "{w:?}");
        // Even a backlog of one directory's worth of files stays bounded.
        let w = collapse(
            Work {
                paths: (0..1000).map(|i| p(&format!("f{i}"))).collect(),
                ..Default::default()
            },
            10,
        );
        assert_eq!(w.resyncs, vec![PathBytes::root()]);
        assert!(w.paths.is_empty());
    }
}
