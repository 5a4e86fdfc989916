//! Reaching the Weft control service, written once for its two kinds of client: `weftctl`
//! and proxies following the service (`weft-proxy --control`).
//!
//! - [`control_url`]: `host:port`, `http://host:port` or `https://host:port`, checked and
//!   normalised;
//! - [`Bearer`]: the interceptor that adds `authorization: Bearer <token>` to every call;
//! - [`token`]: the token from a file or an environment variable;
//! - [`endpoint`] and [`connect`]: a channel with the timeouts both clients use, over TLS
//!   verified against a CA file for an `https://` URL (never in plaintext).
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let url = weft_client::control_url("127.0.0.1:7070")?;
//! let bearer = weft_client::Bearer::new(weft_client::token(None, "WEFT_TOKEN")?.as_deref())?;
//! let channel = weft_client::connect(weft_client::endpoint(&url, None)?, bearer).await?;
//! # drop(channel); Ok(()) }
//! ```

pub mod signing;

use std::path::Path;
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How long a connection attempt to the control service may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel to the control service that authenticates every call.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// The control service's URL from `host:port`, `http://host:port` or `https://host:port`.
pub fn control_url(address: &str) -> Result<String, String> {
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    match url.parse::<http::Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some() =>
        {
            Ok(url)
        }
        _ => Err(format!(
            "control service address `{address}`: expected host:port, http://host:port or \
             https://host:port"
        )),
    }
}

/// Several addresses, comma-separated (`https://a:7070,https://b:7070`), each checked as
/// [`control_url`] does: replicas of the control service, tried in turn.
pub fn control_urls(list: &str) -> Result<Vec<String>, String> {
    let urls = list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(control_url)
        .collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err(format!("control service address `{list}`: none given"));
    }
    Ok(urls)
}

/// The bearer token: the trimmed contents of `file` if given, else the environment variable
/// `env`; `None` when neither holds one.
pub fn token(file: Option<&Path>, env: &str) -> Result<Option<String>, String> {
    let token = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => std::env::var(env).ok(),
    };
    Ok(token.filter(|t| !t.is_empty()))
}

/// Adds `authorization: Bearer <token>` to every call when there is a token.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    /// The interceptor for `token` (none: calls go without `authorization`).
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        token
            .map(|t| {
                AsciiMetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| "the token holds characters a header cannot carry".to_owned())
            })
            .transpose()
            .map(Bearer)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The endpoint of `url` with the connect timeout, TCP_NODELAY and HTTP/2 keep-alives (a
/// dead service is noticed within seconds on a long-lived stream). An `https://` URL is
/// TLS verified against the roots in `ca_file` (the mesh's trust bundle), which it needs:
/// it is never reached in plaintext; a CA file with an `http://` URL is an error too, so
/// that nobody believes a plaintext channel is verified.
pub fn endpoint(url: &str, ca_file: Option<&Path>) -> Result<Endpoint, String> {
    endpoint_trusting(url, ca_file, None)
}

/// [`endpoint`], also trusting the roots in `bundle` when it is readable: a proxy's mesh
/// trust bundle, which the CA hands it with every certificate, so that a proxy follows a
/// CA rotation (the control service's certificate moves to the new root) without a new CA
/// file or a restart. Both files are read at each call: call it per connection attempt.
pub fn endpoint_trusting(
    url: &str,
    ca_file: Option<&Path>,
    bundle: Option<&Path>,
) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map(|e| {
            e.connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .map_err(|e| format!("invalid control service URL `{url}`: {e}"))?;
    match (url.starts_with("https://"), ca_file) {
        (true, Some(ca)) => {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(pem) = bundle.and_then(|b| std::fs::read(b).ok()) {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint
                .tls_config(tls)
                .map_err(|e| format!("{}: not a usable CA: {e}", ca.display()))
        }
        (true, None) => Err(format!(
            "`{url}` is https: give the CA its certificate chains to (the mesh's trust bundle: \
             `weftctl ca bundle`, or the control service's <data-dir>/ca/bundle.pem) with a CA \
             file option or WEFT_CONTROL_CA"
        )),
        (false, Some(_)) => Err(format!(
            "a CA file was given, but `{url}` is plaintext: use https://"
        )),
        (false, None) => Ok(endpoint),
    }
}

/// `e` and its causes, `: `-separated (a tonic transport error alone says only
/// "transport error").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Connects now; fails when the service cannot be reached.
pub async fn connect(
    endpoint: Endpoint,
    bearer: Bearer,
) -> Result<AuthChannel, tonic::transport::Error> {
    Ok(InterceptedService::new(endpoint.connect().await?, bearer))
}

/// A channel that connects on first use and reconnects after failures.
pub fn connect_lazy(endpoint: Endpoint, bearer: Bearer) -> AuthChannel {
    InterceptedService::new(endpoint.connect_lazy(), bearer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_a_scheme_and_bad_ones_are_refused() {
        assert_eq!(
            control_url("127.0.0.1:7070").as_deref(),
            Ok("http://127.0.0.1:7070")
        );
        assert_eq!(
            control_url("http://control:7070").as_deref(),
            Ok("http://control:7070")
        );
        assert_eq!(
            control_url("https://control:7070").as_deref(),
            Ok("https://control:7070")
        );
        assert!(endpoint("https://control:7070", None).is_err());
        assert!(endpoint("http://control:7070", Some(Path::new("/ca.pem"))).is_err());
        for bad in ["ftp://x:1", "http://", "a b:7070"] {
            assert!(control_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_bearer_goes_on_every_call_and_bad_tokens_are_refused() {
        use tonic::service::Interceptor as _;
        let mut bearer = Bearer::new(Some("s3cret")).unwrap();
        let req = bearer.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        let req = Bearer::default().call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
        assert!(Bearer::new(Some("line\nbreak")).is_err());
    }
}
