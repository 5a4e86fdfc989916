//! Weft's control service and CLI.
//!
//! `weft-control` stores WASM filter modules and config resources in an embedded database,
//! keeps a registry of service instances, and streams each proxy the snapshot of what it
//! should run over one long-lived discovery stream (xDS semantics: versioned snapshots,
//! ACK/NACK). `weftctl` drives it. The API is `proto/weft/control/v1/control.proto`,
//! described in `docs/control-api.md`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use weft_control::{ControlState, EmbeddedRegistry, RedbStore, Store};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store: Arc<dyn Store> = Arc::new(RedbStore::open("data".as_ref())?);
//! let registry = Box::new(EmbeddedRegistry::load(store.clone())?);
//! let state = Arc::new(ControlState::load(store.clone(), registry)?);
//! let ca = weft_control::MeshCa::load_or_create(
//!     "data".as_ref(),
//!     "weft.local",
//!     None,
//!     std::time::Duration::from_secs(86_400),
//! )?;
//! let identity = weft_control::IdentityService::new(Arc::new(ca), store);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7070").await?;
//! weft_control::serve(state, identity, listener, None, None, std::future::pending()).await?;
//! # Ok(()) }
//! ```

pub mod ca;
pub mod dashboard;
pub mod dns;
pub mod etcd;
pub mod gateway;
pub mod identity;
pub mod inject;
pub mod manifest;
pub mod model;
pub mod module_check;
pub mod registry;
pub mod rollout;
pub mod service;
pub mod snapshot;
pub mod state;
pub mod stats;
pub mod store;
pub mod tap;
pub mod tls;

pub use ca::MeshCa;
pub use identity::IdentityService;
pub use registry::{EmbeddedRegistry, Registry};
pub use service::serve;
pub use state::{ControlError, ControlState};
pub use store::{RedbStore, Store, StoreError};
