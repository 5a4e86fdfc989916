//! The control service's state in etcd ([`EtcdStore`], `weft-control --store
//! etcd://host:2379,host:2379/prefix`): modules, resources and the config version,
//! registered instances, join tokens and DNS answers, under one key prefix, shared by any
//! number of control service replicas at once.
//!
//! Layout under the prefix (default `/weft`): `modules/meta/<digest>` (JSON record, with
//! the number of byte chunks), `modules/bytes/<digest>/<n>` (chunks of 1 MiB: etcd refuses
//! requests over 1.5 MiB), `modules/names/<name>` (a digest), `config/version` (20 digits),
//! `config/resources/<kind>/<name>`, `instances/<id>` (each on an etcd lease of its TTL),
//! `tokens/<hash>`, `dns/<name>` (JSON), `leader` (the elected replica, on its lease),
//! `ca/files/<name>` (the mesh CA a replica made, shared by all), `config/commit` and
//! `redeemed/<hash>` (nonces that tell a replica its write went through after an answer was
//! lost).
//!
//! Replicas are all active: each serves its own proxies and weftctl, and watches the prefix
//! ([`Store::take_changes`]) to read again what any replica wrote. Config commits are
//! compare-and-swap on the version, token redemption on the token's revision, so two
//! replicas never overwrite each other. Instances live on etcd leases ([`EtcdRegistry`]):
//! a heartbeat through any replica renews the lease, and etcd itself deletes an instance
//! whose lease ran out. One replica, elected through the `leader` key on a lease it keeps
//! alive, does the singleton work (DNS resolution); when it dies, another takes over
//! within [`LEADER_TTL`] seconds.
//!
//! etcd's client is async and the [`Store`] trait is not: calls run on the store's own
//! runtime thread and the caller waits (at most [`CALL_TIMEOUT`]), from any thread.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};

use crate::model::{Endpoint, Instance, Kind, ModuleRecord, Resource, now_ms};
use crate::registry::Registry;
use crate::state::ControlError;
use crate::store::{Changed, Store, StoreError, TokenRecord};

/// A key and its value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// The longest a store call waits for etcd.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Module bytes per etcd value.
const CHUNK: usize = 1 << 20;
/// The leader lease's time to live, in seconds: how long singleton work may go undone
/// after the elected replica dies without a word.
pub const LEADER_TTL: i64 = 5;

/// One client per etcd member; calls go to one of them and move to the next when it
/// does not answer (etcd-client's own balancing keeps trying a dead member).
struct Members {
    clients: Vec<Client>,
    current: std::sync::atomic::AtomicUsize,
    addresses: Vec<String>,
}

impl Members {
    /// The client in use now and its index.
    fn get(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len();
        (i, self.clients[i].clone())
    }

    /// Moves on from member `i` (if it is still the one in use).
    fn failed(&self, i: usize, why: &str) {
        let next = (i + 1) % self.clients.len();
        if self
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && self.clients.len() > 1
        {
            tracing::warn!(
                from = %self.addresses[i],
                to = %self.addresses[next],
                "etcd: moving to another member: {why}"
            );
        }
    }
}

/// Whether `e` says the member cannot serve (down, unreachable, without a leader): the
/// call may go to another.
fn unavailable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        _ => false,
    }
}

/// The longest one try of a call waits for one member.
const TRY_TIMEOUT: Duration = Duration::from_secs(3);

/// The store in etcd.
pub struct EtcdStore {
    members: Arc<Members>,
    prefix: String,
    runtime: tokio::runtime::Runtime,
    /// Whether this replica holds the `leader` key now.
    leading: Arc<AtomicBool>,
    /// The lease the `leader` key is on while this replica holds it (0: none).
    leader_lease: Arc<AtomicI64>,
    /// What the watch of the prefix sees, until taken.
    changes: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Changed>>>,
}

impl Drop for EtcdStore {
    /// Hands leadership over at once (a stopped replica's lease would hold it for its TTL).
    fn drop(&mut self) {
        let lease = self.leader_lease.load(Ordering::Acquire);
        if lease != 0 {
            let _ = self.call(move |mut c| async move { c.lease_revoke(lease).await.map(drop) });
        }
    }
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("etcd: {e}"))
}

fn json(v: &impl serde::Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(err)
}

fn parse<T: serde::de::DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| err(format!("{}: {e}", String::from_utf8_lossy(key))))
}

/// A version as stored: 20 digits, so that etcd's byte order is numeric order.
fn version_text(v: u64) -> String {
    format!("{v:020}")
}

/// Module metadata as stored: the record and how many chunks its bytes have.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredModule {
    #[serde(flatten)]
    record: ModuleRecord,
    chunks: usize,
}

impl EtcdStore {
    /// Connects to `url` (`etcd://host:port[,host:port...][/prefix]`), checks that etcd
    /// answers, starts watching the prefix, and campaigns for leadership as `holder` (this
    /// replica: host, listen address and PID).
    pub fn open(url: &str, holder: &str) -> Result<EtcdStore, StoreError> {
        let rest = url.strip_prefix("etcd://").ok_or_else(|| {
            StoreError(format!(
                "--store `{url}`: use etcd://host:port[,host:port]/prefix"
            ))
        })?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) if !p.is_empty() => (h, format!("/{}", p.trim_end_matches('/'))),
            Some((h, _)) => (h, "/weft".to_owned()),
            None => (rest, "/weft".to_owned()),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError(format!("--store `{url}`: no etcd address")));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weft-etcd")
            .enable_all()
            .build()
            .map_err(err)?;
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let options = options.with_require_leader(true);
        let (clients, answered) = runtime.block_on(async {
            let mut clients = Vec::new();
            let mut answered = None;
            let mut why = Vec::new();
            for (i, endpoint) in endpoints.iter().enumerate() {
                let mut client = Client::connect([endpoint], Some(options.clone()))
                    .await
                    .map_err(|e| StoreError(format!("etcd at {endpoint}: {e}")))?;
                // Connecting is lazy: ask something to know that one member answers.
                if answered.is_none() {
                    match tokio::time::timeout(TRY_TIMEOUT, client.status()).await {
                        Ok(Ok(_)) => answered = Some(i),
                        Ok(Err(e)) => why.push(format!("{endpoint}: {e}")),
                        Err(_) => why.push(format!("{endpoint}: no answer")),
                    }
                }
                clients.push(client);
            }
            match answered {
                Some(i) => Ok((clients, i)),
                None => Err(StoreError(format!(
                    "etcd at {}: no member answers ({})",
                    endpoints.join(","),
                    why.join("; ")
                ))),
            }
        })?;
        let members = Arc::new(Members {
            clients,
            current: answered.into(),
            addresses: endpoints,
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let store = EtcdStore {
            members,
            prefix,
            runtime,
            leading: Arc::default(),
            leader_lease: Arc::default(),
            changes: Mutex::new(Some(rx)),
        };
        store.runtime.spawn(watch(
            store.members.clone(),
            format!("{}/", store.prefix),
            tx,
        ));
        store.runtime.spawn(campaign(
            store.members.clone(),
            store.key("leader"),
            holder.to_owned(),
            store.leading.clone(),
            store.leader_lease.clone(),
        ));
        Ok(store)
    }

    /// The replica that holds the `leader` key now, if any.
    pub fn leader(&self) -> Result<Option<String>, StoreError> {
        let (who, _) = self.get("leader")?;
        Ok(who.map(|w| String::from_utf8_lossy(&w).into_owned()))
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    /// Runs `f` with a member's client on the store's runtime and waits for it, from any
    /// thread; a member that cannot serve is left for the next, until each was tried once.
    /// (A write tried again after no answer may have happened: every write here is
    /// idempotent or compare-and-swap.)
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let members = self.members.clone();
        self.runtime.spawn(async move {
            let r = tokio::time::timeout(CALL_TIMEOUT, async {
                let mut why = String::new();
                for _ in 0..members.clients.len() {
                    let (i, client) = members.get();
                    why = match tokio::time::timeout(TRY_TIMEOUT, f(client)).await {
                        Ok(Ok(v)) => return Ok(v),
                        Ok(Err(e)) if unavailable(&e) => e.to_string(),
                        Ok(Err(e)) => return Err(e.to_string()),
                        Err(_) => format!("no answer within {}s", TRY_TIMEOUT.as_secs()),
                    };
                    members.failed(i, &why);
                }
                Err(format!("no member answers: {why}"))
            })
            .await;
            let _ = tx.send(r);
        });
        match rx.recv() {
            Ok(Ok(r)) => r.map_err(err),
            Ok(Err(_)) => Err(err(format!("no answer within {}s", CALL_TIMEOUT.as_secs()))),
            Err(_) => Err(err("the store's runtime stopped")),
        }
    }

    /// Every (key, value) under `rest`.
    fn get_prefix(&self, rest: &str) -> Result<Vec<KeyValue>, StoreError> {
        let key = self.key(rest);
        self.call(move |c| {
            let key = key.clone();
            async move {
                let r = c
                    .kv_client()
                    .get(key, Some(GetOptions::new().with_prefix()))
                    .await?;
                Ok(r.kvs()
                    .iter()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
                    .collect())
            }
        })
    }

    /// The value of `rest` and its mod revision (0: absent).
    fn get(&self, rest: &str) -> Result<(Option<Vec<u8>>, i64), StoreError> {
        let key = self.key(rest);
        self.call(move |c| {
            let key = key.clone();
            async move {
                let r = c.kv_client().get(key, None).await?;
                Ok(match r.kvs().first() {
                    Some(kv) => (Some(kv.value().to_vec()), kv.mod_revision()),
                    None => (None, 0),
                })
            }
        })
    }

    /// Runs `txn`; whether its comparisons held.
    fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        self.call(move |c| {
            let txn = txn.clone();
            async move { Ok(c.kv_client().txn(txn).await?.succeeded()) }
        })
    }

    /// Runs `ops` if `when` holds, with `marker` set to a fresh nonce in the same
    /// transaction: whether they were applied, also when an answer was lost and `call` sent
    /// the transaction again (which then fails its comparisons against its own write).
    fn txn_marked(
        &self,
        when: Vec<Compare>,
        mut ops: Vec<TxnOp>,
        marker: &str,
    ) -> Result<bool, StoreError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| err(format!("no randomness: {e}")))?;
        let nonce = hex::encode(bytes);
        ops.push(TxnOp::put(self.key(marker), nonce.as_str(), None));
        if self.txn(Txn::new().when(when).and_then(ops))? {
            return Ok(true);
        }
        let (stored, _) = self.get(marker)?;
        Ok(stored.as_deref() == Some(nonce.as_bytes()))
    }

    /// Writes the mesh CA's files kept in the store (`ca/files/<name>`) into `dir`
    /// (created, owner only); whether there were any.
    pub fn fetch_ca(&self, dir: &std::path::Path) -> Result<bool, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let base = self.key("ca/files/");
        let files = self.get_prefix("ca/files/")?;
        if files.is_empty() {
            return Ok(false);
        }
        let io = |path: &std::path::Path, e: std::io::Error| {
            StoreError(format!("{}: {e}", path.display()))
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io(dir, e))?;
        for (key, value) in files {
            let key = String::from_utf8_lossy(&key);
            let name = key.strip_prefix(&base).unwrap_or(&key);
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(err(format!("a CA file named `{name}` in the store")));
            }
            let text = String::from_utf8(value)
                .map_err(|_| err(format!("the CA file `{name}` in the store is not text")))?;
            crate::ca::write_private(&dir.join(name), &text).map_err(err)?;
        }
        Ok(true)
    }

    /// Puts the mesh CA's files in `dir` (`*.pem`, `*.json`) in the store, unless another
    /// replica put its own first: whether these are the CA's files now.
    pub fn offer_ca(&self, dir: &std::path::Path) -> Result<bool, StoreError> {
        let mut ops = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
        for entry in entries {
            let path = entry.map_err(err)?.path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if name.starts_with('.') || !(name.ends_with(".pem") || name.ends_with(".json")) {
                continue;
            }
            let bytes =
                std::fs::read(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
            ops.push(TxnOp::put(
                self.key(&format!("ca/files/{name}")),
                bytes,
                None,
            ));
        }
        let marker = self.key("ca/files/state.json");
        self.txn(
            Txn::new()
                .when([Compare::create_revision(marker, CompareOp::Equal, 0)])
                .and_then(ops),
        )
    }

    /// Every instance with the lease it is on (0: none, as written before leases).
    fn leased_instances(&self) -> Result<Vec<(Instance, i64)>, StoreError> {
        self.leased("instances/", true)
    }

    /// The instances (with their leases) under `rest`, or at `rest` when not `prefix`.
    fn leased(&self, rest: &str, prefix: bool) -> Result<Vec<(Instance, i64)>, StoreError> {
        let key = self.key(rest);
        let kvs = self.call(move |c| {
            let key = key.clone();
            async move {
                let options = prefix.then(|| GetOptions::new().with_prefix());
                let r = c.kv_client().get(key, options).await?;
                Ok(r.kvs()
                    .iter()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.lease()))
                    .collect::<Vec<_>>())
            }
        })?;
        kvs.iter()
            .map(|(k, v, lease)| Ok((parse(k, v)?, *lease)))
            .collect()
    }

    /// A new lease of `ttl` seconds.
    fn grant(&self, ttl: u32) -> Result<i64, StoreError> {
        self.call(move |mut c| async move { Ok(c.lease_grant(i64::from(ttl), None).await?.id()) })
    }

    /// Writes `instance` on `lease`.
    fn put_leased(&self, instance: &Instance, lease: i64) -> Result<(), StoreError> {
        let (key, value) = (
            self.key(&format!("instances/{}", instance.id)),
            json(instance)?,
        );
        self.call(move |c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.kv_client()
                    .put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
                    .map(drop)
            }
        })
    }

    /// Renews `lease` once: whether it was still alive.
    fn renew(&self, lease: i64) -> Result<bool, StoreError> {
        match self.call(move |mut c| async move {
            // Opening the stream sends the one renewal.
            let (_keeper, mut answers) = c.lease_keep_alive(lease).await?;
            Ok(matches!(answers.message().await?, Some(a) if a.ttl() > 0))
        }) {
            // etcd says so of a lease that ran out (or was revoked).
            Err(e) if e.0.contains("lease not found") => Ok(false),
            r => r,
        }
    }

    /// Revokes `lease` (and deletes the keys on it); one that is gone already is no error.
    fn revoke(&self, lease: i64) {
        if let Err(e) = self.call(move |mut c| async move { c.lease_revoke(lease).await.map(drop) })
            && !e.0.contains("not found")
        {
            tracing::warn!(lease, "etcd: cannot revoke a lease: {e}");
        }
    }
}

/// What a key under the prefix (without it) belongs to.
fn classify(rest: &str) -> Changed {
    Changed {
        config: rest.starts_with("config/"),
        modules: rest.starts_with("modules/meta/") || rest.starts_with("modules/names/"),
        instances: rest.starts_with("instances/"),
        dns: rest.starts_with("dns/"),
    }
}

/// Watches everything under `prefix` and says what changed on `tx`, until its receiver is
/// gone. A watch that breaks (the etcd member died, the stream was cancelled) is made
/// again; once it is created, `Changed::ALL` is sent, since events may have been missed.
async fn watch(
    members: Arc<Members>,
    prefix: String,
    tx: tokio::sync::mpsc::UnboundedSender<Changed>,
) {
    let mut said = false;
    while !tx.is_closed() {
        let (i, mut client) = members.get();
        let why = match client
            .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
            .await
        {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(r)) if r.canceled() => {
                        break format!("the watch was cancelled: {}", r.cancel_reason());
                    }
                    Ok(Some(r)) => {
                        if r.created() {
                            if said {
                                tracing::info!("etcd: watching the store again");
                                said = false;
                            }
                            let _ = tx.send(Changed::ALL);
                        }
                        let changed = r
                            .events()
                            .iter()
                            .filter_map(|e| e.kv())
                            .map(|kv| {
                                let key = String::from_utf8_lossy(kv.key());
                                classify(key.strip_prefix(&prefix).unwrap_or(&key))
                            })
                            .fold(Changed::default(), Changed::merge);
                        if changed != Changed::default() && tx.send(changed).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break "the watch ended".to_owned(),
                    Err(e) => break e.to_string(),
                }
            },
            Err(e) => e.to_string(),
        };
        members.failed(i, &why);
        if !said {
            tracing::warn!("etcd: the watch of the store broke ({why}); watching again");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Campaigns for `key` as `holder` for as long as the process runs: takes it when it is
/// free (on a lease of [`LEADER_TTL`]), keeps the lease alive while leading, and campaigns
/// again when the lease is lost.
async fn campaign(
    members: Arc<Members>,
    key: String,
    holder: String,
    leading: Arc<AtomicBool>,
    leader_lease: Arc<AtomicI64>,
) {
    loop {
        let (i, mut c) = members.get();
        let taken = async {
            let lease = c.lease_grant(LEADER_TTL, None).await?.id();
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    holder.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            if c.kv_client().txn(txn).await?.succeeded() {
                Ok::<_, etcd_client::Error>(Some(lease))
            } else {
                c.lease_revoke(lease).await?;
                Ok(None)
            }
        }
        .await;
        let lease = match taken {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => {
                tracing::debug!("etcd: campaign: {e}");
                if unavailable(&e) {
                    members.failed(i, &e.to_string());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        leader_lease.store(lease, Ordering::Release);
        leading.store(true, Ordering::Release);
        tracing::info!("elected to do singleton work (DNS resolution)");
        let why = keep_leading(&members, lease).await;
        leading.store(false, Ordering::Release);
        leader_lease.store(0, Ordering::Release);
        tracing::warn!("no longer elected: {why}");
    }
}

/// Keeps `lease` alive until it may be lost; why it stopped. Leading stops a margin before
/// the lease could have run out in etcd, counting from when the last renewal that
/// succeeded was *sent*, so that no two replicas lead at once.
async fn keep_leading(members: &Members, lease: i64) -> String {
    let ttl = Duration::from_secs(LEADER_TTL as u64);
    let safe = ttl - Duration::from_secs(1);
    let mut renewed = tokio::time::Instant::now();
    loop {
        let sent = tokio::time::Instant::now();
        let (i, mut c) = members.get();
        let once = async {
            // Opening the stream sends the one renewal.
            let (_keeper, mut answers) = c.lease_keep_alive(lease).await?;
            Ok::<_, etcd_client::Error>(answers.message().await?.map(|a| a.ttl()))
        };
        let left = (renewed + safe).saturating_duration_since(sent);
        let why = match tokio::time::timeout(left.min(ttl / 3), once).await {
            Ok(Ok(Some(left))) if left > 0 => {
                renewed = sent;
                tokio::time::sleep(ttl / 4).await;
                continue;
            }
            Ok(Ok(_)) => return "the lease expired".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "etcd did not answer".to_owned(),
        };
        members.failed(i, &why);
        if renewed.elapsed() >= safe {
            return format!("the lease could not be renewed in time: {why}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The registry on a shared etcd store: every instance is on an etcd lease of its TTL, so
/// that a heartbeat through any replica renews it and etcd deletes it when nobody does;
/// what this replica lists is what it read from etcd (again at every change watched).
pub struct EtcdRegistry {
    store: Arc<EtcdStore>,
    /// Instance id → (instance, its lease).
    instances: Mutex<BTreeMap<String, (Instance, i64)>>,
    /// Registrations and removals made through this replica: a refresh that read etcd
    /// before one of them is not applied (the write's own watch event reads it again).
    writes: std::sync::atomic::AtomicU64,
}

impl EtcdRegistry {
    /// Reads the stored instances. One stored without a lease (before leases, or by a
    /// store of one writer) is put on one of its TTL now: it expires unless renewed.
    pub fn load(store: Arc<EtcdStore>) -> Result<EtcdRegistry, ControlError> {
        let mut instances = BTreeMap::new();
        for (instance, mut lease) in store.leased_instances()? {
            if lease == 0 {
                lease = store.grant(instance.ttl_seconds.max(1))?;
                store.put_leased(&instance, lease)?;
            }
            instances.insert(instance.id.clone(), (instance, lease));
        }
        Ok(EtcdRegistry {
            store,
            instances: Mutex::new(instances),
            writes: 0.into(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Instance, i64)>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Registry for EtcdRegistry {
    fn register(&self, mut instance: Instance) -> Result<Instance, ControlError> {
        instance.id = format!("{}/{}", instance.service, instance.address);
        instance.last_seen_ms = now_ms();
        // etcd first, with no lock held (listing instances must not wait on etcd).
        let lease = self.store.grant(instance.ttl_seconds.max(1))?;
        if let Err(e) = self.store.put_leased(&instance, lease) {
            self.store.revoke(lease);
            return Err(e.into());
        }
        let old = {
            let mut instances = self.lock();
            self.writes.fetch_add(1, Ordering::AcqRel);
            instances.insert(instance.id.clone(), (instance.clone(), lease))
        };
        if let Some((_, old)) = old
            && old != lease
        {
            // The key moved to the new lease; the old one holds nothing of it now.
            self.store.revoke(old);
        }
        Ok(instance)
    }

    fn heartbeat(&self, id: &str) -> Result<Instance, ControlError> {
        let expired =
            || ControlError::NotFound(format!("instance `{id}` (expired or never registered)"));
        let known = self.lock().get(id).cloned();
        let found = match known {
            Some(found) => Some(found),
            // Registered through another replica a moment ago? (Its watch event adds it
            // here, and tells proxies.)
            None => self
                .store
                .leased(&format!("instances/{id}"), false)?
                .into_iter()
                .next(),
        };
        let (mut instance, mut lease) = found.ok_or_else(expired)?;
        if !self.store.renew(lease)? {
            // Registered again (through another replica) on a new lease? Renew that one.
            let current = self
                .store
                .leased(&format!("instances/{id}"), false)?
                .into_iter()
                .next();
            match current {
                Some((now, l)) if l != lease && self.store.renew(l)? => {
                    (instance, lease) = (now, l);
                }
                _ => {
                    let mut instances = self.lock();
                    if instances.get(id).is_some_and(|(_, l)| *l == lease) {
                        instances.remove(id);
                    }
                    return Err(expired());
                }
            }
        }
        instance.last_seen_ms = now_ms();
        if let Some(entry) = self.lock().get_mut(id)
            && entry.1 == lease
        {
            entry.0.last_seen_ms = instance.last_seen_ms;
        }
        Ok(instance)
    }

    fn deregister(&self, id: &str) -> Result<Instance, ControlError> {
        let known = self.lock().get(id).cloned();
        let (instance, lease) = match known {
            Some(found) => found,
            // Registered through another replica a moment ago?
            None => self
                .store
                .leased(&format!("instances/{id}"), false)?
                .into_iter()
                .next()
                .ok_or_else(|| ControlError::NotFound(format!("instance `{id}`")))?,
        };
        self.store.delete_instances(&[id.to_owned()])?;
        self.store.revoke(lease);
        let mut instances = self.lock();
        self.writes.fetch_add(1, Ordering::AcqRel);
        if instances.get(id).is_some_and(|(_, l)| *l == lease) {
            instances.remove(id);
        }
        Ok(instance)
    }

    fn instances(&self) -> Vec<Instance> {
        self.lock().values().map(|(i, _)| i.clone()).collect()
    }

    /// Nothing to do here: etcd deletes an instance whose lease ran out, and every
    /// replica sees the deletion through its watch.
    fn expire(&self, _now_ms: u64) -> Result<Vec<Instance>, ControlError> {
        Ok(Vec::new())
    }

    fn refresh(&self) -> Result<bool, ControlError> {
        let before = self.writes.load(Ordering::Acquire);
        let stored = self.store.leased_instances()?;
        let mut instances = self.lock();
        if self.writes.load(Ordering::Acquire) != before {
            // A write here since the read: what was read may be older than this map.
            return Ok(false);
        }
        let same = stored.len() == instances.len()
            && stored.iter().all(|(i, lease)| {
                instances.get(&i.id).is_some_and(|(known, l)| {
                    *l == *lease
                        && Instance {
                            last_seen_ms: known.last_seen_ms,
                            ..i.clone()
                        } == *known
                })
            });
        if same {
            return Ok(false);
        }
        *instances = stored
            .into_iter()
            .map(|(mut i, lease)| {
                if let Some((known, _)) = instances.get(&i.id) {
                    i.last_seen_ms = i.last_seen_ms.max(known.last_seen_ms);
                }
                (i.id.clone(), (i, lease))
            })
            .collect();
        Ok(true)
    }
}

impl Store for EtcdStore {
    fn shared(&self) -> bool {
        true
    }

    fn leads(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    fn take_changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Changed>> {
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn modules(&self) -> Result<Vec<ModuleRecord>, StoreError> {
        self.get_prefix("modules/meta/")?
            .iter()
            .map(|(k, v)| parse::<StoredModule>(k, v).map(|m| m.record))
            .collect()
    }

    fn module_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (meta, _) = self.get(&format!("modules/meta/{digest}"))?;
        let Some(meta) = meta else {
            return Ok(None);
        };
        let meta: StoredModule = parse(digest.as_bytes(), &meta)?;
        let mut chunks = self.get_prefix(&format!("modules/bytes/{digest}/"))?;
        // Keys end in the chunk number: sort numerically.
        let number = |k: &[u8]| -> usize {
            String::from_utf8_lossy(k)
                .rsplit('/')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX)
        };
        chunks.sort_by_key(|(k, _)| number(k));
        if chunks.len() != meta.chunks
            || chunks.iter().enumerate().any(|(i, (k, _))| number(k) != i)
        {
            return Err(err(format!(
                "module {digest}: {} of {} chunks in the store",
                chunks.len(),
                meta.chunks
            )));
        }
        Ok(Some(chunks.into_iter().flat_map(|(_, v)| v).collect()))
    }

    fn put_module(&self, record: &ModuleRecord, bytes: &[u8]) -> Result<(), StoreError> {
        // The bytes first, chunk by chunk (content-addressed: rewriting them is harmless),
        // then the record and the name in one transaction: a module is listed only once
        // its bytes are whole.
        let digest = &record.digest;
        let chunks: Vec<&[u8]> = bytes.chunks(CHUNK).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let (key, value) = (
                self.key(&format!("modules/bytes/{digest}/{i}")),
                chunk.to_vec(),
            );
            self.call(move |c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.kv_client().put(key, value, None).await.map(drop) }
            })?;
        }
        let stored = StoredModule {
            record: record.clone(),
            chunks: chunks.len(),
        };
        let txn = Txn::new().and_then([
            TxnOp::put(
                self.key(&format!("modules/meta/{digest}")),
                json(&stored)?,
                None,
            ),
            TxnOp::put(
                self.key(&format!("modules/names/{}", record.name)),
                digest.as_str(),
                None,
            ),
        ]);
        self.txn(txn).map(drop)
    }

    fn delete_module(&self, digest: &str, config_version: u64) -> Result<bool, StoreError> {
        let mut ops = vec![
            TxnOp::delete(self.key(&format!("modules/meta/{digest}")), None),
            TxnOp::delete(
                self.key(&format!("modules/bytes/{digest}/")),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        ];
        for (name, d) in self.module_names()? {
            if d == digest {
                ops.push(TxnOp::delete(
                    self.key(&format!("modules/names/{name}")),
                    None,
                ));
            }
        }
        // Only if no config was committed since the caller checked that none uses it.
        let vkey = self.key("config/version");
        let unchanged = if config_version == 0 {
            Compare::create_revision(vkey, CompareOp::Equal, 0)
        } else {
            Compare::value(vkey, CompareOp::Equal, version_text(config_version))
        };
        self.txn(Txn::new().when([unchanged]).and_then(ops))
    }

    fn module_names(&self) -> Result<Vec<(String, String)>, StoreError> {
        let base = self.key("modules/names/");
        Ok(self
            .get_prefix("modules/names/")?
            .into_iter()
            .map(|(k, v)| {
                let k = String::from_utf8_lossy(&k);
                (
                    k.strip_prefix(&base).unwrap_or(&k).to_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect())
    }

    fn config(&self) -> Result<(Vec<Resource>, u64), StoreError> {
        // The version, then the resources as of the same revision: one consistent state.
        let (vkey, rkey) = (self.key("config/version"), self.key("config/resources/"));
        let (version, kvs) = self.call(move |c| {
            let (vkey, rkey) = (vkey.clone(), rkey.clone());
            async move {
                let mut kv = c.kv_client();
                let v = kv.get(vkey, None).await?;
                let at = v.header().map(|h| h.revision()).unwrap_or(0);
                let r = kv
                    .get(
                        rkey,
                        Some(GetOptions::new().with_prefix().with_revision(at)),
                    )
                    .await?;
                Ok((
                    v.kvs().first().map(|kv| kv.value().to_vec()),
                    r.kvs()
                        .iter()
                        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
                        .collect::<Vec<_>>(),
                ))
            }
        })?;
        let resources = kvs
            .iter()
            .map(|(k, v)| parse(k, v))
            .collect::<Result<_, _>>()?;
        let version = match version {
            Some(v) => String::from_utf8_lossy(&v)
                .parse()
                .map_err(|e| err(format!("config/version: {e}")))?,
            None => 0,
        };
        Ok((resources, version))
    }

    fn commit_config(
        &self,
        version: u64,
        put: &[Resource],
        delete: &[(Kind, String)],
    ) -> Result<bool, StoreError> {
        // Compare-and-swap on the version: nobody else committed since it was read.
        let (stored, revision) = self.get("config/version")?;
        let stored: u64 = stored
            .map(|v| String::from_utf8_lossy(&v).parse().unwrap_or(u64::MAX))
            .unwrap_or(0);
        if stored >= version {
            return Ok(false);
        }
        let vkey = self.key("config/version");
        let mut ops = vec![TxnOp::put(vkey.clone(), version_text(version), None)];
        for r in put {
            ops.push(TxnOp::put(
                self.key(&format!("config/resources/{}/{}", r.kind.as_str(), r.name)),
                json(r)?,
                None,
            ));
        }
        for (kind, name) in delete {
            ops.push(TxnOp::delete(
                self.key(&format!("config/resources/{}/{name}", kind.as_str())),
                None,
            ));
        }
        // Every module the new resources use is still stored (another replica may be
        // deleting one right now).
        let mut when = vec![Compare::mod_revision(vkey, CompareOp::Equal, revision)];
        let digests: std::collections::BTreeSet<&str> =
            put.iter().flat_map(|r| r.modules()).collect();
        for digest in digests {
            when.push(Compare::create_revision(
                self.key(&format!("modules/meta/{digest}")),
                CompareOp::Greater,
                0,
            ));
        }
        self.txn_marked(when, ops, "config/commit")
    }

    fn instances(&self) -> Result<Vec<Instance>, StoreError> {
        self.get_prefix("instances/")?
            .iter()
            .map(|(k, v)| parse(k, v))
            .collect()
    }

    fn put_instance(&self, instance: &Instance) -> Result<(), StoreError> {
        let txn = Txn::new().and_then([TxnOp::put(
            self.key(&format!("instances/{}", instance.id)),
            json(instance)?,
            None,
        )]);
        self.txn(txn).map(drop)
    }

    fn delete_instances(&self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ops: Vec<TxnOp> = ids
            .iter()
            .map(|id| TxnOp::delete(self.key(&format!("instances/{id}")), None))
            .collect();
        self.txn(Txn::new().and_then(ops)).map(drop)
    }

    fn put_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        let txn = Txn::new().and_then([TxnOp::put(
            self.key(&format!("tokens/{hash}")),
            json(record)?,
            None,
        )]);
        self.txn(txn).map(drop)
    }

    fn dns_answers(&self) -> Result<Vec<(String, Vec<Endpoint>)>, StoreError> {
        let base = self.key("dns/");
        self.get_prefix("dns/")?
            .iter()
            .map(|(k, v)| {
                let name = String::from_utf8_lossy(k);
                Ok((
                    name.strip_prefix(&base).unwrap_or(&name).to_owned(),
                    parse(k, v)?,
                ))
            })
            .collect()
    }

    fn put_dns_answer(&self, name: &str, endpoints: &[Endpoint]) -> Result<(), StoreError> {
        let txn = Txn::new().and_then([TxnOp::put(
            self.key(&format!("dns/{name}")),
            json(&endpoints)?,
            None,
        )]);
        self.txn(txn).map(drop)
    }

    fn redeem_token(&self, hash: &str, now_ms: u64) -> Result<Option<TokenRecord>, StoreError> {
        let rest = format!("tokens/{hash}");
        // Compare-and-swap on the token's revision, so that two redemptions at once cannot
        // both find it unused.
        for _ in 0..8 {
            let (value, revision) = self.get(&rest)?;
            let Some(value) = value else {
                return Ok(None);
            };
            let record: TokenRecord = parse(rest.as_bytes(), &value)?;
            if record.used_ms.is_some() {
                return Ok(Some(record));
            }
            let used = TokenRecord {
                used_ms: Some(now_ms),
                ..record.clone()
            };
            let key = self.key(&rest);
            let when = vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )];
            let ops = vec![TxnOp::put(key, json(&used)?, None)];
            if self.txn_marked(when, ops, &format!("redeemed/{hash}"))? {
                return Ok(Some(record));
            }
        }
        Err(err("a join token kept changing while it was redeemed"))
    }
}
