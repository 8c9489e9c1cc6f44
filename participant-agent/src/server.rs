//! The agent's gRPC face: parse, call the branch manager, map errors to statuses; and the
//! replicas' message stream (Prepare, Decide, answers to enlistments).

use crate::branches::Branches;
use crate::error::AgentError;
use paxos_commit_core::{Msg, ReplicaId, TxnId};
use paxos_commit_proto::convert::{delivered_from_pb, outcome_from_pb, txid_from_pb, Delivered};
use paxos_commit_proto::pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct AgentService {
    pub branches: Arc<Branches>,
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

fn txid(s: &str) -> Result<TxnId, Status> {
    txid_from_pb(s).map_err(|e| AgentError::BadRequest(e.to_string()).into())
}

impl AgentService {
    /// Acts on one message from a replica. Branch work runs on its own task, as a unary
    /// call's would: the stream goes on with the next message meanwhile.
    fn delivered(&self, d: Delivered) {
        match d {
            Delivered::Msg(_, Msg::Prepare { txn, participants }) => {
                let branches = self.branches.clone();
                tokio::spawn(async move {
                    if let Err(e) = branches.prepare(txn, participants).await {
                        // No vote leaves; the group's recovery settles the instance.
                        tracing::warn!(%txn, "prepare failed: {e}");
                    }
                });
            }
            Delivered::Msg(from, Msg::Decide { txn, outcome }) => {
                let branches = self.branches.clone();
                tokio::spawn(decide_and_acknowledge(branches, txn, outcome, from));
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
        Ok(()) => branches.coordinators().applied(txn, from),
        Err(e) => tracing::debug!(%txn, "decision not applied yet: {e}"),
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn execute(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let req = req.into_inner();
        let txn = txid(&req.txid)?;
        let branches = self.branches.clone();
        let resp =
            detached(async move { branches.execute(txn, &req.sql, &req.params).await }).await?;
        Ok(Response::new(resp))
    }

    async fn deliver_stream(
        &self,
        req: Request<tonic::Streaming<pb::PaxosBatch>>,
    ) -> Result<Response<pb::Empty>, Status> {
        let mut stream = req.into_inner();
        while let Some(batch) = stream.message().await? {
            for m in &batch.messages {
                match delivered_from_pb(m) {
                    Ok(d) => self.delivered(d),
                    // One bad message must not cost the others on the stream.
                    Err(e) => tracing::warn!("dropping a message from a replica: {e}"),
                }
            }
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn decide(&self, req: Request<pb::DecideRequest>) -> Result<Response<pb::Empty>, Status> {
        let req = req.into_inner();
        let txn = txid(&req.txid)?;
        let outcome = outcome_from_pb(req.outcome)
            .map_err(|e| Status::from(AgentError::BadRequest(e.to_string())))?;
        let branches = self.branches.clone();
        detached(async move { branches.decide(txn, outcome).await }).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_prepared(
        &self,
        _req: Request<pb::Empty>,
    ) -> Result<Response<pb::ListPreparedResponse>, Status> {
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

    async fn heuristic(
        &self,
        req: Request<pb::HeuristicRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let req = req.into_inner();
        let outcome = outcome_from_pb(req.outcome)
            .map_err(|e| Status::from(AgentError::BadRequest(e.to_string())))?;
        let branches = self.branches.clone();
        detached(async move { branches.heuristic(&req.gid, outcome).await }).await?;
        Ok(Response::new(pb::Empty {}))
    }
}
