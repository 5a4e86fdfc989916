//! The WASM filter host: proxy-wasm ABI 0.2.1 on wasmtime.
//!
//! This is the only crate that touches wasmtime types; the core proxy (`weft-core`) reaches it
//! through [`weft_core::filter::FilterHost`], which [`WasmHost`] implements. The ABI reference
//! is `docs/filter-abi.md`.
//!
//! Where things are:
//!
//! - building: [`WasmRuntime`] (`runtime.rs`: engine, epoch ticker, linker, `build_chain`),
//!   `cache.rs` (compiled modules on disk), `linker.rs` (the linker that records what it
//!   defines, stubs for the rest);
//! - the ABI: `hostcalls/` (one file per proxy-wasm interface, plus WASI), over `state.rs`
//!   (the store's data), `memory.rs` (guest memory), `maps.rs` (header maps),
//!   `properties.rs`;
//! - running: `instance.rs` (a filter instance and its callbacks), `limits.rs` (memory cap
//!   and callback deadlines), `failure.rs` (failure kinds and policies), `worker.rs` (each
//!   worker's table of instances), `retired.rs` (chains swapped out), [`WasmChain`]
//!   (`chain.rs`), `stream.rs` (one stream through the chain), `ticks.rs` (ticks, queue
//!   notifications, callouts answered outside a stream's path), `queues.rs` (shared queues),
//!   `grpc.rs` (gRPC calls and streams: framing, statuses, the stream task).
//!
//! ```no_run
//! use std::sync::Arc;
//! use weft_core::filter::FilterHost;
//!
//! // What the binary hands the core (`ProxyOptions::filter_host`): compiled modules cached in
//! // the user's cache directory; the engine starts with the first chain.
//! let host: Arc<dyn FilterHost> = Arc::new(weft_wasm::WasmHost::new(None));
//! # drop(host);
//! ```

mod cache;
mod chain;
mod connection;
mod failure;
mod grpc;
mod hostcalls;
mod instance;
mod limits;
mod linker;
mod maps;
mod memory;
mod properties;
mod queues;
mod retired;
mod runtime;
mod state;
mod stream;
#[cfg(test)]
mod testing;
mod ticks;
mod worker;

use std::path::PathBuf;

pub use chain::WasmChain;
pub use properties::{Node, set_node};
pub use runtime::WasmRuntime;

use weft_config::FilterConfig;
use weft_core::filter::{ChainError, FilterChain, FilterHost};
use weft_core::metrics::Metrics;

/// Period of the epoch ticker: the granularity of callback deadlines.
pub const EPOCH_TICK_MS: u64 = 5;

/// Why a filter could not be loaded or started.
pub type WasmError = ChainError;

/// The filter host the proxy binary hands the core: creates the [`WasmRuntime`] (engine,
/// epoch ticker, module cache) when the first chain is built, so that a proxy without
/// filters never starts it.
pub struct WasmHost {
    /// Where compiled modules are cached (see [`WasmRuntime::new`]).
    cache_dir: Option<PathBuf>,
    /// The runtime, once the first chain was built.
    runtime: std::sync::OnceLock<WasmRuntime>,
    /// Held while the runtime is created, so that it is created once.
    starting: std::sync::Mutex<()>,
    /// Keys every module must be signed by (none: no signature needed).
    module_keys: weft_client::signing::TrustedKeys,
}

impl WasmHost {
    /// A host whose compiled modules are cached in `cache_dir`, a directory private to this
    /// user (created if missing; one that is not makes building the first chain fail,
    /// naming it), or without one in the user's cache directory (see [`WasmRuntime::new`]).
    pub fn new(cache_dir: Option<PathBuf>) -> Self {
        Self {
            cache_dir,
            runtime: std::sync::OnceLock::new(),
            starting: std::sync::Mutex::new(()),
            module_keys: Default::default(),
        }
    }

    /// Runs only modules signed by one of `keys` (their `<module>.sig` beside them, which
    /// a proxy following a control service writes with each module it fetches): a module
    /// without a good signature fails its chain, naming the module.
    pub fn with_module_keys(mut self, keys: weft_client::signing::TrustedKeys) -> Self {
        self.module_keys = keys;
        self
    }

    /// The runtime, created on first use.
    fn runtime(&self) -> anyhow::Result<&WasmRuntime> {
        if let Some(rt) = self.runtime.get() {
            return Ok(rt);
        }
        let _one = self
            .starting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(rt) = self.runtime.get() {
            return Ok(rt);
        }
        let mut rt = WasmRuntime::new(self.cache_dir.clone())?;
        rt.module_keys = self.module_keys.clone();
        Ok(self.runtime.get_or_init(|| rt))
    }
}

impl FilterHost for WasmHost {
    fn build_chain(
        &self,
        listener: &str,
        filters: &[FilterConfig],
        clusters: &std::sync::Arc<weft_core::upstream::ClusterTable>,
        metrics: &Metrics,
    ) -> Result<Box<dyn FilterChain>, ChainError> {
        let rt = self.runtime().map_err(|e| ChainError {
            listener: listener.to_owned(),
            filter: filters.first().map(|f| f.name.clone()).unwrap_or_default(),
            module: filters
                .first()
                .map(|f| f.module.clone())
                .unwrap_or_default(),
            message: format!("cannot start the WASM filter host: {e:#}"),
        })?;
        let chain = rt.build_chain(listener, filters, clusters, metrics)?;
        Ok(Box::new(chain))
    }
}
