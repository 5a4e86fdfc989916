//! The proxy's state directory: the last good snapshot and the module files it names, kept
//! across restarts and verified by digest before use.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::snapshot::{ControlSnapshot, digest_hex};

/// The proxy's state directory: `snapshot.json` and `modules/<hex>.wasm`.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The directory (created when first written).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Where the module with `digest` is kept.
    pub fn module_path(&self, digest: &str) -> PathBuf {
        let hex = digest_hex(digest).unwrap_or("invalid");
        self.root.join("modules").join(format!("{hex}.wasm"))
    }

    /// The persisted snapshot, if there is one that reads.
    pub fn load_snapshot(&self) -> Option<ControlSnapshot> {
        let path = self.root.join("snapshot.json");
        let text = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&text) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("ignoring {}: {e}", path.display());
                None
            }
        }
    }

    /// Persists `snap` (written whole, then renamed into place).
    pub fn save_snapshot(&self, snap: &ControlSnapshot) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        let json = serde_json::to_vec_pretty(snap).map_err(std::io::Error::other)?;
        write_atomic(&self.root.join("snapshot.json"), &json)
    }

    /// Checks that every module of `snap` is in the state dir with its digest (the files a
    /// restart or a SIGHUP would load; fetched modules are checked as they arrive).
    pub fn check_modules(&self, snap: &ControlSnapshot) -> Result<(), String> {
        for c in &snap.chains {
            if let Some(f) = c.filters.iter().find(|f| !self.has_module(&f.digest)) {
                return Err(format!(
                    "filter `{}`: module {} is missing from the state dir or does not match its digest",
                    f.name, f.digest
                ));
            }
        }
        Ok(())
    }

    /// Whether the module file for `digest` exists and has that digest.
    pub(super) fn has_module(&self, digest: &str) -> bool {
        std::fs::read(self.module_path(digest)).is_ok_and(|b| digest_of(&b) == digest)
    }
}

pub(super) fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
