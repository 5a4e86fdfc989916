//! Mesh peer checks: a peer's certificate chains to the current trust bundle (rustls'
//! WebPKI verification) and names exactly one SPIFFE ID, of the proxy's trust domain. Which
//! identity a client must be is the authorization filter's business; which one a server
//! must be is checked by the connector ([`super::client`]) once the handshake is done.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use weft_config::SpiffeId;

use super::identity::IdentityStore;

/// What the proxy reads from a certificate.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// Serial number, hex.
    pub serial: String,
    /// URI subject alternative names.
    pub uri_sans: Vec<String>,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    /// End of validity, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// Reads `der` (an X.509 certificate).
pub fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut uri_sans = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                uri_sans.push((*uri).to_owned());
            }
        }
    }
    Ok(CertInfo {
        serial: cert.raw_serial_as_string().replace(':', ""),
        uri_sans,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The SPIFFE ID a certificate proves: its only URI SAN (an SVID has exactly one).
pub fn spiffe_id(der: &[u8]) -> Result<SpiffeId, String> {
    let info = cert_info(der)?;
    match info.uri_sans.as_slice() {
        [one] => SpiffeId::parse(one),
        [] => Err("the certificate has no URI SAN (no SPIFFE ID)".into()),
        many => Err(format!(
            "the certificate has {} URI SANs; a SPIFFE certificate has exactly one",
            many.len()
        )),
    }
}

/// The SPIFFE ID of a mesh peer's certificate, which must be of `trust_domain`.
fn mesh_peer(der: &[u8], trust_domain: &str) -> Result<SpiffeId, Error> {
    let id = spiffe_id(der).map_err(Error::General)?;
    if id.trust_domain != trust_domain {
        return Err(Error::General(format!(
            "peer {id} is not of trust domain `{trust_domain}`"
        )));
    }
    Ok(id)
}

/// A handshake signature checked with the provider's algorithms (`verify`: rustls' TLS 1.2
/// or TLS 1.3 check), the same on both sides.
fn signature(
    verify: fn(
        &[u8],
        &CertificateDer<'_>,
        &DigitallySignedStruct,
        &rustls::crypto::WebPkiSupportedAlgorithms,
    ) -> Result<HandshakeSignatureValid, Error>,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    verify(
        message,
        cert,
        dss,
        &super::provider().signature_verification_algorithms,
    )
}

fn no_identity() -> Error {
    Error::General("this proxy has no usable mesh identity".into())
}

/// Verifies mesh clients (the server side of mesh mTLS).
#[derive(Debug)]
pub struct MeshClientVerifier {
    pub(super) store: Arc<IdentityStore>,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle changes under the verifier; clients of the mesh have one identity.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let id = self.store.current().ok_or_else(no_identity)?;
        id.client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        mesh_peer(end_entity, &id.id.trust_domain)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signature(verify_tls12_signature, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signature(verify_tls13_signature, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        super::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies mesh servers (the client side of mesh mTLS): the chain and the trust domain;
/// SPIFFE IDs have no DNS name to check against the server name.
#[derive(Debug)]
pub struct MeshServerVerifier {
    pub(super) store: Arc<IdentityStore>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = self.store.current().ok_or_else(no_identity)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &id.roots,
            intermediates,
            now,
            super::provider().signature_verification_algorithms.all,
        )?;
        mesh_peer(end_entity, &id.id.trust_domain)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signature(verify_tls12_signature, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        signature(verify_tls13_signature, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        super::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
