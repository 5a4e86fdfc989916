//! Upgraded connections (WebSocket and other `101 Switching Protocols`): once both sides have
//! upgraded, bytes are relayed both ways until either side ends.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// Relays bytes both ways once both sides of an upgrade completed.
pub async fn tunnel(down: OnUpgrade, up: OnUpgrade) {
    match tokio::join!(down, up) {
        (Ok(down), Ok(up)) => {
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                tracing::debug!("upgraded connection ended: {e}");
            }
        }
        (d, u) => tracing::debug!(
            downstream_ok = d.is_ok(),
            upstream_ok = u.is_ok(),
            "upgrade failed"
        ),
    }
}
