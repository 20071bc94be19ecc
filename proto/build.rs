//! Compiles `herald/v1/*.proto` with protox (pure Rust, no system `protoc`) and tonic-prost-build,
//! and writes the file descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "herald/v1/common.proto",
        "herald/v1/admin.proto",
        "herald/v1/subscriptions.proto",
        "herald/v1/events.proto",
        "herald/v1/deliveries.proto",
        "herald/v1/agent.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={file}");
    }
    // Imports (google/protobuf/timestamp.proto) are included, so reflection clients can
    // resolve every type from what the server sends.
    let descriptors = protox::Compiler::new(["."])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(files)?
        .file_descriptor_set();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("herald_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `AgentService.Connect` is part of the contract; the generated `connect(dst)` helper
        // would clash with it, so clients are built from a `Channel` instead.
        .build_transport(false)
        // A job's body is the event's payload, shared (not copied) by every job of the event.
        .bytes(".herald.v1.Job.body")
        .compile_fds(descriptors)?;
    Ok(())
}
