//! Outbound messages of a replica: Paxos messages to the other replicas, Prepare and Decide
//! to the agents.
//!
//! Each peer replica has one sender (`paxos_commit_proto::sender`) that ships queued messages
//! in batches over one long-lived stream. Delivery is best effort: Paxos tolerates loss, and
//! the core's timers retry what matters.

use paxos_commit_core::{Dest, Msg, Participant, ReplicaId, TxnId};
use paxos_commit_proto::client::lazy_channel;
use paxos_commit_proto::convert::{enlisted_to_pb, msg_to_pb};
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::acceptor_client::AcceptorClient;
use paxos_commit_proto::pb::agent_client::AgentClient;
use paxos_commit_proto::sender::{self, Link};
use paxos_commit_proto::telemetry::{self, TraceParent};
use paxos_commit_proto::tls::Security;
use std::collections::{BTreeMap, HashMap};

/// Most agent links kept at once (one per agent address).
const MAX_AGENT_LINKS: usize = 1024;

pub struct Peers {
    me: ReplicaId,
    replicas: Vec<Option<Link>>,
    /// By address: every transaction with that agent shares its stream.
    agents: HashMap<String, Link>,
    /// Messages sent, by kind (the protocol-cost figures).
    pub sent: BTreeMap<&'static str, u64>,
    security: Security,
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
    /// Starts one sender task per other replica, each naming this replica's incarnation;
    /// agents get theirs when first addressed.
    pub fn start(
        me: ReplicaId,
        incarnation: Option<u64>,
        replicas: &[String],
        security: Security,
    ) -> Result<Peers, paxos_commit_proto::client::ClientError> {
        let mut senders = Vec::with_capacity(replicas.len());
        for (i, address) in replicas.iter().enumerate() {
            if i as ReplicaId == me {
                senders.push(None);
                continue;
            }
            // No per-call timeout: the channel carries one long-lived stream.
            let client = AcceptorClient::new(lazy_channel(address, None, &security)?);
            senders.push(Some(sender::to_replica(client, incarnation)));
        }
        Ok(Peers {
            me,
            replicas: senders,
            agents: HashMap::new(),
            sent: BTreeMap::new(),
            security,
        })
    }

    /// Queues `msg` for `to`, with the trace context of its transaction when it has one.
    pub fn send(&mut self, to: Dest, msg: Msg, trace: Option<&TraceParent>) {
        *self.sent.entry(kind(&msg)).or_default() += 1;
        let mut wire = msg_to_pb(self.me, &msg);
        telemetry::attach(&mut wire, trace);
        match to {
            Dest::Replica(r) => {
                if let Some(Some(tx)) = self.replicas.get(r as usize) {
                    tx.send(wire);
                }
            }
            Dest::Agent(p) => self.send_to_agent(&p, wire),
        }
    }

    /// Answers an agent's enlistment (`code` 0: enlisted).
    pub fn enlisted(&mut self, agent: &Participant, txn: TxnId, code: i32, message: String) {
        let wire = enlisted_to_pb(txn, self.me, code, message);
        self.send_to_agent(agent, wire);
    }

    fn send_to_agent(&mut self, p: &Participant, wire: pb::PaxosMessage) {
        if let Some(link) = self.agents.get(&p.address) {
            link.send(wire);
            return;
        }
        if self.agents.len() >= MAX_AGENT_LINKS {
            // Addresses come from agents' enlistments; a flood of made-up ones must not grow
            // this map without end. Dropping the links ends their sender tasks; the live
            // agents' links are made again on their next message.
            tracing::warn!(
                links = self.agents.len(),
                "too many agent links; closing them all"
            );
            self.agents.clear();
        }
        match lazy_channel(&p.address, None, &self.security) {
            Ok(ch) => {
                let link = sender::to_agent(AgentClient::new(ch));
                link.send(wire);
                self.agents.insert(p.address.clone(), link);
            }
            Err(e) => tracing::warn!(participant = %p.id, "cannot reach agent: {e}"),
        }
    }
}
