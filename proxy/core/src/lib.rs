//! Weft's core sidecar proxy: everything native on the data path, without the WASM runtime.
//!
//! [`Proxy::bind`] takes a [`Config`], binds every socket (so a port in use is an error before
//! anything runs), and [`Proxy::run`] starts one worker thread per core, each with its own
//! single-threaded tokio runtime and its own `SO_REUSEPORT` socket per listener, plus the
//! admin endpoint on the calling thread. It returns after a graceful drain on SIGTERM or
//! SIGINT. On SIGHUP it re-reads its config file and swaps in the new filter chains.
//!
//! ```no_run
//! use weft_core::{Config, Proxy, ProxyOptions};
//! let config = Config::load("proxy.yaml".as_ref())?;
//! // A proxy whose listeners have filters needs a filter host (`weft_wasm::WasmHost`).
//! let options = ProxyOptions { workers: 2, config_path: None, control: None, filter_host: None };
//! let proxy = Proxy::bind(config, options)?;
//! proxy.run()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The modules follow the data path:
//!
//! - [`downstream`]: listening sockets, worker threads, accepted connections, transports;
//! - [`http`]: the request path as named phases over one request context;
//! - [`filter`]: the seam to a filter chain (the WASM host implements [`filter::FilterHost`]);
//! - [`body`]: the body types that cross the request path;
//! - [`upstream`]: clusters, endpoints, limits held by drop guards, balancers, pools,
//!   connecting, and [`upstream::dispatch`], the one way a request reaches an endpoint;
//! - [`control`]: following a control service (snapshots, state dir, backoff);
//! - [`app`]: startup, reload, drain; [`admin`]: the admin endpoint; [`metrics`], [`clock`];
//!   [`golden`]: the traffic counts reported to the control service; [`tap`]: live request
//!   samples for `weftctl tap`; [`otlp`]: spans exported to an OpenTelemetry collector.
//!
//! Module dependencies point one way (`app` → `downstream` → `http` → `upstream` → `body` →
//! `filter`); see `docs/ARCHITECTURE.md` for the code map and invariants.

pub mod admin;
pub mod app;
pub mod body;
pub mod clock;
pub mod control;
pub mod downstream;
pub mod filter;
pub mod golden;
pub mod http;
pub mod idle;
pub mod metrics;
pub mod otlp;
pub mod overload;
pub mod relay;
pub mod tap;
pub mod tcp;
pub mod tls;
pub mod upstream;

/// The configuration schema (crate `weft-config`).
pub use weft_config as config;

pub use app::{Proxy, ProxyOptions, StartError};
pub use config::Config;
