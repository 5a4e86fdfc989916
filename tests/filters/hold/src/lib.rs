//! An authentication filter that is not ready until its root context has fetched what it
//! needs (as an OIDC filter waits for its discovery document), here simulated by time: it
//! becomes ready `ready_after_ms` after it starts, checked from `on_tick`. While it is not
//! ready it pauses every request with nothing outstanding and remembers its context; when it
//! becomes ready, `on_tick` takes each one up again through `set_effective_context`:
//!
//! - `allow`: resumes it (`x-held: yes` was added while it waited);
//! - `deny`: answers it 403 `denied after discovery`;
//! - `trap`: traps instead of becoming ready (the held requests must fail, not pass);
//! - `never`: never becomes ready (the held requests must end at their timeout).
//!
//! Configuration: `<mode>:<ready_after_ms>`, e.g. `allow:400`. Requests arriving once it is
//! ready go straight on with `x-held: no`.

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
        })
    });
}}

struct Root {
    mode: String,
    ready_after: Duration,
    started: Option<SystemTime>,
    ready: Rc<Cell<bool>>,
    pending: Rc<RefCell<Vec<u32>>>,
}

impl Context for Root {}

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
        matches!(mode, "allow" | "deny" | "trap" | "never")
    }

    fn on_tick(&mut self) {
        if self.ready.get() {
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
        self.ready.set(true);
        for context in self.pending.borrow_mut().drain(..) {
            if hostcalls::set_effective_context(context).is_err() {
                continue; // the request is gone
            }
            if self.mode == "deny" {
                let _ = hostcalls::send_http_response(
                    403,
                    vec![("x-held", "denied")],
                    Some(b"denied after discovery\n"),
                );
            } else {
                let _ = hostcalls::resume_http_request();
            }
        }
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
