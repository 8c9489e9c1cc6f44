//! A paxos-commit coordinator replica: the async shell around the sans-IO core
//! (`paxos-commit-core`).
//!
//! Tour:
//! * [`config`] — TOML file + flags + environment, shared with txctl;
//! * [`log`] — the acceptor's durable log (fsync'd, group-committed, compacted, refused when
//!   damaged); [`dirlock`] — one process per data directory;
//! * [`lifecycle`] — joining, serving, degraded (a stalled disk) or draining (asked to stop);
//! * [`join`] — a new log's admission by every peer, before it acts as a replica;
//! * [`driver`] — the task that owns the core and the log and keeps the persist-then-send rule;
//! * [`peers`] — outbound messages to replicas (batched) and agents;
//! * [`traces`] — each transaction's trace context and open spans, beside the core;
//! * [`server`] — gRPC handlers (Coordinator and Acceptor services);
//! * [`error`] — typed errors and their gRPC status;
//! * [`ops`] — what txctl asks of a whole deployment.

pub mod audit;
pub mod begins;
pub mod causes;
pub mod config;
pub mod dirlock;
pub mod driver;
pub mod error;
pub mod join;
pub mod lifecycle;
pub mod log;
pub mod operator_html;
pub mod operator_page;
pub mod ops;
pub mod outcomes;
pub mod peers;
pub mod recent;
pub mod server;
pub mod traces;

use crate::config::ReplicaConfig;
use crate::dirlock::{DirLock, DirLockError};
use crate::driver::{Command, Driver, Storage};
use crate::error::CoordinatorError;
use crate::lifecycle::Lifecycle;
use crate::log::{DurableLog, LogError};
use crate::outcomes::Archive;
use crate::peers::Peers;
use crate::server::Handle;
use paxos_commit_core::{JoinMode, Record, Replica};
use paxos_commit_proto::pb::acceptor_server::AcceptorServer;
use paxos_commit_proto::pb::coordinator_server::CoordinatorServer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Recovers the replica from its log and serves until `shutdown` resolves, then drains:
/// Begin refused and health NOT_SERVING at once, no more acceptor work for other leaders,
/// the commits it leads decided (at most `drain_timeout`), every stream closed, and return.
pub async fn serve(
    cfg: ReplicaConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let addr: SocketAddr = cfg.listen.parse().map_err(|e| {
        CoordinatorError::InvalidArgument(format!("listen address {:?}: {e}", cfg.listen))
    })?;
    let holder = format!(
        "coordinator replica {} of group {} listening on {}",
        cfg.id, cfg.group, cfg.listen
    );
    let _dir_lock = DirLock::take(&cfg.data_dir, &holder).map_err(|e| match e {
        e @ DirLockError::Held { .. } => CoordinatorError::Refused(e.to_string()),
        e => CoordinatorError::InvalidArgument(e.to_string()),
    })?;
    let (log, records) = open_log(&cfg).await?;
    let (archive, outcomes) = {
        let (dir, keep) = (cfg.data_dir.clone(), cfg.outcome_retention);
        tokio::task::spawn_blocking(move || Archive::open(&dir, keep))
            .await
            .map_err(|e| CoordinatorError::InvalidArgument(format!("archive open task: {e}")))??
    };
    let core = Replica::recover(cfg.core(), rand::random(), &records, 0);
    let stats = core.stats();
    tracing::info!(
        replica = cfg.id,
        replicas = cfg.replicas.len(),
        records = records.len(),
        archived_outcomes = outcomes.len(),
        undecided = stats.undecided,
        rejoined = stats.rejoined,
        "recovered the acceptor log"
    );
    cfg.security.warn_if_insecure("this coordinator replica");
    if let Some(tls) = cfg.security.tls() {
        if tls.role != paxos_commit_proto::tls::Role::Replica(cfg.id) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "this is replica {}, but its certificate names {}",
                cfg.id, tls.role
            )));
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let incarnation = core.incarnation();
    let joining = (!core.is_admitted()).then_some(if stats.rejoined {
        JoinMode::Rejoin
    } else {
        JoinMode::First
    });
    let peers = Peers::start(cfg.id, incarnation, &cfg.replicas, cfg.security.clone())
        .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    if joining.is_some() {
        // Not serving from the first answer: a joining replica is not ready.
        health_reporter
            .set_not_serving::<CoordinatorServer<Handle>>()
            .await;
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    } else {
        health_reporter
            .set_serving::<CoordinatorServer<Handle>>()
            .await;
    }
    if let Some(listen) = &cfg.health_listen {
        paxos_commit_proto::health::serve(listen, health.clone())
            .await
            .map_err(CoordinatorError::InvalidArgument)?;
    }
    let life = Lifecycle::new(health_reporter);
    if joining.is_some() {
        life.set_joining(true);
    }
    let cfg = Arc::new(cfg);
    let handle = Handle::new(cfg.clone(), tx.clone(), life.clone())?;
    tokio::spawn(
        Driver::new(
            core,
            (Storage { log, archive }, outcomes),
            peers,
            rx,
            cfg.max_open_transactions,
            life.clone(),
            cfg.fsync_stall,
        )
        .run(),
    );

    tracing::info!(%addr, group = %cfg.group, tls = cfg.security.tls().is_some(), "coordinator replica serving");
    let mut server = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = cfg.security.tls() {
        server = server
            .tls_config(tls.server_config())
            .map_err(|e| CoordinatorError::InvalidArgument(format!("TLS: {e}")))?;
    }
    if let Some(listen) = &cfg.metrics_listen {
        paxos_commit_proto::metrics::install(listen).map_err(CoordinatorError::InvalidArgument)?;
        tokio::spawn(sample_metrics(handle.clone()));
    }
    let last_audit = audit::LastAudit::default();
    if !cfg.agents.is_empty() && !cfg.audit_interval.is_zero() {
        tokio::spawn(audit::run_periodically(cfg.clone(), last_audit.clone()));
    }
    operator_page::start(cfg.clone(), handle.clone(), last_audit).await?;
    let reflection = paxos_commit_proto::reflection_service()
        .map_err(|e| CoordinatorError::InvalidArgument(format!("reflection: {e}")))?;
    let admitted = {
        let (cfg, commands, life) = (cfg.clone(), tx.clone(), life.clone());
        async move {
            if let (Some(mode), Some(incarnation)) = (joining, incarnation) {
                join::join(cfg, incarnation, mode, commands, life).await?;
            }
            std::future::pending::<Result<(), CoordinatorError>>().await
        }
    };
    let stop = drain_on(shutdown, life.clone(), tx, cfg.drain_timeout);
    let max = paxos_commit_proto::limits::MAX_MESSAGE_BYTES;
    let serving = server
        // Outermost, so that it sees the codes as they leave (after `limits`).
        .layer(paxos_commit_proto::reason::ReasonLayer)
        .layer(paxos_commit_proto::limits::layer())
        .add_service(health)
        .add_service(reflection)
        .add_service(CoordinatorServer::new(handle.clone()).max_decoding_message_size(max))
        .add_service(AcceptorServer::new(handle).max_decoding_message_size(max))
        .serve_with_shutdown(addr, stop);
    tokio::select! {
        served = serving => served
            .map_err(|e| CoordinatorError::InvalidArgument(format!("serving on {addr}: {e}"))),
        // Only a refusal ends this: a peer knows this replica as another incarnation.
        refused = admitted => refused,
        // Every stream is told to end when the replica closes; a connection that still does
        // not finish (a peer that stopped reading) must not hold the process.
        () = async {
            life.closed().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        } => {
            tracing::warn!("connections still open a second after closing; stopping anyway");
            Ok(())
        }
    }
}

/// The stop sequence, after `shutdown` resolves (see [`serve`]). Resolves when the server
/// must stop accepting and close its connections.
async fn drain_on(
    shutdown: impl Future<Output = ()>,
    life: Arc<Lifecycle>,
    commands: mpsc::UnboundedSender<Command>,
    drain_timeout: Duration,
) {
    shutdown.await;
    let started = Instant::now();
    life.start_draining();
    tracing::info!(
        "stopping: Begin refused, NOT_SERVING, no longer an acceptor for other leaders; \
         waiting (at most {drain_timeout:?}) for the commits this replica leads"
    );
    let (reply, drained) = oneshot::channel();
    let finished = commands.send(Command::Drain { reply }).is_ok()
        && tokio::time::timeout(drain_timeout, drained).await.is_ok();
    tracing::info!(
        finished,
        drain_ms = started.elapsed().as_millis() as u64,
        "closing every stream and stopping"
    );
    life.close();
}

/// Opens the acceptor log; with `--rejoin`, first moves a damaged (or lost) one aside and
/// starts a new one under `Record::Rejoined`.
async fn open_log(
    cfg: &ReplicaConfig,
) -> Result<(DurableLog<Record>, Vec<Record>), CoordinatorError> {
    let dir = cfg.data_dir.clone();
    let rejoin = cfg.rejoin;
    tokio::task::spawn_blocking(move || {
        let refused = |e: LogError| match e {
            e @ LogError::Damaged { .. } => CoordinatorError::Refused(e.to_string()),
            e => CoordinatorError::Log(e),
        };
        if !rejoin {
            let (mut log, mut records) = DurableLog::<Record>::open(&dir).map_err(refused)?;
            if !records
                .iter()
                .any(|r| matches!(r, Record::Incarnation { .. }))
            {
                // A new log (or one from before incarnations) is given its life's name
                // before anything else: the replica then joins under it.
                let born = Record::Incarnation {
                    incarnation: new_incarnation(),
                };
                log.append_batch(std::slice::from_ref(&born))?;
                records.push(born);
            }
            return Ok((log, records));
        }
        match DurableLog::<Record>::open(&dir) {
            // A log never admitted (the refused start of a lost one, or a rejoin cut short)
            // holds no promise: it may be set aside like a lost one.
            Ok((_, records)) if !records.is_empty() && !never_admitted(&records) => {
                return Err(CoordinatorError::Refused(format!(
                    "--rejoin is for a replica whose acceptor log is damaged or lost, but the \
                     log in {} is intact ({} records): start it without --rejoin",
                    dir.display(),
                    records.len()
                )))
            }
            Ok(_) | Err(LogError::Damaged { .. }) => {}
            Err(e) => return Err(CoordinatorError::Log(e)),
        }
        let aside = DurableLog::<Record>::set_aside(&dir)?;
        let (mut log, _) = DurableLog::<Record>::open(&dir)?;
        let born = [
            Record::Incarnation {
                incarnation: new_incarnation(),
            },
            Record::Rejoined,
        ];
        log.append_batch(&born)?;
        tracing::warn!(
            moved_to = ?aside,
            "rejoined with an empty acceptor log: this replica answers only for transactions \
             begun after now; the other replicas settle every older one"
        );
        Ok((log, born.to_vec()))
    })
    .await
    .map_err(|e| CoordinatorError::InvalidArgument(format!("log open task: {e}")))?
}

/// Whether a log was born with an incarnation and never admitted: it answered for nothing.
fn never_admitted(records: &[Record]) -> bool {
    records
        .iter()
        .any(|r| matches!(r, Record::Incarnation { .. }))
        && !records.iter().any(|r| matches!(r, Record::Admitted))
}

/// A random name for a new life of this replica (never 0, which the wire reads as none).
fn new_incarnation() -> u64 {
    loop {
        let n: u64 = rand::random();
        if n != 0 {
            return n;
        }
    }
}

/// Sets the replica's gauges once a second from what it tells `txctl cluster`.
async fn sample_metrics(handle: Handle) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Ok(info) = handle.info().await else {
            continue;
        };
        let s = &info.stats;
        // Known to this acceptor and not decided yet: the group's transactions in doubt.
        metrics::gauge!("paxos_commit_transactions_undecided").set(s.undecided as f64);
        metrics::gauge!("paxos_commit_transactions_leading").set(s.leading as f64);
        metrics::gauge!("paxos_commit_transactions_decided_retained")
            .set(s.decided_retained as f64);
        let oldest = s
            .oldest_undecided
            .map_or(0, |(_, since)| info.now_ms.saturating_sub(since));
        metrics::gauge!("paxos_commit_oldest_undecided_seconds").set(oldest as f64 / 1000.0);
        metrics::gauge!("paxos_commit_log_bytes").set(info.log_bytes as f64);
    }
}
