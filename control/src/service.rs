//! The gRPC edge: each `weft.control.v1` service implemented over [`ControlState`], with the
//! protobuf types converted to and from the service's own ([`crate::model`]) here and
//! nowhere else, and the bearer-token check.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_proto::v1;

use crate::model::{
    self, ChainSpec, ClusterSpec, FilterConfigSpec, FilterSpec, Kind, Labels, Spec,
};
use crate::rollout;
use crate::snapshot::Snapshot;
use crate::state::{Change, ControlError, ControlState, MAX_MODULE_BYTES};

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Status {
        match e {
            ControlError::Invalid(m) => Status::invalid_argument(m),
            ControlError::NotFound(m) => Status::not_found(format!("{m} not found")),
            ControlError::Conflict(m) => Status::failed_precondition(m),
            ControlError::Denied(m) => Status::permission_denied(m),
            ControlError::Store(e) => Status::internal(e.to_string()),
        }
    }
}

fn module_msg(m: model::ModuleRecord) -> v1::Module {
    v1::Module {
        digest: m.digest,
        name: m.name,
        size: m.size,
        abi_version: m.abi_version,
        created_ms: m.created_ms,
        signature: m.signature,
        verified_by: m.verified_by,
        current: false,
        chains: Vec::new(),
    }
}

/// The chains that run each module digest.
fn chains_by_module(state: &ControlState) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut runs: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for r in state.resources(Some(Kind::Chain)).0 {
        if let model::Spec::Chain(c) = &r.spec {
            for f in &c.filters {
                let chains = runs.entry(f.module.clone()).or_default();
                if !chains.contains(&r.name) {
                    chains.push(r.name.clone());
                }
            }
        }
    }
    runs
}

/// A module with whether its name points to it and the chains that run it (taken from
/// `runs`).
fn annotated(
    state: &ControlState,
    m: model::ModuleRecord,
    runs: &mut std::collections::BTreeMap<String, Vec<String>>,
) -> v1::Module {
    let current = state.resolve_module(&m.name).ok() == Some(m.digest.clone());
    let chains = runs.remove(&m.digest).unwrap_or_default();
    v1::Module {
        current,
        chains,
        ..module_msg(m)
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> Labels {
    map.into_iter().collect()
}

fn hash_map(labels: &Labels) -> std::collections::HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A protobuf resource as the service's own, modules not yet resolved (the first check an
/// `Apply` makes; public for the fuzz target).
pub fn resource_from(r: v1::Resource) -> Result<model::Resource, ControlError> {
    let kind = Kind::parse(&r.kind).ok_or_else(|| {
        ControlError::Invalid(format!(
            "resource `{}`: unknown kind `{}` (Chain, FilterConfig or Cluster)",
            r.name, r.kind
        ))
    })?;
    let spec = match r.spec {
        Some(v1::resource::Spec::Chain(c)) => Spec::Chain(ChainSpec {
            listener: c.listener,
            default_cluster: c.default_cluster,
            filters: c
                .filters
                .into_iter()
                .map(|f| {
                    let config = if f.config_json.trim().is_empty() {
                        serde_json::Value::Null
                    } else {
                        serde_json::from_str(&f.config_json).map_err(|e| {
                            ControlError::Invalid(format!(
                                "chain `{}`: filter `{}`: config is not JSON: {e}",
                                r.name, f.name
                            ))
                        })?
                    };
                    let failure_policy = f.failure_policy.parse().map_err(|e| {
                        ControlError::Invalid(format!(
                            "chain `{}`: filter `{}`: {e}",
                            r.name, f.name
                        ))
                    })?;
                    Ok(FilterSpec {
                        name: f.name,
                        module: f.module,
                        root_id: f.root_id,
                        vm_id: f.vm_id,
                        config,
                        config_ref: f.config_ref,
                        failure_policy,
                    })
                })
                .collect::<Result<_, ControlError>>()?,
        }),
        Some(v1::resource::Spec::Cluster(c)) => Spec::Cluster(ClusterSpec {
            endpoints: c
                .endpoints
                .into_iter()
                .map(|e| model::Endpoint {
                    address: e.address,
                    weight: e.weight,
                    identity: e.identity,
                })
                .collect(),
            service: c.service,
            dns: c.dns,
            settings: if c.settings_json.trim().is_empty() {
                None
            } else {
                Some(serde_json::from_str(&c.settings_json).map_err(|e| {
                    ControlError::Invalid(format!("cluster settings are not JSON: {e}"))
                })?)
            },
        }),
        Some(v1::resource::Spec::FilterConfig(c)) => Spec::FilterConfig(FilterConfigSpec {
            config: if c.config_json.trim().is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(&c.config_json).map_err(|e| {
                    ControlError::Invalid(format!(
                        "filterconfig `{}`: config is not JSON: {e}",
                        r.name
                    ))
                })?
            },
        }),
        Some(v1::resource::Spec::Listener(l)) => Spec::Listener(model::ListenerSpec {
            settings: serde_json::from_str(&l.settings_json).map_err(|e| {
                ControlError::Invalid(format!("listener `{}`: settings are not JSON: {e}", r.name))
            })?,
        }),
        Some(v1::resource::Spec::Scope(s)) => Spec::Scope(model::ScopeSpec {
            services: s.services,
        }),
        Some(v1::resource::Spec::HttpRoute(g) | v1::resource::Spec::GrpcRoute(g)) => {
            Spec::Route(model::RouteSpec {
                namespace: if g.namespace.is_empty() {
                    "default".into()
                } else {
                    g.namespace
                },
                spec: serde_json::from_str(&g.spec_json).map_err(|e| {
                    ControlError::Invalid(format!("{} `{}`: spec is not JSON: {e}", r.kind, r.name))
                })?,
            })
        }
        None => {
            return Err(ControlError::Invalid(format!(
                "{} `{}`: no spec",
                kind.as_str().to_lowercase(),
                r.name
            )));
        }
    };
    Ok(model::Resource {
        kind,
        name: r.name,
        selector: labels(r.selector),
        version: 0,
        spec,
    })
}

fn config_json(v: &serde_json::Value) -> String {
    if v.is_null() {
        String::new()
    } else {
        v.to_string()
    }
}

fn endpoint_msg(e: &model::Endpoint) -> v1::Endpoint {
    v1::Endpoint {
        address: e.address.clone(),
        weight: e.weight,
        identity: e.identity.clone(),
    }
}

fn resource_msg(r: model::Resource) -> v1::Resource {
    let spec = match r.spec {
        Spec::Chain(c) => v1::resource::Spec::Chain(v1::ChainSpec {
            listener: c.listener,
            default_cluster: c.default_cluster,
            filters: c
                .filters
                .iter()
                .map(|f| v1::FilterRef {
                    name: f.name.clone(),
                    module: f.module.clone(),
                    root_id: f.root_id.clone(),
                    vm_id: f.vm_id.clone(),
                    config_json: config_json(&f.config),
                    failure_policy: f.failure_policy.as_str().to_owned(),
                    config_ref: f.config_ref.clone(),
                })
                .collect(),
        }),
        Spec::Cluster(c) => v1::resource::Spec::Cluster(v1::ClusterSpec {
            endpoints: c.endpoints.iter().map(endpoint_msg).collect(),
            service: c.service,
            dns: c.dns,
            settings_json: c.settings.as_ref().map(config_json).unwrap_or_default(),
        }),
        Spec::FilterConfig(c) => v1::resource::Spec::FilterConfig(v1::FilterConfigSpec {
            config_json: config_json(&c.config),
        }),
        Spec::Listener(l) => v1::resource::Spec::Listener(v1::ListenerSpec {
            settings_json: config_json(&l.settings),
        }),
        Spec::Scope(s) => v1::resource::Spec::Scope(v1::ScopeSpec {
            services: s.services,
        }),
        Spec::Route(route) => {
            let spec = v1::GatewayRouteSpec {
                namespace: route.namespace,
                spec_json: route.spec.to_string(),
            };
            if r.kind == Kind::GrpcRoute {
                v1::resource::Spec::GrpcRoute(spec)
            } else {
                v1::resource::Spec::HttpRoute(spec)
            }
        }
    };
    v1::Resource {
        kind: r.kind.as_str().into(),
        name: r.name,
        selector: hash_map(&r.selector),
        version: r.version,
        spec: Some(spec),
        conditions: Vec::new(),
    }
}

fn change_msg(c: Change) -> v1::ResourceChange {
    v1::ResourceChange {
        kind: c.kind.as_str().into(),
        name: c.name,
        action: c.action.into(),
        diff: c.diff,
    }
}

fn instance_msg(i: model::Instance) -> v1::Instance {
    v1::Instance {
        labels: hash_map(&i.labels),
        id: i.id,
        service: i.service,
        address: i.address,
        ttl_seconds: i.ttl_seconds,
        weight: i.weight,
        last_seen_ms: i.last_seen_ms,
        identity: i.identity,
    }
}

fn snapshot_msg(s: &Snapshot) -> v1::Snapshot {
    v1::Snapshot {
        listeners: s
            .listeners
            .iter()
            .map(|l| v1::SnapshotListener {
                name: l.name.clone(),
                settings_json: config_json(&l.settings),
            })
            .collect(),
        version: s.version,
        hash: s.hash.clone(),
        chains: s
            .chains
            .iter()
            .map(|c| v1::SnapshotChain {
                name: c.name.clone(),
                listener: c.listener.clone(),
                default_cluster: c.default_cluster.clone(),
                filters: c
                    .filters
                    .iter()
                    .map(|f| v1::SnapshotFilter {
                        name: f.name.clone(),
                        digest: f.module.clone(),
                        root_id: f.root_id.clone(),
                        vm_id: f.vm_id.clone(),
                        config_json: config_json(&f.config),
                        failure_policy: f.failure_policy.as_str().to_owned(),
                    })
                    .collect(),
            })
            .collect(),
        clusters: s
            .clusters
            .iter()
            .map(|c| v1::SnapshotCluster {
                name: c.name.clone(),
                endpoints: c.endpoints.iter().map(endpoint_msg).collect(),
                settings_json: c.settings.as_ref().map(config_json).unwrap_or_default(),
                implicit: c.implicit,
            })
            .collect(),
    }
}

/// Implements every service over one shared state.
#[derive(Clone)]
pub struct ControlService {
    state: Arc<ControlState>,
}

impl ControlService {
    /// Runs a state change (locks, store commits, diffs) off the async threads, which keep
    /// serving discovery streams meanwhile.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ControlState) -> Result<T, ControlError> + Send + 'static,
    ) -> Result<T, Status> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::from)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl v1::modules_server::Modules for ControlService {
    async fn push(
        &self,
        request: Request<Streaming<v1::PushChunk>>,
    ) -> Result<Response<v1::Module>, Status> {
        let mut chunks = request.into_inner();
        let (mut name, mut bytes, mut signature) = (None, Vec::new(), String::new());
        while let Some(chunk) = chunks.message().await? {
            if name.is_none() {
                name = Some(chunk.name);
                signature = chunk.signature;
            }
            if bytes.len() + chunk.data.len() > MAX_MODULE_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "module larger than {} MiB",
                    MAX_MODULE_BYTES >> 20
                )));
            }
            bytes.extend_from_slice(&chunk.data);
        }
        let name = name.unwrap_or_default();
        let state = self.state.clone();
        // Compiling a module takes a while: off the async threads.
        let record = tokio::task::spawn_blocking(move || {
            state.push_signed_module(&name, &bytes, &signature)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(module = %record.name, digest = %record.digest, size = record.size, "module stored");
        let mut runs = chains_by_module(&self.state);
        Ok(Response::new(annotated(&self.state, record, &mut runs)))
    }

    async fn list(
        &self,
        _: Request<v1::ListModulesRequest>,
    ) -> Result<Response<v1::ListModulesResponse>, Status> {
        let mut runs = chains_by_module(&self.state);
        let modules = self
            .state
            .modules()
            .into_iter()
            .map(|m| annotated(&self.state, m, &mut runs))
            .collect();
        Ok(Response::new(v1::ListModulesResponse { modules }))
    }

    type FetchStream = BoxStream<v1::ModuleChunk>;

    async fn fetch(
        &self,
        request: Request<v1::FetchModuleRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        // Resolved once: a push under the same name meanwhile cannot pair these bytes with
        // another module's signature.
        // The bytes may come from etcd: not on the async threads.
        let module = request.into_inner().module;
        let (digest, bytes) = self
            .blocking(move |s| {
                let digest = s.resolve_module(&module)?;
                let bytes = s.module_bytes(&digest)?;
                Ok((digest, bytes))
            })
            .await?;
        let mut signature = self
            .state
            .modules()
            .into_iter()
            .find(|m| m.digest == digest)
            .map(|m| m.signature)
            .unwrap_or_default();
        let chunks: Vec<Result<v1::ModuleChunk, Status>> = bytes
            .chunks(1 << 20)
            .map(|c| {
                Ok(v1::ModuleChunk {
                    data: c.to_vec(),
                    signature: std::mem::take(&mut signature),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteModuleRequest>,
    ) -> Result<Response<v1::Module>, Status> {
        let module = request.into_inner().module;
        let m = self.blocking(move |s| s.delete_module(&module)).await?;
        tracing::info!(module = %m.name, digest = %m.digest, "module deleted");
        Ok(Response::new(module_msg(m)))
    }
}

#[tonic::async_trait]
impl v1::config_server::Config for ControlService {
    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        let req = request.into_inner();
        let resources = req
            .resources
            .into_iter()
            .map(resource_from)
            .collect::<Result<Vec<_>, _>>()?;
        let dry_run = req.dry_run;
        if let Some(r) = resources
            .iter()
            .find(|r| self.state.rollouts.moving(r.kind, &r.name))
        {
            return Err(Status::failed_precondition(format!(
                "{} `{}` is being rolled out; wait for the rollout or abort it \
                 (`weftctl rollout abort`)",
                r.kind.as_str().to_lowercase(),
                r.name
            )));
        }
        let (version, changes) = self.blocking(move |s| s.apply(resources, dry_run)).await?;
        if !req.dry_run {
            tracing::info!(version, "config applied");
        }
        Ok(Response::new(v1::ApplyResponse {
            version,
            changes: changes.into_iter().map(change_msg).collect(),
        }))
    }

    async fn list(
        &self,
        request: Request<v1::ListResourcesRequest>,
    ) -> Result<Response<v1::ListResourcesResponse>, Status> {
        let kind = request.into_inner().kind;
        let kind = if kind.is_empty() {
            None
        } else {
            Some(Kind::parse(&kind).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown kind `{kind}` (Chain, FilterConfig, Cluster, Listener, Scope, HTTPRoute or GRPCRoute)"
                ))
            })?)
        };
        let (resources, version) = self.state.resources(kind);
        let resources = resources
            .into_iter()
            .map(|r| {
                let conditions = self.state.route_conditions(&r);
                let mut msg = resource_msg(r);
                msg.conditions = conditions
                    .into_iter()
                    .map(|c| v1::RouteCondition {
                        r#type: c.kind,
                        status: c.status,
                        reason: c.reason,
                        message: c.message,
                    })
                    .collect();
                msg
            })
            .collect();
        Ok(Response::new(v1::ListResourcesResponse {
            resources,
            version,
        }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteResourceRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        let req = request.into_inner();
        let kind = Kind::parse(&req.kind).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown kind `{}` (Chain, FilterConfig, Cluster, Listener, Scope, HTTPRoute or GRPCRoute)",
                req.kind
            ))
        })?;
        if self.state.rollouts.moving(kind, &req.name) {
            return Err(Status::failed_precondition(format!(
                "{} `{}` is being rolled out; wait for the rollout or abort it \
                 (`weftctl rollout abort`)",
                kind.as_str().to_lowercase(),
                req.name
            )));
        }
        let name = req.name.clone();
        let (version, change) = self.blocking(move |s| s.delete(kind, &name)).await?;
        Ok(Response::new(v1::ApplyResponse {
            version,
            changes: vec![change_msg(change)],
        }))
    }
}

#[tonic::async_trait]
impl v1::registry_server::Registry for ControlService {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        let r = request.into_inner();
        let instance = model::Instance {
            id: String::new(),
            service: r.service,
            address: r.address,
            labels: labels(r.labels),
            ttl_seconds: r.ttl_seconds,
            weight: r.weight,
            last_seen_ms: 0,
            identity: r.identity,
        };
        let i = self.blocking(move |s| s.register(instance)).await?;
        tracing::info!(instance = %i.id, ttl_s = i.ttl_seconds, "instance registered");
        Ok(Response::new(instance_msg(i)))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        // On etcd a heartbeat renews a lease there: not on the async threads.
        let id = request.into_inner().id;
        Ok(Response::new(instance_msg(
            self.blocking(move |s| s.heartbeat(&id)).await?,
        )))
    }

    async fn deregister(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        let id = request.into_inner().id;
        let i = self.blocking(move |s| s.deregister(&id)).await?;
        tracing::info!(instance = %i.id, "instance deregistered");
        Ok(Response::new(instance_msg(i)))
    }

    async fn list_services(
        &self,
        _: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesResponse>, Status> {
        Ok(Response::new(v1::ListServicesResponse {
            instances: self
                .state
                .instances()
                .into_iter()
                .map(instance_msg)
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl v1::discovery_server::Discovery for ControlService {
    type SubscribeStream = BoxStream<v1::Snapshot>;

    async fn subscribe(
        &self,
        request: Request<Streaming<v1::DiscoveryRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before naming the proxy"))?;
        let node = first
            .node
            .filter(|n| !n.id.is_empty())
            .ok_or_else(|| Status::invalid_argument("the first message must carry node.id"))?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(serve_proxy(
            self.state.clone(),
            node.id,
            labels(node.labels),
            first.hash,
            inbound,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type TapsStream = BoxStream<v1::TapCommand>;

    async fn taps(
        &self,
        request: Request<Streaming<v1::TapEvent>>,
    ) -> Result<Response<Self::TapsStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .filter(|m| !m.proxy.is_empty())
            .ok_or_else(|| Status::invalid_argument("the first message must name the proxy"))?;
        let id = first.proxy;
        let (n, commands) = self.state.taps.proxy_connected(&id);
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok(Some(mut event)) = inbound.message().await {
                // The stream's proxy, whatever the event says.
                event.proxy.clone_from(&id);
                state.taps.deliver(event);
            }
            state.taps.proxy_gone(&id, n);
        });
        let commands = tokio_stream::StreamExt::map(ReceiverStream::new(commands), Ok);
        Ok(Response::new(Box::pin(commands)))
    }

    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let now = model::now_ms();
        Ok(Response::new(v1::StatusResponse {
            version: self.state.version(),
            proxies: self
                .state
                .proxies()
                .into_iter()
                .map(|p| v1::ProxyStatus {
                    labels: hash_map(&p.labels),
                    id: p.id,
                    connected: p.connected,
                    acked_version: p.acked_version,
                    acked_hash: p.acked_hash,
                    sent_version: p.sent_version,
                    synced_version: p.synced_version,
                    nack_error: p.nack_error,
                    nacked_version: p.nacked_version,
                    // A proxy whose stream is open is seen now.
                    last_seen_ms: if p.connected { now } else { p.last_seen_ms },
                    failures: p
                        .failures
                        .into_iter()
                        .map(|(filter, kind, count)| v1::FilterFailures {
                            filter,
                            kind,
                            count,
                        })
                        .collect(),
                    filters: p
                        .filters
                        .into_iter()
                        .map(
                            |(listener, filter, digest, failure_policy)| v1::RunningFilter {
                                listener,
                                filter,
                                digest,
                                failure_policy,
                            },
                        )
                        .collect(),
                    spiffe_id: p.identity.clone().map(|i| i.0).unwrap_or_default(),
                    cert_not_after_unix: p.identity.map_or(0, |i| i.1),
                    last_report_ms: p.last_report_ms,
                })
                .collect(),
        }))
    }
}

/// A tap call's samples, stopping the tap on the proxies when the call ends.
struct TapStream {
    events: ReceiverStream<v1::TapEvent>,
    _guard: crate::tap::TapGuard,
}

impl Stream for TapStream {
    type Item = Result<v1::TapEvent, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        Pin::new(&mut self.events).poll_next(cx).map(|e| e.map(Ok))
    }
}

/// The most samples a second a tap may ask of each proxy.
const TAP_MAX_RPS: u32 = 100;

#[tonic::async_trait]
impl v1::observe_server::Observe for ControlService {
    type TapStream = BoxStream<v1::TapEvent>;

    async fn tap(
        &self,
        request: Request<v1::TapRequest>,
    ) -> Result<Response<Self::TapStream>, Status> {
        let req = request.into_inner();
        let max_rps = match req.max_rps {
            0 => 10,
            n if n <= TAP_MAX_RPS => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "max_rps {n}: at most {TAP_MAX_RPS} samples a second per proxy"
                )));
            }
        };
        if req.duration_seconds > 3600 {
            return Err(Status::invalid_argument("duration_seconds: at most 3600"));
        }
        let selector = labels(req.selector);
        let proxies: Vec<String> = self
            .state
            .proxies()
            .into_iter()
            .filter(|p| p.connected && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .map(|p| p.id)
            .collect();
        let (id, events, on) = self.state.taps.start(&proxies, &req.path_prefix, max_rps);
        if on.is_empty() {
            return Err(Status::failed_precondition(
                "no connected proxy matches the selector (or none takes taps)",
            ));
        }
        tracing::info!(tap = id, proxies = on.len(), "tap started");
        if req.duration_seconds > 0 {
            let state = self.state.clone();
            let after = Duration::from_secs(req.duration_seconds.into());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                state.taps.stop(id);
            });
        }
        Ok(Response::new(Box::pin(TapStream {
            events: ReceiverStream::new(events),
            _guard: crate::tap::TapHub::guard(self.state.clone(), id),
        })))
    }

    async fn stat(
        &self,
        request: Request<v1::StatRequest>,
    ) -> Result<Response<v1::StatResponse>, Status> {
        let req = request.into_inner();
        let kind: crate::stats::StatKind = req.kind.parse().map_err(Status::invalid_argument)?;
        let window = match req.window_seconds {
            0 => crate::stats::DEFAULT_WINDOW_S,
            w if w <= (crate::stats::KEEP_MS / 1000) as u32 => w,
            w => {
                return Err(Status::invalid_argument(format!(
                    "window_seconds {w}: at most {}",
                    crate::stats::KEEP_MS / 1000
                )));
            }
        };
        let rows = self.state.stats.stat(kind, window, model::now_ms());
        Ok(Response::new(v1::StatResponse {
            window_seconds: window,
            rows: rows.into_iter().map(stat_row_msg).collect(),
        }))
    }
}

fn stat_row_msg(r: crate::stats::Row) -> v1::StatRow {
    v1::StatRow {
        service: r.service,
        route: r.route,
        source: r.source,
        proxy: r.proxy,
        requests: r.requests,
        failures: r.failures,
        rps: r.rps,
        success_rate: r.success_rate,
        p50_ms: r.p50_ms,
        p95_ms: r.p95_ms,
        p99_ms: r.p99_ms,
        proxies: r.proxies,
    }
}

#[tonic::async_trait]
impl v1::rollouts_server::Rollouts for ControlService {
    async fn start(
        &self,
        request: Request<v1::StartRolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        let req = request.into_inner();
        let gates = rollout::Gates::new(
            req.steps,
            req.interval_ms,
            req.max_error_rate,
            req.max_p99_ms,
            req.min_requests,
        )
        .map_err(Status::invalid_argument)?;
        let target = match (req.module.is_empty(), req.resources.is_empty()) {
            (false, true) => rollout::Target::Module(req.module),
            (true, false) => rollout::Target::Resources(
                req.resources
                    .into_iter()
                    .map(resource_from)
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            _ => {
                return Err(Status::invalid_argument(
                    "give either resources or a module to roll out",
                ));
            }
        };
        let now = req.now;
        let record = self
            .blocking(move |s| rollout::start(s, target, gates, now))
            .await?;
        Ok(Response::new(rollout_msg(record)))
    }

    async fn get(
        &self,
        _: Request<v1::GetRolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        let record = self
            .state
            .rollouts
            .current()
            .ok_or_else(|| Status::not_found("no rollout has run"))?;
        Ok(Response::new(rollout_msg(record)))
    }

    async fn list(
        &self,
        _: Request<v1::ListRolloutsRequest>,
    ) -> Result<Response<v1::ListRolloutsResponse>, Status> {
        Ok(Response::new(v1::ListRolloutsResponse {
            rollouts: self
                .state
                .rollouts
                .list()
                .into_iter()
                .map(rollout_msg)
                .collect(),
        }))
    }

    async fn abort(
        &self,
        request: Request<v1::AbortRolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        let reason = request.into_inner().reason;
        let record = self.blocking(move |s| rollout::abort(s, &reason)).await?;
        Ok(Response::new(rollout_msg(record)))
    }
}

fn sample_msg(s: Option<crate::stats::Sample>) -> Option<v1::RolloutSample> {
    s.map(|s| v1::RolloutSample {
        error_rate: s.error_rate(),
        requests: s.requests,
        failures: s.failures,
        p99_ms: s.p99_ms,
    })
}

fn rollout_msg(r: rollout::Record) -> v1::Rollout {
    let (module, digest) = r.module.unwrap_or_default();
    v1::Rollout {
        id: r.id,
        state: r.state.as_str().into(),
        resources: r.resources,
        module: if module.is_empty() {
            String::new()
        } else {
            format!("{module}@{digest}")
        },
        steps: r.gates.steps,
        step: r.step as u32,
        proxies: r.proxies as u32,
        share: r.share,
        interval_ms: r.gates.interval_ms,
        max_error_rate: r.gates.max_error_rate,
        max_p99_ms: r.gates.max_p99_ms,
        min_requests: r.gates.min_requests,
        started_ms: r.started_ms,
        updated_ms: r.updated_ms,
        step_live_ms: r.step_live_ms,
        reason: r.reason,
        decisions: r
            .decisions
            .into_iter()
            .map(|d| v1::RolloutDecision {
                at_ms: d.at_ms,
                step_percent: d.step_percent,
                action: d.action.into(),
                reason: d.reason,
                canary: sample_msg(d.canary),
                baseline: sample_msg(d.baseline),
            })
            .collect(),
        version: r.version,
    }
}

/// One proxy's discovery stream: sends its snapshot whenever what it should run changes,
/// records every ACK and NACK, and marks it disconnected when the stream ends.
async fn serve_proxy(
    state: Arc<ControlState>,
    id: String,
    labels: Labels,
    running_hash: String,
    mut inbound: Streaming<v1::DiscoveryRequest>,
    tx: mpsc::Sender<Result<v1::Snapshot, Status>>,
) {
    let stream = state.proxy_connected(&id, labels.clone());
    tracing::info!(proxy = %id, "proxy connected");
    let mut changes = state.changes();
    // What the proxy runs, as far as we know: the hash it reported, then what it ACKs.
    let mut acked_hash = running_hash;
    let mut sent_hash = String::new();
    let mut nacked_hash = String::new();
    let mut dirty = true;
    loop {
        if dirty {
            dirty = false;
            changes.borrow_and_update();
            let snap = state.snapshot_for(&id, &labels);
            // Runs it already, with nothing else on its way to it.
            if snap.hash == acked_hash && (sent_hash.is_empty() || sent_hash == acked_hash) {
                state.with_proxy(&id, stream, |p| {
                    p.acked_hash = snap.hash.clone();
                    p.synced_version = p.synced_version.max(snap.version);
                    p.acked_version = p.acked_version.max(snap.version);
                });
            } else if snap.hash == nacked_hash {
                // Still what the proxy refused: the refusal stands for this version too.
                state.with_proxy(&id, stream, |p| {
                    p.nacked_version = p.nacked_version.max(snap.version)
                });
            } else if snap.hash != sent_hash {
                sent_hash = snap.hash.clone();
                state.with_proxy(&id, stream, |p| p.sent_version = snap.version);
                if tx.send(Ok(snapshot_msg(&snap))).await.is_err() {
                    break;
                }
            }
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() { break; }
                dirty = true;
            }
            msg = inbound.message() => match msg {
                Ok(Some(m)) => {
                    let now = model::now_ms();
                    let failures: Vec<(String, String, u64)> = m
                        .failures
                        .iter()
                        .map(|f| (f.filter.clone(), f.kind.clone(), f.count))
                        .collect();
                    if m.report {
                        // Not an answer: what the proxy runs is unchanged.
                        if let Some(report) = m.stats {
                            record_report(&state, &id, &labels, stream, now, report);
                        }
                        state.with_proxy(&id, stream, |p| {
                            p.failures = failures;
                            p.last_seen_ms = now;
                        });
                    } else if m.error.is_empty() {
                        acked_hash = m.hash.clone();
                        // A refusal stands until the proxy runs something else: what it
                        // refused may be offered again later (a rollout started again).
                        nacked_hash.clear();
                        state.with_proxy(&id, stream, |p| {
                            p.acked_version = m.version;
                            p.acked_hash = m.hash.clone();
                            p.synced_version = p.synced_version.max(m.version);
                            p.nack_error.clear();
                            p.last_seen_ms = now;
                            p.failures = failures;
                        });
                        tracing::debug!(proxy = %id, version = m.version, "ACK");
                        // A change may have landed while the proxy was applying.
                        dirty = true;
                    } else {
                        nacked_hash = m.hash.clone();
                        tracing::warn!(proxy = %id, version = m.version, "NACK: {}", m.error);
                        state.with_proxy(&id, stream, |p| {
                            p.nack_error = m.error.clone();
                            p.nacked_version = m.version;
                            p.nacked_hash = m.hash.clone();
                            p.last_seen_ms = now;
                        });
                    }
                }
                Ok(None) | Err(_) => break,
            },
        }
    }
    state.with_proxy(&id, stream, |p| {
        p.connected = false;
        p.last_seen_ms = model::now_ms();
    });
    tracing::info!(proxy = %id, "proxy disconnected");
}

/// Keeps a proxy's traffic report and what it says the proxy runs.
fn record_report(
    state: &ControlState,
    id: &str,
    labels: &Labels,
    stream: u64,
    now: u64,
    report: v1::ProxyReport,
) {
    let traffic = report
        .traffic
        .into_iter()
        .map(|t| crate::stats::Counts {
            listener: t.listener,
            direction: t.direction,
            cluster: t.cluster,
            route: t.route,
            requests: t.requests,
            failures: t.failures,
            latency: t.latency.into_iter().collect(),
        })
        .collect();
    state
        .stats
        .record(id, labels, now, report.interval_ms, traffic);
    let filters = report
        .filters
        .into_iter()
        .map(|f| (f.listener, f.filter, f.digest, f.failure_policy))
        .collect();
    let identity =
        (!report.spiffe_id.is_empty()).then_some((report.spiffe_id, report.cert_not_after_unix));
    state.with_proxy(id, stream, |p| {
        p.filters = filters;
        p.identity = identity;
        p.last_report_ms = now;
    });
}

/// Checks `authorization: Bearer <token>` on every call when a token is set.
#[derive(Clone)]
pub struct Auth {
    token: Option<Arc<str>>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => Err(Status::unauthenticated(
                "this control service needs `authorization: Bearer <token>`",
            )),
        }
    }
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves every control service on `listener` until `shutdown` resolves, expiring registry
/// instances in the background.
pub async fn serve(
    state: Arc<ControlState>,
    identity: crate::identity::IdentityService,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    token: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let expirer = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                if let Err(e) = state.expire() {
                    tracing::error!("registry expiry: {e}");
                }
            }
        })
    };
    let driver = tokio::spawn(rollout::drive(state.clone()));
    let svc = ControlService { state };
    let auth = Auth {
        token: token.map(Into::into),
    };
    // Discovery streams never end on their own: once shutdown is asked for, open streams
    // get a moment, then the server stops (proxies reconnect to the next instance).
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(v1::modules_server::ModulesServer::with_interceptor(
            svc.clone(),
            auth.clone(),
        ))
        .add_service(v1::config_server::ConfigServer::with_interceptor(
            svc.clone(),
            auth.clone(),
        ))
        .add_service(v1::registry_server::RegistryServer::with_interceptor(
            svc.clone(),
            auth.clone(),
        ))
        .add_service(v1::identity_server::IdentityServer::with_interceptor(
            identity,
            auth.clone(),
        ))
        .add_service(v1::rollouts_server::RolloutsServer::with_interceptor(
            svc.clone(),
            auth.clone(),
        ))
        .add_service(v1::observe_server::ObserveServer::with_interceptor(
            svc.clone(),
            auth.clone(),
        ))
        .add_service(v1::discovery_server::DiscoveryServer::with_interceptor(
            svc, auth,
        ));
    // TLS is ours (rustls, a certificate swapped on CA rotation), not tonic's.
    let server: Pin<Box<dyn std::future::Future<Output = _> + Send>> = match tls {
        Some(config) => Box::pin(
            router.serve_with_incoming_shutdown(crate::tls::accept(listener, config), shutdown),
        ),
        None => {
            // Small messages both ways (snapshots, ACKs): no Nagle delay.
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |conn| {
                    conn.inspect(|c| {
                        let _ = c.set_nodelay(true);
                    })
                },
            );
            Box::pin(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
    };
    let grace = async {
        let _ = stop_rx.wait_for(|s| *s).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let result = tokio::select! {
        r = server => r,
        _ = grace => Ok(()),
    };
    expirer.abort();
    driver.abort();
    result
}

/// Where `serve` listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
