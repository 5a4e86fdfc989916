//! [`WasmRuntime`]: the engine (epoch interruption, driven by a ticker thread every
//! [`EPOCH_TICK_MS`]), the [`HostLinker`] with every host function (built once), the
//! [`ModuleCache`], and [`WasmRuntime::build_chain`]: load a listener's filters, check them,
//! link them, and start a canary instance of each before anything is served.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::{Config, Engine};

use weft_config::FilterConfig;
use weft_core::metrics::Metrics;
use weft_core::upstream::ClusterTable;

use crate::cache::ModuleCache;
use crate::failure::FailureCounters;
use crate::instance::{self, FilterInstance, FilterSpec, OWN_INSTANCE};
use crate::linker::HostLinker;
use crate::state::{PluginMeta, callback_bit};
use crate::{EPOCH_TICK_MS, WasmChain, WasmError, hostcalls};

/// The engine, linker and module cache shared by every filter of the proxy.
pub struct WasmRuntime {
    /// The engine (epoch interruption on).
    engine: Engine,
    /// Every host function, defined once.
    linker: HostLinker,
    /// Compiled modules on disk.
    cache: ModuleCache,
    /// Stops the epoch ticker thread when the runtime is dropped.
    ticker_stop: Arc<AtomicBool>,
    /// Keys every module must be signed by (none: no signature needed).
    pub(crate) module_keys: weft_client::signing::TrustedKeys,
}

impl Drop for WasmRuntime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl WasmRuntime {
    /// An engine with epoch interruption, the host functions, and a module cache in
    /// `cache_dir`, which must be a directory private to this user (created if missing; an
    /// error otherwise); without one, in the per-user default (`$XDG_CACHE_HOME/weft/modules`
    /// or `$HOME/.cache/weft/modules`) if that is private, else none.
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        Self::with_cache(ModuleCache::open(cache_dir)?)
    }

    /// A runtime that compiles every module.
    #[cfg(test)]
    pub fn uncached() -> anyhow::Result<Self> {
        Self::with_cache(ModuleCache::disabled())
    }

    /// The engine.
    #[cfg(test)]
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The linker with every host function.
    #[cfg(test)]
    pub fn linker(&self) -> &HostLinker {
        &self.linker
    }

    /// A runtime over `cache`: the engine, the linker, and the epoch ticker thread.
    fn with_cache(cache: ModuleCache) -> anyhow::Result<Self> {
        if let Some(dir) = cache.dir() {
            tracing::info!("module cache: {}", dir.display());
        }
        let mut config = Config::new();
        config.epoch_interruption(true);
        // `WEFT_WASM_PERFMAP=1`: wasmtime writes /tmp/perf-<pid>.map, so that `perf report`
        // names the filters' compiled functions (benches/profile/run.sh sets it).
        if std::env::var_os("WEFT_WASM_PERFMAP").is_some_and(|v| v == "1") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let mut linker = HostLinker::new(&engine);
        hostcalls::add_to_linker(&mut linker)?;
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
            cache,
            ticker_stop,
            module_keys: Default::default(),
        })
    }

    /// Loads the filters of a listener's chain and proves each can start: an unreadable
    /// file, bytes that are not wasm, a module without the proxy-wasm ABI, a trap at start or
    /// `on_configure` returning false is an error naming the filter and the file.
    pub fn build_chain(
        &self,
        listener: &str,
        filters: &[FilterConfig],
        clusters: &Arc<ClusterTable>,
        metrics: &Metrics,
    ) -> Result<WasmChain, WasmError> {
        let mut specs: Vec<FilterSpec> = Vec::with_capacity(filters.len());
        let mut modules: Vec<Vec<u8>> = Vec::with_capacity(filters.len());
        for (i, f) in filters.iter().enumerate() {
            let err = |message: String| WasmError {
                listener: listener.to_owned(),
                filter: f.name.clone(),
                module: f.module.clone(),
                message,
            };
            let bytes = std::fs::read(&f.module).map_err(|e| err(format!("cannot read: {e}")))?;
            // The bytes that run are the bytes checked.
            if !self.module_keys.is_empty() {
                let signature = weft_client::signing::ModuleSignature::beside(&f.module)
                    .map_err(|e| err(format!("its signature: {e}")))?;
                self.module_keys
                    .verify(&bytes, signature.as_ref())
                    .map_err(err)?;
            }
            let mut spec = self
                .filter_spec(f, &bytes, clusters, metrics)
                .map_err(err)?;
            // Envoy's VM sharing: a filter runs in the instance (per worker) of an earlier one
            // with the same `vm_id`, module and `vm_config` — an empty `vm_id` included — with
            // its own root context and configuration.
            (spec.vm, spec.plugin) = (i, 0);
            let same_vm = |o: &FilterConfig, code: &Vec<u8>| {
                o.vm_id == f.vm_id && *code == bytes && o.vm_config == f.vm_config
            };
            let bounded_alike =
                |o: &FilterConfig| o.failure_policy == f.failure_policy && o.limits == f.limits;
            let owner = if f.vm_id.is_empty() {
                // Without a vm_id, sharing is the default where it can be: filters whose
                // failure policy or limits differ keep instances of their own.
                (0..i).find(|&o| same_vm(&filters[o], &modules[o]) && bounded_alike(&filters[o]))
            } else if let Some(o) = (0..i).find(|&o| filters[o].vm_id == f.vm_id) {
                let other = &filters[o];
                if !same_vm(other, &modules[o]) {
                    return Err(err(format!(
                        "shares vm_id `{}` with filter `{}` but not its module and vm_config \
                         (filters that share an instance run one module, started once)",
                        f.vm_id, other.name
                    )));
                }
                // One instance fails, restarts and is bounded as one.
                if !bounded_alike(other) {
                    return Err(err(format!(
                        "shares vm_id `{}` with filter `{}` but not its failure_policy and \
                         limits (filters that share an instance fail and are bounded together)",
                        f.vm_id, other.name
                    )));
                }
                Some(o)
            } else {
                None
            };
            if let Some(owner) = owner {
                spec.vm = specs[owner].vm;
                spec.plugin = specs.iter().filter(|s| s.vm == spec.vm).count();
            }
            modules.push(bytes);
            specs.push(spec);
        }
        // The canary: each instance (with every filter it runs) must start, or no worker's
        // would.
        for (i, f) in filters.iter().enumerate() {
            if specs[i].vm != i {
                continue;
            }
            let plugins: Vec<&FilterSpec> = specs.iter().filter(|s| s.vm == i).collect();
            FilterInstance::start(&plugins, usize::MAX, 0).map_err(|failure| WasmError {
                listener: listener.to_owned(),
                filter: f.name.clone(),
                module: f.module.clone(),
                message: failure.message,
            })?;
        }
        Ok(WasmChain::new(specs))
    }

    /// Filter `f` of module `bytes`, compiled (or loaded from the cache), checked for the
    /// proxy-wasm ABI and linked, ready to be started; the error says why not.
    pub(crate) fn filter_spec(
        &self,
        f: &FilterConfig,
        bytes: &[u8],
        clusters: &Arc<ClusterTable>,
        metrics: &Metrics,
    ) -> Result<FilterSpec, String> {
        let started = Instant::now();
        let (module, cached) = self
            .cache
            .load_or_compile(&self.engine, bytes)
            .map_err(|e| format!("not a valid WebAssembly module: {e:#}"))?;
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
            return Err(
                "does not export a proxy-wasm ABI version (proxy_abi_version_0_2_1)".into(),
            );
        }
        let linker = self
            .linker
            .for_module(&module)
            .map_err(|e| format!("{e:#}"))?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| format!("cannot link: {e:#}"))?;
        Ok(FilterSpec {
            meta: Arc::new(PluginMeta {
                name: f.name.clone(),
                root_id: f.root_id.clone(),
                vm_id: f.vm_id.clone(),
                config: config_bytes(&f.config),
                vm_config: config_bytes(&f.vm_config),
                unused: Default::default(),
            }),
            pre,
            engine: self.engine.clone(),
            policy: f.failure_policy,
            memory_bytes: f.limits.memory_mb as usize * 1024 * 1024,
            callback_ticks: f.limits.callback_ms.div_ceil(EPOCH_TICK_MS) + 1,
            failures: FailureCounters::new(&f.name, metrics.filter_failures(&f.name)),
            defined_metrics: metrics.filter_defined(),
            has_tick: module.exports().any(|e| e.name() == "proxy_on_tick"),
            body_exports: [
                weft_core::filter::Direction::Request,
                weft_core::filter::Direction::Response,
            ]
            .map(|d| {
                let bit_if_exported = |name: &str, bit: u16| {
                    if module.exports().any(|e| e.name() == name) {
                        bit
                    } else {
                        0
                    }
                };
                bit_if_exported(instance::body_callback(d), callback_bit::BODY[d as usize])
                    | bit_if_exported(
                        instance::trailers_callback(d),
                        callback_bit::TRAILERS[d as usize],
                    )
            }),
            buffer_limit: f.limits.buffer_kb as usize * 1024,
            clusters: clusters.clone(),
            // Its own instance, until the chain says otherwise (`build_chain`).
            vm: OWN_INSTANCE,
            plugin: 0,
        })
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
