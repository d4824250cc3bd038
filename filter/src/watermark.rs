//! The filter's part of the crash checkpoint (ARCHITECTURE.md, invariant 4): what it may
//! say in [`ChangeBatch::safe_us`](protocol::wire::ChangeBatch::safe_us).
//!
//! The watcher stamps each raw batch with `read_to_us`: every change with a ctime before
//! it is in that batch or an earlier one. So a change that first came in a batch has a
//! ctime at or after the `read_to_us` of the batch before: that is its *floor*. The
//! filter may vouch, for a root, for the last `read_to_us` it took in, but not past
//! the floor of a change it still holds (a hot file, a transient name resting, a move
//! waiting for its pair). Held changes carry the `time_us` of the batch they first came
//! in (their `since_us`), so the filter keeps, for each batch back to the oldest held
//! change, its `time_us` and the `read_to_us` before it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use protocol::wire::RawBatch;

/// How long a computed say is used again: finding the oldest change held walks all of
/// them, and in a burst the filter publishes many times a second. An older say is
/// still true (it only claims what was published by then), and within one watcher's
/// epoch later ones are no lower.
const SAY_AGAIN_FOR: Duration = Duration::from_millis(50);

/// What the watcher vouched for, and the floors of the batches held changes came in.
#[derive(Debug, Default)]
pub(crate) struct Vouched {
    /// The last batch's `read_to_us` (0: the watcher cannot say).
    read_to_us: u64,
    /// The epoch of the watcher that sent the last batch.
    epoch: Option<u64>,
    /// Batches of more than one watcher were interleaved: no single `read_to_us`
    /// speaks for every root, so nothing is vouched for any more.
    several: bool,
    /// `(time_us, floor)` of each batch taken in, oldest first, pruned to the oldest
    /// change held.
    floors: VecDeque<(u64, u64)>,
    /// The last say computed, and when (forgotten when another watcher speaks).
    said: Option<(Instant, HashMap<String, u64>)>,
}

impl Vouched {
    /// Takes in what `batch` vouches for. `returning`: its watcher sent batches before
    /// another one's did (two watchers feed this filter).
    pub(crate) fn take(&mut self, batch: &RawBatch, returning: bool) {
        if self.epoch != Some(batch.epoch) {
            self.several |= returning;
            self.said = None;
        }
        self.epoch = Some(batch.epoch);
        self.floors.push_back((batch.time_us, self.read_to_us));
        self.read_to_us = if self.several { 0 } else { batch.read_to_us };
    }

    /// What each root's next message may say in `safe_us`, at `now`: `oldest_held`
    /// gives the `since_us` of the oldest change held per root (roots holding nothing
    /// are absent). Forgets the floors of batches newer ones make useless.
    pub(crate) fn safe_us<'a>(
        &mut self,
        now: Instant,
        roots: &[String],
        oldest_held: impl FnOnce() -> HashMap<&'a str, u64>,
    ) -> HashMap<String, u64> {
        if let Some((at, said)) = &self.said {
            if now.duration_since(*at) < SAY_AGAIN_FOR {
                return said.clone();
            }
        }
        let oldest_held = oldest_held();
        if let Some(&oldest) = oldest_held.values().min() {
            // Keep the last batch at or before the oldest held change, and the rest.
            while self.floors.len() > 1 && self.floors[1].0 <= oldest {
                self.floors.pop_front();
            }
        } else {
            let keep = self.floors.len().min(1);
            self.floors.drain(..self.floors.len() - keep);
        }
        let said: HashMap<String, u64> = roots
            .iter()
            .map(|r| {
                let safe = match oldest_held.get(r.as_str()) {
                    Some(&since) => self.read_to_us.min(self.floor_of(since)),
                    None => self.read_to_us,
                };
                (r.clone(), safe)
            })
            .collect();
        self.said = Some((now, said.clone()));
        said
    }

    /// The floor of a change first seen in the batch of `time_us` == `since_us`: that
    /// batch's, or, for a time no batch has (a resync the filter made itself), the
    /// last one's before it, which is no later.
    fn floor_of(&self, since_us: u64) -> u64 {
        let i = self.floors.partition_point(|(t, _)| *t <= since_us);
        match i.checked_sub(1).map(|j| self.floors[j]) {
            // Batches sharing a time: the first of them has the lowest floor.
            Some((t, _)) => {
                let first = self.floors.partition_point(|(u, _)| *u < t);
                self.floors[first].1
            }
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(epoch: u64, time_us: u64, read_to_us: u64) -> RawBatch {
        RawBatch {
            version: protocol::wire::VERSION,
            epoch,
            seq: 1,
            time_us,
            read_to_us,
            events: Vec::new(),
        }
    }

    #[test]
    fn a_held_change_holds_its_root_back_to_the_read_mark_before_its_batch() {
        let roots = vec!["a".to_string(), "b".to_string()];
        let mut v = Vouched::default();
        // Each call a moment later than the last: no say is used again.
        let mut clock = Instant::now();
        let mut at = || {
            clock += SAY_AGAIN_FOR;
            clock
        };
        assert_eq!(
            v.safe_us(at(), &roots, HashMap::new)["a"],
            0,
            "nothing read yet"
        );
        v.take(&batch(1, 100, 90), false);
        v.take(&batch(1, 200, 190), false);
        v.take(&batch(1, 300, 290), false);
        // Nothing held: the last read mark.
        assert_eq!(v.safe_us(at(), &roots, HashMap::new)["a"], 290);
        v.take(&batch(1, 400, 390), false);
        v.take(&batch(1, 500, 490), false);
        // `a` holds a change first seen in the batch of time 400: its ctime is at or
        // after 290, the mark before that batch. `b` holds nothing.
        let safe = v.safe_us(at(), &roots, || HashMap::from([("a", 400)]));
        assert_eq!((safe["a"], safe["b"]), (290, 490));
        // A time between batches (a resync the filter made): the batch before it.
        assert_eq!(
            v.safe_us(at(), &roots, || HashMap::from([("a", 450)]))["a"],
            290
        );
        // Older floors were forgotten only up to the oldest held change.
        assert_eq!(v.floor_of(400), 290);
        assert_eq!(v.floor_of(500), 390);
    }

    #[test]
    fn two_watchers_interleaved_vouch_for_nothing() {
        let roots = vec!["a".to_string()];
        let mut v = Vouched::default();
        let now = Instant::now();
        v.take(&batch(1, 100, 90), false);
        assert_eq!(v.safe_us(now, &roots, HashMap::new)["a"], 90);
        // A restarted watcher (a new epoch, never seen before) is believed, at once.
        v.take(&batch(2, 200, 190), false);
        assert_eq!(v.safe_us(now, &roots, HashMap::new)["a"], 190);
        // The first one again: two watchers feed this filter.
        v.take(&batch(1, 300, 290), true);
        v.take(&batch(2, 400, 390), true);
        assert_eq!(v.safe_us(now, &roots, HashMap::new)["a"], 0);
    }

    #[test]
    fn a_say_is_used_again_for_a_moment_and_then_computed_anew() {
        let roots = vec!["a".to_string()];
        let mut v = Vouched::default();
        let t0 = Instant::now();
        v.take(&batch(1, 100, 90), false);
        assert_eq!(v.safe_us(t0, &roots, HashMap::new)["a"], 90);
        v.take(&batch(1, 200, 190), false);
        assert_eq!(
            v.safe_us(t0 + SAY_AGAIN_FOR / 2, &roots, HashMap::new)["a"],
            90
        );
        assert_eq!(
            v.safe_us(t0 + SAY_AGAIN_FOR, &roots, HashMap::new)["a"],
            190
        );
    }
}
