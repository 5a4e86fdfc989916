//! How filters fail and what follows: the [`FailureKind`]s counted in
//! `weft_filter_failures_total`, [`classify`] (which kind an error from a callback is), and
//! the failure policies' answer to the stream ([`policy_reply`]). What happens to the failed
//! instance on its worker is in [`crate::worker::fail`].

use bytes::Bytes;
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use wasmtime::Trap;

use weft_config::FailurePolicy;
use weft_core::filter::LocalReply;

/// How a filter failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// A trap (panic, `unreachable`, bad memory access, `proc_exit`).
    Trap,
    /// The callback ran past its deadline.
    Deadline,
    /// The instance hit its memory cap.
    Memory,
    /// A fresh instance could not start (instantiate, `on_vm_start`, `on_configure`).
    Start,
}

impl FailureKind {
    /// Every kind, in the order of [`FailureCounters`].
    pub const ALL: [Self; 4] = [Self::Trap, Self::Deadline, Self::Memory, Self::Start];

    /// Label value in `weft_filter_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trap => "trap",
            Self::Deadline => "deadline",
            Self::Memory => "memory",
            Self::Start => "start",
        }
    }
}

/// A failure with its description.
#[derive(Debug)]
pub struct Failure {
    /// What kind.
    pub kind: FailureKind,
    /// Details (the trap message, which callback).
    pub message: String,
}

impl Failure {
    /// A fresh instance could not start, for `message`.
    pub fn start(message: String) -> Self {
        Self {
            kind: FailureKind::Start,
            message,
        }
    }
}

/// Which kind of failure `e`, returned by callback `during`, is.
pub fn classify(e: wasmtime::Error, during: &str) -> Failure {
    let full = format!("{e:?}");
    let trap = e.downcast_ref::<Trap>();
    let kind = match trap {
        Some(Trap::Interrupt) => FailureKind::Deadline,
        // StoreLimits with trap_on_grow_failure reports a refused `memory.grow`.
        _ if full.contains("memory") && full.contains("grow") => FailureKind::Memory,
        _ => FailureKind::Trap,
    };
    let detail = match (kind, trap) {
        (FailureKind::Deadline, _) => "callback ran past its deadline".to_owned(),
        (FailureKind::Memory, _) => "memory limit reached".to_owned(),
        (_, Some(t)) => t.to_string(),
        (_, None) => e.root_cause().to_string(),
    };
    Failure {
        kind,
        message: format!("{during}: {detail}"),
    }
}

/// `weft_filter_failures_total{filter, kind}` handles of one filter, by [`FailureKind`].
pub struct FailureCounters {
    filter: String,
    counters: [Counter; 4],
}

impl FailureCounters {
    /// Counts filter `filter`'s failures on `counters` (trap, deadline, memory, start: as
    /// `weft_core::metrics::Metrics::filter_failures` returns them).
    pub fn new(filter: &str, counters: [Counter; 4]) -> Self {
        Self {
            filter: filter.to_owned(),
            counters,
        }
    }

    /// Counts and logs `f`.
    pub fn count(&self, f: &Failure) {
        let i = FailureKind::ALL
            .iter()
            .position(|k| *k == f.kind)
            .unwrap_or(0);
        self.counters[i].inc();
        tracing::warn!(filter = %self.filter, kind = f.kind.as_str(), "filter failed: {}", f.message);
    }
}

/// What a stream gets when its filter `filter` failed (or is failed on this worker), by the
/// filter's policy: `None` to go on without the filter (fail_open), else a 503 naming it.
pub fn policy_reply(policy: FailurePolicy, filter: &str) -> Option<LocalReply> {
    match policy {
        FailurePolicy::FailOpen => None,
        FailurePolicy::FailClosed | FailurePolicy::Reload => Some(failure_reply(filter)),
    }
}

/// 503 for a stream whose filter failed.
fn failure_reply(filter: &str) -> LocalReply {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(filter) {
        headers.insert(HeaderName::from_static("x-weft-filter-failed"), v);
    }
    LocalReply {
        status: StatusCode::SERVICE_UNAVAILABLE,
        headers,
        body: Bytes::from_static(b"filter failure\n"),
    }
}
