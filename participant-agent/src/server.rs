//! The agent's gRPC face: parse, call the branch manager, map errors to statuses.

use crate::branches::Branches;
use crate::error::AgentError;
use paxos_commit_core::TxnId;
use paxos_commit_proto::convert::{outcome_from_pb, participants_from_pb, txid_from_pb};
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

    async fn prepare(
        &self,
        req: Request<pb::AgentPrepareRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let req = req.into_inner();
        let txn = txid(&req.txid)?;
        let participants = participants_from_pb(&req.participants);
        let branches = self.branches.clone();
        detached(async move { branches.prepare(txn, participants).await }).await?;
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
