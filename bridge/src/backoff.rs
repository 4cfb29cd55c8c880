//! [`Backoff`]: how long the edge waits before it connects again.

use std::time::Duration;

/// Reconnect waits: from `min`, doubling up to `max`, each wait drawn between half the
/// current backoff and all of it (full jitter, so that a fleet that lost its cloud at once
/// does not come back at once), and back to `min` after a link that made progress. Pure:
/// the randomness is a xorshift generator from a seed, so a test can replay it.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    /// Starts at `min`; `seed` may be anything (0 included).
    pub fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Self {
            min,
            max,
            current: min,
            rng: seed | 1,
        }
    }

    /// The wait before the next attempt, after a link that ended; `progressed`: the cloud
    /// acknowledged something on it. Call once per attempt.
    pub fn next_wait(&mut self, progressed: bool) -> Duration {
        if progressed {
            self.current = self.min;
        }
        let half = self.current.as_millis() as u64 / 2;
        self.rng = xorshift(self.rng);
        let wait = Duration::from_millis(half + self.rng % (half + 1));
        self.current = (self.current * 2).min(self.max);
        wait
    }

    /// The backoff the next wait is drawn from.
    pub fn current(&self) -> Duration {
        self.current
    }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn each_wait_is_between_half_and_all_of_a_backoff_that_doubles_up_to_the_max() {
        for seed in 0..50 {
            let mut b = Backoff::new(MIN, MAX, seed);
            let mut expect = MIN;
            for _ in 0..12 {
                assert_eq!(b.current(), expect);
                let wait = b.next_wait(false);
                assert!(
                    wait >= expect / 2 && wait <= expect,
                    "{wait:?} for {expect:?}"
                );
                expect = (expect * 2).min(MAX);
            }
            assert_eq!(b.current(), MAX);
        }
    }

    #[test]
    fn the_waits_are_jittered_not_fixed() {
        let mut b = Backoff::new(MAX, MAX, 7);
        let waits: std::collections::HashSet<_> = (0..20).map(|_| b.next_wait(false)).collect();
        assert!(waits.len() > 10, "{waits:?}");
        // Two edges with different seeds do not wait alike.
        let (mut x, mut y) = (Backoff::new(MAX, MAX, 1), Backoff::new(MAX, MAX, 2));
        let differ = (0..10)
            .filter(|_| x.next_wait(false) != y.next_wait(false))
            .count();
        assert!(differ > 5);
    }

    #[test]
    fn progress_starts_the_backoff_again_from_the_min() {
        let mut b = Backoff::new(MIN, MAX, 3);
        for _ in 0..8 {
            b.next_wait(false);
        }
        assert_eq!(b.current(), MAX);
        let wait = b.next_wait(true);
        assert!(wait >= MIN / 2 && wait <= MIN, "{wait:?}");
        assert_eq!(b.current(), MIN * 2);
    }

    #[test]
    fn the_same_seed_replays_the_same_waits() {
        let (mut a, mut b) = (Backoff::new(MIN, MAX, 42), Backoff::new(MIN, MAX, 42));
        for _ in 0..10 {
            assert_eq!(a.next_wait(false), b.next_wait(false));
        }
    }
}
