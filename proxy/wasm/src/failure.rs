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

use crate::limits::Stopped;

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

/// Which kind of failure `e`, returned by callback `during`, is: decided from what the
/// store's limits recorded while it ran ([`Stopped`]: a refused memory growth, an interrupt
/// at the deadline) and the trap code, never from an error's text.
pub fn classify(e: wasmtime::Error, stopped: Stopped, during: &str) -> Failure {
    let trap = e.downcast_ref::<Trap>().copied();
    let kind = if stopped.memory {
        FailureKind::Memory
    } else if stopped.deadline || trap == Some(Trap::Interrupt) {
        FailureKind::Deadline
    } else {
        FailureKind::Trap
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
#[derive(Clone)]
pub struct FailureCounters {
    /// The filter's name (for the log).
    filter: String,
    /// The counters, in [`FailureKind::ALL`] order.
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
        tracing::warn!(
            filter = %self.filter,
            kind = f.kind.as_str(),
            "filter failed: {}",
            f.message
        );
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
        reset: false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use weft_config::FilterLimits;

    use super::*;
    use crate::instance::FilterInstance;
    use crate::state::Seen;
    use crate::testing::{self, i32_const};

    /// 1 MiB of memory, 10 ms per callback.
    const SMALL: FilterLimits = FilterLimits {
        memory_mb: 1,
        callback_ms: 10,
        buffer_kb: 64,
    };

    /// Runs a filter whose request-headers callback (named `name`) is `body`, and returns
    /// how it failed.
    fn failure_of(name: &str, body: Vec<u8>) -> Failure {
        let rt = testing::runtime();
        let spec = testing::spec(&rt, &testing::filter(&[], name, body), SMALL);
        let mut inst = FilterInstance::start(&[&spec], 0, 1).expect("starts");
        let ticks = spec.callback_ticks;
        let ctx = inst.new_context(0, ticks).expect("context");
        let (mut head, info) = (testing::request(), testing::info());
        inst.headers(ticks, ctx, &mut head, &info, true, &mut Seen::default())
            .err()
            .expect("the callback fails")
    }

    #[test]
    fn a_trap_is_a_trap() {
        let f = failure_of("headers", vec![0x00]); // unreachable
        assert_eq!(f.kind, FailureKind::Trap);
        assert!(f.message.contains("unreachable"), "{}", f.message);
    }

    #[test]
    fn a_refused_memory_growth_is_memory() {
        // memory.grow by 1000 pages (62.5 MiB) past the 1 MiB cap.
        let body = [i32_const(1000), vec![0x40, 0x00, 0x1a], i32_const(0)].concat();
        let f = failure_of("headers", body);
        assert_eq!(f.kind, FailureKind::Memory, "{}", f.message);
    }

    #[test]
    fn a_runaway_loop_is_a_deadline() {
        // loop { br 0 }
        let body = [vec![0x03, 0x40, 0x0c, 0x00, 0x0b], i32_const(0)].concat();
        let started = Instant::now();
        let f = failure_of("headers", body);
        assert_eq!(f.kind, FailureKind::Deadline, "{}", f.message);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_trap_whose_text_mentions_memory_growth_is_still_a_trap() {
        // The trap's backtrace names the function: the text says "grow" and "memory".
        let wasm = testing::filter(&[], "grow_memory_pool", vec![0x00]);
        let engine = wasmtime::Engine::default();
        let module = wasmtime::Module::new(&engine, &wasm).unwrap();
        let mut store = wasmtime::Store::new(&engine, ());
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let headers = instance
            .get_typed_func::<(i32, i32, i32), i32>(&mut store, "proxy_on_request_headers")
            .unwrap();
        let text = format!("{:?}", headers.call(&mut store, (1, 0, 1)).unwrap_err());
        assert!(text.contains("grow_memory_pool"), "{text}");

        let f = failure_of("grow_memory_pool", vec![0x00]);
        assert_eq!(f.kind, FailureKind::Trap, "{}", f.message);
        let e = wasmtime::format_err!("the filter could not grow its memory pool");
        assert_eq!(classify(e, Stopped::default(), "x").kind, FailureKind::Trap);
    }

    #[test]
    fn the_recorded_facts_decide() {
        let memory = Stopped {
            memory: true,
            deadline: false,
        };
        let e = wasmtime::format_err!("anything");
        assert_eq!(classify(e, memory, "x").kind, FailureKind::Memory);
        let e = wasmtime::Error::from(Trap::Interrupt);
        assert_eq!(
            classify(e, Stopped::default(), "x").kind,
            FailureKind::Deadline
        );
        let e = wasmtime::Error::from(Trap::MemoryOutOfBounds);
        let f = classify(e, Stopped::default(), "on_x");
        assert_eq!(f.kind, FailureKind::Trap);
        assert!(f.message.starts_with("on_x: "), "{}", f.message);
    }
}
