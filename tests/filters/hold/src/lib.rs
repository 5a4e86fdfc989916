//! An authentication filter that is not ready until its root context has fetched what it
//! needs (as an OIDC filter waits for its discovery document), here simulated by time: it
//! becomes ready `ready_after_ms` after it starts, checked from `on_tick`. While it is not
//! ready it pauses every request with nothing outstanding and remembers its context; when it
//! becomes ready, `on_tick` takes each one up again through `set_effective_context`:
//!
//! - `allow`: resumes it (`x-held: yes` was added while it waited);
//! - `deny`: answers it 403 `denied after discovery`;
//! - `trap`: traps instead of becoming ready (the held requests must fail, not pass);
//! - `never`: never becomes ready (the held requests must end at their timeout);
//! - `wrong-way`: becomes ready, then continues each held request's *response* (not what is
//!   held: the requests must stay held until their timeout, as in Envoy);
//! - `fetch`: fetches its "discovery document" from its root context, as OIDC filters do:
//!   on its first tick it calls cluster `auth` (`GET /status/<n>`, `n` the number in the
//!   configuration); a 200 makes it ready and resumes the held requests, anything else
//!   denies them (403 `discovery failed`).
//!
//! Configuration: `<mode>:<ready_after_ms>` (for `fetch`, `fetch:<status>`), e.g.
//! `allow:400`. Requests arriving once it is ready go straight on with `x-held: no`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root {
            mode: String::new(),
            ready_after: Duration::ZERO,
            started: None,
            ready: Rc::new(Cell::new(false)),
            pending: Rc::new(RefCell::new(Vec::new())),
            fetching: false,
        })
    });
}}

struct Root {
    mode: String,
    ready_after: Duration,
    started: Option<SystemTime>,
    ready: Rc<Cell<bool>>,
    pending: Rc<RefCell<Vec<u32>>>,
    /// `fetch`: the discovery call is out.
    fetching: bool,
}

impl Root {
    /// Becomes ready and takes up every held request: resumes it, or denies it.
    fn release(&mut self, allow: bool) {
        self.ready.set(allow);
        let (status, body): (u32, &[u8]) = match self.mode.as_str() {
            "fetch" => (403, b"discovery failed\n"),
            _ => (403, b"denied after discovery\n"),
        };
        for context in self.pending.borrow_mut().drain(..) {
            if hostcalls::set_effective_context(context).is_err() {
                // The request is gone (its client left): counted.
                if let Ok(id) = hostcalls::define_metric(proxy_wasm::types::MetricType::Counter, "hold_gone") {
                    let _ = hostcalls::increment_metric(id, 1);
                }
                continue;
            }
            if self.mode == "wrong-way" {
                // Continues the response, which is not what is held: nothing goes on.
                let _ = hostcalls::resume_http_response();
            } else if allow {
                let _ = hostcalls::resume_http_request();
            } else {
                let _ = hostcalls::send_http_response(status, vec![("x-held", "denied")], Some(body));
            }
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _trailers: usize) {
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        self.release(status == "200");
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let Some((mode, ms)) = config.split_once(':') else {
            return false;
        };
        let Ok(ms) = ms.parse::<u64>() else {
            return false;
        };
        self.mode = mode.to_owned();
        self.ready_after = Duration::from_millis(ms);
        self.set_tick_period(Duration::from_millis(50));
        matches!(mode, "allow" | "deny" | "trap" | "never" | "fetch" | "wrong-way")
    }

    fn on_tick(&mut self) {
        if self.ready.get() {
            return;
        }
        if self.mode == "fetch" {
            if !self.fetching {
                self.fetching = true;
                let path = format!("/status/{}", self.ready_after.as_millis());
                let headers = vec![(":method", "GET"), (":path", path.as_str()), (":authority", "auth")];
                if self.dispatch_http_call("auth", headers, None, vec![], Duration::from_secs(5)).is_err() {
                    self.release(false);
                }
            }
            return;
        }
        let now = self.get_current_time();
        let started = *self.started.get_or_insert(now);
        if now.duration_since(started).unwrap_or_default() < self.ready_after {
            return;
        }
        match self.mode.as_str() {
            "never" => return,
            "trap" => panic!("the discovery document could not be fetched"),
            _ => {}
        }
        let allow = self.mode != "deny";
        self.release(allow);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Held {
            id: context_id,
            ready: self.ready.clone(),
            pending: self.pending.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Held {
    id: u32,
    ready: Rc<Cell<bool>>,
    pending: Rc<RefCell<Vec<u32>>>,
}

impl Context for Held {}

impl HttpContext for Held {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if self.ready.get() {
            self.set_http_request_header("x-held", Some("no"));
            return Action::Continue;
        }
        self.set_http_request_header("x-held", Some("yes"));
        self.pending.borrow_mut().push(self.id);
        Action::Pause
    }
}
