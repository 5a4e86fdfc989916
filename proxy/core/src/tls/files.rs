//! PEM files: certificate chains, private keys and roots, each error naming its file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable, not PEM, or holds the wrong thing.
    #[error("{}: {why}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The material loaded but does not make a usable identity or config.
    #[error("{0}")]
    Invalid(String),
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

/// The certificates of a PEM file, in order; at least one.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_err(path, format!("no usable private key: {e}")))
}

/// A trust store from a PEM file of roots.
pub fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(path)? {
        store
            .add(cert)
            .map_err(|e| file_err(path, format!("not a usable root: {e}")))?;
    }
    Ok(store)
}

/// A certificate chain with its key, checked to belong together.
pub fn certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = certs(cert_file)?;
    let key = key(key_file)?;
    CertifiedKey::from_der(chain, key, &super::provider()).map_err(|e| {
        file_err(
            key_file,
            format!("does not go with {}: {e}", cert_file.display()),
        )
    })
}

/// The system's trust store (what `ca_file` defaults to for TLS to external services).
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsError::Invalid(format!(
            "no system root certificates found ({}); give the cluster a `ca_file`",
            found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "none installed".into())
        )));
    }
    Ok(store)
}

/// Calls `reload` whenever the modification time of one of `paths` changes (looked at every
/// `every`), forever. A reload that fails is logged and tried again only once the files
/// change again (they are often written one after the other); what was loaded last stays.
pub async fn on_change(
    paths: Vec<PathBuf>,
    every: Duration,
    what: &str,
    mut reload: impl FnMut() -> Result<(), TlsError>,
) {
    let stamp = || {
        paths
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect::<Vec<Option<SystemTime>>>()
    };
    let mut seen = stamp();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = stamp();
        if now == seen {
            continue;
        }
        seen = now;
        match reload() {
            Ok(()) => tracing::info!("{what} reloaded"),
            Err(e) => {
                tracing::warn!("{what}: files changed but do not load, keeping the last: {e}")
            }
        }
    }
}
