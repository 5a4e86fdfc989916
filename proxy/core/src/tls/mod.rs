//! TLS on both sides of the proxy, with rustls and one crypto provider (*ring*), chosen
//! here once: the proxy's mesh identity ([`identity`]: a SPIFFE certificate, its key and the
//! trust bundle, replaced while traffic flows), SPIFFE peer checks ([`verify`]), listeners
//! that terminate TLS ([`server`]: mesh mTLS strict or permissive, edge TLS with SNI) and
//! clusters that originate it ([`client`]: mesh mTLS, or TLS to an external service).
//! `docs/security.md` explains the model.

pub mod client;
pub mod enroll;
mod files;
pub mod identity;
pub mod server;
mod stream;
mod verify;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub use client::ClientTls;
pub use files::TlsError;
pub use identity::{IdentityStore, MeshIdentity};
pub use server::{PeerTls, ServerTls};
pub use stream::Stream;

/// The crypto provider every TLS config of the process uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// ALPN protocol ids.
pub(crate) const ALPN_H2: &[u8] = b"h2";
pub(crate) const ALPN_HTTP11: &[u8] = b"http/1.1";
/// Offered by a proxy relaying opaque TCP over mesh TLS, so that the receiving sidecar relays
/// the bytes instead of reading HTTP (Istio's `istio` ALPN value).
pub(crate) const ALPN_WEFT_TCP: &[u8] = b"weft-tcp";
/// Offered (never chosen) by every mesh TLS client, so that a capture listener tells a
/// sidecar's handshake, which it terminates, from an app's own TLS, which it passes through.
pub(crate) const ALPN_WEFT_MESH: &[u8] = b"weft-mesh";

/// Whether a ClientHello offering `alpn` comes from a mesh sidecar.
pub fn is_mesh_hello(alpn: &[Vec<u8>]) -> bool {
    alpn.iter()
        .any(|p| p == ALPN_WEFT_MESH || p == ALPN_WEFT_TCP)
}
