//! The proxy's mesh identity: its SPIFFE certificate and key and the trust bundle, held in
//! an [`IdentityStore`] that handshakes read and a new certificate or bundle replaces
//! (new handshakes use it; connections already up are untouched).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use weft_config::SpiffeId;

use super::files::{self, TlsError};
use super::verify::{CertInfo, cert_info, spiffe_id};

/// One certificate of the proxy's identity, with what checks peers against the bundle.
#[derive(Debug)]
pub struct MeshIdentity {
    /// The SPIFFE ID the certificate proves.
    pub id: SpiffeId,
    /// The certificate chain and key served and presented.
    pub certified: Arc<CertifiedKey>,
    /// The leaf's serial, URI SANs and validity.
    pub leaf: CertInfo,
    /// The trust bundle.
    pub roots: Arc<RootCertStore>,
    /// How many roots the bundle has.
    pub root_count: usize,
    /// WebPKI client verification over `roots` (the chain and the client-auth usage).
    pub(super) client_verifier: Arc<dyn ClientCertVerifier>,
}

impl MeshIdentity {
    /// An identity from a chain with its key and a bundle: the leaf must name exactly one
    /// SPIFFE ID, chain to the bundle and be valid now.
    pub fn new(certified: CertifiedKey, roots: RootCertStore) -> Result<Self, TlsError> {
        let leaf_der = certified
            .cert
            .first()
            .ok_or_else(|| TlsError::Invalid("empty certificate chain".into()))?;
        let id = spiffe_id(leaf_der).map_err(TlsError::Invalid)?;
        let leaf = cert_info(leaf_der).map_err(TlsError::Invalid)?;
        let root_count = roots.len();
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), super::provider())
                .build()
                .map_err(|e| TlsError::Invalid(format!("unusable trust bundle: {e}")))?;
        // Our own certificate must pass what peers will check: chain, usage, validity.
        client_verifier
            .verify_client_cert(
                leaf_der,
                &certified.cert[1..],
                rustls_pki_types::UnixTime::now(),
            )
            .map_err(|e| {
                TlsError::Invalid(format!("the certificate of {id} does not verify: {e}"))
            })?;
        Ok(Self {
            id,
            certified: Arc::new(certified),
            leaf,
            roots,
            root_count,
            client_verifier,
        })
    }

    /// Loads an identity from its certificate, key and bundle files.
    pub fn from_files(cert: &Path, key: &Path, bundle: &Path) -> Result<Self, TlsError> {
        let certified = files::certified_key(cert, key)?;
        let roots = files::roots(bundle)?;
        Self::new(certified, roots).map_err(|e| match e {
            TlsError::Invalid(why) => TlsError::File {
                path: cert.to_owned(),
                why,
            },
            e => e,
        })
    }

    /// Whether the certificate has expired.
    pub fn expired(&self) -> bool {
        unix_now() >= self.leaf.not_after
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The current identity of the proxy, if it has one.
#[derive(Debug, Default)]
pub struct IdentityStore {
    current: ArcSwapOption<MeshIdentity>,
}

impl IdentityStore {
    /// A store holding `identity`.
    pub fn new(identity: Option<MeshIdentity>) -> Self {
        Self {
            current: ArcSwapOption::new(identity.map(Arc::new)),
        }
    }

    /// The identity in use, unless none or expired (an expired certificate is never
    /// served: mesh handshakes fail instead).
    pub fn current(&self) -> Option<Arc<MeshIdentity>> {
        self.current.load_full().filter(|id| !id.expired())
    }

    /// The identity held, expired or not (for the admin endpoint).
    pub fn held(&self) -> Option<Arc<MeshIdentity>> {
        self.current.load_full()
    }

    /// Replaces the identity: later handshakes use the new one.
    pub fn set(&self, identity: MeshIdentity) {
        self.current.store(Some(Arc::new(identity)));
    }

    /// Follows the identity's files: when they change and make a valid identity, it
    /// replaces the one held; otherwise the one held stays (see [`files::on_change`]).
    pub async fn follow_files(self: Arc<Self>, [cert, key, bundle]: [PathBuf; 3], every: Duration) {
        let paths = vec![cert.clone(), key.clone(), bundle.clone()];
        files::on_change(paths, every, "mesh identity", || {
            let identity = MeshIdentity::from_files(&cert, &key, &bundle)?;
            tracing::info!(
                id = %identity.id,
                serial = %identity.leaf.serial,
                not_after = identity.leaf.not_after,
                roots = identity.root_count,
                "mesh identity loaded"
            );
            self.set(identity);
            Ok(())
        })
        .await
    }
}
