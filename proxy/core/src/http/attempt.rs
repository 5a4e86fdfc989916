//! The `attempts` phase: each attempt goes to the cluster through [`upstream::dispatch`], its
//! response (or the proxy's own answer when it failed) goes through the response-header
//! callbacks, and a filter may ask for another attempt (`weft.retry`), made only with a
//! request kept whole for replay ([`Replay`]).

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body::Frame;
use http_body_util::BodyExt as _;

use super::{Early, Exchange, X_WEFT_ATTEMPT, X_WEFT_OVERLOADED, headers};
use crate::body::{FilteredBody, Inbound, RequestBody};
use crate::config::UpstreamProtocol;
use crate::filter::{self, Attempt, AttemptError, Direction, ResponseDecision, RouteOverrides};
use crate::upstream::{self, DispatchError};

/// The request as the attempts send it.
pub enum Sendable {
    /// Kept whole: as many attempts as the filters allow.
    Replay(Box<Replay>),
    /// Streamed: one attempt.
    Once(RequestBody),
}

impl Exchange {
    /// Sends the request to its cluster, attempt after attempt while a response filter asks
    /// for another and the request can be replayed; returns the response that goes on to the
    /// client (the proxy's own answer to a failed attempt ends the exchange as
    /// [`Early::Proxy`]).
    pub(super) async fn attempts(
        &mut self,
        head: http::request::Parts,
        sendable: Sendable,
        route: &RouteOverrides,
    ) -> Result<(http::response::Parts, Inbound), Early> {
        let cluster = self.target()?.clone();
        let index = self.cluster.unwrap_or_default();
        let (max_attempts, replay, mut once) = match sendable {
            Sendable::Replay(r) => (route.max_attempts, Some(r), None),
            Sendable::Once(body) => (1, None, Some(body)),
        };
        let timeout = match route.timeout {
            Some(t) if t.is_zero() => None,
            Some(t) => Some(t),
            None => cluster.request_timeout,
        };
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let try_timeout = route.try_timeout.filter(|t| !t.is_zero());
        let mut head = Some(head);
        let mut tried: Vec<u64> = Vec::new();
        let mut number = 0u32;
        loop {
            number += 1;
            let (mut h, b) = match &replay {
                // The first attempt takes the original head; only retries need copies.
                Some(r) => (head.take().unwrap_or_else(|| r.head()), r.body()),
                None => (
                    head.take().expect("one attempt without replay"),
                    once.take().expect("one attempt without replay"),
                ),
            };
            if replay.is_some() {
                h.headers
                    .insert(X_WEFT_ATTEMPT.clone(), HeaderValue::from(number));
            }
            let limit = match (deadline, try_timeout) {
                (Some(d), Some(t)) => Some(d.min(tokio::time::Instant::now() + t)),
                (d, t) => d.or_else(|| t.map(|t| tokio::time::Instant::now() + t)),
            };
            let filters = self.filters.clone();
            let dispatched = upstream::dispatch(
                &cluster,
                Request::from_parts(h, b),
                &tried,
                limit,
                |endpoint| {
                    if let Some(f) = &filters {
                        filter::lock(f).set_upstream(index, endpoint.peer());
                    }
                },
            )
            .await;
            if let Some(ep) = &dispatched.endpoint {
                tried.push(ep.id);
                // A host name's address is known once a connection reached it.
                if ep.address.ip().is_none()
                    && let Some(f) = &filters
                {
                    filter::lock(f).set_upstream(index, ep.peer());
                }
            }
            let (mut rhead, rbody, error) = match dispatched.outcome {
                Ok((resp, in_flight)) => {
                    self.stream_mut().upstream = Some(in_flight);
                    let (mut rhead, rbody) = resp.into_parts();
                    if rhead.status != StatusCode::SWITCHING_PROTOCOLS {
                        headers::strip_hop_by_hop(&mut rhead.headers, false);
                    }
                    (rhead, Some(rbody), AttemptError::None)
                }
                Err(e) => {
                    // A body callback may have ended the stream while the body streamed
                    // upstream.
                    if let Some(reply) = filters.as_ref().and_then(|f| filter::lock(f).take_reply())
                    {
                        return Err(Early::Filter {
                            reply: Box::new(reply),
                            close: true,
                        });
                    }
                    (proxy_head(&e), None, e.attempt_error())
                }
            };
            let Some(filters) = filters else {
                return finish_attempts(rhead, rbody);
            };
            let time_left = deadline.is_none_or(|d| d > tokio::time::Instant::now());
            filter::lock(&filters).set_attempt(Attempt {
                number,
                status: rhead.status.as_u16(),
                error,
                retry_allowed: number < max_attempts && time_left,
            });
            let end_of_stream = rbody.as_ref().is_none_or(|b| b.is_end_stream());
            let mut decision =
                filter::lock(&filters).on_response_headers(&mut rhead, end_of_stream);
            let retry = loop {
                match decision {
                    ResponseDecision::Continue => break None,
                    ResponseDecision::Respond(reply) => {
                        // The upstream body is dropped unread, so its connection is not reused.
                        return Err(Early::Filter {
                            reply: Box::new(reply),
                            close: false,
                        });
                    }
                    ResponseDecision::Pause(callouts) => {
                        let outcomes = super::callout::run_all(&self.live.clusters, callouts).await;
                        decision = filter::lock(&filters).resume_response(
                            &mut rhead,
                            end_of_stream,
                            outcomes,
                        );
                    }
                    ResponseDecision::Retry(ask) => break Some(ask),
                    ResponseDecision::Hold => {
                        self.hold(&filters, false).await?;
                        decision = filter::lock(&filters).resume_response(
                            &mut rhead,
                            end_of_stream,
                            Vec::new(),
                        );
                    }
                }
            };
            let Some(ask) = retry else {
                return finish_attempts(rhead, rbody);
            };
            cluster.metrics.retries.inc();
            if let Some(up) = self.stream_mut().upstream.take() {
                up.finish(false);
            }
            if !ask.exclude_tried {
                tried.clear();
            }
            let wake = tokio::time::Instant::now() + ask.delay;
            tokio::time::sleep_until(deadline.map_or(wake, |d| wake.min(d))).await;
        }
    }
}

/// The last attempt's response, or the proxy's answer as the filters left it.
fn finish_attempts(
    rhead: http::response::Parts,
    rbody: Option<Inbound>,
) -> Result<(http::response::Parts, Inbound), Early> {
    match rbody {
        Some(body) => Ok((rhead, body)),
        None => Err(Early::Proxy(Box::new(rhead))),
    }
}

/// The body text of a proxy answer, carried in its head's extensions.
#[derive(Clone, Copy)]
pub(super) struct LocalText(pub &'static str);

/// The head of the proxy's answer to a failed attempt, for the response callbacks.
fn proxy_head(e: &DispatchError) -> http::response::Parts {
    let (status, text) = match e {
        DispatchError::Overflow(_) => (StatusCode::SERVICE_UNAVAILABLE, "upstream overflow\n"),
        DispatchError::NoHealthyUpstream => {
            (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n")
        }
        DispatchError::Connect(_) => (StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n"),
        DispatchError::Reset(_) => (StatusCode::BAD_GATEWAY, "upstream reset\n"),
        DispatchError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
    };
    let (mut head, ()) = Response::new(()).into_parts();
    head.status = status;
    head.headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let DispatchError::Overflow(limit) = e {
        head.headers.insert(
            X_WEFT_OVERLOADED.clone(),
            HeaderValue::from_static(limit.as_str()),
        );
    }
    head.extensions.insert(LocalText(text));
    head
}

/// Points the request at the upstream: origin-form with a `host` header for HTTP/1.1,
/// absolute form (`:authority`) for HTTP/2.
pub fn set_upstream_target(
    head: &mut http::request::Parts,
    protocol: UpstreamProtocol,
) -> Result<(), (StatusCode, &'static str)> {
    let path = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    match protocol {
        UpstreamProtocol::Http1 => {
            head.version = Version::HTTP_11;
            let from_uri = head
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
            if head.uri.authority().is_some() {
                head.uri =
                    Uri::try_from(path).map_err(|_| (StatusCode::BAD_REQUEST, "bad path\n"))?;
            }
            // A `host` header names the target (over the URI's authority); one lookup, and
            // the common case (one `host`) changes nothing.
            match head.headers.entry(header::HOST) {
                header::Entry::Occupied(mut e) => {
                    if e.iter().nth(1).is_some() {
                        // Only the first goes on.
                        let first = e.get().clone();
                        e.insert(first);
                    }
                }
                header::Entry::Vacant(e) => {
                    e.insert(from_uri.ok_or((StatusCode::BAD_REQUEST, "missing host\n"))?);
                }
            }
        }
        UpstreamProtocol::Http2 => {
            head.version = Version::HTTP_2;
            let authority = head.headers.get(header::HOST).cloned().or_else(|| {
                head.uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            });
            let Some(a) = authority else {
                return Err((StatusCode::BAD_REQUEST, "missing host\n"));
            };
            let uri = Uri::builder()
                .scheme("http")
                .authority(a.as_bytes())
                .path_and_query(path)
                .build()
                .map_err(|_| (StatusCode::BAD_REQUEST, "bad authority\n"))?;
            head.uri = uri;
            head.headers.remove(header::HOST);
        }
    }
    Ok(())
}

/// A request kept whole so that it can be sent again.
pub struct Replay {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Replay {
    /// Reads `body` to its end if it fits in `limit` bytes: `Ok(Ok(replay))`, or
    /// `Ok(Err(body))` with a body that yields what was read and then the rest.
    pub async fn buffer(
        head: &http::request::Parts,
        mut body: RequestBody,
        limit: usize,
    ) -> Result<Result<Replay, RequestBody>, crate::body::BoxError> {
        let mut data = bytes::BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            match frame?.into_data() {
                Ok(d) => {
                    data.extend_from_slice(&d);
                    if data.len() > limit {
                        return Ok(Err(RequestBody::Prefixed {
                            first: Some(Frame::data(data.freeze())),
                            rest: Box::new(body),
                        }));
                    }
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
        Ok(Ok(Replay {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            headers: head.headers.clone(),
            body: data.freeze(),
            trailers,
        }))
    }

    /// A copy of the head for one more attempt.
    fn head(&self) -> http::request::Parts {
        let (mut head, ()) = Request::new(()).into_parts();
        head.method = self.method.clone();
        head.uri = self.uri.clone();
        head.version = self.version;
        head.headers = self.headers.clone();
        head
    }

    /// The body for an attempt (shared bytes, not copied).
    fn body(&self) -> RequestBody {
        let body =
            FilteredBody::whole(self.body.clone(), self.trailers.clone(), Direction::Request);
        RequestBody::Filtered { body }
    }
}
