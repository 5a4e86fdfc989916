//! `weft-grpc-origin`: the gRPC origin of the load benchmark, an h2c (prior knowledge) server
//! on one thread that answers every unary call with its own request message.
//!
//! ```text
//! weft-grpc-origin --listen 127.0.0.1:18079
//! ```
//!
//! A call is any POST whose `content-type` starts with `application/grpc`: the answer is
//! `200`, `content-type: application/grpc`, the request's body (one length-prefixed message,
//! echoed as it came) and the trailer `grpc-status: 0`. Anything else gets a
//! `grpc-status: 12` (unimplemented) with no message, so a proxy that mangles a call shows up
//! as a failed one in the load generator's count.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// h2c gRPC echo server for the load benchmark.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on (keep it on loopback).
    #[arg(long)]
    listen: SocketAddr,
}

type Frames = std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>;
type EchoBody = StreamBody<tokio_stream::Iter<Frames>>;

/// The answer to one request: the echoed message and its status trailer.
async fn echo(req: Request<Incoming>) -> Result<Response<EchoBody>, Infallible> {
    let is_call = req.method() == http::Method::POST
        && req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let message = if is_call {
        req.into_body().collect().await.ok().map(|b| b.to_bytes())
    } else {
        None
    };
    let mut trailers = HeaderMap::new();
    let status = if message.is_some() { "0" } else { "12" };
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    let mut frames = Vec::with_capacity(2);
    if let Some(m) = message.filter(|m| !m.is_empty()) {
        frames.push(Ok(Frame::data(m)));
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let body = StreamBody::new(tokio_stream::iter(frames));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

async fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(1000)
                .serve_connection(TokioIo::new(stream), service_fn(echo));
            let _ = conn.await; // a client that goes away is not the origin's concern
        });
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-grpc-origin: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args.listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-grpc-origin: {}: {e}", args.listen);
            ExitCode::FAILURE
        }
    }
}
