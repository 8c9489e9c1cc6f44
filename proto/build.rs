//! Compiles `proto/*.proto` with protox (pure Rust), so a fresh machine needs no `protoc`; and
//! keeps the encoded descriptors for gRPC reflection (grpcurl lists and calls the services).
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/paxoscommit.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("paxoscommit_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
