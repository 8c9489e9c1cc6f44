//! The agent's gRPC face: check who calls, parse, call the branch manager, map errors to
//! statuses; and the replicas' message stream (Prepare, Decide, answers to enlistments).
//!
//! The agent finishes a prepared branch only on a replica's word (the message stream, whose
//! caller must hold a replica certificate) or after asking the group itself (an operator's
//! Decide); a heuristic decision needs an operator, `force`, and the same checks txctl shows,
//! run here again, and it leaves a row in `paxos_commit.heuristic_log`.

use crate::branches::{Branches, ProofRow};
use crate::error::AgentError;
use paxos_commit_core::{Msg, ReplicaId, TxnId};
use paxos_commit_proto::convert::{
    delivered_from_pb, outcome_from_pb, txid_from_pb, txids_from_pb, Delivered,
};
use paxos_commit_proto::pb;
use paxos_commit_proto::phase_span;
use paxos_commit_proto::telemetry::{set_parent, TraceParent};
use paxos_commit_proto::tls::{Caller, Gate, Kind, Role};
use std::sync::Arc;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

#[derive(Clone)]
pub struct AgentService {
    pub branches: Arc<Branches>,
    pub gate: Gate,
    /// Becomes true once the agent has drained and is stopping: the replicas' message
    /// streams end then, or the server would wait for them for ever (they never end on
    /// their own).
    pub stopped: tokio::sync::watch::Receiver<bool>,
}

/// Runs a branch operation to completion on its own task. tonic drops a handler's future when
/// the caller goes away (a replica killed mid-RPC); dropped halfway through, a PREPARE
/// TRANSACTION could complete in PostgreSQL while the branch's state says otherwise.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, AgentError>> + Send + 'static,
) -> Result<T, Status> {
    match tokio::spawn(work).await {
        Ok(result) => result.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("branch task failed: {e}"))),
    }
}

/// The agent's share of a transaction's phases: a statement (execute), PREPARE TRANSACTION
/// and the vote (prepare), COMMIT / ROLLBACK PREPARED and its acknowledgement (apply).
fn phase_took(phase: &'static str, started: std::time::Instant) {
    metrics::histogram!("paxos_commit_agent_phase_seconds", "phase" => phase)
        .record(started.elapsed().as_secs_f64());
}

fn txid(s: &str) -> Result<TxnId, Status> {
    txid_from_pb(s).map_err(|e| AgentError::BadRequest(e.to_string()).into())
}

impl AgentService {
    /// Acts on one message from a replica. Branch work runs on its own task, as a unary
    /// call's would: the stream goes on with the next message meanwhile. Its span continues
    /// the trace the message carried, if any.
    fn delivered(&self, caller: &Caller, d: Delivered, trace: Option<TraceParent>) {
        match d {
            Delivered::Msg(_, Msg::Prepare { txn, participants }) => {
                let branches = self.branches.clone();
                let span = phase_span!("prepare", txid = %txn);
                set_parent(&span, trace.as_ref());
                tokio::spawn(
                    async move {
                        let started = std::time::Instant::now();
                        if let Err(e) = branches.prepare(txn, participants).await {
                            // No vote leaves; the group's recovery settles the instance.
                            tracing::warn!(%txn, "prepare failed: {e}");
                        }
                        phase_took("prepare", started);
                    }
                    .instrument(span),
                );
            }
            Delivered::Msg(claimed, Msg::Decide { txn, outcome }) => {
                // The acknowledgement goes to the replica that really sent it.
                let replicas = self.branches.coordinators().replicas().len() as u32;
                let Some(from) = caller.replica_or(claimed).filter(|r| *r < replicas) else {
                    return;
                };
                let branches = self.branches.clone();
                let span = phase_span!("apply", txid = %txn, ?outcome);
                set_parent(&span, trace.as_ref());
                tokio::spawn(
                    async move {
                        let started = std::time::Instant::now();
                        decide_and_acknowledge(branches, txn, outcome, from).await;
                        phase_took("apply", started);
                    }
                    .instrument(span),
                );
            }
            Delivered::Enlisted { txn, code, message } => {
                self.branches.coordinators().enlisted(txn, code, message)
            }
            other => tracing::warn!("unexpected message for an agent: {other:?}"),
        }
    }
}

/// Applies a decision and tells the replica that sent it, which retries until it hears so.
async fn decide_and_acknowledge(
    branches: Arc<Branches>,
    txn: TxnId,
    outcome: paxos_commit_core::Outcome,
    from: ReplicaId,
) {
    match branches.decide(txn, outcome).await {
        Ok(()) => {
            metrics::counter!(
                "paxos_commit_agent_decisions_applied_total",
                "outcome" => if outcome == paxos_commit_core::Outcome::Committed { "committed" } else { "aborted" }
            )
            .increment(1);
            branches.coordinators().applied(txn, from)
        }
        // The database contradicts the group (a hand-made COMMIT PREPARED, a heuristic):
        // an operator must look. The branch never prepared: the group decided without it.
        Err(e @ AgentError::Conflict { .. }) => {
            tracing::error!(%txn, %outcome, "the group's decision cannot be applied here: {e}")
        }
        Err(e @ AgentError::NotPrepared { .. }) => {
            tracing::warn!(%txn, %outcome, "decision for a branch that never prepared: {e}")
        }
        // Retried by the replicas until it is applied (a database restarting, say).
        Err(e) => tracing::debug!(%txn, "decision not applied yet: {e}"),
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn execute(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let span = phase_span!("execute", txid = tracing::field::Empty);
        set_parent(&span, TraceParent::from_metadata(req.metadata()).as_ref());
        let _admitted = self.gate.admit(&req, "Agent.Execute", &[Kind::Client])?;
        let req = req.into_inner();
        let txn = txid(&req.txid)?;
        span.record("txid", tracing::field::display(txn));
        let branches = self.branches.clone();
        let started = std::time::Instant::now();
        let resp = detached(
            async move { branches.execute(txn, req.seq, &req.sql, &req.params).await }
                .instrument(span),
        )
        .await;
        phase_took("execute", started);
        let resp = resp?;
        Ok(Response::new(resp))
    }

    async fn deliver_stream(
        &self,
        req: Request<tonic::Streaming<pb::PaxosBatch>>,
    ) -> Result<Response<pb::Empty>, Status> {
        // Prepare and Decide come from replicas only: a decision from anyone else could commit
        // this branch while another database aborts its own.
        let caller = self
            .gate
            .allow(&req, "Agent.DeliverStream", &[Kind::Replica])?;
        let mut stream = req.into_inner();
        let mut stopped = self.stopped.clone();
        loop {
            let batch = tokio::select! {
                batch = stream.message() => batch?,
                // The sender opens a new stream, to this agent's successor.
                _ = stopped.wait_for(|s| *s) => None,
            };
            let Some(batch) = batch else { break };
            for m in &batch.messages {
                match delivered_from_pb(m) {
                    Ok(d) => self.delivered(&caller, d, TraceParent::from_pb(m)),
                    // One bad message must not cost the others on the stream.
                    Err(e) => tracing::warn!("dropping a message from a replica: {e}"),
                }
            }
        }
        Ok(Response::new(pb::Empty {}))
    }

    /// An operator's Decide (txctl resolve) is applied only when the group chose that
    /// outcome: the agent asks the group itself (a replica takes the transaction over if it
    /// must), as its in-doubt sweep does, and never takes the caller's word for it.
    async fn decide(&self, req: Request<pb::DecideRequest>) -> Result<Response<pb::Empty>, Status> {
        let (caller, _permit) = self.gate.admit(&req, "Agent.Decide", &[Kind::Operator])?;
        let req = req.into_inner();
        let txn = txid(&req.txid)?;
        let asked = outcome_from_pb(req.outcome)
            .map_err(|e| Status::from(AgentError::BadRequest(e.to_string())))?;
        let branches = self.branches.clone();
        let chosen = branches
            .coordinators()
            .resolve(txn, &[])
            .await
            .map_err(|s| {
                // The group unreachable is worth retrying; its refusal (an unknown or
                // forgotten transaction, a denied call) is not.
                let code = match s.code() {
                    Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Unknown => Code::Unavailable,
                    other => other,
                };
                Status::new(
                    code,
                    format!(
                        "cannot confirm the decision of {txn} with the coordinator group, so it \
                         is not applied: {}",
                        s.message()
                    ),
                )
            })?;
        if chosen != asked {
            tracing::warn!(%txn, caller = %caller.name(), %asked, %chosen, "refused a Decide that contradicts the group");
            return Err(Status::failed_precondition(format!(
                "the coordinator group decided {txn} {chosen}, not {asked}; nothing was done"
            )));
        }
        tracing::info!(%txn, caller = %caller.name(), outcome = %chosen, "applying a decision an operator pushed");
        match detached(async move { branches.decide(txn, chosen).await }).await {
            Ok(()) => Ok(Response::new(pb::Empty {})),
            Err(status) => {
                // A conflict (the database did the opposite) or a branch that never
                // prepared: an operator must see why the push did nothing.
                tracing::warn!(%txn, caller = %caller.name(), outcome = %chosen, "an operator's decision was not applied: {}", status.message());
                Err(status)
            }
        }
    }

    async fn list_prepared(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::ListPreparedResponse>, Status> {
        let _admitted =
            self.gate
                .admit(&req, "Agent.ListPrepared", &[Kind::Operator, Kind::Replica])?;
        let prepared = self.branches.list_prepared().await?;
        Ok(Response::new(pb::ListPreparedResponse {
            participant: self.branches.participant().to_string(),
            prepared: prepared
                .into_iter()
                .map(|p| pb::PreparedTxn {
                    txid: p.txn.to_string(),
                    participant: self.branches.participant().to_string(),
                    gid: p.gid,
                    age_ms: p.age_ms,
                    database: p.database,
                })
                .collect(),
            open_branches: self.branches.open_count() as u64,
        }))
    }

    async fn list_proofs(
        &self,
        req: Request<pb::ListProofsRequest>,
    ) -> Result<Response<pb::ListProofsResponse>, Status> {
        let _admitted =
            self.gate
                .admit(&req, "Agent.ListProofs", &[Kind::Operator, Kind::Replica])?;
        let req = req.into_inner();
        let proof = |p: ProofRow| pb::CommitProof {
            txid: p.txn.to_string(),
            participants: p.participants,
            age_ms: p.age_ms,
        };
        let mut resp = pb::ListProofsResponse {
            participant: self.branches.participant().to_string(),
            retention_ms: self.branches.commit_proof_retention().as_millis() as u64,
            ..Default::default()
        };
        if req.txids.is_empty() {
            let (proofs, more) = self
                .branches
                .proofs_page(
                    &req.after_txid,
                    req.limit as usize,
                    (req.younger_than_ms > 0)
                        .then(|| std::time::Duration::from_millis(req.younger_than_ms)),
                )
                .await?;
            resp.proofs = proofs.into_iter().map(proof).collect();
            resp.more = more;
        } else {
            let txns = txids_from_pb(&req.txids)
                .map_err(|e| Status::from(AgentError::BadRequest(e.to_string())))?;
            let (proofs, prepared) = self.branches.proofs_of(&txns).await?;
            resp.proofs = proofs.into_iter().map(proof).collect();
            resp.prepared = prepared.iter().map(TxnId::to_string).collect();
        }
        Ok(Response::new(resp))
    }

    async fn heuristic(
        &self,
        req: Request<pb::HeuristicRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let (caller, _permit) = self
            .gate
            .admit(&req, "Agent.Heuristic", &[Kind::Operator])?;
        let operator = match &caller {
            Caller::Peer(Role::Operator(name)) => name.clone(),
            other => other.name(),
        };
        let req = req.into_inner();
        let outcome = outcome_from_pb(req.outcome)
            .map_err(|e| Status::from(AgentError::BadRequest(e.to_string())))?;
        // Whether the gid is ours is checked again where it is applied.
        let (_, txn, _) = paxos_commit_core::types::parse_gid(&req.gid).ok_or_else(|| {
            Status::from(AgentError::BadRequest(format!(
                "{:?} is not a paxos-commit gid",
                req.gid
            )))
        })?;
        if !req.force {
            tracing::warn!(gid = %req.gid, %operator, %outcome, "refused a heuristic decision without force");
            return Err(Status::failed_precondition(
                "a heuristic decision needs force: it bypasses the coordinator group",
            ));
        }
        let statuses = paxos_commit_proto::heuristic::local_statuses(
            self.branches.coordinators().replicas(),
            &txn.to_string(),
        )
        .await;
        let check = paxos_commit_proto::heuristic::check(outcome, &statuses);
        let summary = check.checks.join("; ");
        if let Some(c) = &check.contradiction {
            tracing::warn!(gid = %req.gid, %operator, %outcome, "refused a heuristic decision: {c}");
            return Err(Status::failed_precondition(format!(
                "refused: {c} (checked: {summary})"
            )));
        }
        tracing::warn!(gid = %req.gid, %operator, %outcome, "applying a HEURISTIC decision");
        metrics::counter!("paxos_commit_agent_heuristic_decisions_total").increment(1);
        let branches = self.branches.clone();
        let gid = req.gid.clone();
        detached(async move { branches.heuristic(&gid, outcome, &operator, &summary).await })
            .await?;
        Ok(Response::new(pb::Empty {}))
    }
}
