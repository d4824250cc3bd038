//! The one backoff rule of every stage: a delay that starts at `initial` and doubles
//! with each failure in a row, up to `max`, plus a random share of itself so that many
//! waiting parties do not all come back at once. The retrier's journal retries, the
//! dispatcher's retries from memory and the supervisor's stage restarts all use it.

use std::time::Duration;

/// The delay after `failures` failures in a row (1-based; 0 counts as 1): `initial`
/// doubled `failures - 1` times, at most `max`, plus up to `jitter` of itself (`unit`,
/// in `[0, 1)`, is the random draw).
pub fn delay(initial: Duration, max: Duration, failures: u32, jitter: f64, unit: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    let base = 2u32
        .checked_pow(doublings)
        .and_then(|f| initial.checked_mul(f))
        .map_or(max, |d| d.min(max));
    base + base.mul_f64(jitter.max(0.0) * unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_adds_at_most_its_share_of_jitter() {
        let ms = Duration::from_millis;
        let d = |n, jitter, unit| delay(ms(100), ms(1000), n, jitter, unit).as_millis();
        let table = [
            (0, 0.0, 0.0, 100),
            (1, 0.0, 0.0, 100),
            (2, 0.0, 0.0, 200),
            (4, 0.0, 0.0, 800),
            (5, 0.0, 0.0, 1000),
            (40, 0.0, 0.0, 1000),
            (u32::MAX, 0.0, 0.0, 1000),
            (1, 0.25, 0.999_999, 124),
            (5, 0.25, 0.5, 1125),
            (1, 0.25, 7.0, 125),
        ];
        for (n, jitter, unit, want) in table {
            assert_eq!(
                d(n, jitter, unit),
                want,
                "after {n} failures, jitter {jitter} × {unit}"
            );
        }
    }
}
