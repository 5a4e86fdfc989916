//! The `Identity` gRPC service: join tokens (stored hashed, single-use, expiring), CSRs
//! signed by the mesh CA for a token's identity or a current certificate's, the trust
//! bundle.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};
use weft_config::SpiffeId;
use weft_proto::v1;

use crate::ca::{CaError, MeshCa};
use crate::store::{Store, TokenRecord};

/// How long a join token may be redeemed unless said otherwise.
const TOKEN_TTL: Duration = Duration::from_secs(86_400);

/// The `Identity` service over the CA and the store.
#[derive(Clone)]
pub struct IdentityService {
    ca: Arc<MeshCa>,
    store: Arc<dyn Store>,
}

impl IdentityService {
    /// The service of `ca`, keeping tokens in `store`.
    pub fn new(ca: Arc<MeshCa>, store: Arc<dyn Store>) -> Self {
        Self { ca, store }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl From<CaError> for Status {
    fn from(e: CaError) -> Status {
        match e {
            CaError::Refused(m) => Status::permission_denied(m),
            CaError::File { .. } => Status::internal(e.to_string()),
            CaError::Precondition(m) => Status::failed_precondition(m),
        }
    }
}

fn signed(ca: &MeshCa, s: crate::ca::Signed) -> v1::SignResponse {
    v1::SignResponse {
        cert_chain_der: s.chain,
        trust_bundle_der: ca.roots(),
        spiffe_id: s.spiffe_id.to_string(),
        not_after_unix: s.not_after,
    }
}

fn status_msg(s: crate::ca::CaStatus) -> v1::CaStatus {
    v1::CaStatus {
        trust_domain: s.trust_domain,
        roots: s
            .roots
            .into_iter()
            .map(|r| v1::CaRoot {
                der: r.der,
                subject: r.subject,
                fingerprint: r.fingerprint,
                signing: r.signing,
                not_after_unix: r.not_after,
            })
            .collect(),
        phase: s.phase.map(|p| p.name().to_owned()).unwrap_or_default(),
        next_step_unix: s.next_step_unix,
        step_seconds: s.phase_length.as_secs(),
    }
}

/// Takes the steps of a CA rotation as they fall due, for ever (checking every second).
pub async fn drive_rotation(ca: Arc<MeshCa>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let step = {
            let ca = ca.clone();
            tokio::task::spawn_blocking(move || ca.step(crate::ca::unix_now())).await
        };
        match step {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("CA rotation step (tried again in a second): {e}"),
            Err(e) => tracing::error!("CA rotation step: {e}"),
        }
    }
}

#[tonic::async_trait]
impl v1::identity_server::Identity for IdentityService {
    async fn create_token(
        &self,
        request: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let r = request.into_inner();
        let id = SpiffeId::workload(self.ca.trust_domain(), &r.namespace, &r.service_account)
            .map_err(|e| Status::invalid_argument(format!("namespace and service account: {e}")))?;
        let ttl = match r.ttl_seconds {
            0 => TOKEN_TTL,
            s => Duration::from_secs(s.min(365 * 86_400)),
        };
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| Status::internal(e.to_string()))?;
        let token = hex::encode(secret);
        let expires_ms = now_ms() + ttl.as_millis() as u64;
        let record = TokenRecord {
            spiffe_id: id.to_string(),
            expires_ms,
            used_ms: None,
            reusable: r.reusable,
        };
        let store = self.store.clone();
        let hash = token_hash(&token);
        tokio::task::spawn_blocking(move || store.put_token(&hash, &record))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(%id, reusable = r.reusable, "join token minted");
        Ok(Response::new(v1::CreateTokenResponse {
            token,
            spiffe_id: id.to_string(),
            expires_unix: (expires_ms / 1000) as i64,
        }))
    }

    async fn sign(
        &self,
        request: Request<v1::SignRequest>,
    ) -> Result<Response<v1::SignResponse>, Status> {
        let r = request.into_inner();
        let ca = self.ca.clone();
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            match r.credential {
                Some(v1::sign_request::Credential::JoinToken(token)) => {
                    // Garbage does not spend a token; a CSR for another identity does.
                    ca.check_csr(&r.csr_der)?;
                    let now = now_ms();
                    let record = store
                        .redeem_token(&token_hash(token.trim()), now)
                        .map_err(|e| Status::internal(e.to_string()))?
                        .ok_or_else(|| Status::unauthenticated("unknown join token"))?;
                    if record.used_ms.is_some() && !record.reusable {
                        tracing::warn!(id = %record.spiffe_id, "a join token was presented again");
                        return Err(Status::unauthenticated("this join token was already used"));
                    }
                    if now >= record.expires_ms {
                        return Err(Status::unauthenticated("this join token has expired"));
                    }
                    let id = SpiffeId::parse(&record.spiffe_id).map_err(Status::internal)?;
                    let s = ca.sign(&r.csr_der, &id)?;
                    tracing::info!(%id, "certificate signed for a join token");
                    Ok(signed(&ca, s))
                }
                Some(v1::sign_request::Credential::CurrentCertDer(current)) => {
                    let s = ca.renew(&current, &r.csr_der)?;
                    tracing::debug!(id = %s.spiffe_id, "certificate renewed");
                    Ok(signed(&ca, s))
                }
                None => Err(Status::unauthenticated(
                    "a join token or the current certificate is needed",
                )),
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        result.map(Response::new)
    }

    async fn rotate_ca(
        &self,
        _request: Request<v1::RotateCaRequest>,
    ) -> Result<Response<v1::CaStatus>, Status> {
        let ca = self.ca.clone();
        let status = tokio::task::spawn_blocking(move || ca.rotate())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(status_msg(status)))
    }

    async fn get_ca_status(
        &self,
        _request: Request<v1::CaStatusRequest>,
    ) -> Result<Response<v1::CaStatus>, Status> {
        Ok(Response::new(status_msg(self.ca.status())))
    }

    async fn trust_bundle(
        &self,
        _request: Request<v1::TrustBundleRequest>,
    ) -> Result<Response<v1::TrustBundleResponse>, Status> {
        Ok(Response::new(v1::TrustBundleResponse {
            roots_der: self.ca.roots(),
            trust_domain: self.ca.trust_domain().to_owned(),
        }))
    }
}
