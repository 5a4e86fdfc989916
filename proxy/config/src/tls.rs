//! TLS settings: the proxy's mesh identity, TLS on listeners (mesh mTLS, strict or
//! permissive, and ordinary TLS at the edge) and on clusters (mesh mTLS, or TLS to an
//! external service). `docs/security.md` explains the model.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The proxy's workload identity: from the control service, the mesh CA (`token_file`), or
/// from files (a SPIFFE SVID as SPIRE's helper or cert-manager writes them: `cert_file`,
/// `key_file`, `trust_bundle_file`). Files are read again when they change, and a
/// certificate from the CA is renewed before it expires, so new handshakes use a new
/// certificate without a restart.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM certificate chain, leaf first; the leaf's only URI SAN is the proxy's SPIFFE ID
    /// (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the leaf (PKCS#8, SEC1 or PKCS#1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// PEM roots the mesh trusts (the trust bundle); peers must chain to one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle_file: Option<PathBuf>,
    /// A file holding a join token (`weftctl identity token`): the proxy generates its key,
    /// and the control service it follows (`--control`) signs its certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// Where an identity comes from.
#[derive(Clone, Copy, Debug)]
pub enum IdentitySource<'a> {
    /// Certificate, key and bundle files.
    Files {
        /// The certificate chain.
        cert: &'a Path,
        /// The key.
        key: &'a Path,
        /// The trust bundle.
        bundle: &'a Path,
    },
    /// The control service, with a join token from this file.
    Control {
        /// The token file.
        token_file: &'a Path,
    },
}

impl IdentityConfig {
    /// Where the identity comes from; `Err((field, why))` unless exactly one source is
    /// given whole.
    pub fn source(&self) -> Result<IdentitySource<'_>, (String, String)> {
        match (
            &self.cert_file,
            &self.key_file,
            &self.trust_bundle_file,
            &self.token_file,
        ) {
            (Some(cert), Some(key), Some(bundle), None) => {
                Ok(IdentitySource::Files { cert, key, bundle })
            }
            (None, None, None, Some(token_file)) => Ok(IdentitySource::Control { token_file }),
            (_, _, _, Some(_)) => Err((
                "token_file".into(),
                "an identity comes from the control service (token_file) or from files \
                 (cert_file, key_file, trust_bundle_file), not both"
                    .into(),
            )),
            _ => Err((
                "cert_file".into(),
                "give cert_file, key_file and trust_bundle_file together, or token_file".into(),
            )),
        }
    }
}

/// TLS on a listener.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// What the listener accepts.
    pub mode: ListenerTlsMode,
    /// `simple` and `mutual`: the certificates served, chosen by the client's SNI (the
    /// first one when no name matches or the client sends none).
    #[serde(default)]
    pub certificates: Vec<CertificateFiles>,
    /// `mutual`: PEM roots that client certificates must chain to.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl ListenerTls {
    /// `Err((field, why))` when the settings do not fit the mode; `identity`: the proxy has
    /// a mesh identity.
    pub fn validate(&self, identity: bool) -> Result<(), (String, String)> {
        match self.mode {
            ListenerTlsMode::Strict | ListenerTlsMode::Permissive => {
                if !identity {
                    return Err(("mode".into(), MESH_NEEDS_IDENTITY.into()));
                }
                if !self.certificates.is_empty() || self.client_ca_file.is_some() {
                    return Err((
                        "certificates".into(),
                        "mesh modes serve the proxy's identity; certificates and client_ca_file \
                         are for `simple` and `mutual`"
                            .into(),
                    ));
                }
            }
            ListenerTlsMode::Simple | ListenerTlsMode::Mutual => {
                if self.certificates.is_empty() {
                    return Err(("certificates".into(), "at least one is needed".into()));
                }
                match (self.mode, &self.client_ca_file) {
                    (ListenerTlsMode::Mutual, None) => {
                        return Err(("client_ca_file".into(), "`mutual` needs it".into()));
                    }
                    (ListenerTlsMode::Simple, Some(_)) => {
                        return Err((
                            "client_ca_file".into(),
                            "only `mutual` checks client certificates".into(),
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

const MESH_NEEDS_IDENTITY: &str = "mesh mTLS needs the proxy's identity (the `identity` section)";

/// What a listener with TLS accepts.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListenerTlsMode {
    /// Mesh mTLS only: clients present a certificate of the trust domain (Istio's
    /// `PeerAuthentication` STRICT). Needs `identity`.
    Strict,
    /// Mesh mTLS or plaintext on one port, told apart by the first bytes (PERMISSIVE), so a
    /// mesh can move to mTLS service by service. Needs `identity`.
    Permissive,
    /// Ordinary TLS with `certificates` (an edge listener).
    Simple,
    /// Ordinary TLS that also requires a client certificate chaining to `client_ca_file`.
    Mutual,
}

/// A certificate and its key, served for some server names.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// SNI names this certificate is served for (`*.example.com` matches one label); empty:
    /// the names in the certificate.
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// TLS towards a cluster's endpoints.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// How the proxy speaks TLS to the endpoints.
    pub mode: ClusterTlsMode,
    /// `mesh`: SPIFFE IDs an endpoint may prove (an endpoint's own `identity` wins); empty:
    /// any identity of the trust domain.
    #[serde(default)]
    pub identities: Vec<String>,
    /// `simple` and `mutual`: the name sent as SNI and checked in the server's certificate;
    /// defaults to the endpoint's host name (an IP endpoint is checked against its IP).
    #[serde(default)]
    pub server_name: Option<String>,
    /// `simple` and `mutual`: PEM roots the server must chain to; without it, the system's
    /// roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `mutual`: the client certificate presented.
    #[serde(default)]
    pub client_certificate: Option<CertificateFiles>,
}

impl ClusterTls {
    /// `Err((field, why))` when the settings do not fit the mode; `identity`: the proxy has
    /// a mesh identity.
    pub fn validate(&self, identity: bool) -> Result<(), (String, String)> {
        for (i, id) in self.identities.iter().enumerate() {
            SpiffeId::parse(id).map_err(|m| (format!("identities[{i}]"), m))?;
        }
        match self.mode {
            ClusterTlsMode::Mesh => {
                if !identity {
                    return Err(("mode".into(), MESH_NEEDS_IDENTITY.into()));
                }
                if self.server_name.is_some()
                    || self.ca_file.is_some()
                    || self.client_certificate.is_some()
                {
                    return Err((
                        "mode".into(),
                        "`mesh` uses the proxy's identity and trust bundle; server_name, ca_file \
                         and client_certificate are for `simple` and `mutual`"
                            .into(),
                    ));
                }
            }
            ClusterTlsMode::Simple | ClusterTlsMode::Mutual => {
                if !self.identities.is_empty() {
                    return Err(("identities".into(), "only `mesh` checks SPIFFE IDs".into()));
                }
                match (self.mode, &self.client_certificate) {
                    (ClusterTlsMode::Mutual, None) => {
                        return Err(("client_certificate".into(), "`mutual` needs it".into()));
                    }
                    (ClusterTlsMode::Simple, Some(_)) => {
                        return Err((
                            "client_certificate".into(),
                            "only `mutual` presents one".into(),
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// How a cluster's connections are secured.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClusterTlsMode {
    /// Mesh mTLS with the proxy's identity, the server's SPIFFE ID verified (Istio's
    /// `ISTIO_MUTUAL`). Needs `identity`.
    Mesh,
    /// Ordinary TLS to an external service.
    Simple,
    /// Ordinary TLS with a client certificate.
    Mutual,
}

/// A SPIFFE ID: `spiffe://<trust-domain>/<path>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// The trust domain (lowercase letters, digits, `.`, `-`, `_`).
    pub trust_domain: String,
    /// The path, with its leading `/` (may be empty).
    pub path: String,
}

impl SpiffeId {
    /// Parses `spiffe://<trust-domain>/<path>` as the SPIFFE ID standard defines it: no
    /// port, user info, query or fragment; path segments not empty, `.` or `..`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("`{s}` is not a SPIFFE ID (spiffe://<trust-domain>/...)"))?;
        let (domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if domain.is_empty()
            || !domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(format!("`{s}`: bad trust domain `{domain}`"));
        }
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty()
                    || seg == "."
                    || seg == ".."
                    || !seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err(format!("`{s}`: bad path segment `{seg}`"));
                }
            }
        }
        Ok(Self {
            trust_domain: domain.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The Istio-style workload ID `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, String> {
        Self::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The namespace of an Istio-style ID (`/ns/<namespace>/...`).
    pub fn namespace(&self) -> Option<&str> {
        let mut segs = self.path.trim_start_matches('/').split('/');
        (segs.next()? == "ns").then(|| segs.next()).flatten()
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_as_the_standard_says() {
        let id = SpiffeId::parse("spiffe://weft.local/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain, "weft.local");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.to_string(), "spiffe://weft.local/ns/default/sa/web");
        for bad in [
            "https://weft.local/ns/a",
            "spiffe://",
            "spiffe://Weft.local/x",
            "spiffe://weft.local:8443/x",
            "spiffe://user@weft.local/x",
            "spiffe://weft.local/a//b",
            "spiffe://weft.local/a/../b",
            "spiffe://weft.local/a?b",
            "spiffe://weft.local/",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
