//! When to read inotify next: at once, or, while events stream in, once per [`PACE`].
//!
//! Pure, time a parameter. The watcher used to read as soon as the inotify fd was
//! readable. During a burst (a writer making files as fast as it can) that meant one
//! wake-up, one read and one bus message for every one or two events: each event woke
//! the watcher, the ZeroMQ threads on both ends of the socket and the filter, and those
//! wake-ups took the CPU from the very writer that caused them (10,000 files: ~20,000
//! watcher wake-ups). Once [`STREAM_EVENTS`] events came in reads that followed each
//! other closely, the watcher instead lets the kernel queue fill for [`PACE`] after a
//! read, so each read (and each message) carries what a millisecond of the burst
//! produced.
//!
//! # Invariants
//! - A read that follows a quiet spell (more than [`STREAM_GAP`] since the previous one)
//!   is never delayed, so a single write, or a few, is read as soon as the kernel has it.
//! - A delayed read waits at most [`PACE`] after the previous one, and a read that finds
//!   nothing ends the pacing, so the stream's last events wait at most [`PACE`] too.

use std::time::{Duration, Instant};

/// The time between two reads while events stream in.
pub(crate) const PACE: Duration = Duration::from_millis(1);
/// A read this soon after the previous one continues a stream.
pub(crate) const STREAM_GAP: Duration = Duration::from_millis(5);
/// Events read in one stream before the reads are paced: a file written whole is three
/// (create, modify, close_write), a few files and a rename or two stay below it.
pub(crate) const STREAM_EVENTS: usize = 64;

#[derive(Debug, Default, Clone)]
pub(crate) struct Pacer {
    last_read: Option<Instant>,
    /// Events read since the stream began.
    streamed: usize,
}

impl Pacer {
    /// A read at `now` returned `events` events.
    pub(crate) fn read(&mut self, now: Instant, events: usize) {
        let continues = self
            .last_read
            .is_some_and(|t| now.saturating_duration_since(t) <= STREAM_GAP);
        self.streamed = match (events, continues) {
            // Nothing was queued: the stream is over.
            (0, _) => 0,
            (n, true) => self.streamed.saturating_add(n),
            (n, false) => n,
        };
        self.last_read = Some(now);
    }

    /// When the next read may happen: `None` as soon as inotify is readable, or the
    /// moment to read whatever has been queued by then.
    pub(crate) fn next_read(&self) -> Option<Instant> {
        if self.streamed < STREAM_EVENTS {
            return None;
        }
        self.last_read.map(|t| t + PACE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_single_write_is_read_at_once() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        assert_eq!(p.next_read(), None);
        // create, modify, close_write in three reads.
        for i in 0..3 {
            p.read(t0 + Duration::from_micros(20 * i), 1);
            assert_eq!(p.next_read(), None);
        }
    }

    #[test]
    fn a_stream_is_read_once_per_pace_until_a_read_finds_nothing() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        let mut t = t0;
        for _ in 0..STREAM_EVENTS / 2 {
            p.read(t, 2);
            t += Duration::from_micros(30);
        }
        assert_eq!(p.next_read(), Some(t - Duration::from_micros(30) + PACE));
        p.read(t + PACE, 100);
        assert_eq!(p.next_read(), Some(t + PACE + PACE));
        p.read(t + PACE + PACE, 0);
        assert_eq!(p.next_read(), None);
    }

    #[test]
    fn writes_spread_out_never_add_up_to_a_stream() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        for i in 0..1000 {
            p.read(t0 + (STREAM_GAP + ms(1)) * i, 3);
            assert_eq!(p.next_read(), None, "read {i}");
        }
    }
}
