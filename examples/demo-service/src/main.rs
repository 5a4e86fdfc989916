//! `demo-service`: a tiny HTTP/1.1 + h2c service for the mesh demo. It answers every request
//! with a JSON line naming itself and echoing the mesh headers the sidecars added; with
//! `--upstream`, it first calls that service (the same path, the request id, trace context and
//! demo fault headers passed on) and puts its answer in its own, as a service calling another
//! would.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// Demo service.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Name reported in every answer.
    #[arg(long)]
    name: String,
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// A service to call for every request (`http://service2:8080`): its answer is part of
    /// this one, and its failure is this one's 502.
    #[arg(long)]
    upstream: Option<String>,
}

/// Headers passed on to the upstream.
const PASSED_ON: [&str; 4] = [
    "x-request-id",
    "traceparent",
    "x-weft-fault-abort",
    "x-weft-fault-delay-ms",
];

type Http = Client<HttpConnector, Empty<Bytes>>;

async fn answer(
    name: &str,
    upstream: Option<(&str, &Http)>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let mut body = serde_json::json!({
        "service": name,
        "path": req.uri().path(),
        "x-request-id": header("x-request-id"),
        "x-forwarded-for": header("x-forwarded-for"),
        "x-forwarded-proto": header("x-forwarded-proto"),
        "traceparent": header("traceparent"),
    });
    let mut status = StatusCode::OK;
    if let Some((base, client)) = upstream {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut call = Request::get(format!("{base}{path}"));
        for h in PASSED_ON {
            if let Some(v) = req.headers().get(h) {
                call = call.header(h, v);
            }
        }
        let call = call.body(Empty::new()).expect("request");
        let got = tokio::time::timeout(Duration::from_secs(10), client.request(call)).await;
        body["upstream"] = match got {
            Ok(Ok(resp)) => {
                let code = resp.status();
                let bytes = resp.into_body().collect().await.map(|b| b.to_bytes());
                let text = bytes.map_or_else(
                    |e| e.to_string(),
                    |b| String::from_utf8_lossy(&b).into_owned(),
                );
                if !code.is_success() {
                    status = code;
                }
                serde_json::from_str(&text).unwrap_or_else(
                    |_| serde_json::json!({ "status": code.as_u16(), "body": text.trim() }),
                )
            }
            Ok(Err(e)) => {
                status = StatusCode::BAD_GATEWAY;
                serde_json::json!({ "error": e.to_string() })
            }
            Err(_) => {
                status = StatusCode::GATEWAY_TIMEOUT;
                serde_json::json!({ "error": "no answer within 10 s" })
            }
        };
    }
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("static"));
    Ok(resp)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let name: &'static str = Box::leak(args.name.into_boxed_str());
    let upstream: Option<&'static str> = args
        .upstream
        .map(|u| &*Box::leak(u.trim_end_matches('/').to_owned().into_boxed_str()));
    let client: &'static Http =
        Box::leak(Box::new(Client::builder(TokioExecutor::new()).build_http()));
    eprintln!("{name} listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(name, upstream.map(|u| (u, client)), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
