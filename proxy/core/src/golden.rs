//! Golden metrics for the control service: answered requests, failures and latency by
//! listener, cluster and route, pre-aggregated so that a request costs a few relaxed atomic
//! adds, and taken (read and zeroed) every report interval by the control follower.
//!
//! A listener's [`Live`](crate::http::Live) resolves each cluster's [`ClusterCells`] once;
//! the route a filter matched picks a cell in it (a read lock and a hash of the route name,
//! only when a router named one). Cells are registered in [`Golden`], which the follower
//! drains; a cell no listener state holds any more is dropped once drained.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use weft_proto::latency;

/// What one cell counts: requests of one listener to one cluster by one route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct TrafficKey {
    /// The listener's name.
    pub listener: String,
    /// The listener's direction (Envoy's number: 0 unspecified, 1 inbound, 2 outbound).
    pub direction: u8,
    /// The cluster; empty when none was found.
    pub cluster: String,
    /// The route a router filter matched; empty when none.
    pub route: String,
}

/// Counts taken from one cell: what happened since the previous take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficCounts {
    /// Whose counts.
    pub key: TrafficKey,
    /// Answered requests.
    pub requests: u64,
    /// Answered with a 5xx, or reset.
    pub failures: u64,
    /// Latency to response headers: (bucket index, count), non-zero only, in index order.
    pub latency: Vec<(u32, u64)>,
}

/// One key's counters.
struct Cell {
    key: TrafficKey,
    requests: AtomicU64,
    failures: AtomicU64,
    latency: Box<[AtomicU64]>,
}

impl Cell {
    fn new(key: TrafficKey) -> Self {
        Self {
            key,
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency: (0..latency::BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    #[inline]
    fn record(&self, status: u16, latency_ns: u64) {
        self.requests.fetch_add(1, Relaxed);
        if status >= 500 || status == 0 {
            self.failures.fetch_add(1, Relaxed);
        }
        self.latency[latency::bucket(latency_ns / 1_000)].fetch_add(1, Relaxed);
    }

    /// The counts since the last take, zeroing them; `None` when there were none. Every
    /// field is taken (a request counted during the take may show in this one or the next,
    /// but its fields are never split across a dropped cell).
    fn take(&self) -> Option<TrafficCounts> {
        let requests = self.requests.swap(0, Relaxed);
        let failures = self.failures.swap(0, Relaxed);
        let latency: Vec<(u32, u64)> = self
            .latency
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match n.swap(0, Relaxed) {
                0 => None,
                n => Some((i as u32, n)),
            })
            .collect();
        if requests == 0 && failures == 0 && latency.is_empty() {
            return None;
        }
        Some(TrafficCounts {
            key: self.key.clone(),
            requests,
            failures,
            latency,
        })
    }
}

/// The proxy's golden-metric cells, drained by the control follower.
#[derive(Default)]
pub struct Golden {
    cells: Mutex<Vec<Arc<Cell>>>,
    /// Someone drains the cells (a control follower). Until then, cells nothing else holds
    /// are dropped as new ones come (a proxy without a control service, reloaded a thousand
    /// times, keeps only the cells of what runs).
    drained: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Golden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.cells.lock().map_or(0, |c| c.len());
        f.debug_struct("Golden").field("cells", &n).finish()
    }
}

impl Golden {
    fn cell(&self, key: TrafficKey) -> Arc<Cell> {
        let cell = Arc::new(Cell::new(key));
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        if !self.drained.load(Relaxed) {
            cells.retain(|c| Arc::strong_count(c) > 1);
        }
        cells.push(cell.clone());
        cell
    }

    /// The cells of `listener`'s requests to `cluster` (empty: none found). Made once per
    /// cluster and listener state.
    pub fn cluster(self: &Arc<Self>, listener: &str, direction: u8, cluster: &str) -> ClusterCells {
        let key = |route: &str| TrafficKey {
            listener: listener.to_owned(),
            direction,
            cluster: cluster.to_owned(),
            route: route.to_owned(),
        };
        ClusterCells {
            unrouted: self.cell(key("")),
            routes: RwLock::new(HashMap::new()),
            template: key(""),
            golden: self.clone(),
        }
    }

    /// What every cell counted since the last take, merged by key (a cluster's cells made
    /// again for a new listener state count under the same key), sorted by key. Cells
    /// nothing else holds any more are dropped once drained.
    pub fn take(&self) -> Vec<TrafficCounts> {
        self.drained.store(true, Relaxed);
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        // Cells only this registry holds: their listener state is gone, so nothing counts
        // into them any more; drained below for the last time.
        let gone: Vec<Arc<Cell>> = cells
            .extract_if(.., |c| Arc::strong_count(c) == 1)
            .collect();
        let mut merged: std::collections::BTreeMap<TrafficKey, TrafficCounts> = Default::default();
        for cell in cells.iter().chain(&gone) {
            let Some(c) = cell.take() else { continue };
            match merged.get_mut(&c.key) {
                None => {
                    merged.insert(c.key.clone(), c);
                }
                Some(m) => {
                    m.requests += c.requests;
                    m.failures += c.failures;
                    let mut by: std::collections::BTreeMap<u32, u64> =
                        m.latency.drain(..).collect();
                    for (i, n) in c.latency {
                        *by.entry(i).or_default() += n;
                    }
                    m.latency = by.into_iter().collect();
                }
            }
        }
        merged.into_values().collect()
    }
}

/// Route names counted apart per cluster and listener state; later ones count as
/// [`OTHER_ROUTES`] (a filter names routes: it must not make the proxy's memory or its
/// reports grow without bound).
pub const MAX_ROUTES: usize = 256;

/// The route of requests past [`MAX_ROUTES`] names.
pub const OTHER_ROUTES: &str = "[other]";

/// The cells of one listener's requests to one cluster: one for requests no route named,
/// one per route name (up to [`MAX_ROUTES`]), made at the route's first request.
pub struct ClusterCells {
    unrouted: Arc<Cell>,
    routes: RwLock<HashMap<Box<str>, Arc<Cell>>>,
    template: TrafficKey,
    golden: Arc<Golden>,
}

impl ClusterCells {
    /// Counts an answered request (`status` 0: reset without an answer) by `route` (a
    /// router's match, if any) that took `latency_ns` to its response headers.
    #[inline]
    pub fn record(&self, route: Option<&str>, status: u16, latency_ns: u64) {
        let Some(route) = route.filter(|r| !r.is_empty()) else {
            self.unrouted.record(status, latency_ns);
            return;
        };
        let found = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(route)
            .cloned();
        let cell = match found {
            Some(cell) => cell,
            None => {
                let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
                let route = if routes.len() >= MAX_ROUTES && !routes.contains_key(route) {
                    OTHER_ROUTES
                } else {
                    route
                };
                routes
                    .entry(route.into())
                    .or_insert_with(|| {
                        self.golden.cell(TrafficKey {
                            route: route.to_owned(),
                            ..self.template.clone()
                        })
                    })
                    .clone()
            }
        };
        cell.record(status, latency_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_take_returns_what_was_counted_since_the_last_and_merges_equal_keys() {
        let golden = Arc::new(Golden::default());
        let a = golden.cluster("outbound", 2, "svc");
        // A listener state made again: the same key, new cells.
        let b = golden.cluster("outbound", 2, "svc");
        a.record(None, 200, 1_000_000); // 1 ms
        a.record(Some("api"), 503, 20_000_000);
        b.record(None, 204, 1_000_000);
        b.record(None, 0, 5_000_000);
        let took = golden.take();
        assert_eq!(took.len(), 2, "{took:?}");
        let unrouted = &took[0];
        assert_eq!(unrouted.key.route, "");
        assert_eq!((unrouted.requests, unrouted.failures), (3, 1));
        let ms1 = latency::bucket(1_000) as u32;
        assert!(
            unrouted.latency.contains(&(ms1, 2)),
            "{:?}",
            unrouted.latency
        );
        assert_eq!(took[1].key.route, "api");
        assert_eq!((took[1].requests, took[1].failures), (1, 1));
        // Drained: nothing until more requests.
        assert!(golden.take().is_empty());
        a.record(Some("api"), 200, 1_000);
        assert_eq!(golden.take()[0].requests, 1);
    }

    #[test]
    fn route_names_past_the_cap_count_together() {
        let golden = Arc::new(Golden::default());
        let cells = golden.cluster("outbound", 2, "svc");
        for i in 0..MAX_ROUTES + 50 {
            cells.record(Some(&format!("r{i}")), 200, 1_000);
        }
        let took = golden.take();
        assert_eq!(
            took.len(),
            MAX_ROUTES + 1,
            "every name up to the cap, and [other]"
        );
        let other = took.iter().find(|t| t.key.route == OTHER_ROUTES).unwrap();
        assert_eq!(other.requests, 50);
    }

    #[test]
    fn without_anyone_draining_cells_of_states_gone_do_not_pile_up() {
        let golden = Arc::new(Golden::default());
        for _ in 0..1000 {
            // A reload: a new listener state, its cells made at its first request.
            let cells = golden.cluster("ingress", 0, "svc");
            cells.record(None, 200, 1_000);
        }
        assert!(golden.cells.lock().unwrap().len() <= 1);
    }

    #[test]
    fn cells_of_a_state_gone_are_dropped_once_drained() {
        let golden = Arc::new(Golden::default());
        let cells = golden.cluster("inbound", 1, "local");
        cells.record(Some("r"), 200, 1_000);
        assert_eq!(golden.cells.lock().unwrap().len(), 2);
        drop(cells);
        assert_eq!(golden.take().len(), 1, "what was counted is still reported");
        assert!(golden.cells.lock().unwrap().is_empty());
        assert!(golden.take().is_empty());
    }
}
