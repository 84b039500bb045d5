//! Compiles the vendored protos with protox (a protobuf compiler in Rust: no `protoc` on the
//! build machine) and generates prost messages from them. Only messages: the client that
//! speaks the service is the data plane's own (HTTP/2 on the shards).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/vllm_engine.proto", "proto/common.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
