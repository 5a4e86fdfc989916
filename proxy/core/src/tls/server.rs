//! TLS on listeners: mesh mTLS with the proxy's identity (strict, or permissive: a
//! connection whose first byte is not a TLS handshake record is served as plaintext), and
//! ordinary TLS at the edge with certificate files chosen by SNI and read again when they
//! change.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use weft_config::{CertificateFiles, DownstreamProtocol, ListenerTls, ListenerTlsMode, SpiffeId};

use super::files::{self, TlsError};
use super::identity::IdentityStore;
use super::verify::{MeshClientVerifier, cert_info, spiffe_id};
use super::{ALPN_H2, ALPN_HTTP11, ALPN_WEFT_TCP};

/// What a downstream TLS connection established: filters read it as properties
/// (`connection.mtls`, `connection.tls_version`, `source.principal`, ...).
#[derive(Clone, Debug, Default)]
pub struct PeerTls {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// The client presented a certificate that verified.
    pub mtls: bool,
    /// The URI SANs of the client's certificate.
    pub uri_sans: Vec<String>,
    /// The client's SPIFFE ID (mesh mTLS).
    pub peer_id: Option<SpiffeId>,
    /// The server name the client asked for (SNI).
    pub sni: Option<String>,
    /// The ALPN protocol agreed on.
    pub alpn: Option<Vec<u8>>,
}

/// A listener's TLS: how it accepts a connection.
pub struct ServerTls {
    acceptor: TlsAcceptor,
    /// Plaintext is served too (mesh permissive mode).
    pub permissive: bool,
    /// The certificates of an edge listener, for following their files.
    edge: Option<Arc<EdgeCerts>>,
}

/// The ALPN protocols a listener offers; a capture listener also takes opaque TCP
/// (`weft-tcp`) from other sidecars.
fn alpn(protocol: DownstreamProtocol, capture: bool) -> Vec<Vec<u8>> {
    let mut offered = match protocol {
        DownstreamProtocol::Http1 => vec![ALPN_HTTP11.to_vec()],
        DownstreamProtocol::Http2 => vec![ALPN_H2.to_vec()],
        DownstreamProtocol::Auto => vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()],
        DownstreamProtocol::Tcp => vec![],
    };
    if capture || protocol == DownstreamProtocol::Tcp {
        offered.push(ALPN_WEFT_TCP.to_vec());
    }
    offered
}

/// Whether a handshake agreed on opaque TCP (`weft-tcp`).
pub fn is_opaque(alpn: Option<&[u8]>) -> bool {
    alpn == Some(ALPN_WEFT_TCP)
}

impl ServerTls {
    /// The TLS of a listener with `cfg`, speaking `protocol` (and opaque TCP too when it
    /// `capture`s); `store`: the proxy's mesh identity.
    pub fn new(
        cfg: &ListenerTls,
        protocol: DownstreamProtocol,
        capture: bool,
        store: &Arc<IdentityStore>,
    ) -> Result<Self, TlsError> {
        let builder = ServerConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        let (mut config, edge) = match cfg.mode {
            ListenerTlsMode::Strict | ListenerTlsMode::Permissive => {
                let config = builder
                    .with_client_cert_verifier(Arc::new(MeshClientVerifier {
                        store: store.clone(),
                    }))
                    .with_cert_resolver(Arc::new(MeshCert {
                        store: store.clone(),
                    }));
                (config, None)
            }
            ListenerTlsMode::Simple | ListenerTlsMode::Mutual => {
                let edge = Arc::new(EdgeCerts::load(&cfg.certificates)?);
                let builder = match &cfg.client_ca_file {
                    Some(ca) => {
                        let roots = Arc::new(files::roots(ca)?);
                        let verifier =
                            WebPkiClientVerifier::builder_with_provider(roots, super::provider())
                                .build()
                                .map_err(|e| TlsError::File {
                                    path: ca.clone(),
                                    why: format!("unusable client CA: {e}"),
                                })?;
                        builder.with_client_cert_verifier(verifier)
                    }
                    None => builder.with_no_client_auth(),
                };
                (builder.with_cert_resolver(edge.clone()), Some(edge))
            }
        };
        config.alpn_protocols = alpn(protocol, capture);
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            permissive: cfg.mode == ListenerTlsMode::Permissive,
            edge,
        })
    }

    /// Runs the handshake on `tcp` within `limit`.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        limit: Duration,
    ) -> io::Result<(TlsStream<TcpStream>, PeerTls)> {
        let tls = tokio::time::timeout(limit, self.acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let conn = tls.get_ref().1;
        let peer_cert = conn.peer_certificates().and_then(|c| c.first());
        let uri_sans = peer_cert
            .and_then(|c| cert_info(c).ok())
            .map(|i| i.uri_sans)
            .unwrap_or_default();
        let peer = PeerTls {
            version: match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "TLSv1.3",
            },
            mtls: peer_cert.is_some(),
            peer_id: peer_cert.and_then(|c| spiffe_id(c).ok()),
            uri_sans,
            sni: conn.server_name().map(str::to_owned),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        };
        Ok((tls, peer))
    }

    /// Follows the files of an edge listener's certificates (every `every`); a mesh
    /// listener's identity is followed by its store.
    pub async fn follow_files(&self, every: Duration) {
        if let Some(edge) = &self.edge {
            edge.follow(every).await;
        }
    }
}

/// Whether `first` (a connection's first byte) starts a TLS handshake record.
pub fn is_tls_record(first: u8) -> bool {
    first == 0x16
}

/// Serves the proxy's current mesh certificate (none, so no handshake, when it has none or
/// it expired).
#[derive(Debug)]
struct MeshCert {
    store: Arc<IdentityStore>,
}

impl ResolvesServerCert for MeshCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.store.current()?.certified.clone())
    }
}

/// One certificate of an edge listener.
#[derive(Debug)]
struct EdgeCert {
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// An edge listener's certificates, chosen by SNI.
#[derive(Debug)]
struct EdgeCerts {
    files: Vec<CertificateFiles>,
    certs: ArcSwap<Vec<EdgeCert>>,
}

impl EdgeCerts {
    fn load(files: &[CertificateFiles]) -> Result<Self, TlsError> {
        Ok(Self {
            files: files.to_vec(),
            certs: ArcSwap::from_pointee(Self::read(files)?),
        })
    }

    fn read(files: &[CertificateFiles]) -> Result<Vec<EdgeCert>, TlsError> {
        files
            .iter()
            .map(|f| {
                let key = files::certified_key(&f.cert_file, &f.key_file)?;
                let names = if f.server_names.is_empty() {
                    dns_names(key.cert.first().map(|c| c.as_ref()).unwrap_or(&[]))
                } else {
                    f.server_names
                        .iter()
                        .map(|n| n.to_ascii_lowercase())
                        .collect()
                };
                Ok(EdgeCert {
                    names,
                    key: Arc::new(key),
                })
            })
            .collect()
    }

    async fn follow(&self, every: Duration) {
        let paths = self
            .files
            .iter()
            .flat_map(|f| [f.cert_file.clone(), f.key_file.clone()])
            .collect();
        files::on_change(paths, every, "listener certificates", || {
            self.certs.store(Arc::new(Self::read(&self.files)?));
            Ok(())
        })
        .await
    }
}

impl ResolvesServerCert for EdgeCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        let chosen = hello.server_name().and_then(|sni| {
            let sni = sni.to_ascii_lowercase();
            certs
                .iter()
                .find(|c| c.names.iter().any(|n| name_matches(n, &sni)))
        });
        Some(chosen.or(certs.first())?.key.clone())
    }
}

/// `pattern` (a name, or `*.` and a name standing for one more label) matches `name`.
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

/// The DNS names of a certificate's SANs.
fn dns_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_stand_for_one_label() {
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(name_matches("example.com", "example.com"));
        assert!(!name_matches("example.com", "a.example.com"));
    }
}
