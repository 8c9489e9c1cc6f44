//! The agent's links to the coordinator group: enlisting with a transaction's leader, sending
//! its ballot-0 vote to every acceptor, and asking any replica to resolve an in-doubt branch.

use paxos_commit_core::{participant, Msg, Outcome, Participant, TxnId, Vote};
use paxos_commit_proto::client::{lazy_channel, ClientError};
use paxos_commit_proto::convert::{outcome_from_pb, participant_to_pb, participants_to_pb};
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::acceptor_client::AcceptorClient;
use paxos_commit_proto::pb::coordinator_client::CoordinatorClient;
use paxos_commit_proto::sender;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Status};

#[derive(Clone)]
pub struct Coordinators {
    coordinators: Vec<CoordinatorClient<Channel>>,
    /// One streaming sender per acceptor, shared by every branch's vote.
    acceptors: Vec<mpsc::UnboundedSender<Msg>>,
    me: Participant,
}

impl Coordinators {
    pub fn new(addresses: &[String], me: Participant) -> Result<Coordinators, ClientError> {
        let mut coordinators = Vec::new();
        let mut acceptors = Vec::new();
        for a in addresses {
            coordinators.push(CoordinatorClient::new(lazy_channel(
                a,
                Some(Duration::from_secs(5)),
            )?));
            acceptors.push(sender::spawn(
                0,
                AcceptorClient::new(lazy_channel(a, None)?),
            ));
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

    /// Sends this participant's ballot-0 vote to every acceptor. Lost messages are fine:
    /// recovery (phase 1 of a takeover) settles an instance whose vote did not land.
    pub fn vote(&self, txn: TxnId, vote: Vote, participants: &[Participant]) {
        let msgs = participant::vote(
            txn,
            &self.me.id,
            vote,
            participants,
            self.acceptors.len() as u32,
        );
        for (r, msg) in msgs {
            if let Some(acceptor) = self.acceptors.get(r as usize) {
                let _ = acceptor.send(msg);
            }
        }
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
