//! A paxos-commit coordinator replica: the async shell around the sans-IO core
//! (`paxos-commit-core`).
//!
//! Tour:
//! * [`config`] — TOML file + flags + environment, shared with txctl;
//! * [`log`] — the acceptor's durable log (fsync'd, group-committed, compacted);
//! * [`driver`] — the task that owns the core and the log and keeps the persist-then-send rule;
//! * [`peers`] — outbound messages to replicas (batched) and agents;
//! * [`server`] — gRPC handlers (Coordinator and Acceptor services);
//! * [`error`] — typed errors and their gRPC status;
//! * [`ops`] — what txctl asks of a whole deployment.

pub mod config;
pub mod driver;
pub mod error;
pub mod log;
pub mod ops;
pub mod peers;
pub mod server;

use crate::config::ReplicaConfig;
use crate::driver::Driver;
use crate::error::CoordinatorError;
use crate::log::DurableLog;
use crate::peers::Peers;
use crate::server::Handle;
use paxos_commit_core::{Record, Replica};
use paxos_commit_proto::pb::acceptor_server::AcceptorServer;
use paxos_commit_proto::pb::coordinator_server::CoordinatorServer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Recovers the replica from its log and serves until `shutdown` resolves.
pub async fn serve(
    cfg: ReplicaConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let addr: SocketAddr = cfg.listen.parse().map_err(|e| {
        CoordinatorError::InvalidArgument(format!("listen address {:?}: {e}", cfg.listen))
    })?;
    let dir = cfg.data_dir.clone();
    let (log, records) = tokio::task::spawn_blocking(move || DurableLog::<Record>::open(&dir))
        .await
        .map_err(|e| CoordinatorError::InvalidArgument(format!("log open task: {e}")))??;
    let epoch = Instant::now();
    let core = Replica::recover(cfg.core(), rand::random(), &records, 0);
    let stats = core.stats();
    tracing::info!(
        replica = cfg.id,
        replicas = cfg.replicas.len(),
        records = records.len(),
        undecided = stats.undecided,
        "recovered the acceptor log"
    );
    let (tx, rx) = mpsc::unbounded_channel();
    let peers = Peers::start(cfg.id, &cfg.replicas, cfg.security.clone())
        .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
    let cfg = Arc::new(cfg);
    let handle = Handle::new(cfg.clone(), tx)?;
    tokio::spawn(Driver::new(core, log, peers, epoch, rx, cfg.max_open_transactions).run());

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<Handle>>()
        .await;
    cfg.security.warn_if_insecure("this coordinator replica");
    if let Some(tls) = cfg.security.tls() {
        if tls.role != paxos_commit_proto::tls::Role::Replica(cfg.id) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "this is replica {}, but its certificate names {}",
                cfg.id, tls.role
            )));
        }
    }
    tracing::info!(%addr, group = %cfg.group, tls = cfg.security.tls().is_some(), "coordinator replica serving");
    let mut server = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = cfg.security.tls() {
        server = server
            .tls_config(tls.server_config())
            .map_err(|e| CoordinatorError::InvalidArgument(format!("TLS: {e}")))?;
    }
    let max = paxos_commit_proto::limits::MAX_MESSAGE_BYTES;
    server
        .layer(paxos_commit_proto::limits::layer())
        .add_service(health)
        .add_service(CoordinatorServer::new(handle.clone()).max_decoding_message_size(max))
        .add_service(AcceptorServer::new(handle).max_decoding_message_size(max))
        .serve_with_shutdown(addr, shutdown)
        .await
        .map_err(|e| CoordinatorError::InvalidArgument(format!("serving on {addr}: {e}")))
}
