//! The Weft control API (`weft.control.v1`): messages and gRPC clients and servers generated
//! from `proto/weft/control/v1/control.proto`, the reference for every field.
//!
//! Only this crate holds generated types; the control service and the proxy convert them at
//! their edges into their own plain structs.

#![allow(missing_docs, clippy::all)]

/// `weft.control.v1`.
pub mod v1 {
    tonic::include_proto!("weft.control.v1");
}

/// The latency buckets of [`v1::TrafficCounts::latency`], shared by the proxies that fill
/// them and the control service that merges them: bucket `i` holds durations in
/// microseconds within `[lower(i), upper(i))`. Below 4 µs a bucket is 1 µs wide; above, each
/// power of two is split in 4, so a bucket's midpoint is within 12.5% of any value in it,
/// over the whole range of `u64` (252 buckets).
pub mod latency {
    /// The number of buckets.
    pub const BUCKETS: usize = 252;

    /// The bucket of a duration of `us` microseconds.
    #[inline]
    pub fn bucket(us: u64) -> usize {
        if us < 4 {
            return us as usize;
        }
        let e = 63 - us.leading_zeros() as usize; // 2..=63
        let sub = ((us >> (e - 2)) & 3) as usize;
        (e - 1) * 4 + sub
    }

    /// The smallest duration (µs) in bucket `i`.
    pub fn lower(i: usize) -> u64 {
        if i < 4 {
            return i as u64;
        }
        let (e, sub) = (i / 4 + 1, (i % 4) as u64);
        (4 + sub) << (e - 2)
    }

    /// The end (exclusive, µs) of bucket `i`; saturates at `u64::MAX` for the last.
    pub fn upper(i: usize) -> u64 {
        if i + 1 >= BUCKETS {
            u64::MAX
        } else {
            lower(i + 1)
        }
    }

    /// The value that stands for bucket `i`: its midpoint (µs).
    pub fn midpoint(i: usize) -> f64 {
        let (lo, hi) = (lower(i) as f64, upper(i) as f64);
        lo + (hi - lo) / 2.0
    }

    /// The `q` quantile (0..=1) of the counts `by_bucket` (index: bucket), in µs; `None`
    /// without counts.
    pub fn quantile(by_bucket: &[u64], q: f64) -> Option<f64> {
        let total: u64 = by_bucket.iter().sum();
        if total == 0 {
            return None;
        }
        // The rank of the quantile, 1-based: the smallest value with at least q of the
        // counts at or below it.
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &n) in by_bucket.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(midpoint(i));
            }
        }
        None
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_duration_falls_in_the_bucket_that_spans_it() {
            let mut probes: Vec<u64> = (0..5000).collect();
            for shift in 0..64 {
                let p = 1u64 << shift;
                probes.extend([p.saturating_sub(1), p, p.saturating_add(1), p | (p >> 1)]);
            }
            probes.push(u64::MAX);
            for us in probes {
                let i = bucket(us);
                assert!(i < BUCKETS, "{us} -> {i}");
                assert!(lower(i) <= us, "{us} below bucket {i} [{}..)", lower(i));
                assert!(
                    us < upper(i) || i == BUCKETS - 1,
                    "{us} past bucket {i} (ends {})",
                    upper(i)
                );
                if us >= 4 {
                    let err = (midpoint(i) - us as f64).abs() / us as f64;
                    assert!(err <= 0.125, "{us}: midpoint {} is {err} off", midpoint(i));
                }
            }
        }

        #[test]
        fn quantiles_come_from_the_ranked_bucket() {
            let mut counts = vec![0u64; BUCKETS];
            // 90 requests at 1 ms, 9 at 20 ms, 1 at 400 ms.
            counts[bucket(1_000)] += 90;
            counts[bucket(20_000)] += 9;
            counts[bucket(400_000)] += 1;
            let near = |got: Option<f64>, want: f64| {
                let got = got.unwrap();
                assert!((got - want).abs() / want <= 0.125, "{got} vs {want}");
            };
            near(quantile(&counts, 0.5), 1_000.0);
            near(quantile(&counts, 0.9), 1_000.0);
            near(quantile(&counts, 0.95), 20_000.0);
            near(quantile(&counts, 0.99), 20_000.0);
            near(quantile(&counts, 1.0), 400_000.0);
            assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
        }
    }
}
