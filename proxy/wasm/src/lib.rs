//! The WASM filter host: proxy-wasm ABI 0.2.1 on wasmtime.
//!
//! This is the only crate that touches wasmtime types; the core proxy (`weft-core`) reaches it
//! through [`weft_core::filter::FilterHost`], which [`WasmHost`] implements. [`WasmRuntime`] owns the engine (with
//! epoch interruption driven by a ticker thread), the linker holding every host function
//! ([`abi`]), and the on-disk cache of compiled modules keyed by content digest.
//! [`WasmRuntime::build_chain`] loads a listener's filters, starts one canary instance of each
//! (instantiate, `on_vm_start`, `on_configure`) so that a bad module or config is an error
//! before anything is served, and returns a [`WasmChain`]; workers then run their own
//! instances ([`chain`]). The ABI reference is `docs/filter-abi.md`.

pub mod abi;
pub mod chain;
pub mod host;
pub mod queues;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, ExternType, Linker, Module, Val, ValType};

pub use chain::WasmChain;
use chain::{FilterInstance, FilterSpec};
use host::{HostState, PluginMeta, Status};

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
    cache_dir: Option<PathBuf>,
    runtime: std::sync::OnceLock<WasmRuntime>,
    starting: std::sync::Mutex<()>,
}

impl WasmHost {
    /// A host whose compiled modules are cached in `cache_dir` (see [`WasmRuntime::new`]).
    pub fn new(cache_dir: Option<PathBuf>) -> Self {
        Self {
            cache_dir,
            runtime: std::sync::OnceLock::new(),
            starting: std::sync::Mutex::new(()),
        }
    }

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
        let rt = WasmRuntime::new(self.cache_dir.clone())?;
        Ok(self.runtime.get_or_init(|| rt))
    }
}

impl FilterHost for WasmHost {
    fn build_chain(
        &self,
        listener: &str,
        filters: &[FilterConfig],
        clusters: &[String],
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

/// The engine, linker and module cache shared by every filter of the proxy.
pub struct WasmRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: PathBuf,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for WasmRuntime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl WasmRuntime {
    /// An engine with epoch interruption, the host functions, and a module cache in
    /// `cache_dir` (created if missing).
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        abi::add_to_linker(&mut linker)?;
        let cache_dir = cache_dir.unwrap_or_else(|| std::env::temp_dir().join("weft-module-cache"));
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (e, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("weft-wasm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
                    e.increment_epoch();
                }
            })?;
        Ok(Self {
            engine,
            linker,
            cache_dir,
            ticker_stop,
        })
    }

    /// Compiles `bytes`, or loads the compiled module from the cache. Returns the module and
    /// whether it came from the cache.
    fn compile(&self, bytes: &[u8]) -> anyhow::Result<(Module, bool)> {
        use std::hash::{Hash, Hasher};
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut engine_hash);
        let key = format!(
            "{}-{:016x}.cwasm",
            hex::encode(Sha256::digest(bytes)),
            engine_hash.finish()
        );
        let path = self.cache_dir.join(key);
        if path.exists()
            && let Ok(module) = deserialize_cached(&self.engine, &path)
        {
            return Ok((module, true));
        }
        let module = Module::new(&self.engine, bytes)?;
        // The cache is an optimisation: failing to write it is not an error.
        if std::fs::create_dir_all(&self.cache_dir).is_ok()
            && let Ok(serialized) = module.serialize()
        {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, serialized).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
        Ok((module, false))
    }

    /// Loads the filters of a listener's chain and proves each can start: an unreadable
    /// file, bytes that are not wasm, a module without the proxy-wasm ABI, a trap at start or
    /// `on_configure` returning false is an error naming the filter and the file.
    pub fn build_chain(
        &self,
        listener: &str,
        filters: &[FilterConfig],
        clusters: &[String],
        metrics: &Metrics,
    ) -> Result<WasmChain, WasmError> {
        let clusters: Arc<[String]> = clusters.into();
        let mut specs = Vec::with_capacity(filters.len());
        for f in filters {
            let err = |message: String| WasmError {
                listener: listener.to_owned(),
                filter: f.name.clone(),
                module: f.module.clone(),
                message,
            };
            let bytes = std::fs::read(&f.module).map_err(|e| err(format!("cannot read: {e}")))?;
            let started = Instant::now();
            let (module, cached) = self
                .compile(&bytes)
                .map_err(|e| err(format!("not a valid WebAssembly module: {e:#}")))?;
            tracing::info!(
                filter = %f.name,
                module = %f.module.display(),
                "{} in {} ms",
                if cached { "loaded compiled module from cache" } else { "compiled module" },
                started.elapsed().as_millis()
            );
            let abi = module.exports().any(|e| {
                weft_abi::ABI_VERSION_EXPORTS
                    .iter()
                    .any(|(export, _)| e.name() == *export)
            });
            if !abi {
                return Err(err(
                    "does not export a proxy-wasm ABI version (proxy_abi_version_0_2_1)".into(),
                ));
            }
            let linker = self
                .link_unknown_imports(&module)
                .map_err(|e| err(format!("{e:#}")))?;
            let pre = linker
                .instantiate_pre(&module)
                .map_err(|e| err(format!("cannot link: {e:#}")))?;
            let spec = FilterSpec {
                meta: Arc::new(PluginMeta {
                    name: f.name.clone(),
                    root_id: f.root_id.clone(),
                    vm_id: f.name.clone(),
                    config: config_bytes(&f.config),
                    vm_config: config_bytes(&f.vm_config),
                }),
                pre,
                engine: self.engine.clone(),
                policy: f.failure_policy,
                memory_bytes: f.limits.memory_mb as usize * 1024 * 1024,
                callback_ticks: f.limits.callback_ms.div_ceil(EPOCH_TICK_MS) + 1,
                failures: metrics.filter_failures(&f.name),
                defined_metrics: metrics.filter_defined(),
                has_tick: module.exports().any(|e| e.name() == "proxy_on_tick"),
                body_callbacks: [
                    weft_core::filter::Direction::Request,
                    weft_core::filter::Direction::Response,
                ]
                .map(|d| {
                    module.exports().any(|e| {
                        e.name() == chain::body_callback(d)
                            || e.name() == chain::trailers_callback(d)
                    })
                }),
                buffer_limit: f.limits.buffer_kb as usize * 1024,
                clusters: clusters.clone(),
            };
            // The canary: if this instance cannot start, no worker's would.
            FilterInstance::start(&spec, usize::MAX).map_err(|failure| err(failure.message))?;
            specs.push(spec);
        }
        Ok(WasmChain::new(specs))
    }

    /// The shared linker plus stubs for imports this host does not provide: proxy-wasm calls
    /// answer UNIMPLEMENTED, WASI calls ENOSYS, so that newer or unusual modules still link.
    fn link_unknown_imports(&self, module: &Module) -> anyhow::Result<Linker<HostState>> {
        let mut linker = self.linker.clone();
        let known = abi::defined();
        for import in module.imports() {
            if known.contains(&(import.module(), import.name())) {
                continue;
            }
            let ExternType::Func(ty) = import.ty() else {
                anyhow::bail!(
                    "imports {}::{}, which is not a function",
                    import.module(),
                    import.name()
                );
            };
            if !weft_abi::IMPORT_MODULES.contains(&import.module()) {
                anyhow::bail!(
                    "imports from unknown module `{}` ({})",
                    import.module(),
                    import.name()
                );
            }
            let code = match import.module() {
                "wasi_snapshot_preview1" => 52, // ENOSYS
                _ => Status::Unimplemented as i32,
            };
            let (module_name, name) = (import.module().to_owned(), import.name().to_owned());
            let warned = Arc::new(AtomicBool::new(false));
            linker.func_new(&module_name.clone(), &name.clone(), ty.clone(), move |_c, _params, results| {
                if !warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!("filter called {module_name}::{name}, which this host does not implement");
                }
                for (r, t) in results.iter_mut().zip(ty.results()) {
                    *r = match t {
                        ValType::I32 => Val::I32(code),
                        ValType::I64 => Val::I64(code.into()),
                        ValType::F32 => Val::F32(0),
                        ValType::F64 => Val::F64(0),
                        _ => Val::I32(0),
                    };
                }
                Ok(())
            })?;
        }
        Ok(linker)
    }
}

/// A filter's configuration as `on_configure` / `on_vm_start` receive it: a string as its
/// bytes, nothing as empty, anything else (maps, lists, numbers) as JSON text.
fn config_bytes(v: &serde_json::Value) -> Vec<u8> {
    match v {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::String(s) => s.as_bytes().to_vec(),
        other => other.to_string().into_bytes(),
    }
}

/// Loads a module the proxy itself compiled and wrote into its cache.
#[allow(unsafe_code)]
fn deserialize_cached(engine: &Engine, path: &Path) -> wasmtime::Result<Module> {
    // SAFETY: wasmtime requires that the file was produced by `Module::serialize` of a
    // compatible engine and not tampered with. The cache directory is the proxy's own, every
    // entry is written by `compile` above (via rename, so never partially), and the file name
    // carries the engine's compatibility hash; wasmtime additionally checks the header.
    unsafe { Module::deserialize_file(engine, path) }
}
