//! The anti-replay window of RFC 6347 §4.1.2.6, for one epoch of one peer.
//!
//! A sliding bitmap of the last [`WINDOW`] sequence numbers below the highest one accepted, as
//! OpenSSL keeps it (`dtls1_record_replay_check` / `dtls1_record_bitmap_update`): a number
//! above the highest is new; one within the window is new unless its bit is set; one below the
//! window is too old. The check runs before a record is opened, the update only after it
//! opened, so a record that fails authentication never moves the window.

/// How many sequence numbers below the highest accepted one the window remembers (OpenSSL's
/// bitmap is 64 bits too).
pub(crate) const WINDOW: u64 = 64;

/// One epoch's replay window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ReplayWindow {
    /// The highest sequence number accepted (0 before any: then 0 itself is still new, as in
    /// OpenSSL).
    max: u64,
    /// Bit `i` set: `max - i` was accepted.
    bits: u64,
}

impl ReplayWindow {
    /// Whether a record with sequence number `seq` may be new (check before opening it).
    pub(crate) fn is_fresh(&self, seq: u64) -> bool {
        if seq > self.max {
            return true;
        }
        let back = self.max - seq;
        back < WINDOW && self.bits & (1 << back) == 0
    }

    /// Records `seq` as accepted (after its record opened).
    pub(crate) fn accept(&mut self, seq: u64) {
        if seq > self.max {
            let ahead = seq - self.max;
            self.bits = if ahead < WINDOW {
                (self.bits << ahead) | 1
            } else {
                1
            };
            self.max = seq;
        } else {
            let back = self.max - seq;
            if back < WINDOW {
                self.bits |= 1 << back;
            }
        }
    }

    /// The highest sequence number accepted so far (0 before any).
    pub(crate) fn highest(&self) -> u64 {
        self.max
    }

    /// The window as two numbers (highest accepted, bitmap), to save it.
    pub(crate) fn to_parts(self) -> (u64, u64) {
        (self.max, self.bits)
    }

    /// A window from [`to_parts`](Self::to_parts).
    pub(crate) fn from_parts(max: u64, bits: u64) -> Self {
        Self { max, bits }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// The reference: every sequence number ever accepted, and RFC 6347's rule stated plainly.
    #[derive(Default)]
    struct Model {
        seen: BTreeSet<u64>,
    }

    impl Model {
        fn highest(&self) -> u64 {
            self.seen.last().copied().unwrap_or(0)
        }

        fn is_fresh(&self, seq: u64) -> bool {
            let max = self.highest();
            if self.seen.is_empty() || seq > max {
                return true;
            }
            max - seq < WINDOW && !self.seen.contains(&seq)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any sequence of checks and accepts (accepted only when fresh, as the record layer
        /// does; some fresh ones "fail to open" and are not accepted) agrees with the model.
        #[test]
        fn the_window_agrees_with_the_reference_model(
            ops in prop::collection::vec((0u64..400, any::<bool>(), 0u8..4), 1..300)
        ) {
            let mut window = ReplayWindow::default();
            let mut model = Model::default();
            let mut base = 0u64;
            for (offset, opened, jump) in ops {
                // Mostly near the top, sometimes far ahead (gaps larger than the window).
                if jump == 0 {
                    base += 1000;
                }
                let seq = base.saturating_sub(200) + offset;
                let fresh = model.is_fresh(seq);
                prop_assert_eq!(window.is_fresh(seq), fresh, "seq {}", seq);
                if fresh && opened {
                    window.accept(seq);
                    model.seen.insert(seq);
                }
                prop_assert_eq!(window.highest(), model.highest());
            }
        }
    }

    #[test]
    fn edges_of_the_window() {
        let mut w = ReplayWindow::default();
        assert!(w.is_fresh(0));
        w.accept(0);
        assert!(!w.is_fresh(0), "a replay of 0");
        w.accept(100);
        assert!(!w.is_fresh(100));
        assert!(w.is_fresh(99));
        assert!(
            w.is_fresh(100 - (WINDOW - 1)),
            "the oldest number the window holds"
        );
        assert!(!w.is_fresh(100 - WINDOW), "one below the window is too old");
        w.accept(100 - (WINDOW - 1));
        assert!(!w.is_fresh(100 - (WINDOW - 1)));
        // A jump larger than the window forgets everything below it.
        w.accept(100 + WINDOW + 5);
        assert!(!w.is_fresh(100));
        assert!(w.is_fresh(100 + WINDOW + 4));
        // The largest sequence numbers do not overflow.
        let max = (1u64 << 48) - 1;
        w.accept(max);
        assert!(!w.is_fresh(max));
        assert!(w.is_fresh(max - 1));
    }
}
