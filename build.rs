//! Compiles `proto/` with protox (pure Rust), so building walcast never needs
//! `protoc`, and generates the proto3 JSON mapping (serde) with pbjson.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["walcast/v1/events.proto"], ["proto"])?;
    let descriptor_bytes = descriptors.encode_to_vec();
    prost_build::Config::new()
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .build(&[".walcast"])?;
    Ok(())
}
