//! A network (L4) filter, as written for Envoy: on opaque TCP it masks `secret` in what the
//! client sends, turns the server's `220` greeting into `221`, holds the client's bytes until
//! a whole line has arrived (Pause), counts connections opened and closed in metrics, and
//! traps on `boom`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, MetricType, PeerType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    metrics: Option<(u32, u32)>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        let opened = hostcalls::define_metric(MetricType::Counter, "netfilter_connections").unwrap();
        let closed = hostcalls::define_metric(MetricType::Counter, "netfilter_closes").unwrap();
        self.metrics = Some((opened, closed));
        true
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        let (opened, closed) = self.metrics.unwrap_or_default();
        Some(Box::new(Conn { opened, closed }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

struct Conn {
    opened: u32,
    closed: u32,
}

impl Context for Conn {}

impl StreamContext for Conn {
    fn on_new_connection(&mut self) -> Action {
        let _ = hostcalls::increment_metric(self.opened, 1);
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, end_of_stream: bool) -> Action {
        let data = self.get_downstream_data(0, size).unwrap_or_default();
        // A filter that fails: the proxy applies its failure policy.
        if data.windows(4).any(|w| w == b"boom") {
            panic!("boom");
        }
        // A line at a time: hold a partial one until its end (or the client's end).
        if !data.ends_with(b"\n") && !end_of_stream {
            return Action::Pause;
        }
        let masked = String::from_utf8_lossy(&data).replace("secret", "******");
        self.set_downstream_data(0, size, masked.as_bytes());
        Action::Continue
    }

    fn on_upstream_data(&mut self, size: usize, _end_of_stream: bool) -> Action {
        let data = self.get_upstream_data(0, size).unwrap_or_default();
        if data.starts_with(b"220 ") {
            self.set_upstream_data(0, 3, b"221");
        }
        Action::Continue
    }

    fn on_downstream_close(&mut self, _peer: PeerType) {
        let _ = hostcalls::increment_metric(self.closed, 1);
    }
}
