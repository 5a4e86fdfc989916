//! The control service's state in etcd ([`EtcdStore`], `weft-control --store
//! etcd://host:2379,host:2379/prefix`): modules, resources and the config version,
//! registered instances and join tokens, under one key prefix, so that a control service
//! can lose its machine and be started elsewhere with nothing lost.
//!
//! Layout under the prefix (default `/weft`): `modules/meta/<digest>` (JSON record, with
//! the number of byte chunks), `modules/bytes/<digest>/<n>` (chunks of 1 MiB: etcd refuses
//! requests over 1.5 MiB), `modules/names/<name>` (a digest), `config/version` (20 digits),
//! `config/resources/<kind>/<name>`, `instances/<id>`, `tokens/<hash>` (JSON).
//!
//! One writer per prefix for now: the store holds `writer`, a key on a lease it keeps
//! alive, and a second control service on the same prefix is refused at startup, naming
//! the holder. Config commits are compare-and-swap on the version, token redemption on the
//! token's revision, so even a writer that lost its lease cannot overwrite newer state.
//!
//! etcd's client is async and the [`Store`] trait is not: calls run on the store's own
//! runtime thread and the caller waits (at most [`CALL_TIMEOUT`]), from any thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};

use crate::model::{Endpoint, Instance, Kind, ModuleRecord, Resource};
use crate::store::{Store, StoreError, TokenRecord};

/// A key and its value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// The longest a store call waits for etcd.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Module bytes per etcd value.
const CHUNK: usize = 1 << 20;
/// The writer lease's time to live, in seconds.
const WRITER_TTL: i64 = 10;

/// The store in etcd.
pub struct EtcdStore {
    client: Client,
    prefix: String,
    runtime: tokio::runtime::Runtime,
    /// Set when the writer lease could not be kept alive: writes are refused from then on.
    fenced: Arc<AtomicBool>,
    /// The writer lease (0 before it is taken).
    lease: std::sync::atomic::AtomicI64,
}

impl Drop for EtcdStore {
    /// Gives the prefix up at once (a stopped service's lease would hold it for its TTL).
    fn drop(&mut self) {
        let lease = self.lease.load(Ordering::Acquire);
        if lease != 0 {
            let mut client = self.client.clone();
            let _ = self.call(async move { client.lease_revoke(lease).await.map(drop) });
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
    /// answers, and takes the writer key of the prefix for `holder` (this service: host
    /// and listen address). If another service holds it: refuses, or with `standby` waits
    /// until it is free (that service stopped, or its lease ran out).
    pub fn open(url: &str, holder: &str, standby: bool) -> Result<EtcdStore, StoreError> {
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
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let client = runtime
            .block_on(async {
                let mut client = Client::connect(&endpoints, Some(options)).await?;
                // Connecting is lazy: ask something to know that it answers.
                client.status().await?;
                Ok::<_, etcd_client::Error>(client)
            })
            .map_err(|e| StoreError(format!("etcd at {}: {e}", endpoints.join(","))))?;
        let store = EtcdStore {
            client,
            prefix,
            runtime,
            fenced: Arc::new(AtomicBool::new(false)),
            lease: 0.into(),
        };
        let mut said = false;
        loop {
            match store.take_writer(holder) {
                Ok(()) => break,
                Err(e) if standby && e.0.contains("another control service") => {
                    if !said {
                        tracing::warn!("standing by: {e}");
                        said = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
        if said {
            tracing::warn!(prefix = %store.prefix, "the prefix is free: taking over");
        }
        Ok(store)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    /// Runs `f` on the store's runtime and waits for it, from any thread.
    fn call<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let r = tokio::time::timeout(CALL_TIMEOUT, f).await;
            let _ = tx.send(r);
        });
        match rx.recv() {
            Ok(Ok(r)) => r.map_err(err),
            Ok(Err(_)) => Err(err(format!("no answer within {}s", CALL_TIMEOUT.as_secs()))),
            Err(_) => Err(err("the store's runtime stopped")),
        }
    }

    fn writable(&self) -> Result<(), StoreError> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(StoreError(
                "etcd: this control service lost its writer lease; restart it".into(),
            ));
        }
        Ok(())
    }

    /// Every (key, value) under `rest`.
    fn get_prefix(&self, rest: &str) -> Result<Vec<KeyValue>, StoreError> {
        let mut kv = self.client.kv_client();
        let key = self.key(rest);
        self.call(async move {
            let r = kv.get(key, Some(GetOptions::new().with_prefix())).await?;
            Ok(r.kvs()
                .iter()
                .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
                .collect())
        })
    }

    /// The value of `rest` and its mod revision (0: absent).
    fn get(&self, rest: &str) -> Result<(Option<Vec<u8>>, i64), StoreError> {
        let mut kv = self.client.kv_client();
        let key = self.key(rest);
        self.call(async move {
            let r = kv.get(key, None).await?;
            Ok(match r.kvs().first() {
                Some(kv) => (Some(kv.value().to_vec()), kv.mod_revision()),
                None => (None, 0),
            })
        })
    }

    /// Runs `txn`; whether its comparisons held.
    fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        self.writable()?;
        let mut kv = self.client.kv_client();
        self.call(async move { Ok(kv.txn(txn).await?.succeeded()) })
    }

    /// Creates `writer` on a lease kept alive by a task on the store's runtime; refuses if
    /// another holder has it. A lease that cannot be kept alive fences the store.
    fn take_writer(&self, holder: &str) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let key = self.key("writer");
        let holder = holder.to_owned();
        let (lease, taken) = self.call({
            let key = key.clone();
            async move {
                let lease = client.lease_grant(WRITER_TTL, None).await?.id();
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key,
                        holder,
                        Some(PutOptions::new().with_lease(lease)),
                    )]);
                let taken = client.kv_client().txn(txn).await?.succeeded();
                if !taken {
                    client.lease_revoke(lease).await?;
                }
                Ok((lease, taken))
            }
        })?;
        if !taken {
            let (who, _) = self.get("writer")?;
            return Err(StoreError(format!(
                "etcd: another control service ({}) uses {}; one per prefix (its lease \
                 lasts {WRITER_TTL}s after it stops)",
                who.map(|w| String::from_utf8_lossy(&w).into_owned())
                    .unwrap_or_default(),
                self.prefix
            )));
        }
        self.lease.store(lease, Ordering::Release);
        let mut client = self.client.clone();
        let fenced = self.fenced.clone();
        self.runtime.spawn(async move {
            let lost = async {
                let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
                loop {
                    keeper.keep_alive().await?;
                    match answers.message().await? {
                        Some(a) if a.ttl() > 0 => {}
                        _ => return Ok::<_, etcd_client::Error>("the lease expired".to_owned()),
                    }
                    tokio::time::sleep(Duration::from_secs(WRITER_TTL as u64 / 3)).await;
                }
            }
            .await;
            let why = match lost {
                Ok(why) => why,
                Err(e) => e.to_string(),
            };
            fenced.store(true, Ordering::Release);
            tracing::error!(
                "etcd: the writer lease is lost ({why}); writes are refused from now on"
            );
        });
        Ok(())
    }
}

impl Store for EtcdStore {
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
        self.writable()?;
        // The bytes first, chunk by chunk (content-addressed: rewriting them is harmless),
        // then the record and the name in one transaction: a module is listed only once
        // its bytes are whole.
        let digest = &record.digest;
        let chunks: Vec<&[u8]> = bytes.chunks(CHUNK).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut kv = self.client.kv_client();
            let (key, value) = (
                self.key(&format!("modules/bytes/{digest}/{i}")),
                chunk.to_vec(),
            );
            self.call(async move { kv.put(key, value, None).await.map(drop) })?;
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

    fn delete_module(&self, digest: &str) -> Result<(), StoreError> {
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
        self.txn(Txn::new().and_then(ops)).map(drop)
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
        let resources = self
            .get_prefix("config/resources/")?
            .iter()
            .map(|(k, v)| parse(k, v))
            .collect::<Result<_, _>>()?;
        let (version, _) = self.get("config/version")?;
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
    ) -> Result<(), StoreError> {
        // Compare-and-swap on the version: nobody else committed since it was read.
        let (stored, revision) = self.get("config/version")?;
        let stored: u64 = stored
            .map(|v| String::from_utf8_lossy(&v).parse().unwrap_or(u64::MAX))
            .unwrap_or(0);
        if stored >= version {
            return Err(err(format!(
                "config version {stored} is in the store, {version} was to be written: \
                 another control service changed it"
            )));
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
        let txn = Txn::new()
            .when([Compare::mod_revision(vkey, CompareOp::Equal, revision)])
            .and_then(ops);
        if !self.txn(txn)? {
            return Err(err(
                "the config version changed under this commit: another control service changed it",
            ));
        }
        Ok(())
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
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(key, json(&used)?, None)]);
            if self.txn(txn)? {
                return Ok(Some(record));
            }
        }
        Err(err("a join token kept changing while it was redeemed"))
    }
}
