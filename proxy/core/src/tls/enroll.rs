//! An identity from the mesh CA (the control service): the proxy generates its key (sent
//! nowhere: it is kept in the state dir, readable by the proxy's user only, so a restart
//! renews instead of needing a new token), sends a CSR with its join token, and renews the
//! certificate with the current one at about 70% of its lifetime. When renewal fails the
//! proxy keeps serving with the certificate it holds, retries with backoff and says so;
//! once that certificate has expired it is no longer served.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use weft_proto::v1;

use super::files::TlsError;
use super::identity::{IdentityStore, MeshIdentity};
use crate::control::{Backoff, ControlOptions};

/// How long a starting proxy keeps trying to reach the CA for its first certificate.
const FIRST_CERT_WITHIN: Duration = Duration::from_secs(60);
/// The share of a certificate's remaining lifetime after which it is renewed.
const RENEW_AT: f64 = 0.7;

/// A proxy enrolled with the mesh CA: what renewing needs.
pub struct Enrolled {
    key: KeyPair,
    dir: PathBuf,
    token_file: PathBuf,
    control: ControlOptions,
    /// When the certificate held was received, in Unix seconds.
    received: i64,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn invalid(why: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid(why.to_string())
}

/// Writes `contents` to `path` through a temporary file, readable by the owner only.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| TlsError::File {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

fn pem(label: &str, ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new(label, d.clone())))
        .collect()
}

/// The identity a signed response makes with `key`.
fn identity_of(key: &KeyPair, signed: &v1::SignResponse) -> Result<MeshIdentity, TlsError> {
    let chain: Vec<CertificateDer<'static>> = signed
        .cert_chain_der
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let certified = CertifiedKey::from_der(chain, key_der, &super::provider()).map_err(|e| {
        invalid(format!(
            "the CA's certificate does not go with our key: {e}"
        ))
    })?;
    let mut roots = RootCertStore::empty();
    for der in &signed.trust_bundle_der {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| invalid(format!("the CA's trust bundle: {e}")))?;
    }
    MeshIdentity::new(certified, roots)
}

impl Enrolled {
    fn files(&self) -> [PathBuf; 3] {
        ["key.pem", "cert.pem", "bundle.pem"].map(|f| self.dir.join(f))
    }

    /// Keeps `signed` (with our key) in the state dir.
    fn persist(&self, signed: &v1::SignResponse) -> Result<(), TlsError> {
        let [key, cert, bundle] = self.files();
        write_private(&key, self.key.serialize_pem().as_bytes())?;
        write_private(
            &bundle,
            pem("CERTIFICATE", &signed.trust_bundle_der).as_bytes(),
        )?;
        write_private(&cert, pem("CERTIFICATE", &signed.cert_chain_der).as_bytes())
    }

    fn csr(&self) -> Result<Vec<u8>, TlsError> {
        CertificateParams::default()
            .serialize_request(&self.key)
            .map(|c| c.der().to_vec())
            .map_err(|e| invalid(format!("cannot make a CSR: {e}")))
    }

    async fn sign(
        &self,
        credential: v1::sign_request::Credential,
    ) -> Result<v1::SignResponse, Refusal> {
        // Each replica in turn, until one answers.
        let mut unreachable = Vec::new();
        for address in &self.control.addresses {
            match self.sign_at(address, credential.clone()).await {
                Err(Refusal::Unreachable(why)) => unreachable.push(format!("{address}: {why}")),
                done => return done,
            }
        }
        Err(Refusal::Unreachable(unreachable.join("; ")))
    }

    async fn sign_at(
        &self,
        address: &str,
        credential: v1::sign_request::Credential,
    ) -> Result<v1::SignResponse, Refusal> {
        let bearer =
            weft_client::Bearer::new(self.control.token.as_deref()).map_err(Refusal::Final)?;
        let endpoint = weft_client::endpoint_trusting(
            address,
            self.control.ca_file.as_deref(),
            Some(&self.control.mesh_bundle()),
        )
        .map_err(Refusal::Final)?;
        let channel = weft_client::connect(endpoint, bearer).await.map_err(|e| {
            Refusal::Unreachable(format!(
                "cannot reach the control service: {}",
                weft_client::error_chain(&e)
            ))
        })?;
        let request = v1::SignRequest {
            csr_der: self.csr().map_err(|e| Refusal::Final(e.to_string()))?,
            credential: Some(credential),
        };
        match v1::identity_client::IdentityClient::new(channel)
            .sign(request)
            .await
        {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => {
                let why = format!("the mesh CA refused: {}", s.message());
                match s.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown => Err(Refusal::Unreachable(why)),
                    _ => Err(Refusal::Final(why)),
                }
            }
        }
    }

    fn join_token(&self) -> Result<v1::sign_request::Credential, Refusal> {
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| Refusal::Final(format!("{}: {e}", self.token_file.display())))?;
        Ok(v1::sign_request::Credential::JoinToken(
            token.trim().to_owned(),
        ))
    }

    /// Renews the identity in `store` for ever: at about 70% of the remaining lifetime of
    /// the certificate held, with the current certificate (or, once it has expired, the
    /// join token file again, which an operator may have refreshed); on failure, again
    /// with backoff, saying each time how long the certificate held has left.
    pub async fn renew_forever(mut self, store: Arc<IdentityStore>) {
        let mut backoff = Backoff::default();
        let mut due = self.due(&store);
        loop {
            tokio::time::sleep_until(due).await;
            let held = store.held();
            let credential = match held.as_ref().filter(|id| !id.expired()) {
                Some(id) => Ok(v1::sign_request::Credential::CurrentCertDer(
                    id.certified.cert[0].to_vec(),
                )),
                None => self.join_token(),
            };
            let result = match credential {
                Ok(c) => self.sign(c).await,
                Err(e) => Err(e),
            };
            let outcome = result.map_err(|r| r.to_string()).and_then(|signed| {
                let identity = identity_of(&self.key, &signed).map_err(|e| e.to_string())?;
                if let Err(e) = self.persist(&signed) {
                    tracing::warn!("the renewed certificate is not kept on disk: {e}");
                }
                Ok(identity)
            });
            match outcome {
                Ok(identity) => {
                    tracing::info!(
                        id = %identity.id,
                        serial = %identity.leaf.serial,
                        not_after = identity.leaf.not_after,
                        "mesh certificate renewed"
                    );
                    store.set(identity);
                    self.received = unix_now();
                    backoff.reset();
                    due = self.due(&store);
                }
                Err(e) => {
                    let left = held.map(|id| id.leaf.not_after - unix_now()).unwrap_or(0);
                    let wait = backoff
                        .next_delay()
                        .min(Duration::from_secs((left.max(4) / 4) as u64))
                        .max(Duration::from_millis(250));
                    if left > 0 {
                        tracing::warn!(
                            expires_in_s = left,
                            retry_in_ms = wait.as_millis() as u64,
                            "cannot renew the mesh certificate; serving with the current one: {e}"
                        );
                    } else {
                        tracing::error!(
                            retry_in_ms = wait.as_millis() as u64,
                            "the mesh certificate has expired and cannot be renewed: mesh TLS is refused until it is: {e}"
                        );
                    }
                    due = tokio::time::Instant::now() + wait;
                }
            }
        }
    }

    /// When the identity held is due for renewal.
    fn due(&self, store: &IdentityStore) -> tokio::time::Instant {
        let now = unix_now();
        let not_after = store.held().map(|id| id.leaf.not_after).unwrap_or(now);
        let from = self.received.min(now);
        let at = from as f64 + (not_after - from) as f64 * RENEW_AT;
        let wait = (at - now as f64).max(0.0);
        tokio::time::Instant::now() + Duration::from_secs_f64(wait)
    }
}

/// Why the CA did not sign.
#[derive(Debug)]
enum Refusal {
    /// The control service could not be reached: try again.
    Unreachable(String),
    /// It answered no (a used or unknown token, a bad CSR), or the request could not be made.
    Final(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unreachable(m) | Refusal::Final(m) => f.write_str(m),
        }
    }
}

/// The identity of a proxy enrolled with the CA, at startup: the one kept in the state dir
/// if it is still valid, else a new key and a certificate for the join token in
/// `token_file` (waiting up to a minute for the control service). Blocks.
pub fn enroll(
    token_file: &Path,
    control: &ControlOptions,
) -> Result<(MeshIdentity, Enrolled), TlsError> {
    let dir = control.state_dir.join("identity");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| TlsError::File {
                path: dir.clone(),
                why: e.to_string(),
            })?;
    }
    let enrolled = |key| Enrolled {
        key,
        dir: dir.clone(),
        token_file: token_file.to_owned(),
        control: control.clone(),
        received: unix_now(),
    };
    if let Some((key, identity)) = kept(&dir) {
        tracing::info!(id = %identity.id, serial = %identity.leaf.serial, "mesh identity from the state dir");
        return Ok((identity, enrolled(key)));
    }
    let enrolled =
        enrolled(KeyPair::generate().map_err(|e| invalid(format!("cannot make a key: {e}")))?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    let signed = runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + FIRST_CERT_WITHIN;
        let mut backoff = Backoff::default();
        loop {
            let credential = enrolled.join_token().map_err(|e| invalid(e.to_string()))?;
            match enrolled.sign(credential).await {
                Ok(signed) => return Ok(signed),
                Err(Refusal::Final(why)) => return Err(invalid(why)),
                Err(Refusal::Unreachable(why)) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!("waiting for the mesh CA: {why}");
                    tokio::time::sleep(backoff.next_delay().min(Duration::from_secs(5))).await;
                }
                Err(Refusal::Unreachable(why)) => {
                    return Err(invalid(format!("no certificate within a minute: {why}")));
                }
            }
        }
    })?;
    let identity = identity_of(&enrolled.key, &signed)?;
    enrolled.persist(&signed)?;
    tracing::info!(id = %identity.id, serial = %identity.leaf.serial, not_after = identity.leaf.not_after, "mesh certificate from the CA");
    Ok((identity, enrolled))
}

/// The key and identity kept in `dir`, if they make a valid identity now.
fn kept(dir: &Path) -> Option<(KeyPair, MeshIdentity)> {
    let key_pem = std::fs::read_to_string(dir.join("key.pem")).ok()?;
    let key = KeyPair::from_pem(&key_pem).ok()?;
    let chain = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .ok()?
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).ok()?;
    let certified = CertifiedKey::from_der(chain, key_der, &super::provider()).ok()?;
    let roots = super::files::roots(&dir.join("bundle.pem")).ok()?;
    match MeshIdentity::new(certified, roots) {
        Ok(identity) => Some((key, identity)),
        Err(e) => {
            tracing::info!(
                "the identity kept in the state dir is not usable ({e}); enrolling again"
            );
            None
        }
    }
}
