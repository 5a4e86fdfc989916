//! The mesh CA: a root made on first start in the data dir (or an intermediate given as
//! files) for one trust domain, signing short-lived SPIFFE certificates for proxies' CSRs.
//! X.509 is rcgen's and x509-parser's, chain verification rustls' WebPKI.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, UnixTime};
use weft_config::SpiffeId;

/// Why the CA could not start or sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// CA files could not be read, written or used.
    #[error("{}: {why}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The request cannot be signed (a bad CSR, a CSR for another identity, a current
    /// certificate that does not verify).
    #[error("{0}")]
    Refused(String),
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> CaError {
    CaError::File {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

/// A signed certificate.
#[derive(Debug)]
pub struct Signed {
    /// The chain, DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The identity in it.
    pub spiffe_id: SpiffeId,
    /// End of validity, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// The mesh CA.
pub struct MeshCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// What goes above the leaf in every chain: an intermediate CA and its parents.
    above: Vec<CertificateDer<'static>>,
    /// The trust bundle.
    roots: Vec<CertificateDer<'static>>,
    /// Verifies proxies' current certificates (renewals).
    verifier: Arc<dyn ClientCertVerifier>,
    /// Lifetime of the certificates it signs.
    cert_ttl: Duration,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .field("cert_ttl", &self.cert_ttl)
            .finish()
    }
}

/// Validity of a root the CA makes itself.
const ROOT_YEARS: i64 = 10;
/// Clock skew allowed for between the CA and proxies.
const SKEW: Duration = Duration::from_secs(60);

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn at(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Writes `contents` to `path`, readable by the owner only.
fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| file_err(path, e))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let pem = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    KeyPair::from_pem(&pem).map_err(|e| file_err(path, format!("not a usable key: {e}")))
}

impl MeshCa {
    /// The CA of `trust_domain`: from `ca_files` (an intermediate: the CA certificate first,
    /// then its chain up to the root, which becomes the trust bundle; and its key), else the
    /// root kept in `data_dir/ca/`, made there on first start.
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: &str,
        ca_files: Option<(&Path, &Path)>,
        cert_ttl: Duration,
    ) -> Result<Self, CaError> {
        SpiffeId::parse(&format!("spiffe://{trust_domain}"))
            .map_err(|e| CaError::Refused(format!("--trust-domain: {e}")))?;
        let (issuer, above, roots) = match ca_files {
            Some((cert, key)) => {
                let certs = read_certs(cert)?;
                let key_pair = read_key(key)?;
                let issuer = Issuer::from_ca_cert_der(&certs[0], key_pair)
                    .map_err(|e| file_err(cert, format!("not a usable CA certificate: {e}")))?;
                let root = certs[certs.len() - 1].clone();
                (issuer, certs, vec![root])
            }
            None => {
                let dir = data_dir.join("ca");
                let (cert, key) = (dir.join("root.pem"), dir.join("root-key.pem"));
                if !cert.exists() {
                    Self::make_root(&dir, &cert, &key, trust_domain)?;
                }
                let certs = read_certs(&cert)?;
                let issuer = Issuer::from_ca_cert_der(&certs[0], read_key(&key)?)
                    .map_err(|e| file_err(&cert, format!("not a usable CA certificate: {e}")))?;
                (issuer, Vec::new(), vec![certs[0].clone()])
            }
        };
        let mut store = rustls::RootCertStore::empty();
        for root in &roots {
            store
                .add(root.clone())
                .map_err(|e| CaError::Refused(format!("the root is not usable: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .map_err(|e| CaError::Refused(format!("the trust bundle is not usable: {e}")))?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            above,
            roots,
            verifier,
            cert_ttl,
        })
    }

    fn make_root(dir: &Path, cert: &Path, key: &Path, trust_domain: &str) -> Result<(), CaError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| file_err(dir, e))?;
        let key_pair = KeyPair::generate().map_err(|e| CaError::Refused(e.to_string()))?;
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        p.distinguished_name
            .push(DnType::CommonName, format!("weft mesh root {trust_domain}"));
        let now = unix_now();
        p.not_before = at(now - SKEW.as_secs() as i64);
        p.not_after = at(now + ROOT_YEARS * 365 * 86_400);
        p.serial_number = Some(random_serial());
        let root = p
            .self_signed(&key_pair)
            .map_err(|e| CaError::Refused(e.to_string()))?;
        // The key first: a root file without its key would be a CA that cannot sign.
        write_private(key, &key_pair.serialize_pem())?;
        write_private(cert, &root.pem())?;
        tracing::info!(
            trust_domain,
            root = %cert.display(),
            "created the mesh root CA"
        );
        Ok(())
    }

    /// A certificate for the control service itself (its TLS endpoint), with a new key:
    /// `names` as DNS or IP SANs and the SPIFFE ID
    /// `spiffe://<trust-domain>/ns/weft-system/sa/weft-control`, valid for a year. PEM chain
    /// and PEM key.
    pub fn server_certificate(&self, names: &[String]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Refused(e.to_string()))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, "weft-control");
        let id = format!(
            "spiffe://{}/ns/weft-system/sa/weft-control",
            self.trust_domain
        );
        let mut sans = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|e| CaError::Refused(format!("{id}: {e}")))?,
        )];
        for n in names {
            sans.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.as_str()
                        .try_into()
                        .map_err(|e| CaError::Refused(format!("--tls-name {n}: {e}")))?,
                ),
            });
        }
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let now = unix_now();
        p.not_before = at(now - SKEW.as_secs() as i64);
        p.not_after = at(now + 365 * 86_400);
        p.serial_number = Some(random_serial());
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Refused(format!("cannot sign: {e}")))?;
        let mut chain = cert.pem();
        for c in &self.above {
            chain.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())));
        }
        Ok((chain, key.serialize_pem()))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle, DER.
    pub fn roots(&self) -> Vec<Vec<u8>> {
        self.roots.iter().map(|c| c.to_vec()).collect()
    }

    /// Checks that `csr_der` is a CSR signed by its key (before a token is spent on it).
    pub fn check_csr(&self, csr_der: &[u8]) -> Result<(), CaError> {
        parse_csr(csr_der).map(drop)
    }

    /// Signs `csr_der` for `id`; the CSR must name no other identity.
    pub fn sign(&self, csr_der: &[u8], id: &SpiffeId) -> Result<Signed, CaError> {
        let csr = parse_csr(csr_der)?;
        self.sign_parsed(csr, id)
    }

    fn sign_parsed(
        &self,
        csr: CertificateSigningRequestParams,
        id: &SpiffeId,
    ) -> Result<Signed, CaError> {
        let want = id.to_string();
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::URI(uri) if uri.as_str() == want => {}
                other => {
                    return Err(CaError::Refused(format!(
                        "the CSR asks for {other:?}, but the credential is for {want}"
                    )));
                }
            }
        }
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(
            want.as_str()
                .try_into()
                .map_err(|e| CaError::Refused(format!("{want}: {e}")))?,
        )];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.use_authority_key_identifier_extension = true;
        let now = unix_now();
        let not_after = now + self.cert_ttl.as_secs().max(1) as i64;
        p.not_before = at(now - SKEW.as_secs() as i64);
        p.not_after = at(not_after);
        p.serial_number = Some(random_serial());
        let leaf = p
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Refused(format!("cannot sign: {e}")))?;
        let mut chain = vec![leaf.der().to_vec()];
        chain.extend(self.above.iter().map(|c| c.to_vec()));
        Ok(Signed {
            chain,
            spiffe_id: id.clone(),
            not_after,
        })
    }

    /// Renews: `current` (DER) must be a certificate of this CA, valid now, with one SPIFFE
    /// ID of the trust domain, and `csr_der` for the same key; the new certificate is for
    /// that identity.
    pub fn renew(&self, current: &[u8], csr_der: &[u8]) -> Result<Signed, CaError> {
        let cert = CertificateDer::from(current.to_vec());
        self.verifier
            .verify_client_cert(&cert, &self.above, UnixTime::now())
            .map_err(|e| {
                CaError::Refused(format!("the current certificate does not verify: {e}"))
            })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(current)
            .map_err(|e| CaError::Refused(format!("the current certificate: {e}")))?;
        let uris: Vec<String> = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let [uri] = uris.as_slice() else {
            return Err(CaError::Refused(
                "the current certificate does not name exactly one SPIFFE ID".into(),
            ));
        };
        let id = SpiffeId::parse(uri).map_err(CaError::Refused)?;
        if id.trust_domain != self.trust_domain {
            return Err(CaError::Refused(format!(
                "{id} is not of trust domain {}",
                self.trust_domain
            )));
        }
        let csr = parse_csr(csr_der)?;
        if csr.public_key.der_bytes() != parsed.public_key().subject_public_key.data.as_ref() {
            return Err(CaError::Refused(
                "a renewal's CSR must be for the key of the current certificate".into(),
            ));
        }
        self.sign_parsed(csr, &id)
    }
}

/// Parses a CSR and checks its signature (proof that its sender holds the key).
fn parse_csr(der: &[u8]) -> Result<CertificateSigningRequestParams, CaError> {
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
        .map_err(|e| CaError::Refused(format!("not a valid CSR: {e}")))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the system's random source");
    // Positive and of full length.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(key: &KeyPair, uris: &[&str]) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn signs_only_the_credentials_identity_and_renews_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::load_or_create(dir.path(), "weft.local", None, Duration::from_secs(60))
            .unwrap();
        let id = SpiffeId::parse("spiffe://weft.local/ns/default/sa/a").unwrap();
        let key = KeyPair::generate().unwrap();
        let signed = ca.sign(&csr(&key, &[]), &id).unwrap();
        assert_eq!(signed.spiffe_id, id);
        let (_, leaf) = x509_parser::parse_x509_certificate(&signed.chain[0]).unwrap();
        assert!(leaf.validity().not_after.timestamp() - unix_now() <= 60);
        // A CSR naming another identity is refused.
        let err = ca
            .sign(
                &csr(&key, &["spiffe://weft.local/ns/default/sa/admin"]),
                &id,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("but the credential is for"),
            "{err}"
        );
        // Renewal: same key yes, another key no, garbage no.
        let renewed = ca.renew(&signed.chain[0], &csr(&key, &[])).unwrap();
        assert_eq!(renewed.spiffe_id, id);
        let other = KeyPair::generate().unwrap();
        assert!(ca.renew(&signed.chain[0], &csr(&other, &[])).is_err());
        assert!(ca.renew(b"not a cert", &csr(&key, &[])).is_err());
        // Another CA's certificate does not renew here.
        let dir2 = tempfile::tempdir().unwrap();
        let ca2 = MeshCa::load_or_create(dir2.path(), "weft.local", None, Duration::from_secs(60))
            .unwrap();
        let foreign = ca2.sign(&csr(&key, &[]), &id).unwrap();
        assert!(ca.renew(&foreign.chain[0], &csr(&key, &[])).is_err());
        // The root is kept: a second start signs with the same one.
        let again = MeshCa::load_or_create(dir.path(), "weft.local", None, Duration::from_secs(60))
            .unwrap();
        assert_eq!(again.roots(), ca.roots());
        assert!(again.renew(&signed.chain[0], &csr(&key, &[])).is_ok());
    }

    #[test]
    fn an_intermediate_from_files_signs_chains_up_to_its_root() {
        let dir = tempfile::tempdir().unwrap();
        let ca_params = || {
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            p
        };
        let root_key = KeyPair::generate().unwrap();
        let root = ca_params().self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(ca_params(), root_key);
        let mid_key = KeyPair::generate().unwrap();
        let mid = ca_params().signed_by(&mid_key, &root_issuer).unwrap();
        let (cert, key) = (dir.path().join("mid.pem"), dir.path().join("mid-key.pem"));
        std::fs::write(&cert, format!("{}{}", mid.pem(), root.pem())).unwrap();
        std::fs::write(&key, mid_key.serialize_pem()).unwrap();
        let ca = MeshCa::load_or_create(
            dir.path(),
            "weft.local",
            Some((&cert, &key)),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(ca.roots(), vec![root.der().to_vec()]);
        let id = SpiffeId::parse("spiffe://weft.local/ns/default/sa/a").unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let signed = ca.sign(&csr(&leaf_key, &[]), &id).unwrap();
        assert_eq!(signed.chain.len(), 3, "leaf, intermediate, root");
        assert!(ca.renew(&signed.chain[0], &csr(&leaf_key, &[])).is_ok());
        // A key file that is not a key is an error naming it.
        std::fs::write(&key, "junk").unwrap();
        let err = MeshCa::load_or_create(
            dir.path(),
            "weft.local",
            Some((&cert, &key)),
            Duration::from_secs(60),
        )
        .unwrap_err();
        assert!(err.to_string().contains("mid-key.pem"), "{err}");
    }
}
