//! Reconnection backoff for the control stream.

use std::time::Duration;

/// Reconnection delays: 1 s, then ×1.6 each time up to 120 s, each with ±20 % jitter.
#[derive(Debug)]
pub struct Backoff {
    base: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: 1.0 }
    }
}

impl Backoff {
    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let jitter = 1.0 + (fastrand::f64() * 0.4 - 0.2);
        let d = (self.base * jitter).min(120.0);
        self.base = (self.base * 1.6).min(120.0);
        Duration::from_secs_f64(d)
    }

    /// Back to the first delay (after a session that worked).
    pub fn reset(&mut self) {
        self.base = 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_1_6_with_jitter_and_caps_at_120_s() {
        let mut b = Backoff::default();
        let mut base = 1.0f64;
        for _ in 0..20 {
            let d = b.next_delay().as_secs_f64();
            assert!(
                d >= (base * 0.8).min(120.0) - 1e-9 && d <= (base * 1.2).min(120.0) + 1e-9,
                "{d} vs {base}"
            );
            base = (base * 1.6).min(120.0);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }
}
