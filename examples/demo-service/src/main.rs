//! `demo-service`: a tiny HTTP/1.1 + h2c service for the mesh demo. It answers every request
//! with a JSON line naming itself and echoing the mesh headers the sidecars added.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// Demo service.
#[derive(Parser, Debug)]
struct Args {
    /// Name reported in every answer.
    #[arg(long)]
    name: String,
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
}

async fn answer(name: &str, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let body = serde_json::json!({
        "service": name,
        "path": req.uri().path(),
        "x-request-id": header("x-request-id"),
        "x-forwarded-for": header("x-forwarded-for"),
        "traceparent": header("traceparent"),
    });
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("static"));
    Ok(resp)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let name: &'static str = Box::leak(args.name.into_boxed_str());
    eprintln!("{name} listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(name, req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
