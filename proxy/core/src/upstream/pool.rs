//! Per-worker state: each worker thread runs its own single-threaded tokio runtime and owns,
//! in a thread-local, one balancer and one connection pool per cluster endpoint. The request
//! path reaches them with short synchronous borrows, never held across an `.await`, so no
//! lock is taken; other per-worker state (such as filter instances) can live beside them.

use rustc_hash::FxHashMap as HashMap;
use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hyper::client::conn::{http1, http2};

use crate::body::RequestBody;
use crate::upstream::h1::Conn;
use crate::upstream::lb::{LoadBalancer, new_balancer};
use crate::upstream::{Cluster, ClusterTable, Endpoint, EndpointSet};

/// An idle HTTP/1 connection: driven by hyper's client (its last request had a body) or
/// inline (`h1.rs`).
pub enum Idle {
    /// hyper's client connection, its task reading the socket.
    Hyper(http1::SendRequest<RequestBody>),
    /// An inline connection (nothing reads it while it idles).
    Inline(Box<Conn>),
}

impl Idle {
    /// Whether the connection can carry another request.
    fn is_usable(&mut self) -> bool {
        match self {
            Self::Hyper(sender) => !sender.is_closed(),
            Self::Inline(conn) => conn.is_usable(),
        }
    }
}

/// An idle HTTP/1 connection in a pool.
struct IdleH1 {
    conn: Idle,
    since_ms: u64,
}

#[derive(Default)]
struct EndpointPool {
    /// Idle HTTP/1 connections; the most recently used is reused first.
    h1_idle: Vec<IdleH1>,
    /// Shared HTTP/2 connections.
    h2: Vec<http2::SendRequest<RequestBody>>,
}

struct WorkerCluster {
    /// The endpoint set generation the balancer was built for.
    generation: u64,
    /// The cluster's idle timeout (a cluster whose settings change is a new cluster).
    idle_timeout_ms: u64,
    balancer: Box<dyn LoadBalancer>,
    /// Pools by endpoint id, for the endpoints of `generation` (a map: a cluster may have
    /// thousands of endpoints, and every request looks its endpoint's pool up twice; keyed by
    /// ids the proxy makes, so FxHash).
    pools: HashMap<u64, EndpointPool>,
}

impl WorkerCluster {
    fn new(set: &EndpointSet, policy: crate::config::LbPolicy, idle_timeout_ms: u64) -> Self {
        Self {
            generation: set.generation,
            idle_timeout_ms,
            balancer: new_balancer(policy, &set.list),
            pools: set
                .list
                .iter()
                .map(|e| (e.id, EndpointPool::default()))
                .collect(),
        }
    }

    /// Follows a new endpoint set: a new balancer, the pools of endpoints that stay kept,
    /// those of removed endpoints dropped (their connections close).
    fn follow(&mut self, set: &EndpointSet, policy: crate::config::LbPolicy) {
        let mut next = Self::new(set, policy, self.idle_timeout_ms);
        for (id, pool) in &mut next.pools {
            if let Some(old) = self.pools.remove(id) {
                *pool = old;
            }
        }
        *self = next;
    }

    fn pool(&mut self, endpoint: u64) -> Option<&mut EndpointPool> {
        self.pools.get_mut(&endpoint)
    }
}

/// What one worker thread owns.
struct WorkerState {
    id: usize,
    /// By cluster id: made at a cluster's first pick on this worker.
    clusters: HashMap<u64, WorkerCluster>,
    /// The proxy's clusters, to let go of the state of removed ones.
    table: Arc<ClusterTable>,
    /// The [`TABLES`] count this worker last pruned at.
    pruned_at: u64,
}

/// How many times the cluster table was replaced: workers look at it on every pick and
/// let go of removed clusters' state when it moved.
static TABLES: AtomicU64 = AtomicU64::new(0);

/// Tells the workers that the cluster table was replaced.
pub fn table_replaced() {
    TABLES.fetch_add(1, Relaxed);
}

impl WorkerState {
    /// Drops the balancers and pools of clusters the table no longer has (their idle
    /// connections close), once per table.
    #[inline]
    fn prune(&mut self) {
        let now = TABLES.load(Relaxed);
        if now == self.pruned_at {
            return;
        }
        self.pruned_at = now;
        let table = self.table.load();
        let live: std::collections::HashSet<u64> = table.list.iter().map(|c| c.id).collect();
        self.clusters.retain(|id, _| live.contains(id));
    }
}

thread_local! {
    static WORKER: RefCell<Option<WorkerState>> = const { RefCell::new(None) };
}

/// Sets up the calling thread as worker `id` for the clusters of `table`.
pub fn install(id: usize, table: Arc<ClusterTable>) {
    let state = WorkerState {
        id,
        clusters: HashMap::default(),
        table,
        pruned_at: TABLES.load(Relaxed),
    };
    WORKER.with(|w| *w.borrow_mut() = Some(state));
}

fn with_cluster<R>(cluster: u64, f: impl FnOnce(&mut WorkerCluster) -> R) -> Option<R> {
    WORKER.with(|w| {
        let mut w = w.borrow_mut();
        w.as_mut()?.clusters.get_mut(&cluster).map(f)
    })
}

/// This worker's id, if the thread is a worker.
pub fn id() -> Option<usize> {
    WORKER.with(|w| w.borrow().as_ref().map(|s| s.id))
}

/// Picks an endpoint of `cluster` with this worker's balancer.
pub fn pick(cluster: &Cluster, now_ms: u64) -> Option<Arc<Endpoint>> {
    let set = cluster.endpoints();
    WORKER.with(|w| {
        let mut w = w.borrow_mut();
        let w = w.as_mut()?;
        w.prune();
        let wc = w.clusters.entry(cluster.id).or_insert_with(|| {
            WorkerCluster::new(&set, cluster.lb_policy, cluster.idle_timeout_ms)
        });
        if wc.generation != set.generation {
            wc.follow(&set, cluster.lb_policy);
        }
        // In panic every endpoint is a candidate, ejected or not (as Envoy's balancers).
        let seen_at = if cluster.in_panic(now_ms) {
            cluster.metrics.panic_picks.inc();
            u64::MAX
        } else {
            now_ms
        };
        let i = wc.balancer.pick(&set.list, seen_at)?;
        set.list.get(i).cloned()
    })
}

/// Takes the most recently used idle HTTP/1 connection to an endpoint that is neither closed
/// nor idle for longer than `idle_timeout_ms`: of the kind the request is best sent on
/// (`inline`: an empty body, for the inline codec; else hyper's) if there is one, else of the
/// other, so that a mix of requests keeps connections of both kinds instead of turning
/// every one into hyper's.
pub fn take_h1(
    cluster: u64,
    endpoint: u64,
    now_ms: u64,
    idle_timeout_ms: u64,
    inline: bool,
) -> Option<Idle> {
    with_cluster(cluster, |wc| {
        let idle = &mut wc.pool(endpoint)?.h1_idle;
        loop {
            let i = idle
                .iter()
                .rposition(|c| matches!(c.conn, Idle::Inline(_)) == inline)
                .or_else(|| idle.len().checked_sub(1))?;
            let mut taken = idle.remove(i);
            if now_ms.saturating_sub(taken.since_ms) > idle_timeout_ms || !taken.conn.is_usable() {
                continue; // dropped: the connection closes and releases its slot
            }
            return Some(taken.conn);
        }
    })
    .flatten()
}

/// Closes this worker's idle HTTP/1 connections that were idle past their cluster's idle
/// timeout or that the upstream closed, giving back their `max_connections` slots. An
/// inline connection has no task watching it while it idles, so its upstream's close is
/// seen here (the worker runs this every second) or when it is taken.
pub fn sweep_idle(now_ms: u64) {
    WORKER.with(|w| {
        let mut w = w.borrow_mut();
        let Some(w) = w.as_mut() else {
            return;
        };
        for wc in w.clusters.values_mut() {
            let timeout = wc.idle_timeout_ms;
            for pool in wc.pools.values_mut() {
                pool.h1_idle.retain_mut(|idle| {
                    now_ms.saturating_sub(idle.since_ms) <= timeout && idle.conn.is_usable()
                });
            }
        }
    });
}

/// Returns an HTTP/1 connection whose last response was read to the end.
pub fn put_h1(cluster: u64, endpoint: u64, conn: Idle, now_ms: u64) {
    if let Idle::Hyper(sender) = &conn
        && sender.is_closed()
    {
        return;
    }
    with_cluster(cluster, |wc| {
        // An endpoint that left the cluster has no pool: its connection closes.
        if let Some(pool) = wc.pool(endpoint) {
            pool.h1_idle.push(IdleH1 {
                conn,
                since_ms: now_ms,
            })
        }
    });
}

/// A live shared HTTP/2 connection to an endpoint, if this worker has one.
pub fn h2(cluster: u64, endpoint: u64) -> Option<http2::SendRequest<RequestBody>> {
    with_cluster(cluster, |wc| {
        let conns = &mut wc.pool(endpoint)?.h2;
        conns.retain(|c| !c.is_closed());
        conns.first().cloned()
    })
    .flatten()
}

/// Adds a new HTTP/2 connection to an endpoint's pool.
pub fn add_h2(cluster: u64, endpoint: u64, sender: http2::SendRequest<RequestBody>) {
    with_cluster(cluster, |wc| {
        if let Some(pool) = wc.pool(endpoint) {
            pool.h2.push(sender)
        }
    });
}
