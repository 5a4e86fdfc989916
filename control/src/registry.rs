//! Service registry behind the [`Registry`] trait, and the embedded implementation
//! ([`EmbeddedRegistry`]): instances live in memory with their last heartbeat and are
//! persisted through the [`Store`] on register, deregister and expiry. Heartbeats are not
//! written to disk; after a restart every stored instance gets one full TTL to heartbeat
//! again before it expires.
//!
//! A Kubernetes-backed registry (Endpoints/EndpointSlices) implements the same trait.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::model::{Instance, now_ms};
use crate::state::ControlError;
use crate::store::Store;

/// Where service instances come from.
pub trait Registry: Send + Sync + 'static {
    /// Registers or replaces an instance (its id is `<service>/<address>`).
    fn register(&self, instance: Instance) -> Result<Instance, ControlError>;
    /// Renews an instance's TTL.
    fn heartbeat(&self, id: &str) -> Result<Instance, ControlError>;
    /// Removes an instance.
    fn deregister(&self, id: &str) -> Result<Instance, ControlError>;
    /// Every live instance, sorted by id.
    fn instances(&self) -> Vec<Instance>;
    /// Removes the instances whose TTL ran out by `now_ms`; returns them.
    fn expire(&self, now_ms: u64) -> Result<Vec<Instance>, ControlError>;
    /// Reads the instances again from a shared store (other replicas register too);
    /// whether they changed.
    fn refresh(&self) -> Result<bool, ControlError> {
        Ok(false)
    }
}

/// The embedded registry.
pub struct EmbeddedRegistry {
    store: Arc<dyn Store>,
    instances: Mutex<BTreeMap<String, Instance>>,
}

impl EmbeddedRegistry {
    /// Loads the stored instances, each renewed as of now.
    pub fn load(store: Arc<dyn Store>) -> Result<EmbeddedRegistry, ControlError> {
        let now = now_ms();
        let instances = store
            .instances()?
            .into_iter()
            .map(|mut i| {
                i.last_seen_ms = now;
                (i.id.clone(), i)
            })
            .collect();
        Ok(EmbeddedRegistry {
            store,
            instances: Mutex::new(instances),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Instance>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Registry for EmbeddedRegistry {
    fn register(&self, mut instance: Instance) -> Result<Instance, ControlError> {
        instance.id = format!("{}/{}", instance.service, instance.address);
        instance.last_seen_ms = now_ms();
        let mut instances = self.lock();
        self.store.put_instance(&instance)?;
        instances.insert(instance.id.clone(), instance.clone());
        Ok(instance)
    }

    fn heartbeat(&self, id: &str) -> Result<Instance, ControlError> {
        let mut instances = self.lock();
        let i = instances.get_mut(id).ok_or_else(|| {
            ControlError::NotFound(format!("instance `{id}` (expired or never registered)"))
        })?;
        i.last_seen_ms = now_ms();
        Ok(i.clone())
    }

    fn deregister(&self, id: &str) -> Result<Instance, ControlError> {
        // The store is written under the lock, so a concurrent register of the same id
        // cannot be undone on disk by this removal.
        let mut instances = self.lock();
        if !instances.contains_key(id) {
            return Err(ControlError::NotFound(format!("instance `{id}`")));
        }
        self.store.delete_instances(&[id.to_owned()])?;
        instances
            .remove(id)
            .ok_or_else(|| ControlError::NotFound(format!("instance `{id}`")))
    }

    fn instances(&self) -> Vec<Instance> {
        self.lock().values().cloned().collect()
    }

    fn expire(&self, now_ms: u64) -> Result<Vec<Instance>, ControlError> {
        let mut instances = self.lock();
        let ids: Vec<String> = instances
            .values()
            .filter(|i| now_ms > i.last_seen_ms + u64::from(i.ttl_seconds) * 1000)
            .map(|i| i.id.clone())
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Under the lock, as in `deregister`.
        self.store.delete_instances(&ids)?;
        Ok(ids.iter().filter_map(|id| instances.remove(id)).collect())
    }
}
