//! A filter of the previous SDK generation (proxy-wasm 0.1, ABI 0.1.0), as older Envoy and
//! Istio filters were built: its root context reads its configuration with
//! `proxy_get_configuration`, and its request-headers callback (which has no end-of-stream
//! argument in that ABI) adds `x-legacy: <configuration>`; a request to `/legacy-deny` gets a
//! local 403.

use std::cell::RefCell;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, LogLevel};

thread_local! {
    static CONFIG: RefCell<String> = RefCell::new(String::new());
}

#[unsafe(no_mangle)]
pub fn _start() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Legacy) });
}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self
            .get_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        CONFIG.with(|c| *c.borrow_mut() = config);
        true
    }
}

struct Legacy;

impl Context for Legacy {}

impl HttpContext for Legacy {
    fn on_http_request_headers(&mut self, _num_headers: usize) -> Action {
        if self.get_http_request_header(":path").as_deref() == Some("/legacy-deny") {
            self.send_http_response(403, vec![("x-legacy", "denied")], Some(b"denied by a 0.1 filter\n"));
            return Action::Pause;
        }
        let config = CONFIG.with(|c| c.borrow().clone());
        self.set_http_request_header("x-legacy", Some(&config));
        Action::Continue
    }
}
