//! The Weft control API (`weft.control.v1`): messages and gRPC clients and servers generated
//! from `proto/weft/control/v1/control.proto`, the reference for every field.
//!
//! Only this crate holds generated types; the control service and the proxy convert them at
//! their edges into their own plain structs.

#![allow(missing_docs, clippy::all)]

/// `weft.control.v1`.
pub mod v1 {
    tonic::include_proto!("weft.control.v1");
}
