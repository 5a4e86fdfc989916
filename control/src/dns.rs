//! DNS discovery: a `Cluster` resource with `dns: name:port` (A and AAAA records) or
//! `dns: _service._proto.name` (SRV records, ports and weights from them) gets the
//! addresses the name resolves to, resolved by the control service and again when the
//! records' TTL runs out (Envoy's strict DNS clusters). This is how Docker Compose replicas,
//! Kubernetes headless services and Consul's DNS interface join the mesh.
//!
//! A name that does not exist (NXDOMAIN, or no records) leaves its cluster without DNS
//! endpoints; a server that does not answer keeps the last answer (logged, retried with
//! backoff), so a DNS outage never empties a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::time::Instant;

use crate::ControlState;
use crate::model::Endpoint;

/// Shortest wait before a name is resolved again (a TTL of 0 or 1).
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest wait before a name is resolved again, whatever its TTL.
const MAX_REFRESH: Duration = Duration::from_secs(300);
/// Wait after an answer with no records (NXDOMAIN or NODATA).
const NEGATIVE_REFRESH: Duration = Duration::from_secs(2);
/// Longest wait between tries while the server does not answer.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What a `dns` field names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsTarget {
    /// A and AAAA records of `name`, each address with `port`.
    Host {
        /// The name.
        name: String,
        /// The port of every address.
        port: u16,
    },
    /// SRV records of `name` (`_service._proto.domain`): targets, ports and weights.
    Srv {
        /// The name.
        name: String,
    },
}

fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

impl DnsTarget {
    /// Reads `name:port` or `_service._proto.domain`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with('_') {
            return if valid_dns_name(s) && !s.contains(':') {
                Ok(DnsTarget::Srv { name: s.to_owned() })
            } else {
                Err(format!(
                    "`{s}` is not an SRV name (`_service._proto.domain`)"
                ))
            };
        }
        let Some((name, port)) = s.rsplit_once(':') else {
            return Err(format!(
                "`{s}` needs a port (`name:port`), or is an SRV name (`_service._proto.domain`)"
            ));
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("`{s}`: `{port}` is not a port"))?;
        if !valid_dns_name(name) {
            return Err(format!("`{s}`: `{name}` is not a DNS name"));
        }
        Ok(DnsTarget::Host {
            name: name.to_owned(),
            port,
        })
    }
}

fn address(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// A resolution: the endpoints and until when they hold, `None` for a name without
/// records, or why the server did not answer.
type Resolved = Result<Option<(Vec<Endpoint>, Instant)>, String>;

/// Resolves the `dns` names of the state's Cluster resources for ever.
pub struct DnsDiscovery {
    resolver: TokioResolver,
}

impl DnsDiscovery {
    /// A resolver asking `servers` (UDP, then TCP for long answers), or the system's
    /// (`/etc/resolv.conf`) when there are none. Its own cache is off: each refresh asks.
    pub fn new(servers: &[SocketAddr]) -> Result<Self, String> {
        let mut builder = if servers.is_empty() {
            Resolver::builder_tokio().map_err(|e| format!("the system's DNS configuration: {e}"))?
        } else {
            let name_servers = servers
                .iter()
                .map(|s| {
                    let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
                    (udp.port, tcp.port) = (s.port(), s.port());
                    NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                })
                .collect();
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(name_servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.cache_size = 0;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        let resolver = builder
            .build()
            .map_err(|e| format!("cannot make a DNS resolver: {e}"))?;
        Ok(Self { resolver })
    }

    /// The addresses of `name` (A and AAAA records, asked apart so that a failure of one
    /// is never taken for an empty answer of the other) and until when they hold; empty
    /// when it has neither.
    async fn addresses(&self, name: &str) -> Result<(Vec<IpAddr>, Option<Instant>), String> {
        let (v4, v6) = tokio::join!(
            self.resolver.ipv4_lookup(name),
            self.resolver.ipv6_lookup(name)
        );
        let mut ips = Vec::new();
        let mut until: Option<Instant> = None;
        for answer in [v4, v6] {
            match answer {
                Ok(lookup) => {
                    let t = Instant::from_std(lookup.valid_until());
                    until = Some(until.map_or(t, |u| u.min(t)));
                    ips.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    }));
                }
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {}
                Err(e) => return Err(format!("{name}: {e}")),
            }
        }
        Ok((ips, until))
    }

    /// The endpoints `target` resolves to now, and until when they hold. `Ok(None)`: the
    /// name has no records.
    async fn resolve(&self, target: &DnsTarget) -> Resolved {
        match target {
            DnsTarget::Host { name, port } => {
                let (ips, until) = self.addresses(name).await?;
                let Some(until) = until.filter(|_| !ips.is_empty()) else {
                    return Ok(None);
                };
                let eps = ips
                    .into_iter()
                    .map(|ip| Endpoint {
                        address: address(ip, *port),
                        weight: 1,
                        identity: String::new(),
                    })
                    .collect();
                Ok(Some((eps, until)))
            }
            DnsTarget::Srv { name } => {
                let srv = match self.resolver.srv_lookup(name.as_str()).await {
                    Ok(srv) => srv,
                    Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(None),
                    Err(e) => return Err(e.to_string()),
                };
                let mut until = Instant::from_std(srv.valid_until());
                let mut eps = Vec::new();
                // Only the best (lowest) priority serves; the others are backups.
                let best = srv
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::SRV(s) => Some(s.priority),
                        _ => None,
                    })
                    .min();
                for record in srv.answers() {
                    let RData::SRV(s) = &record.data else {
                        continue;
                    };
                    if Some(s.priority) != best {
                        continue;
                    }
                    let (ips, valid) = self.addresses(&s.target.to_string()).await?;
                    if let Some(v) = valid {
                        until = until.min(v);
                    }
                    eps.extend(ips.into_iter().map(|ip| Endpoint {
                        address: address(ip, s.port),
                        weight: u32::from(s.weight.max(1)),
                        identity: String::new(),
                    }));
                }
                if eps.is_empty() {
                    return Ok(None);
                }
                Ok(Some((eps, until)))
            }
        }
    }

    /// Follows the `dns` names of `state`'s clusters: each resolved when first seen and
    /// again when its TTL runs out (between 1 s and 5 min), or with backoff (1 s to 30 s)
    /// while its server does not answer; results go to the state, which sends snapshots
    /// when they change.
    pub async fn run(self, state: Arc<ControlState>) {
        let this = Arc::new(self);
        // name → (when to resolve again, backoff after a failure)
        let mut due: BTreeMap<String, (Instant, Duration)> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut running: tokio::task::JoinSet<(String, Resolved)> = tokio::task::JoinSet::new();
        let mut in_flight: BTreeSet<String> = BTreeSet::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(done) = running.join_next() => {
                    let (name, result) = match done {
                        Ok(r) => r,
                        Err(e) => {
                            // A resolution that panicked: start over for every name.
                            tracing::error!("DNS: a resolution failed: {e}");
                            in_flight.clear();
                            continue;
                        }
                    };
                    in_flight.remove(&name);
                    if !due.contains_key(&name) {
                        continue; // no cluster names it any more
                    }
                    let now = Instant::now();
                    let backoff = due.get(&name).map(|d| d.1).unwrap_or(MIN_REFRESH);
                    let next = match result {
                        Ok(Some((eps, until))) => {
                            state.set_dns_endpoints(&name, eps);
                            (until.clamp(now + MIN_REFRESH, now + MAX_REFRESH), MIN_REFRESH)
                        }
                        Ok(None) => {
                            tracing::warn!(name, "DNS: the name has no records; its cluster gets no endpoints from it");
                            state.set_dns_endpoints(&name, Vec::new());
                            (now + NEGATIVE_REFRESH, MIN_REFRESH)
                        }
                        Err(e) => {
                            tracing::warn!(name, retry_in_ms = backoff.as_millis() as u64, "DNS: {e}; keeping the last answer");
                            (now + backoff, (backoff * 2).min(MAX_BACKOFF))
                        }
                    };
                    due.insert(name, next);
                    continue;
                }
            }
            if !state.leads() {
                // Another replica resolves; its answers come through the store. Should
                // this one be elected, it resolves every name at once.
                due.clear();
                continue;
            }
            let wanted = state.dns_names();
            due.retain(|name, _| wanted.contains(name));
            state.retain_dns(&wanted);
            let now = Instant::now();
            for name in wanted {
                let entry = due.entry(name.clone()).or_insert((now, MIN_REFRESH));
                if entry.0 > now || in_flight.contains(&name) {
                    continue;
                }
                let Ok(target) = DnsTarget::parse(&name) else {
                    continue; // checked when applied
                };
                in_flight.insert(name.clone());
                let this = this.clone();
                running.spawn(async move {
                    let result = this.resolve(&target).await;
                    (name, result)
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_fields_name_a_host_and_port_or_an_srv_name() {
        assert_eq!(
            DnsTarget::parse("echo.mesh.test:8080"),
            Ok(DnsTarget::Host {
                name: "echo.mesh.test".into(),
                port: 8080
            })
        );
        assert_eq!(
            DnsTarget::parse("_http._tcp.echo.mesh.test"),
            Ok(DnsTarget::Srv {
                name: "_http._tcp.echo.mesh.test".into()
            })
        );
        for bad in [
            "echo.mesh.test",
            "echo:0",
            "echo:http",
            "ec ho:80",
            "_http._tcp.echo:80",
            ":80",
            "a..b:80",
        ] {
            assert!(DnsTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
