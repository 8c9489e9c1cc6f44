//! The paxos-commit participant agent: runs beside one PostgreSQL database, executes the
//! statements of each transaction's branch, votes by `PREPARE TRANSACTION`, and finishes
//! with `COMMIT PREPARED` / `ROLLBACK PREPARED` once the coordinator group decided.
//!
//! Tour: [`config`] (TOML + flags), [`startup`] (checks, migrations, identity),
//! [`branches`] (the branch life cycle and recovery), [`coordinators`] (enlist, vote,
//! resolve), [`values`] (typed parameters and rows), [`server`] (gRPC), [`error`].

pub mod branches;
pub mod config;
pub mod coordinators;
pub mod error;
pub mod server;
pub mod startup;
pub mod values;

use crate::branches::Branches;
use crate::config::AgentConfig;
use crate::coordinators::Coordinators;
use crate::server::AgentService;
use paxos_commit_core::Participant;
use paxos_commit_proto::pb::agent_server::AgentServer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Fatal start-up and serving errors.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Startup(String),
    #[error("serving on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
}

pub async fn serve(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr: SocketAddr = cfg
        .listen
        .parse()
        .map_err(|e| ServeError::Startup(format!("listen address {:?}: {e}", cfg.listen)))?;
    let pool = startup::prepare_database(&cfg).await?;
    let me = Participant::new(cfg.participant.clone(), cfg.advertise.clone());
    let coordinators =
        Coordinators::new(&cfg.coordinators, me).map_err(|e| ServeError::Startup(e.to_string()))?;
    let branches = Arc::new(Branches::new(
        cfg.group.clone(),
        pool,
        coordinators,
        cfg.lock_timeout,
    ));
    let in_doubt = branches
        .recover()
        .await
        .map_err(|e| ServeError::Startup(format!("listing prepared transactions: {e}")))?;
    tracing::info!(
        participant = %cfg.participant,
        in_doubt,
        "found {in_doubt} prepared transaction(s) of ours; resolving them through the group"
    );
    let sweeper = branches.clone();
    let (branch_timeout, in_doubt_after) = (cfg.branch_timeout, cfg.in_doubt_after);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            sweeper.sweep(branch_timeout, in_doubt_after).await;
        }
    });
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServer<AgentService>>()
        .await;
    tracing::info!(%addr, participant = %cfg.participant, "agent serving");
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health)
        .add_service(AgentServer::new(AgentService { branches }))
        .serve_with_shutdown(addr, shutdown)
        .await
        .map_err(|source| ServeError::Serve { addr, source })
}
