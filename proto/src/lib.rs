//! The wire protocol of paxos-commit (generated from `proto/paxoscommit.proto`), its mapping
//! onto the core's types, and a thin client library that tests, the demo and applications use.

pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("paxoscommit.v1");
}

pub mod client;
pub mod convert;

/// Resolves on Ctrl-C or SIGTERM: how every server of the project is told to stop.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
