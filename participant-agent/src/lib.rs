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
pub mod db_tls;
pub mod error;
pub mod guard;
pub mod numeric;
pub mod server;
pub mod startup;
pub mod values;

use crate::branches::{BranchSettings, Branches};
use crate::config::AgentConfig;
use crate::coordinators::Coordinators;
use crate::server::AgentService;
use paxos_commit_core::Participant;
use paxos_commit_proto::pb::agent_server::AgentServer;
use paxos_commit_proto::tls::Gate;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

impl paxos_commit_proto::ServeFailure for ServeError {
    fn exit_code(&self) -> u8 {
        match self {
            ServeError::Refused(_) => paxos_commit_proto::EXIT_REFUSED,
            _ => 1,
        }
    }
}

/// Fatal start-up and serving errors.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Startup(String),
    /// Starting (or going on) could be unsafe: another agent serves this participant.
    #[error("refused to start: {0}")]
    Refused(String),
    #[error("serving on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
}

/// How long the server may take to close its connections once the branches are drained.
const SERVER_STOP_GRACE: Duration = Duration::from_secs(1);

/// What the agent does when told to stop (resolves when it has, and the server may close):
/// it tells health checks it is not serving, takes no new branches, lets the statements and
/// PREPAREs already running finish for at most `drain`, rolls back its open branches (their
/// row locks go, their transactions abort), leaves its prepared branches to the next start's
/// recovery, and ends the replicas' message streams.
async fn stop(
    shutdown: impl Future<Output = ()>,
    branches: Arc<Branches>,
    health: tonic_health::server::HealthReporter,
    drain: Duration,
    stop_streams: tokio::sync::watch::Sender<bool>,
    drained: tokio::sync::oneshot::Sender<()>,
) {
    shutdown.await;
    let started = std::time::Instant::now();
    health.set_not_serving::<AgentServer<AgentService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    tracing::info!(
        open = branches.open_count(),
        "stopping: taking no new branches; draining for at most {drain:?}"
    );
    let stopped = branches.shut_down(drain).await;
    tracing::info!(
        rolled_back = stopped.rolled_back,
        prepared = stopped.prepared,
        cancelled = stopped.cancelled,
        busy = stopped.busy,
        took_ms = started.elapsed().as_millis() as u64,
        "stopped the branches: rolled back {} open ({} of them after cancelling a statement \
         that outlived the drain), left prepared {} (the next start resolves them), {} still \
         busy (closed with the process)",
        stopped.rolled_back,
        stopped.cancelled,
        stopped.prepared,
        stopped.busy
    );
    let _ = stop_streams.send(true);
    let _ = drained.send(());
}

pub async fn serve(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr: SocketAddr = cfg
        .listen
        .parse()
        .map_err(|e| ServeError::Startup(format!("listen address {:?}: {e}", cfg.listen)))?;
    // One live agent per database and participant: taken before the migrations run, held
    // for the life of the process.
    let lock = startup::take_agent_lock(&cfg).await?;
    let pool = startup::prepare_database(&cfg).await?;
    let me = Participant::new(cfg.participant.clone(), cfg.advertise.clone());
    let coordinators = Coordinators::new(&cfg.coordinators, me, &cfg.security)
        .map_err(|e| ServeError::Startup(e.to_string()))?;
    let branches = Arc::new(Branches::with_settings(
        cfg.group.clone(),
        pool,
        coordinators,
        BranchSettings::from_config(&cfg),
    ));
    if let Some(listen) = &cfg.metrics_listen {
        paxos_commit_proto::metrics::install(listen).map_err(ServeError::Startup)?;
        tokio::spawn(sample_metrics(branches.clone()));
    }
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
        while !sweeper.is_stopping() {
            tick.tick().await;
            sweeper.sweep(branch_timeout, in_doubt_after).await;
        }
    });
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServer<AgentService>>()
        .await;
    if let Some(listen) = &cfg.health_listen {
        paxos_commit_proto::health::serve(listen, health.clone())
            .await
            .map_err(ServeError::Startup)?;
    }
    let (stop_streams, stopped) = tokio::sync::watch::channel(false);
    let (drained_tx, drained) = tokio::sync::oneshot::channel::<()>();
    let stopping = stop(
        shutdown,
        branches.clone(),
        health_reporter,
        cfg.drain_timeout,
        stop_streams,
        drained_tx,
    );
    cfg.security.warn_if_insecure("this agent");
    tracing::info!(
        %addr,
        participant = %cfg.participant,
        tls = cfg.security.tls().is_some(),
        "agent serving"
    );
    let mut server = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = cfg.security.tls() {
        server = server
            .tls_config(tls.server_config())
            .map_err(|e| ServeError::Startup(format!("TLS: {e}")))?;
    }
    let reflection = paxos_commit_proto::reflection_service()
        .map_err(|e| ServeError::Startup(format!("reflection: {e}")))?;
    let service = AgentService {
        branches,
        gate: Gate::new(&cfg.security, cfg.max_concurrent_calls),
        stopped,
    };
    let serving = server
        // Outermost, so that it sees the codes as they leave (after `limits`).
        .layer(paxos_commit_proto::reason::ReasonLayer)
        .layer(paxos_commit_proto::limits::layer())
        .add_service(health)
        .add_service(reflection)
        .add_service(
            AgentServer::new(service)
                .max_decoding_message_size(paxos_commit_proto::limits::MAX_MESSAGE_BYTES),
        )
        .serve_with_shutdown(addr, stopping);
    // Connections that outlive the drain (a call still waiting, a health watch) must not keep
    // a stopped agent alive: past the grace they are closed with the process.
    let overdue = async {
        if drained.await.is_err() {
            return std::future::pending().await;
        }
        tokio::time::sleep(SERVER_STOP_GRACE).await;
    };
    tokio::select! {
        served = serving => served.map_err(|source| ServeError::Serve { addr, source }),
        () = overdue => {
            tracing::warn!(
                "connections still open {SERVER_STOP_GRACE:?} after the drain; closing them"
            );
            Ok(())
        }
        // Another agent took this database's lock (ours was lost with its connection): two
        // agents must never serve one participant, so this one stops.
        fenced = lock.hold() => Err(fenced),
    }
}

/// Sets the agent's gauges every second: its prepared branches as PostgreSQL lists them
/// (a prepared transaction holds its locks and holds back VACUUM until it is finished, which
/// PostgreSQL itself never complains about), and its connection pool.
async fn sample_metrics(branches: Arc<Branches>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !branches.is_stopping() {
        every.tick().await;
        if let Ok(prepared) = branches.list_prepared().await {
            let oldest = prepared.iter().map(|p| p.age_ms).max().unwrap_or(0);
            metrics::gauge!("paxos_commit_agent_prepared_branches").set(prepared.len() as f64);
            metrics::gauge!("paxos_commit_agent_oldest_prepared_seconds")
                .set(oldest as f64 / 1000.0);
        }
        let pool = branches.pool_status();
        let in_use = pool.size.saturating_sub(pool.available);
        metrics::gauge!("paxos_commit_agent_pool_connections", "state" => "in_use")
            .set(in_use as f64);
        metrics::gauge!("paxos_commit_agent_pool_connections", "state" => "idle")
            .set(pool.available as f64);
        metrics::gauge!("paxos_commit_agent_pool_waiting").set(pool.waiting as f64);
    }
}
