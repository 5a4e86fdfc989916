//! The control service's own TLS endpoint: a certificate from the mesh CA's signing root,
//! issued again when a CA rotation moves signing to a new root (new handshakes get it;
//! connections in flight keep theirs), and the accept loop that hands tonic TLS streams.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::MeshCa;
use crate::ca::CaError;

/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The control service's certificate, swapped when the signing root changes.
#[derive(Debug)]
struct ControlCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ControlCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn issue(ca: &MeshCa, names: &[String]) -> Result<CertifiedKey, CaError> {
    let (chain_pem, key_pem) = ca.server_certificate(names)?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Refused(format!("the control certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CaError::Refused(format!("the control key: {e}")))?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(|e| CaError::Refused(format!("the control certificate: {e}")))
}

/// The TLS config of the control endpoint: a certificate for `names` (DNS names or IPs)
/// from the CA's signing root, issued again whenever that root changes (a task on the
/// current runtime follows it). ALPN: h2.
pub fn server_config(
    ca: Arc<MeshCa>,
    names: Vec<String>,
) -> Result<Arc<rustls::ServerConfig>, CaError> {
    let cert = Arc::new(ControlCert {
        current: ArcSwap::from_pointee(issue(&ca, &names)?),
    });
    let mut active = ca.watch_active();
    active.mark_unchanged();
    let follower = cert.clone();
    tokio::spawn(async move {
        while active.changed().await.is_ok() {
            // Until it works: after a rotation, clients may trust only the new root.
            loop {
                let generation = *active.borrow_and_update();
                match issue(&ca, &names) {
                    Ok(c) => {
                        follower.current.store(Arc::new(c));
                        tracing::info!(
                            generation,
                            "control TLS certificate issued from the new signing root"
                        );
                        break;
                    }
                    Err(e) => {
                        tracing::error!(
                            "cannot issue the control TLS certificate from the new root (the old one is kept; tried again in 5 s): {e}"
                        );
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        }
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CaError::Refused(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// TLS connections accepted on `listener`, each handshake on its own task (a slow client
/// holds up no other), failed handshakes logged and dropped.
pub fn accept(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
