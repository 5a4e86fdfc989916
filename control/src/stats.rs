//! The mesh's golden metrics: the proxies' traffic reports, kept for [`KEEP_MS`] and summed
//! over a window into rows per service, route, edge or proxy.
//!
//! Proxies push their counts (pre-aggregated, every few seconds) on the discovery stream they
//! already hold, rather than the service scraping each: no extra port, no extra connection,
//! no address to reach a proxy behind NAT or a Kubernetes network policy, and a report is
//! attributed to the proxy's identity on its authenticated stream. The cost: these numbers
//! live in the memory of the replica each proxy streams to.
//!
//! Who measures what:
//! - a request is reported by every proxy it crosses, by the listener it crossed: outbound
//!   (the proxy's workload calling a cluster) or inbound (the proxy's own service answering);
//! - a **service**'s numbers come from its own proxies' inbound listeners when any reported
//!   in the window (what the server saw), else from its callers' outbound listeners;
//! - a service's **routes** are named by its callers' routers: their outbound listeners'
//!   view when any named one, else the service's view;
//! - an **edge** (source workload → destination service) is measured by the caller's proxy;
//! - a workload is its proxy's `app` label, else the proxy's id.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;

use weft_proto::latency;

use crate::model::Labels;

/// How long reports are kept, in milliseconds (the longest window).
pub const KEEP_MS: u64 = 600_000;

/// The window when a query names none, in seconds.
pub const DEFAULT_WINDOW_S: u32 = 60;

/// Requests of one listener, cluster and route in one report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// The listener.
    pub listener: String,
    /// 1 inbound, 2 outbound, 0 unspecified (counted as outbound).
    pub direction: u32,
    /// The destination cluster; empty when none was found.
    pub cluster: String,
    /// The route matched; empty when none.
    pub route: String,
    /// Answered requests.
    pub requests: u64,
    /// Failed ones (5xx, resets).
    pub failures: u64,
    /// Latency by bucket ([`weft_proto::latency`]): (index, count).
    pub latency: Vec<(u32, u64)>,
}

/// What a row sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StatKind {
    /// Per destination service.
    Services,
    /// Per service and route.
    Routes,
    /// Per source workload and destination service.
    Edges,
    /// Per proxy.
    Proxies,
}

impl std::str::FromStr for StatKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "services" | "service" | "svc" => Self::Services,
            "routes" | "route" => Self::Routes,
            "edges" | "edge" => Self::Edges,
            "proxies" | "proxy" => Self::Proxies,
            other => {
                return Err(format!(
                    "unknown stat kind `{other}`: services, routes, edges or proxies"
                ));
            }
        })
    }
}

/// One row of golden metrics over a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    /// The destination service (services, routes, edges); the workload (proxies).
    pub service: String,
    /// The route (routes).
    pub route: String,
    /// The calling workload (edges).
    pub source: String,
    /// The proxy's id (proxies).
    pub proxy: String,
    /// Requests in the window.
    pub requests: u64,
    /// Failed requests.
    pub failures: u64,
    /// Requests per second.
    pub rps: f64,
    /// 0..=1; 1 without requests.
    pub success_rate: f64,
    /// Latency percentiles, ms (0 without requests).
    pub p50_ms: f64,
    /// 95th.
    pub p95_ms: f64,
    /// 99th.
    pub p99_ms: f64,
    /// Proxies whose reports it sums.
    pub proxies: u32,
}

/// A report as kept.
struct Kept {
    /// When it came, ms since the epoch.
    at_ms: u64,
    /// The milliseconds it covers.
    interval_ms: u64,
    traffic: Vec<Counts>,
}

struct ProxyTraffic {
    labels: Labels,
    reports: VecDeque<Kept>,
}

/// The reports of every proxy, by proxy id.
#[derive(Default)]
pub struct MeshStats {
    proxies: Mutex<HashMap<String, ProxyTraffic>>,
    /// The minute proxies without recent reports were last dropped in.
    pruned_minute: std::sync::atomic::AtomicU64,
}

/// A row being summed.
#[derive(Default)]
struct Acc {
    requests: u64,
    failures: u64,
    rps: f64,
    latency: Vec<u64>,
    proxies: BTreeSet<String>,
}

impl Acc {
    fn add(&mut self, proxy: &str, c: &Counts, span_s: f64) {
        self.requests += c.requests;
        self.failures += c.failures;
        self.rps += c.requests as f64 / span_s;
        if self.latency.is_empty() {
            self.latency = vec![0; latency::BUCKETS];
        }
        for &(i, n) in &c.latency {
            if let Some(b) = self.latency.get_mut(i as usize) {
                *b += n;
            }
        }
        self.proxies.insert(proxy.to_owned());
    }

    fn row(self, service: String, route: String, source: String, proxy: String) -> Row {
        let q = |q: f64| latency::quantile(&self.latency, q).map_or(0.0, |us| us / 1000.0);
        Row {
            success_rate: if self.requests == 0 {
                1.0
            } else {
                (self.requests - self.failures.min(self.requests)) as f64 / self.requests as f64
            },
            p50_ms: q(0.50),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            service,
            route,
            source,
            proxy,
            requests: self.requests,
            failures: self.failures,
            rps: self.rps,
            proxies: self.proxies.len() as u32,
        }
    }
}

/// The traffic of some proxies over some time, summed (a rollout's canary or baseline).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Requests answered.
    pub requests: u64,
    /// Failed ones.
    pub failures: u64,
    /// The 99th percentile latency, ms (0 without requests).
    pub p99_ms: f64,
}

impl Sample {
    /// failures / requests; 0 without requests.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.failures.min(self.requests) as f64 / self.requests as f64
        }
    }
}

/// The workload a proxy belongs to: its `app` label, else its id.
pub fn workload(id: &str, labels: &Labels) -> String {
    labels.get("app").cloned().unwrap_or_else(|| id.to_owned())
}

/// The route column of requests no route matched.
pub const UNROUTED: &str = "[default]";

fn route_name(route: &str) -> String {
    match route {
        "" => UNROUTED.to_owned(),
        r => r.to_owned(),
    }
}

impl MeshStats {
    /// Keeps a report of proxy `id` (with `labels`) that came at `at_ms` and covers
    /// `interval_ms`; drops what is older than [`KEEP_MS`].
    pub fn record(
        &self,
        id: &str,
        labels: &Labels,
        at_ms: u64,
        interval_ms: u64,
        traffic: Vec<Counts>,
    ) {
        let mut proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        let p = proxies
            .entry(id.to_owned())
            .or_insert_with(|| ProxyTraffic {
                labels: labels.clone(),
                reports: VecDeque::new(),
            });
        p.labels = labels.clone();
        p.reports.push_back(Kept {
            at_ms,
            interval_ms: interval_ms.max(1),
            traffic,
        });
        let oldest = at_ms.saturating_sub(KEEP_MS);
        while p.reports.front().is_some_and(|r| r.at_ms < oldest) {
            p.reports.pop_front();
        }
        // Proxies gone quiet, dropped once a minute (not at every report).
        let minute = at_ms / 60_000;
        if self
            .pruned_minute
            .swap(minute, std::sync::atomic::Ordering::Relaxed)
            != minute
        {
            proxies.retain(|_, p| p.reports.back().is_some_and(|r| r.at_ms >= oldest));
        }
    }

    /// The traffic of the proxies `ids` reported for time wholly after `since_ms` (a report
    /// that covers earlier time too is left out: it may count requests of what ran before).
    pub fn sample(&self, ids: &BTreeSet<String>, since_ms: u64) -> Sample {
        let proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        let mut sample = Sample::default();
        let mut buckets = vec![0u64; latency::BUCKETS];
        for id in ids {
            let Some(p) = proxies.get(id) else { continue };
            let after = p
                .reports
                .iter()
                .filter(|r| r.at_ms.saturating_sub(r.interval_ms) >= since_ms);
            for c in after.flat_map(|r| &r.traffic) {
                sample.requests += c.requests;
                sample.failures += c.failures;
                for &(i, n) in &c.latency {
                    if let Some(b) = buckets.get_mut(i as usize) {
                        *b += n;
                    }
                }
            }
        }
        sample.p99_ms = latency::quantile(&buckets, 0.99).map_or(0.0, |us| us / 1000.0);
        sample
    }

    /// The rows of `kind` over the `window_s` seconds before `now_ms`, sorted.
    pub fn stat(&self, kind: StatKind, window_s: u32, now_ms: u64) -> Vec<Row> {
        let since = now_ms.saturating_sub(u64::from(window_s) * 1000);
        self.stat_between(kind, since, now_ms)
    }

    /// The rows of `kind` for `slots` consecutive slots of `slot_s` seconds ending at
    /// `now_ms`, oldest first (the dashboard's charts).
    pub fn series(
        &self,
        kind: StatKind,
        slot_s: u32,
        slots: u32,
        now_ms: u64,
    ) -> Vec<(u64, Vec<Row>)> {
        let slot = u64::from(slot_s) * 1000;
        (0..u64::from(slots))
            .rev()
            .map(|i| {
                let until = now_ms.saturating_sub(i * slot);
                (
                    until,
                    self.stat_between(kind, until.saturating_sub(slot), until),
                )
            })
            .collect()
    }

    /// The rows of `kind` from the reports that came after `since` and by `until` (ms since
    /// the epoch), sorted.
    pub fn stat_between(&self, kind: StatKind, since: u64, until: u64) -> Vec<Row> {
        let window_ms = until.saturating_sub(since);
        let proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        // Each proxy's counts in the window, summed per (listener, direction, cluster,
        // route), with the span its reports cover (its rate's denominator).
        let mut per_proxy: Vec<(&str, &Labels, f64, Vec<Counts>)> = Vec::new();
        for (id, p) in proxies.iter() {
            let recent: Vec<&Kept> = p
                .reports
                .iter()
                .filter(|r| r.at_ms > since && r.at_ms <= until)
                .collect();
            if recent.is_empty() {
                continue;
            }
            let covered: u64 = recent.iter().map(|r| r.interval_ms).sum();
            let span_s = covered.min(window_ms).max(1) as f64 / 1000.0;
            let mut sum: BTreeMap<(&str, u32, &str, &str), Counts> = BTreeMap::new();
            for c in recent.iter().flat_map(|r| &r.traffic) {
                let e = sum
                    .entry((&c.listener, c.direction, &c.cluster, &c.route))
                    .or_insert_with(|| Counts {
                        listener: c.listener.clone(),
                        direction: c.direction,
                        cluster: c.cluster.clone(),
                        route: c.route.clone(),
                        ..Counts::default()
                    });
                e.requests += c.requests;
                e.failures += c.failures;
                e.latency.extend_from_slice(&c.latency);
            }
            per_proxy.push((id, &p.labels, span_s, sum.into_values().collect()));
        }
        // Services some proxy of theirs measured inbound: their callers' view is left out.
        let served: BTreeSet<String> = per_proxy
            .iter()
            .filter(|(_, _, _, counts)| counts.iter().any(|c| c.direction == 1))
            .map(|(id, labels, _, _)| workload(id, labels))
            .collect();
        // Services whose callers' routers name routes: their routes are the callers' view.
        let routed: BTreeSet<&str> = per_proxy
            .iter()
            .flat_map(|(_, _, _, counts)| counts)
            .filter(|c| c.direction != 1 && !c.route.is_empty())
            .map(|c| c.cluster.as_str())
            .collect();
        let mut rows: BTreeMap<(String, String, String, String), Acc> = BTreeMap::new();
        for (id, labels, span_s, counts) in &per_proxy {
            let me = workload(id, labels);
            for c in counts {
                let inbound = c.direction == 1;
                let destination = if inbound {
                    me.clone()
                } else {
                    c.cluster.clone()
                };
                let key = match kind {
                    StatKind::Proxies => (me.clone(), String::new(), String::new(), id.to_string()),
                    StatKind::Edges if inbound => continue,
                    StatKind::Edges => (destination, String::new(), me.clone(), String::new()),
                    StatKind::Routes if routed.contains(destination.as_str()) => {
                        if inbound {
                            continue;
                        }
                        (
                            destination,
                            route_name(&c.route),
                            String::new(),
                            String::new(),
                        )
                    }
                    _ if !inbound && served.contains(&destination) => continue,
                    StatKind::Services => {
                        (destination, String::new(), String::new(), String::new())
                    }
                    StatKind::Routes => (
                        destination,
                        route_name(&c.route),
                        String::new(),
                        String::new(),
                    ),
                };
                rows.entry(key).or_default().add(id, c, *span_s);
            }
        }
        rows.into_iter()
            .map(|((service, route, source, proxy), acc)| acc.row(service, route, source, proxy))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(app: &str) -> Labels {
        [("app".to_owned(), app.to_owned())].into_iter().collect()
    }

    fn counts(direction: u32, cluster: &str, route: &str, ok: u64, failed: u64, ms: u64) -> Counts {
        Counts {
            listener: if direction == 1 {
                "inbound"
            } else {
                "outbound"
            }
            .into(),
            direction,
            cluster: cluster.into(),
            route: route.into(),
            requests: ok + failed,
            failures: failed,
            latency: vec![(latency::bucket(ms * 1000) as u32, ok + failed)],
        }
    }

    #[test]
    fn a_service_is_measured_where_it_is_served_and_edges_where_they_start() {
        let stats = MeshStats::default();
        let now = 1_000_000;
        // web calls api 100 times in 10 s (5 fail), measured by web's proxy; api's proxy
        // sees the same 100 inbound, and 50 more from a caller without a sidecar.
        for t in 0..2u64 {
            let at = now - 10_000 + t * 5_000 + 5_000;
            stats.record(
                "web-1",
                &labels("web"),
                at,
                5_000,
                vec![counts(2, "api", "get-items", 45, 5, 20)],
            );
            stats.record(
                "api-1",
                &labels("api"),
                at,
                5_000,
                vec![counts(1, "local", "", 70, 5, 10)],
            );
        }
        let services = stats.stat(StatKind::Services, 60, now);
        assert_eq!(services.len(), 1, "{services:?}");
        let api = &services[0];
        assert_eq!(api.service, "api");
        assert_eq!((api.requests, api.failures), (150, 10));
        assert!((api.rps - 15.0).abs() < 1e-9, "{}", api.rps);
        assert!((api.success_rate - 140.0 / 150.0).abs() < 1e-9);
        assert!((api.p50_ms - 10.0).abs() <= 1.25, "{}", api.p50_ms);
        let edges = stats.stat(StatKind::Edges, 60, now);
        assert_eq!(edges.len(), 1, "{edges:?}");
        assert_eq!(
            (edges[0].source.as_str(), edges[0].service.as_str()),
            ("web", "api")
        );
        assert_eq!((edges[0].requests, edges[0].failures), (100, 10));
        assert!((edges[0].p99_ms - 20.0).abs() <= 2.5, "{}", edges[0].p99_ms);
        // Routes are named by the callers' routers: their view.
        let routes = stats.stat(StatKind::Routes, 60, now);
        assert_eq!(routes.len(), 1, "{routes:?}");
        assert_eq!(
            (routes[0].route.as_str(), routes[0].requests),
            ("get-items", 100)
        );
        let proxies = stats.stat(StatKind::Proxies, 60, now);
        assert_eq!(proxies.len(), 2);
        assert_eq!(proxies[1].proxy, "web-1");
    }

    #[test]
    fn a_service_without_its_own_proxy_is_measured_by_its_callers() {
        let stats = MeshStats::default();
        let now = 500_000;
        stats.record(
            "web-1",
            &labels("web"),
            now - 1000,
            5_000,
            vec![
                counts(2, "db", "read", 9, 1, 3),
                counts(2, "db", "", 5, 0, 3),
            ],
        );
        stats.record(
            "web-2",
            &labels("web"),
            now - 2000,
            5_000,
            vec![counts(2, "db", "read", 10, 0, 3)],
        );
        let services = stats.stat(StatKind::Services, 60, now);
        assert_eq!(services[0].service, "db");
        assert_eq!((services[0].requests, services[0].proxies), (25, 2));
        // Each proxy's rate over what its reports cover (5 s each): 15/5 + 10/5.
        assert!((services[0].rps - 5.0).abs() < 1e-9, "{}", services[0].rps);
        let routes = stats.stat(StatKind::Routes, 60, now);
        let names: Vec<_> = routes
            .iter()
            .map(|r| (r.route.as_str(), r.requests))
            .collect();
        assert_eq!(names, [(UNROUTED, 5), ("read", 20)]);
    }

    #[test]
    fn reports_outside_the_window_do_not_count_and_old_ones_are_dropped() {
        let stats = MeshStats::default();
        let now = 10_000_000;
        stats.record(
            "a",
            &labels("a"),
            now - 90_000,
            5_000,
            vec![counts(2, "x", "", 10, 0, 1)],
        );
        stats.record(
            "a",
            &labels("a"),
            now - 1_000,
            5_000,
            vec![counts(2, "x", "", 3, 3, 1)],
        );
        let rows = stats.stat(StatKind::Services, 60, now);
        assert_eq!((rows[0].requests, rows[0].failures), (6, 3));
        assert_eq!(rows[0].success_rate, 0.5);
        assert_eq!(stats.stat(StatKind::Services, 120, now)[0].requests, 16);
        // Ten minutes later the proxy is gone with its reports.
        stats.record("b", &labels("b"), now + KEEP_MS + 1, 5_000, vec![]);
        assert!(
            stats
                .stat(StatKind::Services, 600, now + KEEP_MS + 1)
                .is_empty()
        );
        assert!(!stats.proxies.lock().unwrap().contains_key("a"));
    }
}
