//! Persistence behind the [`Store`] trait, and its embedded implementation on redb
//! ([`RedbStore`]): one database file under the data dir, every change one committed
//! transaction, so a restart loses nothing that was acknowledged.
//!
//! A Kubernetes- or etcd-backed store implements the same trait; nothing else changes.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::model::{Endpoint, Instance, Kind, ModuleRecord, Resource};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// What the control service persists. Every method is one atomic change.
pub trait Store: Send + Sync + 'static {
    /// Every module's metadata.
    fn modules(&self) -> Result<Vec<ModuleRecord>, StoreError>;
    /// A module's bytes.
    fn module_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores a module (metadata and bytes) and points `record.name` at it.
    fn put_module(&self, record: &ModuleRecord, bytes: &[u8]) -> Result<(), StoreError>;
    /// Deletes a module (and any name pointing at it), if the config version is still
    /// `config_version` (the one the caller found no resource using it in); `false`
    /// (nothing deleted) when another replica committed config since.
    fn delete_module(&self, digest: &str, config_version: u64) -> Result<bool, StoreError>;
    /// Module names and the digest each points at.
    fn module_names(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Every config resource and the config version.
    fn config(&self) -> Result<(Vec<Resource>, u64), StoreError>;
    /// Writes resource changes and the new config version in one transaction, if the
    /// stored version is still below `version`; `false` (nothing written) when another
    /// replica committed `version` or later first.
    fn commit_config(
        &self,
        version: u64,
        put: &[Resource],
        delete: &[(Kind, String)],
    ) -> Result<bool, StoreError>;
    /// Every registered instance.
    fn instances(&self) -> Result<Vec<Instance>, StoreError>;
    /// Stores or replaces an instance.
    fn put_instance(&self, instance: &Instance) -> Result<(), StoreError>;
    /// Removes instances.
    fn delete_instances(&self, ids: &[String]) -> Result<(), StoreError>;
    /// Stores a join token's record under the hash of the token.
    fn put_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError>;
    /// Redeems a join token, atomically: its record as it was (`used_ms` set if it had been
    /// redeemed before), now marked used at `now_ms`; `None` for an unknown token.
    fn redeem_token(&self, hash: &str, now_ms: u64) -> Result<Option<TokenRecord>, StoreError>;
    /// The last answer kept for every DNS name (so that a restart while DNS is down does
    /// not empty clusters).
    fn dns_answers(&self) -> Result<Vec<(String, Vec<Endpoint>)>, StoreError>;
    /// Keeps the last answer for DNS name `name`.
    fn put_dns_answer(&self, name: &str, endpoints: &[Endpoint]) -> Result<(), StoreError>;
    /// Whether other control services (replicas) write the same store, so that what this
    /// one holds in memory may be behind it.
    fn shared(&self) -> bool {
        false
    }
    /// Whether this replica is the one elected to do singleton work (DNS resolution); a
    /// store of one writer always is.
    fn leads(&self) -> bool {
        true
    }
    /// For a shared store: what changes, as they are seen (written by any replica,
    /// this one included). Taken once; `None` for a store of one writer.
    fn take_changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Changed>> {
        None
    }
}

/// Which parts of a shared store changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Config resources or the config version.
    pub config: bool,
    /// Modules or their names.
    pub modules: bool,
    /// Registered instances.
    pub instances: bool,
    /// DNS answers.
    pub dns: bool,
}

impl Changed {
    /// Everything (after a watch was lost: events may have been missed).
    pub const ALL: Changed = Changed {
        config: true,
        modules: true,
        instances: true,
        dns: true,
    };

    /// Both changes.
    pub fn merge(self, other: Changed) -> Changed {
        Changed {
            config: self.config || other.config,
            modules: self.modules || other.modules,
            instances: self.instances || other.instances,
            dns: self.dns || other.dns,
        }
    }
}

/// A join token as stored (the token itself is not: only its hash is the key).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TokenRecord {
    /// The identity it gives.
    pub spiffe_id: String,
    /// Until when it may be redeemed, in Unix milliseconds.
    pub expires_ms: u64,
    /// When it was redeemed, if it was.
    pub used_ms: Option<u64>,
    /// Redeemable again and again until it expires.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reusable: bool,
}

const MODULES: TableDefinition<&str, &[u8]> = TableDefinition::new("modules");
const MODULE_BYTES: TableDefinition<&str, &[u8]> = TableDefinition::new("module_bytes");
const MODULE_NAMES: TableDefinition<&str, &str> = TableDefinition::new("module_names");
const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("join_tokens");
const DNS: TableDefinition<&str, &[u8]> = TableDefinition::new("dns_answers");

/// The embedded store: `<data-dir>/weft-control.redb`.
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) the database in `data_dir`, creating the directory if needed.
    pub fn open(data_dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError(format!("cannot create {}: {e}", data_dir.display())))?;
        let path = data_dir.join("weft-control.redb");
        let db = Database::create(&path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(err)?;
        {
            txn.open_table(MODULES).map_err(err)?;
            txn.open_table(MODULE_BYTES).map_err(err)?;
            txn.open_table(MODULE_NAMES).map_err(err)?;
            txn.open_table(RESOURCES).map_err(err)?;
            txn.open_table(META).map_err(err)?;
            txn.open_table(INSTANCES).map_err(err)?;
            txn.open_table(TOKENS).map_err(err)?;
            txn.open_table(DNS).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(RedbStore { db })
    }

    fn read_all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(table).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (_, v) = row.map_err(err)?;
            out.push(serde_json::from_slice(v.value()).map_err(err)?);
        }
        Ok(out)
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        f(&txn)?;
        txn.commit().map_err(err)
    }
}

fn json(v: &impl serde::Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(err)
}

fn resource_key(kind: Kind, name: &str) -> String {
    format!("{}/{name}", kind.as_str())
}

impl Store for RedbStore {
    fn modules(&self) -> Result<Vec<ModuleRecord>, StoreError> {
        self.read_all(MODULES)
    }

    fn module_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(MODULE_BYTES).map_err(err)?;
        Ok(t.get(digest).map_err(err)?.map(|v| v.value().to_vec()))
    }

    fn put_module(&self, record: &ModuleRecord, bytes: &[u8]) -> Result<(), StoreError> {
        let meta = json(record)?;
        self.write(|txn| {
            {
                let mut t = txn.open_table(MODULES).map_err(err)?;
                t.insert(record.digest.as_str(), meta.as_slice())
                    .map_err(err)?;
            };
            {
                let mut t = txn.open_table(MODULE_BYTES).map_err(err)?;
                t.insert(record.digest.as_str(), bytes).map_err(err)?;
            };
            {
                let mut t = txn.open_table(MODULE_NAMES).map_err(err)?;
                t.insert(record.name.as_str(), record.digest.as_str())
                    .map_err(err)?;
                Ok(())
            }
        })
    }

    fn delete_module(&self, digest: &str, _config_version: u64) -> Result<bool, StoreError> {
        // One process writes this store, and it checks under its own locks.
        let names: Vec<String> = self
            .module_names()?
            .into_iter()
            .filter(|(_, d)| d == digest)
            .map(|(n, _)| n)
            .collect();
        self.write(|txn| {
            {
                let mut t = txn.open_table(MODULES).map_err(err)?;
                t.remove(digest).map_err(err)?;
            };
            {
                let mut t = txn.open_table(MODULE_BYTES).map_err(err)?;
                t.remove(digest).map_err(err)?;
            };
            let mut t = txn.open_table(MODULE_NAMES).map_err(err)?;
            for n in &names {
                t.remove(n.as_str()).map_err(err)?;
            }
            Ok(())
        })?;
        Ok(true)
    }

    fn module_names(&self) -> Result<Vec<(String, String)>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(MODULE_NAMES).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            out.push((k.value().to_owned(), v.value().to_owned()));
        }
        Ok(out)
    }

    fn config(&self) -> Result<(Vec<Resource>, u64), StoreError> {
        let resources = self.read_all(RESOURCES)?;
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(META).map_err(err)?;
        let version = t
            .get("config_version")
            .map_err(err)?
            .map(|v| v.value())
            .unwrap_or(0);
        Ok((resources, version))
    }

    fn commit_config(
        &self,
        version: u64,
        put: &[Resource],
        delete: &[(Kind, String)],
    ) -> Result<bool, StoreError> {
        let rows = put
            .iter()
            .map(|r| Ok((resource_key(r.kind, &r.name), json(r)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let mut committed = false;
        self.write(|txn| {
            {
                let m = txn.open_table(META).map_err(err)?;
                let stored = m
                    .get("config_version")
                    .map_err(err)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                if stored >= version {
                    return Ok(());
                }
            }
            committed = true;
            let mut t = txn.open_table(RESOURCES).map_err(err)?;
            for (k, v) in &rows {
                t.insert(k.as_str(), v.as_slice()).map_err(err)?;
            }
            for (kind, name) in delete {
                t.remove(resource_key(*kind, name).as_str()).map_err(err)?;
            }
            {
                let mut m = txn.open_table(META).map_err(err)?;
                m.insert("config_version", version).map_err(err)?;
                Ok(())
            }
        })?;
        Ok(committed)
    }

    fn instances(&self) -> Result<Vec<Instance>, StoreError> {
        self.read_all(INSTANCES)
    }

    fn put_instance(&self, instance: &Instance) -> Result<(), StoreError> {
        let v = json(instance)?;
        self.write(|txn| {
            let mut t = txn.open_table(INSTANCES).map_err(err)?;
            t.insert(instance.id.as_str(), v.as_slice()).map_err(err)?;
            Ok(())
        })
    }

    fn delete_instances(&self, ids: &[String]) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut t = txn.open_table(INSTANCES).map_err(err)?;
            for id in ids {
                t.remove(id.as_str()).map_err(err)?;
            }
            Ok(())
        })
    }

    fn put_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        let v = json(record)?;
        self.write(|txn| {
            let mut t = txn.open_table(TOKENS).map_err(err)?;
            t.insert(hash, v.as_slice()).map_err(err)?;
            Ok(())
        })
    }

    fn dns_answers(&self) -> Result<Vec<(String, Vec<Endpoint>)>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(DNS).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            out.push((
                k.value().to_owned(),
                serde_json::from_slice(v.value()).map_err(err)?,
            ));
        }
        Ok(out)
    }

    fn put_dns_answer(&self, name: &str, endpoints: &[Endpoint]) -> Result<(), StoreError> {
        let value = json(&endpoints)?;
        self.write(|txn| {
            let mut t = txn.open_table(DNS).map_err(err)?;
            t.insert(name, value.as_slice()).map_err(err)?;
            Ok(())
        })
    }

    fn redeem_token(&self, hash: &str, now_ms: u64) -> Result<Option<TokenRecord>, StoreError> {
        let mut found = None;
        self.write(|txn| {
            let mut t = txn.open_table(TOKENS).map_err(err)?;
            let record: Option<TokenRecord> = match t.get(hash).map_err(err)? {
                Some(v) => Some(serde_json::from_slice(v.value()).map_err(err)?),
                None => None,
            };
            if let Some(record) = record {
                if record.used_ms.is_none() {
                    let used = TokenRecord {
                        used_ms: Some(now_ms),
                        ..record.clone()
                    };
                    t.insert(hash, json(&used)?.as_slice()).map_err(err)?;
                }
                found = Some(record);
            }
            Ok(())
        })?;
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChainSpec, FilterSpec, Spec};

    #[test]
    fn everything_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let module = ModuleRecord {
            digest: "sha256:ab".into(),
            name: "router".into(),
            size: 3,
            abi_version: "0.2.1".into(),
            created_ms: 1,
            signature: String::new(),
            verified_by: String::new(),
        };
        let chain = Resource {
            kind: Kind::Chain,
            name: "outbound".into(),
            selector: [("app".to_string(), "s1".to_string())].into(),
            version: 4,
            spec: Spec::Chain(ChainSpec {
                listener: "outbound".into(),
                default_cluster: String::new(),
                filters: vec![FilterSpec {
                    name: "router".into(),
                    module: "sha256:ab".into(),
                    root_id: String::new(),
                    vm_id: String::new(),
                    config: serde_json::json!({"routes": []}),
                    config_ref: String::new(),
                    failure_policy: weft_config::FailurePolicy::FailClosed,
                }],
            }),
        };
        let instance = Instance {
            id: "s2/127.0.0.1:1".into(),
            service: "s2".into(),
            address: "127.0.0.1:1".into(),
            labels: Default::default(),
            ttl_seconds: 5,
            weight: 1,
            last_seen_ms: 9,
            identity: "spiffe://weft.local/ns/default/sa/s2".into(),
        };
        {
            let s = RedbStore::open(dir.path()).expect("open");
            s.put_module(&module, b"abc").expect("module");
            assert!(
                s.commit_config(4, std::slice::from_ref(&chain), &[])
                    .expect("config")
            );
            s.put_instance(&instance).expect("instance");
        }
        let s = RedbStore::open(dir.path()).expect("reopen");
        assert_eq!(s.modules().expect("modules"), vec![module]);
        assert_eq!(
            s.module_bytes("sha256:ab").expect("bytes").as_deref(),
            Some(&b"abc"[..])
        );
        assert_eq!(
            s.module_names().expect("names"),
            vec![("router".to_string(), "sha256:ab".to_string())]
        );
        assert_eq!(s.config().expect("config"), (vec![chain], 4));
        assert_eq!(s.instances().expect("instances"), vec![instance]);
        // A version not above the stored one is another writer's: nothing is written.
        assert!(
            !s.commit_config(4, &[], &[(Kind::Chain, "outbound".into())])
                .expect("stale")
        );
        assert!(
            s.commit_config(5, &[], &[(Kind::Chain, "outbound".into())])
                .expect("delete")
        );
        assert!(s.delete_module("sha256:ab", 5).expect("delete module"));
        s.delete_instances(&["s2/127.0.0.1:1".into()])
            .expect("delete instance");
        assert_eq!(s.config().expect("config"), (vec![], 5));
        assert!(s.modules().expect("modules").is_empty());
        assert!(s.module_names().expect("names").is_empty());
        assert!(s.instances().expect("instances").is_empty());
    }
}
