//! Compiles the walcast event contract (`../../proto`, the same files the
//! daemon uses) with protox (pure Rust, so no `protoc` is needed) and
//! generates the proto3 JSON mapping (serde) with pbjson, exactly as the
//! daemon's own build script does: a gateway's JSON is `walcast tail`'s JSON.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    let descriptors = protox::compile(["walcast/v1/events.proto"], ["../../proto"])?;
    let descriptor_bytes = descriptors.encode_to_vec();
    prost_build::Config::new()
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .boxed(".walcast.v1.ChangeEvent.after.task")
        .boxed(".walcast.v1.ChangeEvent.after.project")
        .boxed(".walcast.v1.ChangeEvent.after.lock")
        .boxed(".walcast.v1.ChangeEvent.before.task_before")
        .boxed(".walcast.v1.ChangeEvent.before.project_before")
        .boxed(".walcast.v1.ChangeEvent.before.lock_before")
        .compile_fds(descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .build(&[".walcast"])?;
    Ok(())
}
