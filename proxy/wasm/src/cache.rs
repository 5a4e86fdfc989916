//! The on-disk cache of compiled modules, so that a restart does not compile again.
//!
//! Loading compiled code runs it, so the cache is trusted only as far as it is private:
//!
//! - the directory must be owned by this process's effective user and not group- or
//!   world-writable (it is created with mode 0700). A configured directory that fails this is
//!   an error; the per-user default (`$XDG_CACHE_HOME/weft/modules`, else
//!   `$HOME/.cache/weft/modules`) that fails it means no cache, with one warning;
//! - an entry is named by the module's sha256 and the engine's compatibility hash, and ends
//!   with a sha256 over its name and its compiled bytes. An entry is opened, its file checked
//!   like the directory, its digest verified through that open file, and only then is that
//!   same file mapped (not read into memory: only the code a filter runs becomes resident,
//!   and the pages are the page cache's, shared by every proxy on the host); one that fails
//!   is ignored (with a warning), compiled again and rewritten. An entry copied under
//!   another module's name does not verify.
//!
//! Entries are written to a temporary file (mode 0600) and renamed into place, so a reader
//! never sees a partial one, and a file a proxy has mapped is never written again (a new
//! entry is a new file).

use std::fs::{DirBuilder, File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

/// Length of an entry's trailer (a sha256).
const TRAILER: usize = 32;

/// Compiled modules in a private directory, or no cache at all.
pub struct ModuleCache {
    /// The directory (checked private), or `None` for no cache.
    dir: Option<PathBuf>,
}

impl ModuleCache {
    /// The cache in `configured` (created if missing), which must be private to this user;
    /// without one, the per-user default if it is, else no cache (one warning says why).
    pub fn open(configured: Option<PathBuf>) -> anyhow::Result<Self> {
        if let Some(dir) = configured {
            ensure_private_dir(&dir)
                .map_err(|why| anyhow::anyhow!("module cache dir {}: {why}", dir.display()))?;
            return Ok(Self { dir: Some(dir) });
        }
        let Some(dir) = default_dir(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
        else {
            tracing::warn!(
                "no module cache: neither XDG_CACHE_HOME nor HOME is set (set wasm.cache_dir \
                 to keep compiled modules across restarts)"
            );
            return Ok(Self::disabled());
        };
        match ensure_private_dir(&dir) {
            Ok(()) => Ok(Self { dir: Some(dir) }),
            Err(why) => {
                tracing::warn!(
                    "no module cache: {}: {why} (set wasm.cache_dir to a private directory)",
                    dir.display()
                );
                Ok(Self::disabled())
            }
        }
    }

    /// No cache: every module is compiled.
    pub fn disabled() -> Self {
        Self { dir: None }
    }

    /// The cache's directory, if there is a cache.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The compiled module of `wasm`: from the cache when a verified entry is there, else
    /// compiled (and written to the cache). Says whether it came from the cache.
    pub fn load_or_compile(&self, engine: &Engine, wasm: &[u8]) -> anyhow::Result<(Module, bool)> {
        let Some(dir) = &self.dir else {
            return Ok((Module::new(engine, wasm)?, false));
        };
        let key = key(engine, wasm);
        let path = dir.join(&key);
        match read_entry(&path, &key) {
            Ok(None) => {}
            Ok(Some(file)) => match deserialize(engine, file) {
                Ok(module) => return Ok((module, true)),
                Err(e) => ignored(&path, &format!("{e:#}")),
            },
            Err(why) => ignored(&path, &why),
        }
        let module = Module::new(engine, wasm)?;
        // The cache is an optimisation: failing to write it is not an error.
        match module.serialize() {
            Ok(compiled) => {
                if let Err(e) = write_entry(&path, &key, &compiled) {
                    tracing::debug!("cannot write {}: {e}", path.display());
                }
            }
            Err(e) => tracing::debug!("cannot serialize a compiled module: {e:#}"),
        }
        Ok((module, false))
    }
}

fn ignored(path: &Path, why: &str) {
    tracing::warn!(
        "ignoring cached module {}: {why}; compiling it again",
        path.display()
    );
}

/// The per-user default: `$XDG_CACHE_HOME/weft/modules` (an absolute path), else
/// `$HOME/.cache/weft/modules`.
fn default_dir(
    xdg_cache_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    let xdg = xdg_cache_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| {
        home.filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".cache"))
    })?;
    Some(base.join("weft").join("modules"))
}

/// Creates `dir` (mode 0700) if missing and checks that it is a directory private to this
/// process's user.
fn ensure_private_dir(dir: &Path) -> Result<(), String> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create it: {e}"))?;
    let meta = std::fs::metadata(dir).map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_dir() {
        return Err("is not a directory".into());
    }
    check_private(&meta)
}

/// Owned by this process's effective user, and not writable by its group or others.
fn check_private(meta: &Metadata) -> Result<(), String> {
    private(meta.uid(), meta.mode(), rustix::process::geteuid().as_raw())
}

/// Whether a file of owner `uid` and `mode` is private to user `euid`.
fn private(uid: u32, mode: u32, euid: u32) -> Result<(), String> {
    if uid != euid {
        return Err(format!(
            "is owned by uid {uid}, not by this process's uid {euid}"
        ));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "is group- or world-writable (mode {:o}); it must be writable by its owner only",
            mode & 0o7777
        ));
    }
    Ok(())
}

/// An entry's file name: the module's sha256 and the engine's compatibility hash.
fn key(engine: &Engine, wasm: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
    engine
        .precompile_compatibility_hash()
        .hash(&mut engine_hash);
    format!(
        "{}-{:016x}.cwasm",
        hex::encode(Sha256::digest(wasm)),
        engine_hash.finish()
    )
}

/// The trailer of entry `key` holding `compiled`: binds the bytes to the name.
fn trailer(key: &str, compiled: &[u8]) -> [u8; TRAILER] {
    let mut h = Sha256::new();
    h.update(b"weft module cache 1\0");
    h.update(key.as_bytes());
    h.update(b"\0");
    h.update(compiled);
    h.finalize().into()
}

/// Entry `key` at `path`, opened and verified; `None` when there is none; the reason when it
/// cannot be trusted.
fn read_entry(path: &Path, key: &str) -> Result<Option<File>, String> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    // The file as opened, not the name: nothing can be swapped in between.
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    check_private(&meta)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let Some(split) = bytes.len().checked_sub(TRAILER) else {
        return Err("is truncated".into());
    };
    if bytes[split..] != trailer(key, &bytes[..split]) {
        return Err("its digest does not match (altered, truncated, or not this module's)".into());
    }
    Ok(Some(file))
}

/// Writes entry `key` at `path`: `compiled` and its trailer, to a temporary file renamed into
/// place.
fn write_entry(path: &Path, key: &str, compiled: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(compiled)?;
            f.write_all(&trailer(key, compiled))
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Maps a verified cache entry as a module (the trailer after the compiled bytes is left
/// alone: wasmtime reads the object's sections by their offsets).
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, file: File) -> wasmtime::Result<Module> {
    // SAFETY: wasmtime requires that the file holds what `Module::serialize` of a compatible
    // engine wrote, untampered, as it is run as machine code, and that it does not change
    // while the module lives. It is in a directory and a file owned by this process's user
    // and writable by no one else (so only this user can have written it); its contents,
    // read through this same open file, end with a sha256 over the entry's name and the
    // compiled bytes, which `write_entry` computed when a proxy serialized the module: they
    // are what a proxy of this user compiled from the module the name names, for an engine
    // of the same compatibility hash. Entries are only ever replaced by renaming a new file
    // over the name, never written in place, so the file mapped here keeps its contents.
    // wasmtime checks the header too.
    unsafe { Module::deserialize_open_file(engine, file) }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::testing::{self, i32_const};

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        Engine::new(&config).unwrap()
    }

    fn wasm(n: i32) -> Vec<u8> {
        testing::filter(&[], "headers", i32_const(n))
    }

    fn only_entry(dir: &Path) -> PathBuf {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
        entries.pop().unwrap()
    }

    #[test]
    fn a_warm_entry_is_loaded_and_a_tampered_one_is_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(Some(dir.path().join("modules"))).unwrap();
        let cache_dir = cache.dir().unwrap().to_owned();
        let mode = std::fs::metadata(&cache_dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "created private");
        let engine = engine();
        assert!(!cache.load_or_compile(&engine, &wasm(0)).unwrap().1);
        let entry = only_entry(&cache_dir);
        assert_eq!(std::fs::metadata(&entry).unwrap().mode() & 0o777, 0o600);
        let (warm, cached) = cache.load_or_compile(&engine, &wasm(0)).unwrap();
        assert!(cached, "warm");
        // Mapped from the entry (its trailer after the object) and whole: the same exports.
        let fresh = Module::new(&engine, wasm(0)).unwrap();
        let names = |m: &Module| m.exports().map(|e| e.name().to_owned()).collect::<Vec<_>>();
        assert_eq!(names(&warm), names(&fresh));
        drop(warm);

        // One byte of the compiled code changed: not loaded; compiled and rewritten.
        let mut bytes = std::fs::read(&entry).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&entry, &bytes).unwrap();
        assert!(!cache.load_or_compile(&engine, &wasm(0)).unwrap().1);
        assert!(
            cache.load_or_compile(&engine, &wasm(0)).unwrap().1,
            "rewritten"
        );

        // Truncated, or no trailer at all (as an older proxy wrote): the same.
        std::fs::write(&entry, &bytes[..10]).unwrap();
        assert!(!cache.load_or_compile(&engine, &wasm(0)).unwrap().1);
        let compiled = Module::new(&engine, wasm(0)).unwrap().serialize().unwrap();
        std::fs::write(&entry, &compiled).unwrap();
        assert!(!cache.load_or_compile(&engine, &wasm(0)).unwrap().1);
    }

    #[test]
    fn an_entry_planted_under_another_modules_name_is_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(Some(dir.path().to_owned())).unwrap();
        let engine = engine();
        cache.load_or_compile(&engine, &wasm(1)).unwrap();
        let other = only_entry(dir.path());
        // A valid entry of module 1, copied where module 2's entry belongs.
        let target = dir.path().join(key(&engine, &wasm(2)));
        std::fs::copy(&other, &target).unwrap();
        assert!(read_entry(&target, &key(&engine, &wasm(2))).is_err());
        assert!(!cache.load_or_compile(&engine, &wasm(2)).unwrap().1);
        assert!(cache.load_or_compile(&engine, &wasm(2)).unwrap().1);
    }

    #[test]
    fn an_entry_others_can_write_is_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(Some(dir.path().to_owned())).unwrap();
        let engine = engine();
        cache.load_or_compile(&engine, &wasm(3)).unwrap();
        let entry = only_entry(dir.path());
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).unwrap();
        let why = read_entry(&entry, &key(&engine, &wasm(3))).unwrap_err();
        assert!(why.contains("writable"), "{why}");
        assert!(!cache.load_or_compile(&engine, &wasm(3)).unwrap().1);
        // Rewritten with its own mode.
        assert_eq!(std::fs::metadata(&entry).unwrap().mode() & 0o777, 0o600);
        assert!(cache.load_or_compile(&engine, &wasm(3)).unwrap().1);
    }

    #[test]
    fn a_configured_dir_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o770, 0o707, 0o1777] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let err = ModuleCache::open(Some(dir.path().to_owned()))
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains(&dir.path().display().to_string()), "{err}");
            assert!(err.contains("writable"), "{err}");
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(ModuleCache::open(Some(dir.path().to_owned())).is_ok());
    }

    #[test]
    fn what_another_user_owns_is_refused() {
        // The rule itself, for any user the tests run as.
        let err = private(65_534, 0o40700, 1000).unwrap_err();
        assert!(err.contains("owned by uid 65534"), "{err}");
        assert!(private(1000, 0o40700, 1000).is_ok());
        assert!(private(1000, 0o40755, 1000).is_ok());
        assert!(private(1000, 0o40775, 1000).is_err());
        // And a real directory given away (needs the right to chown: root, as in CI).
        let dir = tempfile::tempdir().unwrap();
        if std::os::unix::fs::chown(dir.path(), Some(65_534), None).is_ok() {
            let err = ModuleCache::open(Some(dir.path().to_owned()))
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains("owned by uid 65534"), "{err}");
        }
    }

    #[test]
    fn the_default_dir_is_per_user() {
        let p = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(
            default_dir(p("/x/cache"), p("/home/u")),
            Some(PathBuf::from("/x/cache/weft/modules"))
        );
        assert_eq!(
            default_dir(p("relative"), p("/home/u")),
            Some(PathBuf::from("/home/u/.cache/weft/modules")),
            "a relative XDG_CACHE_HOME is ignored"
        );
        assert_eq!(default_dir(None, p("")), None);
        assert_eq!(default_dir(None, None), None);
    }
}
