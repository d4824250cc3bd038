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
//! - A read that follows a quiet spell (no events for more than [`STREAM_GAP`]) is
//!   never delayed, so a single write, or a few, is read as soon as the kernel has it.
//! - A delayed read waits at most [`PACE`] after the previous one, so the events of a
//!   stream wait at most [`PACE`] in the kernel queue.
//! - A read that finds nothing (the writer paused, say descheduled on a busy machine)
//!   makes the next read wait for inotify again, without delay; the stream goes on
//!   being paced after that read unless it came after a quiet spell.
//! - A read that brought [`FULL_READ`] events or more is followed by the next at once:
//!   events come faster than a paced read takes them, and the kernel queue (16,384
//!   events by default) must not overflow while the watcher waits.

use std::time::{Duration, Instant};

/// The time between two reads while events stream in.
pub(crate) const PACE: Duration = Duration::from_millis(1);
/// Events this soon after the previous ones continue a stream.
pub(crate) const STREAM_GAP: Duration = Duration::from_millis(5);
/// Events read in one stream before the reads are paced: a file written whole is three
/// (create, modify, close_write), a few files and a rename or two stay below it.
pub(crate) const STREAM_EVENTS: usize = 64;
/// A read this large may have left events queued: the buffer holds `READ_BUFFER / 32`
/// events that name an entry (32 bytes or more each), and half of that is a read that
/// came close to filling it.
pub(crate) const FULL_READ: usize = crate::READ_BUFFER / 32 / 2;

#[derive(Debug, Default, Clone)]
pub(crate) struct Pacer {
    /// The last read that found events.
    last_events: Option<Instant>,
    /// Events read since the stream began.
    streamed: usize,
    /// The last read found nothing.
    drained: bool,
    /// The last read brought [`FULL_READ`] events or more.
    full: bool,
}

impl Pacer {
    /// A read at `now` returned `events` events.
    pub(crate) fn read(&mut self, now: Instant, events: usize) {
        let continues = self
            .last_events
            .is_some_and(|t| now.saturating_duration_since(t) <= STREAM_GAP);
        self.drained = events == 0;
        self.full = events >= FULL_READ;
        if !continues {
            self.streamed = 0;
        }
        if events > 0 {
            self.streamed = self.streamed.saturating_add(events);
            self.last_events = Some(now);
        }
    }

    /// When the next read may happen: `None` as soon as inotify is readable, or the
    /// moment to read whatever has been queued by then.
    pub(crate) fn next_read(&self) -> Option<Instant> {
        if self.drained || self.full || self.streamed < STREAM_EVENTS {
            return None;
        }
        self.last_events.map(|t| t + PACE)
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
    fn a_stream_is_read_once_per_pace() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        let mut t = t0;
        for _ in 0..STREAM_EVENTS / 2 {
            p.read(t, 2);
            t += Duration::from_micros(30);
        }
        let last = t - Duration::from_micros(30);
        assert_eq!(p.next_read(), Some(last + PACE));
        p.read(last + PACE, 100);
        assert_eq!(p.next_read(), Some(last + PACE + PACE));
    }

    #[test]
    fn a_read_that_finds_nothing_waits_for_inotify_and_the_stream_goes_on_paced() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        p.read(t0, STREAM_EVENTS);
        assert_eq!(p.next_read(), Some(t0 + PACE));
        // The writer was descheduled: nothing queued at the paced read.
        p.read(t0 + PACE, 0);
        assert_eq!(p.next_read(), None);
        // It writes again 3 ms later: read at once, then paced again.
        p.read(t0 + ms(4), 1);
        assert_eq!(p.next_read(), Some(t0 + ms(4) + PACE));
        // After a quiet spell, a new stream is not paced before its own events add up.
        p.read(t0 + ms(4) + PACE, 0);
        p.read(t0 + ms(4) + STREAM_GAP + ms(1), 3);
        assert_eq!(p.next_read(), None);
    }

    #[test]
    fn a_read_that_nearly_filled_the_buffer_is_followed_at_once() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        p.read(t0, STREAM_EVENTS);
        p.read(t0 + PACE, FULL_READ);
        assert_eq!(p.next_read(), None);
        p.read(t0 + PACE, 10);
        assert_eq!(p.next_read(), Some(t0 + PACE + PACE));
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
