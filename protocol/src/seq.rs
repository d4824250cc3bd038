//! Loss detection on the bus: every publisher stamps a random `epoch` at start and a
//! gap-free `seq` per topic ([`Stamp`]); a subscriber keeps one [`SeqTracker`] per
//! (publisher, topic).

/// A publisher's side of one stream (one topic): its epoch and the `seq` of the last
/// message stamped. Every sender on the bus stamps its messages with one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    epoch: u64,
    seq: u64,
}

impl Stamp {
    /// A stream that starts now; `epoch` is drawn once per process
    /// (`bus::new_epoch`) and shared by its streams.
    pub fn new(epoch: u64) -> Stamp {
        Stamp { epoch, seq: 0 }
    }

    /// The `(epoch, seq)` of the next message.
    pub fn stamp(&mut self) -> (u64, u64) {
        self.seq += 1;
        (self.epoch, self.seq)
    }

    /// The epoch of this stream.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The `seq` of the last message stamped (0: none yet).
    pub fn last(&self) -> u64 {
        self.seq
    }
}

/// What one received `(epoch, seq)` means for the subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next message of a stream we have followed.
    InOrder,
    /// First message since this subscriber started. `seq == 1` means the publisher is
    /// fresh too, so nothing was missed; anything else means we joined mid-stream.
    First {
        /// The message's `seq`.
        seq: u64,
    },
    /// Messages were lost (`missed` of them), or arrived out of order / duplicated.
    Gap {
        /// How many `seq`s were skipped (0 for one out of order or repeated).
        missed: u64,
    },
    /// The publisher restarted: whatever it held in memory is gone.
    NewEpoch,
}

impl Seen {
    /// True when the subscriber cannot vouch for having seen everything.
    pub fn lost_something(self) -> bool {
        match self {
            Seen::InOrder => false,
            Seen::First { seq } => seq != 1,
            Seen::Gap { .. } | Seen::NewEpoch => true,
        }
    }
}

/// Follows one stream's `(epoch, seq)`: what each message means for loss.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    last: Option<(u64, u64)>,
}

impl SeqTracker {
    /// Takes the next message's `(epoch, seq)` and says what it means.
    pub fn observe(&mut self, epoch: u64, seq: u64) -> Seen {
        let seen = match self.last {
            None => Seen::First { seq },
            Some((e, _)) if e != epoch => Seen::NewEpoch,
            Some((_, s)) if seq == s.wrapping_add(1) => Seen::InOrder,
            Some((_, s)) => Seen::Gap {
                missed: seq.saturating_sub(s).saturating_sub(1),
            },
        };
        self.last = Some((epoch, seq));
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&[(u64, u64)], Seen)] = &[
            (&[(1, 1)], Seen::First { seq: 1 }),
            (&[(1, 5)], Seen::First { seq: 5 }),
            (&[(1, 1), (1, 2)], Seen::InOrder),
            (&[(1, 1), (1, 4)], Seen::Gap { missed: 2 }),
            (&[(1, 3), (1, 3)], Seen::Gap { missed: 0 }),
            (&[(1, 3), (2, 1)], Seen::NewEpoch),
            (&[(1, 3), (2, 1), (2, 2)], Seen::InOrder),
        ];
        for (inputs, want) in cases {
            let mut t = SeqTracker::default();
            let got = inputs.iter().map(|&(e, s)| t.observe(e, s)).last().unwrap();
            assert_eq!(got, *want, "inputs {inputs:?}");
        }
    }

    #[test]
    fn loss_classification() {
        assert!(!Seen::InOrder.lost_something());
        assert!(!Seen::First { seq: 1 }.lost_something());
        assert!(Seen::First { seq: 2 }.lost_something());
        assert!(Seen::Gap { missed: 1 }.lost_something());
        assert!(Seen::NewEpoch.lost_something());
    }

    #[test]
    fn a_stamped_stream_reads_in_order_and_a_restart_as_a_new_epoch() {
        let mut t = SeqTracker::default();
        let mut s = Stamp::new(7);
        let seen: Vec<Seen> = (0..3)
            .map(|_| {
                let (e, q) = s.stamp();
                t.observe(e, q)
            })
            .collect();
        assert_eq!(seen, [Seen::First { seq: 1 }, Seen::InOrder, Seen::InOrder]);
        assert_eq!(s.last(), 3);
        let (e, q) = Stamp::new(8).stamp();
        assert_eq!(t.observe(e, q), Seen::NewEpoch);
    }
}
