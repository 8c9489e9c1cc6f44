//! The wire protocol of paxos-commit (generated from `proto/paxoscommit.proto`) and a thin
//! client library that tests, the demo and applications use.

pub mod pb {
    tonic::include_proto!("paxoscommit.v1");
}

pub mod client;
