//! Settings shared by the criterion benchmarks.

use std::time::Duration;

use criterion::Criterion;

/// Short runs (1 s warm-up, 2 s measurement, 30 samples) so that the whole suite takes
/// about a minute; criterion's command-line options still apply.
pub fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}
