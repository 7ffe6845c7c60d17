//! Compiles the .proto files with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        ["sonde/v1/fleet.proto", "prometheus/remote.proto"],
        ["proto"],
    )?;
    // The service's client and server code only with the `grpc` feature: without it
    // the crate is the messages alone, and pulls in no gRPC runtime.
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .compile_fds(fds)?;
    Ok(())
}
