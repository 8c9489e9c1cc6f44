//! Paxos Commit (Gray & Lamport, "Consensus on Transaction Commit") as a sans-IO core.
//!
//! Every participant's vote is its own Paxos instance; 2F+1 coordinator replicas are the
//! acceptors. A participant proposes its vote in ballot 0 straight to the acceptors; the
//! transaction commits when every instance chose Prepared and aborts as soon as one chose
//! Aborted. A replica that finds a transaction's leader silent runs phase 1 with a higher
//! ballot and proposes Aborted where nothing was accepted, so no crash leaves it blocked.
//!
//! Tour:
//! * [`types`] — transaction ids, ballots, votes, gids;
//! * [`msg`] — messages, durable records and outputs (the contract with the shells);
//! * [`acceptor`] — one acceptor's per-transaction state and its phase 1a/2a rules;
//! * [`admission`] — a replica's incarnation, and the fences that keep a lost log out;
//! * [`coordination`] — the leader's (or a takeover's) tally and the decision rule;
//! * [`replica`] — a whole replica: inputs in, outputs out, timers as deadlines;
//! * [`participant`] — the participant's ballot-0 vote;
//! * [`status`] — combining several replicas' views into one answer.
//!
//! No clock, socket, file or RNG lives here: time comes in as `now`, randomness as a seed.

pub mod acceptor;
pub mod admission;
pub mod coordination;
pub mod msg;
pub mod participant;
pub mod replica;
pub mod status;
pub mod types;

pub use admission::{JoinAnswer, JoinMode};
pub use coordination::AbortCause;
pub use msg::{Dest, Msg, Output, Record};
pub use replica::{Config, LocalStatus, Replica, Stats, TxnError};
pub use types::{Ballot, Outcome, Participant, ReplicaId, TxnId, Vote};
