//! TLS on clusters: mesh mTLS with the proxy's identity, the server's SPIFFE ID checked
//! against the endpoint's (or the cluster's) expected identities, and ordinary TLS to an
//! external service (system roots or a CA file, SNI, optional client certificate).

use std::io;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use weft_config::{ClusterTls, ClusterTlsMode, EndpointAddress, SpiffeId, UpstreamProtocol};

use super::files::{self, TlsError};
use super::identity::IdentityStore;
use super::verify::{MeshServerVerifier, spiffe_id};
use super::{ALPN_H2, ALPN_HTTP11, ALPN_WEFT_MESH, ALPN_WEFT_TCP};

/// A cluster's TLS: how it opens a connection to one endpoint.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    /// The same, offering only `weft-tcp` (opaque TCP relayed over the cluster's TLS).
    opaque: TlsConnector,
    mesh: bool,
    /// The name sent as SNI and checked (ordinary TLS).
    server_name: Option<ServerName<'static>>,
    /// SPIFFE IDs an endpoint of the cluster may prove (mesh; empty: any of the trust
    /// domain).
    identities: Vec<SpiffeId>,
}

impl ClientTls {
    /// The TLS of a cluster with `cfg`; `store`: the proxy's mesh identity.
    pub fn new(
        cfg: &ClusterTls,
        protocol: UpstreamProtocol,
        store: &Arc<IdentityStore>,
    ) -> Result<Self, TlsError> {
        let builder = ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        let mut config = match cfg.mode {
            ClusterTlsMode::Mesh => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(MeshServerVerifier {
                    store: store.clone(),
                }))
                .with_client_cert_resolver(Arc::new(MeshClientCert {
                    store: store.clone(),
                })),
            ClusterTlsMode::Simple | ClusterTlsMode::Mutual => {
                let roots = match &cfg.ca_file {
                    Some(path) => files::roots(path)?,
                    None => files::system_roots()?,
                };
                let builder = builder.with_root_certificates(roots);
                match &cfg.client_certificate {
                    Some(c) => {
                        let key = files::certified_key(&c.cert_file, &c.key_file)?;
                        builder.with_client_cert_resolver(Arc::new(FixedClientCert(Arc::new(key))))
                    }
                    None => builder.with_no_client_auth(),
                }
            }
        };
        let mut opaque = config.clone();
        opaque.alpn_protocols = vec![ALPN_WEFT_TCP.to_vec()];
        config.alpn_protocols = vec![
            match protocol {
                UpstreamProtocol::Http1 => ALPN_HTTP11,
                UpstreamProtocol::Http2 => ALPN_H2,
            }
            .to_vec(),
        ];
        if cfg.mode == ClusterTlsMode::Mesh {
            // The marker a capture listener knows a sidecar's handshake by (the server never
            // picks it: it is not in any listener's list).
            config.alpn_protocols.push(ALPN_WEFT_MESH.to_vec());
            opaque.alpn_protocols.push(ALPN_WEFT_MESH.to_vec());
        }
        let server_name = cfg
            .server_name
            .as_ref()
            .map(|n| {
                ServerName::try_from(n.clone())
                    .map_err(|e| TlsError::Invalid(format!("server_name `{n}`: {e}")))
            })
            .transpose()?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            opaque: TlsConnector::from(Arc::new(opaque)),
            mesh: cfg.mode == ClusterTlsMode::Mesh,
            server_name,
            identities: cfg
                .identities
                .iter()
                .filter_map(|i| SpiffeId::parse(i).ok())
                .collect(),
        })
    }

    /// Runs the handshake on `tcp` to the endpoint at `address`, which must prove
    /// `identity` (mesh) when it has one; `opaque`: the connection relays opaque TCP (ALPN
    /// `weft-tcp` instead of the cluster's HTTP version).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        address: &EndpointAddress,
        identity: Option<&SpiffeId>,
        opaque: bool,
    ) -> io::Result<TlsStream<TcpStream>> {
        let name = match (&self.server_name, address) {
            (Some(n), _) => n.clone(),
            (None, EndpointAddress::Host { host, .. }) => ServerName::try_from(host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            (None, EndpointAddress::Ip(addr)) => ServerName::IpAddress(addr.ip().into()),
        };
        let connector = if opaque {
            &self.opaque
        } else {
            &self.connector
        };
        let tls = connector.connect(name, tcp).await?;
        if self.mesh {
            let (_, conn) = tls.get_ref();
            let cert = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| refused("the server presented no certificate".into()))?;
            let got = spiffe_id(cert).map_err(refused)?;
            let allowed = match identity {
                Some(want) => got == *want,
                None => self.identities.is_empty() || self.identities.contains(&got),
            };
            if !allowed {
                let want = match identity {
                    Some(want) => want.to_string(),
                    None => self
                        .identities
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" or "),
                };
                return Err(refused(format!("the server is {got}, not {want}")));
            }
        }
        Ok(tls)
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("mesh", &self.mesh)
            .field("server_name", &self.server_name)
            .field("identities", &self.identities)
            .finish()
    }
}

fn refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why)
}

/// Presents the proxy's current mesh certificate.
#[derive(Debug)]
struct MeshClientCert {
    store: Arc<IdentityStore>,
}

impl ResolvesClientCert for MeshClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.store.current()?.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Presents one certificate from files.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
