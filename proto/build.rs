//! Generates the control API's types and services from `weft/control/v1/control.proto`
//! with a pure-Rust protobuf compiler (protox): no `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "weft/control/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
