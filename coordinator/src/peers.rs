//! Outbound messages of a replica: Paxos messages to the other replicas, Prepare and Decide
//! to the agents.
//!
//! Each peer replica has one sender (`paxos_commit_proto::sender`) that ships queued messages
//! in batches over one long-lived stream. Delivery is best effort: Paxos tolerates loss, and
//! the core's timers retry what matters.

use crate::driver::Command;
use paxos_commit_core::{Dest, Msg, ReplicaId};
use paxos_commit_proto::client::lazy_channel;
use paxos_commit_proto::convert::{outcome_to_pb, participants_to_pb};
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::acceptor_client::AcceptorClient;
use paxos_commit_proto::pb::agent_client::AgentClient;
use paxos_commit_proto::sender;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::Channel;

const RPC_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Peers {
    replicas: Vec<Option<mpsc::UnboundedSender<Msg>>>,
    agents: HashMap<String, AgentClient<Channel>>,
    commands: mpsc::UnboundedSender<Command>,
    /// Messages sent, by kind (the protocol-cost figures).
    pub sent: BTreeMap<&'static str, u64>,
}

pub fn kind(msg: &Msg) -> &'static str {
    match msg {
        Msg::Phase1a { .. } => "phase1a",
        Msg::Phase1b { .. } => "phase1b",
        Msg::Phase2a { .. } => "phase2a",
        Msg::Phase2b { .. } => "phase2b",
        Msg::Nack { .. } => "nack",
        Msg::Decided { .. } => "decided",
        Msg::Finished { .. } => "finished",
        Msg::Prepare { .. } => "prepare",
        Msg::Decide { .. } => "decide",
    }
}

impl Peers {
    /// Starts one sender task per other replica.
    pub fn start(
        me: ReplicaId,
        replicas: &[String],
        commands: mpsc::UnboundedSender<Command>,
    ) -> Result<Peers, paxos_commit_proto::client::ClientError> {
        let mut senders = Vec::with_capacity(replicas.len());
        for (i, address) in replicas.iter().enumerate() {
            if i as ReplicaId == me {
                senders.push(None);
                continue;
            }
            // No per-call timeout: the channel carries one long-lived stream.
            let client = AcceptorClient::new(lazy_channel(address, None)?);
            senders.push(Some(sender::spawn(me, client)));
        }
        Ok(Peers {
            replicas: senders,
            agents: HashMap::new(),
            commands,
            sent: BTreeMap::new(),
        })
    }

    pub fn send(&mut self, to: Dest, msg: Msg) {
        *self.sent.entry(kind(&msg)).or_default() += 1;
        match to {
            Dest::Replica(r) => {
                if let Some(Some(tx)) = self.replicas.get(r as usize) {
                    let _ = tx.send(msg);
                }
            }
            Dest::Agent(p) => {
                let agent = match self.agents.get(&p.address) {
                    Some(a) => a.clone(),
                    None => match lazy_channel(&p.address, Some(RPC_TIMEOUT)) {
                        Ok(ch) => {
                            let a = AgentClient::new(ch);
                            self.agents.insert(p.address.clone(), a.clone());
                            a
                        }
                        Err(e) => {
                            tracing::warn!(participant = %p.id, "cannot reach agent: {e}");
                            return;
                        }
                    },
                };
                tokio::spawn(to_agent(agent, p.id, msg, self.commands.clone()));
            }
        }
    }
}

async fn to_agent(
    mut agent: AgentClient<Channel>,
    participant: String,
    msg: Msg,
    commands: mpsc::UnboundedSender<Command>,
) {
    match msg {
        Msg::Prepare { txn, participants } => {
            let req = pb::AgentPrepareRequest {
                txid: txn.to_string(),
                participants: participants_to_pb(&participants),
            };
            if let Err(s) = agent.prepare(req).await {
                // The vote will not come; the takeover timer settles the instance.
                tracing::warn!(%txn, %participant, "prepare not delivered: {}", s.message());
            }
        }
        Msg::Decide { txn, outcome } => {
            let req = pb::DecideRequest {
                txid: txn.to_string(),
                outcome: outcome_to_pb(outcome),
            };
            match agent.decide(req).await {
                Ok(_) => {
                    let _ = commands.send(Command::Applied { txn, participant });
                }
                Err(s) => {
                    tracing::debug!(%txn, %participant, "decision not applied yet: {}", s.message())
                }
            }
        }
        _ => {}
    }
}
