//! The mesh CA: a root made on first start in the data dir (or an intermediate given as
//! files) for one trust domain, signing short-lived SPIFFE certificates for proxies' CSRs.
//! X.509 is rcgen's and x509-parser's, chain verification rustls' WebPKI.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::Digest;

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

/// Why the CA could not start, sign or rotate.
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
    /// The CA is not in a state to do it (a rotation under way, a CA from files).
    #[error("{0}")]
    Precondition(String),
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

/// A step of a root rotation (`weftctl ca rotate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Both roots are trusted and the old one still signs: every renewal hands proxies the
    /// bundle with the new root.
    Distributing,
    /// Both roots are trusted and the new one signs: every renewal moves a proxy to it.
    Switching,
}

impl Phase {
    /// Its name in the API.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Distributing => "distributing",
            Phase::Switching => "switching",
        }
    }
}

/// Which root signs, which are trusted, and the rotation under way: `ca/state.json` in the
/// data dir. Roots are numbered by generation: 1 is `root.pem`/`root-key.pem`, later ones
/// `root-<n>.pem`/`root-<n>-key.pem`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Roots {
    active: u32,
    trusted: Vec<u32>,
    #[serde(default)]
    phase: Option<Phase>,
    /// When the phase began, in seconds since the Unix epoch.
    #[serde(default)]
    since_unix: i64,
    /// The longest certificate lifetime that may still be live, in seconds: the lifetime
    /// of an earlier start when `--cert-ttl-seconds` was lowered since, so that rotation
    /// steps wait for the certificates it signed.
    #[serde(default)]
    issued_ttl: u64,
    /// Until when certificates of `issued_ttl` may be live (0: while it is the lifetime
    /// configured now).
    #[serde(default)]
    issued_ttl_until: i64,
}

impl Roots {
    /// Records that certificates of `ttl` seconds are signed from `now` on; whether the
    /// state changed.
    fn signing_with(&mut self, ttl: u64, now: i64) -> bool {
        let before = (self.issued_ttl, self.issued_ttl_until);
        if self.issued_ttl_until != 0 && now >= self.issued_ttl_until {
            (self.issued_ttl, self.issued_ttl_until) = (0, 0);
        }
        if ttl >= self.issued_ttl {
            (self.issued_ttl, self.issued_ttl_until) = (ttl, 0);
        } else if self.issued_ttl_until == 0 {
            // Lowered now: what the earlier lifetime signed lives until then at most.
            self.issued_ttl_until = now + self.issued_ttl as i64;
        }
        before != (self.issued_ttl, self.issued_ttl_until)
    }
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            active: 1,
            trusted: vec![1],
            phase: None,
            since_unix: 0,
            issued_ttl: 0,
            issued_ttl_until: 0,
        }
    }
}

/// The root of one generation in `dir`: (certificate, key) files.
fn root_files(dir: &Path, generation: u32) -> (PathBuf, PathBuf) {
    match generation {
        1 => (dir.join("root.pem"), dir.join("root-key.pem")),
        n => (
            dir.join(format!("root-{n}.pem")),
            dir.join(format!("root-{n}-key.pem")),
        ),
    }
}

/// What signs now, and what is trusted: swapped whole on a rotation step.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// What goes above the leaf in every chain: an intermediate CA and its parents.
    above: Vec<CertificateDer<'static>>,
    /// The trust bundle.
    roots: Vec<CertificateDer<'static>>,
    /// The signing root's certificate (of `roots`).
    signing_root: CertificateDer<'static>,
    /// Verifies proxies' current certificates (renewals) against every trusted root.
    verifier: Arc<dyn ClientCertVerifier>,
    state: Roots,
}

/// One root of the trust bundle, as `status` tells it.
#[derive(Debug, Clone)]
pub struct RootInfo {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Its subject.
    pub subject: String,
    /// `sha256:<hex>` of the DER.
    pub fingerprint: String,
    /// Whether it signs new certificates.
    pub signing: bool,
    /// End of validity, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// Where the CA stands.
#[derive(Debug, Clone)]
pub struct CaStatus {
    /// The trust domain.
    pub trust_domain: String,
    /// The trust bundle.
    pub roots: Vec<RootInfo>,
    /// The rotation step under way, if any.
    pub phase: Option<Phase>,
    /// When the next step is taken, in seconds since the Unix epoch (0: none).
    pub next_step_unix: i64,
    /// How long each step of a rotation lasts.
    pub phase_length: Duration,
}

/// The mesh CA.
pub struct MeshCa {
    trust_domain: String,
    /// Lifetime of the certificates it signs.
    cert_ttl: Duration,
    /// Where its roots are kept (`None`: an intermediate given as files, which an operator
    /// rotates by restarting with new files).
    dir: Option<PathBuf>,
    signer: ArcSwap<Signer>,
    /// The generation of the signing root, for those who issue from it (the control
    /// service's own TLS certificate).
    active: tokio::sync::watch::Sender<u32>,
    /// Serialises rotation steps.
    stepping: std::sync::Mutex<()>,
    /// Why `rotate` is refused here, if it is (replicas sharing the CA).
    no_rotation: Option<String>,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let signer = self.signer.load();
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &signer.roots.len())
            .field("phase", &signer.state.phase)
            .field("cert_ttl", &self.cert_ttl)
            .finish()
    }
}

/// Validity of a root the CA makes itself.
const ROOT_YEARS: i64 = 10;
/// Clock skew allowed for between the CA and proxies.
const SKEW: Duration = Duration::from_secs(60);

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn at(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Writes `contents` to `path` at once (a temporary file renamed over it: a crash never
/// leaves half a file), readable by the owner only.
pub(crate) fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| file_err(&tmp, e))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

/// Replaces `path` with `contents` at once (a temporary file renamed over it).
fn replace_file(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| file_err(&tmp, e))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
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

fn verifier_of(roots: &[CertificateDer<'static>]) -> Result<Arc<dyn ClientCertVerifier>, CaError> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store
            .add(root.clone())
            .map_err(|e| CaError::Refused(format!("a root is not usable: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
        .build()
        .map_err(|e| CaError::Refused(format!("the trust bundle is not usable: {e}")))
}

fn pem_of(ders: &[CertificateDer<'static>]) -> String {
    ders.iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect()
}

impl Signer {
    /// The signer of `state`, from the roots kept in `dir`.
    fn load(dir: &Path, state: Roots) -> Result<Signer, CaError> {
        let mut roots = Vec::new();
        let mut signing = None;
        for &generation in &state.trusted {
            let (cert, key) = root_files(dir, generation);
            let root = read_certs(&cert)?.swap_remove(0);
            if generation == state.active {
                let issuer = Issuer::from_ca_cert_der(&root, read_key(&key)?)
                    .map_err(|e| file_err(&cert, format!("not a usable CA certificate: {e}")))?;
                signing = Some((issuer, root.clone()));
            }
            roots.push(root);
        }
        let Some((issuer, signing_root)) = signing else {
            return Err(file_err(
                &dir.join("state.json"),
                format!("the signing root {} is not trusted", state.active),
            ));
        };
        Ok(Signer {
            issuer,
            above: Vec::new(),
            verifier: verifier_of(&roots)?,
            roots,
            signing_root,
            state,
        })
    }
}

impl MeshCa {
    /// The CA of `trust_domain`: from `ca_files` (an intermediate: the CA certificate first,
    /// then its chain up to the root, which becomes the trust bundle; and its key), else the
    /// roots kept in `data_dir/ca/`, the first made there on first start. The trust bundle
    /// is written to `data_dir/ca/bundle.pem` whenever it changes.
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: &str,
        ca_files: Option<(&Path, &Path)>,
        cert_ttl: Duration,
    ) -> Result<Self, CaError> {
        SpiffeId::parse(&format!("spiffe://{trust_domain}"))
            .map_err(|e| CaError::Refused(format!("--trust-domain: {e}")))?;
        let (signer, dir) = match ca_files {
            Some((cert, key)) => {
                let certs = read_certs(cert)?;
                let key_pair = read_key(key)?;
                let issuer = Issuer::from_ca_cert_der(&certs[0], key_pair)
                    .map_err(|e| file_err(cert, format!("not a usable CA certificate: {e}")))?;
                let root = certs[certs.len() - 1].clone();
                let roots = vec![root.clone()];
                let signer = Signer {
                    issuer,
                    above: certs,
                    verifier: verifier_of(&roots)?,
                    roots,
                    signing_root: root,
                    state: Roots::default(),
                };
                (signer, None)
            }
            None => {
                let dir = data_dir.join("ca");
                let state_file = dir.join("state.json");
                let state = if state_file.exists() {
                    let text = std::fs::read_to_string(&state_file)
                        .map_err(|e| file_err(&state_file, e))?;
                    serde_json::from_str(&text).map_err(|e| file_err(&state_file, e))?
                } else {
                    if !root_files(&dir, 1).0.exists() {
                        Self::make_root(&dir, 1, trust_domain)?;
                    }
                    Roots::default()
                };
                let mut state = state;
                if state.signing_with(cert_ttl.as_secs(), unix_now()) {
                    let json = serde_json::to_vec_pretty(&state)
                        .map_err(|e| CaError::Refused(e.to_string()))?;
                    replace_file(&state_file, &json)?;
                }
                // Keys of retired roots that a crash (or a failed delete) left behind go now.
                let oldest = state.trusted.iter().copied().min().unwrap_or(1);
                for generation in 1..oldest {
                    let (_, key) = root_files(&dir, generation);
                    if key.exists() {
                        std::fs::remove_file(&key).map_err(|e| file_err(&key, e))?;
                        tracing::warn!(key = %key.display(), "deleted the key of a retired root");
                    }
                }
                let signer = Signer::load(&dir, state)?;
                replace_file(&dir.join("bundle.pem"), pem_of(&signer.roots).as_bytes())?;
                (signer, Some(dir))
            }
        };
        let (active, _) = tokio::sync::watch::channel(signer.state.active);
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            cert_ttl,
            dir,
            signer: ArcSwap::from_pointee(signer),
            active,
            stepping: std::sync::Mutex::new(()),
            no_rotation: None,
        })
    }

    /// Refuses `rotate` from now on, saying `why`.
    pub fn without_rotation(self, why: &str) -> Self {
        MeshCa {
            no_rotation: Some(why.to_owned()),
            ..self
        }
    }

    /// Makes the root of `generation` in `dir` (replacing leftovers of a step that did
    /// not finish).
    fn make_root(dir: &Path, generation: u32, trust_domain: &str) -> Result<(), CaError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| file_err(dir, e))?;
        let (cert, key) = root_files(dir, generation);
        for leftover in [&cert, &key] {
            if leftover.exists() {
                std::fs::remove_file(leftover).map_err(|e| file_err(leftover, e))?;
            }
        }
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
        p.distinguished_name.push(
            DnType::CommonName,
            match generation {
                1 => format!("weft mesh root {trust_domain}"),
                n => format!("weft mesh root {trust_domain} #{n}"),
            },
        );
        let now = unix_now();
        p.not_before = at(now - SKEW.as_secs() as i64);
        p.not_after = at(now + ROOT_YEARS * 365 * 86_400);
        p.serial_number = Some(random_serial());
        let root = p
            .self_signed(&key_pair)
            .map_err(|e| CaError::Refused(e.to_string()))?;
        // The key first: a root file without its key would be a CA that cannot sign.
        write_private(&key, &key_pair.serialize_pem())?;
        write_private(&cert, &root.pem())?;
        tracing::info!(
            trust_domain,
            generation,
            root = %cert.display(),
            "created a mesh root CA"
        );
        Ok(())
    }

    /// A certificate for the control service itself (its TLS endpoint), with a new key,
    /// from the root that signs now: `names` as DNS or IP SANs and the SPIFFE ID
    /// `spiffe://<trust-domain>/ns/weft-system/sa/weft-control`, valid for a year. PEM
    /// chain and PEM key.
    pub fn server_certificate(&self, names: &[String]) -> Result<(String, String), CaError> {
        let signer = self.signer.load();
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
            .signed_by(&key, &signer.issuer)
            .map_err(|e| CaError::Refused(format!("cannot sign: {e}")))?;
        let mut chain = cert.pem();
        chain.push_str(&pem_of(&signer.above));
        Ok((chain, key.serialize_pem()))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle, DER.
    pub fn roots(&self) -> Vec<Vec<u8>> {
        self.signer
            .load()
            .roots
            .iter()
            .map(|c| c.to_vec())
            .collect()
    }

    /// Follows the generation of the signing root.
    pub fn watch_active(&self) -> tokio::sync::watch::Receiver<u32> {
        self.active.subscribe()
    }

    /// How long each step of a rotation lasts: a certificate's lifetime and a margin, so
    /// that every live proxy renews (at about 70% of it) within the step.
    /// The lifetime is the longest that may still be live: a `--cert-ttl-seconds` lowered
    /// since an earlier start counts until the certificates of that start have expired.
    pub fn phase_length(&self) -> Duration {
        let state = &self.signer.load().state;
        let earlier = if state.issued_ttl_until == 0 || unix_now() < state.issued_ttl_until {
            Duration::from_secs(state.issued_ttl)
        } else {
            Duration::ZERO
        };
        let ttl = self.cert_ttl.max(earlier);
        ttl + (ttl / 5).max(Duration::from_secs(2))
    }

    /// Where the CA stands.
    pub fn status(&self) -> CaStatus {
        let signer = self.signer.load();
        let roots = signer
            .roots
            .iter()
            .map(|der| {
                let (subject, not_after) = x509_parser::parse_x509_certificate(der)
                    .map(|(_, c)| (c.subject().to_string(), c.validity().not_after.timestamp()))
                    .unwrap_or_default();
                RootInfo {
                    der: der.to_vec(),
                    subject,
                    fingerprint: format!("sha256:{}", hex::encode(sha2::Sha256::digest(der))),
                    signing: *der == signer.signing_root,
                    not_after,
                }
            })
            .collect();
        let phase = signer.state.phase;
        CaStatus {
            trust_domain: self.trust_domain.clone(),
            roots,
            phase,
            next_step_unix: phase
                .map(|_| signer.state.since_unix + self.phase_length().as_secs() as i64)
                .unwrap_or(0),
            phase_length: self.phase_length(),
        }
    }

    /// Starts a rotation to a new root: made now and trusted beside the old one, which
    /// signs until every live proxy holds the new bundle (one step); then the new root
    /// signs (another step); then the old one is dropped from the bundle and its key
    /// deleted. [`MeshCa::step`] takes the steps when they are due. Blocks (file I/O).
    pub fn rotate(&self) -> Result<CaStatus, CaError> {
        let Some(dir) = &self.dir else {
            return Err(CaError::Precondition(
                "this CA is an intermediate from --ca-cert/--ca-key: rotate it with its own \
                 parent CA (restart with the new files)"
                    .into(),
            ));
        };
        if let Some(why) = &self.no_rotation {
            return Err(CaError::Precondition(why.clone()));
        }
        let _step = self.stepping.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.signer.load();
        if let Some(phase) = current.state.phase {
            return Err(CaError::Precondition(format!(
                "a rotation is under way ({}); see `weftctl ca status`",
                phase.name()
            )));
        }
        let old = current.state.active;
        let new = current.state.trusted.iter().copied().max().unwrap_or(old) + 1;
        Self::make_root(dir, new, &self.trust_domain)?;
        self.enter(
            dir,
            Roots {
                active: old,
                trusted: vec![old, new],
                phase: Some(Phase::Distributing),
                since_unix: unix_now(),
                ..current.state.clone()
            },
        )?;
        tracing::warn!(
            old,
            new,
            step_seconds = self.phase_length().as_secs(),
            "CA rotation started: the new root is in the trust bundle; the old one signs until every proxy has it"
        );
        Ok(self.status())
    }

    /// Takes the next step of a rotation if it is due at `now_unix`; says whether it took
    /// one. Blocks (file I/O).
    pub fn step(&self, now_unix: i64) -> Result<bool, CaError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let _step = self.stepping.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.signer.load();
        let state = &current.state;
        let (Some(phase), [old, new]) = (state.phase, state.trusted.as_slice()) else {
            return Ok(false);
        };
        if now_unix < state.since_unix + self.phase_length().as_secs() as i64 {
            return Ok(false);
        }
        let (old, new) = (*old, *new);
        match phase {
            Phase::Distributing => {
                self.enter(
                    dir,
                    Roots {
                        active: new,
                        trusted: vec![old, new],
                        phase: Some(Phase::Switching),
                        since_unix: now_unix,
                        ..state.clone()
                    },
                )?;
                tracing::warn!(
                    new,
                    "CA rotation: the new root signs; both are still trusted"
                );
            }
            Phase::Switching => {
                self.enter(
                    dir,
                    Roots {
                        active: new,
                        trusted: vec![new],
                        phase: None,
                        since_unix: now_unix,
                        ..state.clone()
                    },
                )?;
                // The retired root's certificate stays as a record; its key goes.
                let (_, key) = root_files(dir, old);
                if let Err(e) = std::fs::remove_file(&key) {
                    tracing::error!(key = %key.display(), "cannot delete the retired root's key: {e}");
                }
                tracing::warn!(old, "CA rotation done: the old root is no longer trusted");
            }
        }
        Ok(true)
    }

    /// Makes `state` the CA's: loads its signer, writes the state file (the one atomic
    /// decision of a step) and the bundle file, then swaps.
    fn enter(&self, dir: &Path, state: Roots) -> Result<(), CaError> {
        let signer = Signer::load(dir, state)?;
        let json = serde_json::to_vec_pretty(&signer.state)
            .map_err(|e| CaError::Refused(e.to_string()))?;
        // The bundle first: a start after a crash here writes it again from the state.
        replace_file(&dir.join("bundle.pem"), pem_of(&signer.roots).as_bytes())?;
        replace_file(&dir.join("state.json"), &json)?;
        let active = signer.state.active;
        self.signer.store(Arc::new(signer));
        self.active.send_replace(active);
        Ok(())
    }

    /// Checks that `csr_der` is a CSR signed by its key (before a token is spent on it).
    pub fn check_csr(&self, csr_der: &[u8]) -> Result<(), CaError> {
        parse_csr(csr_der).map(drop)
    }

    /// Signs `csr_der` for `id`; the CSR must name no other identity.
    pub fn sign(&self, csr_der: &[u8], id: &SpiffeId) -> Result<Signed, CaError> {
        let csr = parse_csr(csr_der)?;
        self.sign_parsed(&self.signer.load(), csr, id)
    }

    fn sign_parsed(
        &self,
        signer: &Signer,
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
            .signed_by(&csr.public_key, &signer.issuer)
            .map_err(|e| CaError::Refused(format!("cannot sign: {e}")))?;
        let mut chain = vec![leaf.der().to_vec()];
        chain.extend(signer.above.iter().map(|c| c.to_vec()));
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
        let signer = self.signer.load();
        let cert = CertificateDer::from(current.to_vec());
        signer
            .verifier
            .verify_client_cert(&cert, &signer.above, UnixTime::now())
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
        self.sign_parsed(&signer, csr, &id)
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

    /// The issuer (subject of the signing root) of a signed leaf.
    fn issuer(signed: &Signed) -> String {
        let (_, leaf) = x509_parser::parse_x509_certificate(&signed.chain[0]).unwrap();
        leaf.issuer().to_string()
    }

    #[test]
    fn a_rotation_trusts_both_roots_switches_signing_then_drops_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            MeshCa::load_or_create(dir.path(), "weft.local", None, Duration::from_secs(10)).unwrap()
        };
        let ca = open();
        let id = SpiffeId::parse("spiffe://weft.local/ns/default/sa/a").unwrap();
        let key = KeyPair::generate().unwrap();
        let before = ca.sign(&csr(&key, &[]), &id).unwrap();
        assert!(issuer(&before).ends_with("weft mesh root weft.local"));
        let step = ca.phase_length().as_secs() as i64;
        assert_eq!(step, 12, "a lifetime and a margin");

        let status = ca.rotate().unwrap();
        assert_eq!(status.phase, Some(Phase::Distributing));
        assert_eq!(ca.roots().len(), 2);
        let bundle = std::fs::read_to_string(dir.path().join("ca/bundle.pem")).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
        // The old root still signs; a second rotation waits for this one.
        assert!(issuer(&ca.sign(&csr(&key, &[]), &id).unwrap()).ends_with("weft.local"));
        assert!(matches!(ca.rotate(), Err(CaError::Precondition(_))));
        // Not before the step is due.
        let t0 = status.next_step_unix - step;
        assert!(!ca.step(t0 + step - 1).unwrap());
        // A restart mid-rotation resumes it.
        drop(ca);
        let ca = open();
        assert_eq!(ca.status().phase, Some(Phase::Distributing));
        assert!(ca.step(t0 + step).unwrap());
        assert_eq!(ca.status().phase, Some(Phase::Switching));
        let new = ca.sign(&csr(&key, &[]), &id).unwrap();
        assert!(
            issuer(&new).ends_with("weft mesh root weft.local #2"),
            "{}",
            issuer(&new)
        );
        // Certificates of both roots renew while both are trusted.
        assert!(ca.renew(&before.chain[0], &csr(&key, &[])).is_ok());
        assert!(ca.renew(&new.chain[0], &csr(&key, &[])).is_ok());
        assert!(!ca.step(t0 + 2 * step - 1).unwrap());
        assert!(ca.step(t0 + 2 * step).unwrap());
        let status = ca.status();
        assert_eq!(status.phase, None);
        assert_eq!(status.roots.len(), 1);
        assert!(status.roots[0].signing);
        assert!(status.roots[0].subject.ends_with("#2"));
        // The old root's certificates no longer renew; its key is gone.
        assert!(ca.renew(&before.chain[0], &csr(&key, &[])).is_err());
        assert!(ca.renew(&new.chain[0], &csr(&key, &[])).is_ok());
        assert!(!dir.path().join("ca/root-key.pem").exists());
        assert!(!ca.step(i64::MAX / 2).unwrap(), "nothing to do");
        // And it stays so after a restart; the next rotation makes root 3.
        drop(ca);
        let ca = open();
        assert_eq!(ca.roots().len(), 1);
        ca.rotate().unwrap();
        assert!(dir.path().join("ca/root-3.pem").exists());
    }

    #[test]
    fn a_lowered_lifetime_does_not_shorten_rotation_steps_while_longer_certificates_live() {
        let dir = tempfile::tempdir().unwrap();
        let open = |ttl| {
            MeshCa::load_or_create(dir.path(), "weft.local", None, Duration::from_secs(ttl))
                .unwrap()
        };
        assert_eq!(open(100).phase_length(), Duration::from_secs(120));
        // Restarted with shorter certificates: those of 100 s may live 100 s more.
        let ca = open(10);
        assert_eq!(ca.phase_length(), Duration::from_secs(120));
        // Again: the deadline is not pushed further.
        let until = ca.signer.load().state.issued_ttl_until;
        assert_eq!(open(10).signer.load().state.issued_ttl_until, until);
        // Raised: the new lifetime counts.
        assert_eq!(open(200).phase_length(), Duration::from_secs(240));
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
        let from_files = || {
            MeshCa::load_or_create(
                dir.path(),
                "weft.local",
                Some((&cert, &key)),
                Duration::from_secs(60),
            )
        };
        let ca = from_files().unwrap();
        assert_eq!(ca.roots(), vec![root.der().to_vec()]);
        let id = SpiffeId::parse("spiffe://weft.local/ns/default/sa/a").unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let signed = ca.sign(&csr(&leaf_key, &[]), &id).unwrap();
        assert_eq!(signed.chain.len(), 3, "leaf, intermediate, root");
        assert!(ca.renew(&signed.chain[0], &csr(&leaf_key, &[])).is_ok());
        // A key file that is not a key is an error naming it.
        std::fs::write(&key, "junk").unwrap();
        let err = from_files().unwrap_err();
        assert!(err.to_string().contains("mid-key.pem"), "{err}");
        // An intermediate from files is rotated by its own parent, not here.
        std::fs::write(&key, mid_key.serialize_pem()).unwrap();
        assert!(matches!(
            from_files().unwrap().rotate(),
            Err(CaError::Precondition(_))
        ));
    }
}
