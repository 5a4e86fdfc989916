//! The on-disk cache of compiled modules, keyed by the module's sha256 and the engine's
//! compatibility hash, so that a restart does not compile again.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

/// Compiled modules in a directory.
pub struct ModuleCache {
    dir: Option<PathBuf>,
}

impl ModuleCache {
    /// A cache in `dir`, or in `<temp dir>/weft-module-cache`.
    pub fn open(dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("weft-module-cache"));
        Ok(Self { dir: Some(dir) })
    }

    /// No cache: every module is compiled.
    #[cfg(test)]
    pub fn disabled() -> Self {
        Self { dir: None }
    }

    /// Compiles `bytes`, or loads the compiled module from the cache. Returns the module and
    /// whether it came from the cache.
    pub fn load_or_compile(&self, engine: &Engine, bytes: &[u8]) -> anyhow::Result<(Module, bool)> {
        let Some(dir) = &self.dir else {
            return Ok((Module::new(engine, bytes)?, false));
        };
        use std::hash::{Hash, Hasher};
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        engine
            .precompile_compatibility_hash()
            .hash(&mut engine_hash);
        let key = format!(
            "{}-{:016x}.cwasm",
            hex::encode(Sha256::digest(bytes)),
            engine_hash.finish()
        );
        let path = dir.join(key);
        if path.exists()
            && let Ok(module) = deserialize_cached(engine, &path)
        {
            return Ok((module, true));
        }
        let module = Module::new(engine, bytes)?;
        // The cache is an optimisation: failing to write it is not an error.
        if std::fs::create_dir_all(dir).is_ok()
            && let Ok(serialized) = module.serialize()
        {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, serialized).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
        Ok((module, false))
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
