//! The agent's links to the coordinator group: enlisting with a transaction's leader, sending
//! its ballot-0 vote to every acceptor, and asking any replica to resolve an in-doubt branch.

use paxos_commit_core::{participant, Outcome, Participant, TxnId, Vote};
use paxos_commit_proto::client::{lazy_channel, ClientError};
use paxos_commit_proto::convert::{
    msg_to_pb, outcome_from_pb, participant_to_pb, participants_to_pb,
};
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::acceptor_client::AcceptorClient;
use paxos_commit_proto::pb::coordinator_client::CoordinatorClient;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Status};

#[derive(Clone)]
pub struct Coordinators {
    coordinators: Vec<CoordinatorClient<Channel>>,
    acceptors: Vec<AcceptorClient<Channel>>,
    me: Participant,
}

impl Coordinators {
    pub fn new(addresses: &[String], me: Participant) -> Result<Coordinators, ClientError> {
        let mut coordinators = Vec::new();
        let mut acceptors = Vec::new();
        for a in addresses {
            let ch = lazy_channel(a, Some(Duration::from_secs(5)))?;
            coordinators.push(CoordinatorClient::new(ch.clone()));
            acceptors.push(AcceptorClient::new(ch));
        }
        Ok(Coordinators {
            coordinators,
            acceptors,
            me,
        })
    }

    pub fn me(&self) -> &Participant {
        &self.me
    }

    /// Joins `txn` with its leader (named by the transaction id).
    pub async fn enlist(&self, txn: TxnId) -> Result<(), Status> {
        let leader = self
            .coordinators
            .get(txn.leader() as usize)
            .cloned()
            .ok_or_else(|| {
                Status::not_found(format!(
                    "transaction {txn} names replica {} as its leader, which is not configured",
                    txn.leader()
                ))
            })?;
        leader
            .clone()
            .enlist(pb::EnlistRequest {
                txid: txn.to_string(),
                participant: Some(participant_to_pb(&self.me)),
            })
            .await
            .map(|_| ())
    }

    /// Sends this participant's ballot-0 vote to every acceptor, in parallel. Lost messages
    /// are fine: recovery (phase 1 of a takeover) settles an instance whose vote did not land.
    pub async fn vote(&self, txn: TxnId, vote: Vote, participants: &[Participant]) {
        let msgs = participant::vote(
            txn,
            &self.me.id,
            vote,
            participants,
            self.acceptors.len() as u32,
        );
        let sends = msgs.into_iter().filter_map(|(r, msg)| {
            let mut client = self.acceptors.get(r as usize)?.clone();
            let wire = msg_to_pb(0, &msg)?;
            Some(async move {
                if let Err(s) = client
                    .deliver(pb::PaxosBatch {
                        messages: vec![wire],
                    })
                    .await
                {
                    tracing::debug!(%txn, replica = r, "vote not delivered: {}", s.message());
                }
            })
        });
        futures::future::join_all(sends).await;
    }

    /// Asks the group for the outcome of an in-doubt transaction: the leader first, then the
    /// others, which take the transaction over if they must.
    pub async fn resolve(
        &self,
        txn: TxnId,
        participants: &[Participant],
    ) -> Result<Outcome, Status> {
        let n = self.coordinators.len();
        let first = txn.leader() as usize % n.max(1);
        let mut last = Status::unavailable("no coordinator replica configured");
        for k in 0..n {
            let mut c = self.coordinators[(first + k) % n].clone();
            let req = pb::ResolveRequest {
                txid: txn.to_string(),
                participant: self.me.id.clone(),
                participants: participants_to_pb(participants),
            };
            match c.resolve(req).await {
                Ok(r) => {
                    return outcome_from_pb(r.into_inner().outcome)
                        .map_err(|e| Status::internal(e.to_string()))
                }
                Err(s) if s.code() == Code::InvalidArgument => return Err(s),
                Err(s) => last = s,
            }
        }
        Err(last)
    }
}
