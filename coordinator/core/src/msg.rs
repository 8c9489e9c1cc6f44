//! What the core consumes and produces: Paxos Commit messages, durable records and outputs.
//!
//! The shell turns [`Output::Send`] into RPCs and [`Output::Persist`] into appends to the
//! acceptor log. Order is the contract: every `Persist` of a step is durable before any
//! `Send` or `Decided` of that step leaves the process.

use crate::coordination::AbortCause;
use crate::types::{Ballot, Outcome, Participant, ReplicaId, TxnId, Vote};
use serde::{Deserialize, Serialize};

/// A message between participants and replicas, always about one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Msg {
    /// Proposer → acceptors: promise not to accept ballots below `ballot` for every instance
    /// of `txn`. `participants` is empty when the proposer does not know R yet.
    Phase1a {
        txn: TxnId,
        ballot: Ballot,
        participants: Vec<Participant>,
    },
    /// Acceptor → proposer: the promise, with every value accepted so far.
    Phase1b {
        txn: TxnId,
        ballot: Ballot,
        accepted: Vec<(String, Ballot, Vote)>,
        participants: Vec<Participant>,
    },
    /// Proposer (ballot > 0) or the participant itself (ballot 0) → acceptors.
    Phase2a {
        txn: TxnId,
        participant: String,
        ballot: Ballot,
        vote: Vote,
        participants: Vec<Participant>,
    },
    /// Acceptor → owner of the ballot (for ballot 0: the transaction's leader).
    Phase2b {
        txn: TxnId,
        participant: String,
        ballot: Ballot,
        vote: Vote,
    },
    /// Acceptor → proposer: the ballot is stale, `promised` is higher.
    Nack {
        txn: TxnId,
        ballot: Ballot,
        promised: Ballot,
    },
    /// The decision, broadcast so that every replica can answer for it and finish it.
    Decided {
        txn: TxnId,
        outcome: Outcome,
        participants: Vec<Participant>,
    },
    /// Every participant applied the decision; acceptors may forget after retention.
    Finished { txn: TxnId, outcome: Outcome },
    /// Leader → agent: prepare your branch and vote.
    Prepare {
        txn: TxnId,
        participants: Vec<Participant>,
    },
    /// Replica → agent: apply the decision.
    Decide { txn: TxnId, outcome: Outcome },
}

impl Msg {
    pub fn txn(&self) -> TxnId {
        match self {
            Msg::Phase1a { txn, .. }
            | Msg::Phase1b { txn, .. }
            | Msg::Phase2a { txn, .. }
            | Msg::Phase2b { txn, .. }
            | Msg::Nack { txn, .. }
            | Msg::Decided { txn, .. }
            | Msg::Finished { txn, .. }
            | Msg::Prepare { txn, .. }
            | Msg::Decide { txn, .. } => *txn,
        }
    }
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dest {
    Replica(ReplicaId),
    Agent(Participant),
}

/// An acceptor's durable state change. Replaying all records rebuilds the acceptor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Record {
    /// Promised `ballot` for `txn`.
    Promise {
        txn: TxnId,
        ballot: Ballot,
        participants: Vec<Participant>,
    },
    /// Accepted `vote` in `ballot` for `participant`'s instance of `txn`.
    Accept {
        txn: TxnId,
        participant: String,
        ballot: Ballot,
        vote: Vote,
        participants: Vec<Participant>,
    },
    /// Highest round this replica used as a proposer: ballots are never reused after a crash.
    Round { round: u64 },
    /// The decision, once learned (not needed for safety: it lets a restarted replica finish
    /// and answer without asking).
    Decided {
        txn: TxnId,
        outcome: Outcome,
        participants: Vec<Participant>,
    },
    /// Every participant applied the decision.
    Finished { txn: TxnId, outcome: Outcome },
    /// This replica lost its log (damaged, or its disk replaced) and was brought back with
    /// `--rejoin`: it may once have promised or accepted anything in any transaction begun
    /// before, so from here on it answers only for transactions it began itself since (see
    /// `Replica::answers_for`). Kept by every compaction.
    Rejoined,
    /// The first record of every log: the random number that names this life of the replica
    /// (see `admission`). Kept by every compaction.
    Incarnation { incarnation: u64 },
    /// Every peer recorded this incarnation: the replica may act as one. Until then it
    /// answers for nothing. Kept by every compaction.
    Admitted,
    /// Peer `replica` lives as `incarnation`: a join of another (unless a rejoin) is refused
    /// and its messages are not heard. Kept by every compaction.
    Fence {
        replica: ReplicaId,
        incarnation: u64,
    },
}

/// What a step of the core asks its shell to do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Output {
    /// Make durable before anything that follows in the same batch.
    Persist(Record),
    /// Write with the batch, but let nothing wait for its fsync: a hint (a learned decision)
    /// that speeds up recovery and is never needed for safety.
    PersistLazy(Record),
    Send {
        to: Dest,
        msg: Msg,
    },
    /// The transaction is decided: clients waiting for the decision can be answered.
    Decided {
        txn: TxnId,
        outcome: Outcome,
        /// Why it aborted, when this replica decided it.
        cause: Option<AbortCause>,
    },
    /// Every participant applied the decision: clients waiting for that can be answered.
    Finished {
        txn: TxnId,
        outcome: Outcome,
    },
}
