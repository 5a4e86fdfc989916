//! The control API's requests as they arrive (protobuf bytes): decoding never panics, and an
//! `ApplyRequest` that decodes goes through the service's conversion and a dry-run apply
//! (the whole validation, storing nothing) to a clear answer.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_control::registry::EmbeddedRegistry;
use weft_control::state::ControlState;
use weft_control::store::RedbStore;
use weft_proto::v1;

/// One control state for the process, in a temporary directory.
fn state() -> &'static ControlState {
    static STATE: OnceLock<(tempfile::TempDir, ControlState)> = OnceLock::new();
    &STATE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let store: Arc<dyn weft_control::store::Store> =
                Arc::new(RedbStore::open(dir.path()).expect("store"));
            let registry = EmbeddedRegistry::load(store.clone()).expect("registry");
            let state = ControlState::load(store, Box::new(registry)).expect("state");
            (dir, state)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            if let Ok(req) = v1::ApplyRequest::decode(bytes) {
                let resources: Result<Vec<_>, _> = req
                    .resources
                    .into_iter()
                    .map(weft_control::service::resource_from)
                    .collect();
                if let Ok(resources) = resources {
                    let _ = state().apply(resources, true);
                }
            }
        }
        1 => {
            let _ = v1::RegisterRequest::decode(bytes);
        }
        2 => {
            let _ = v1::DiscoveryRequest::decode(bytes);
        }
        3 => {
            let _ = v1::PushChunk::decode(bytes);
        }
        4 => {
            let _ = v1::DeleteResourceRequest::decode(bytes);
        }
        _ => {
            let _ = v1::HeartbeatRequest::decode(bytes);
        }
    }
});
