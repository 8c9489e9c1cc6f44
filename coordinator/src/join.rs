//! Admission at startup: a replica whose acceptor log is new asks every peer to record its
//! incarnation before it acts as a replica (`paxos_commit_core::admission` says why).
//!
//! Every peer must answer, not a majority: the peer that remembers this replica's earlier
//! life may be the only one that does. So a group's first start waits for all of its
//! replicas, and a replica that lost its volume is refused (exit 78) by any peer that still
//! remembers it, instead of coming back as an acceptor with amnesia.

use crate::config::ReplicaConfig;
use crate::driver::Command;
use crate::error::CoordinatorError;
use crate::lifecycle::Lifecycle;
use paxos_commit_core::{JoinMode, ReplicaId};
use paxos_commit_proto::client::lazy_channel;
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::acceptor_client::AcceptorClient;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long one Join call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Between rounds of asking the peers that have not answered yet.
const RETRY: Duration = Duration::from_secs(1);
/// How often the peers still awaited are logged.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Asks the peers that have not admitted this replica yet, round after round, and forwards
/// each answer to the core, until the core says it is admitted (made durable), then turns
/// the replica SERVING. Fails with `Refused` when a peer knows this
/// replica as another incarnation.
pub async fn join(
    cfg: Arc<ReplicaConfig>,
    incarnation: u64,
    mode: JoinMode,
    commands: mpsc::UnboundedSender<Command>,
    life: Arc<Lifecycle>,
) -> Result<(), CoordinatorError> {
    let mut pending: BTreeMap<ReplicaId, AcceptorClient<tonic::transport::Channel>> =
        BTreeMap::new();
    for (i, address) in cfg.replicas.iter().enumerate() {
        let i = i as ReplicaId;
        if i != cfg.id {
            let channel = lazy_channel(address, Some(CALL_TIMEOUT), &cfg.security)
                .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
            pending.insert(i, AcceptorClient::new(channel));
        }
    }
    let pb_mode = match mode {
        JoinMode::First => pb::JoinMode::First,
        JoinMode::Rejoin => pb::JoinMode::Rejoin,
    };
    tracing::info!(
        incarnation,
        ?mode,
        peers = pending.len(),
        "this replica's acceptor log is new: asking every peer to admit it before it acts"
    );
    let started = Instant::now();
    let mut reported = Instant::now();
    let gone = || CoordinatorError::ShuttingDown;
    loop {
        let mut why: BTreeMap<ReplicaId, String> = BTreeMap::new();
        let mut answered = Vec::new();
        for (&peer, client) in pending.iter_mut() {
            let request = pb::JoinRequest {
                incarnation,
                mode: pb_mode.into(),
                replica: cfg.id,
            };
            match client.join(request).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    if !answer.admitted {
                        return Err(CoordinatorError::Refused(format!(
                            "replica {peer} knows this replica (replica {}) as incarnation {}, \
                             not as this new log's {incarnation}: the acceptor log that was in \
                             {} is lost, and starting it as new could let two outcomes be \
                             chosen. Restore the volume that held it, or start this replica \
                             with --rejoin (README, runbook \"A damaged or lost acceptor log\")",
                            cfg.id,
                            answer.known_incarnation,
                            cfg.data_dir.display()
                        )));
                    }
                    commands
                        .send(Command::JoinAnswered {
                            from: peer,
                            incarnation: answer.incarnation,
                        })
                        .map_err(|_| gone())?;
                    answered.push(peer);
                }
                // Waiting cannot mend these: the certificates or the replica lists disagree.
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::PermissionDenied
                            | tonic::Code::InvalidArgument
                            | tonic::Code::Unauthenticated
                    ) =>
                {
                    return Err(CoordinatorError::Refused(format!(
                        "replica {peer} refuses this replica's join: {} (check the \
                         certificates and that every replica has the same replica list)",
                        status.message()
                    )));
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    why.insert(
                        peer,
                        "it runs a version from before incarnations: upgrade it".into(),
                    );
                }
                Err(status) => {
                    why.insert(peer, format!("{:?}: {}", status.code(), status.message()));
                }
            }
        }
        for peer in answered {
            pending.remove(&peer);
        }
        // Whether that is every peer is the core's rule, not this loop's.
        let (reply, admitted) = oneshot::channel();
        commands
            .send(Command::TryAdmit { reply })
            .map_err(|_| gone())?;
        if admitted.await.map_err(|_| gone())? {
            break;
        }
        if reported.elapsed() >= REPORT_EVERY {
            reported = Instant::now();
            tracing::warn!(
                waiting_s = started.elapsed().as_secs(),
                ?why,
                "still waiting for these replicas to admit this one: a new log needs every \
                 peer's word that this replica never ran as another incarnation"
            );
        }
        tokio::time::sleep(RETRY).await;
    }
    life.set_joining(false);
    tracing::info!(
        incarnation,
        join_ms = started.elapsed().as_millis() as u64,
        "every peer admitted this replica: serving"
    );
    Ok(())
}
