//! The participant's side of Paxos Commit: its vote is ballot 0 of its own instance, sent
//! straight to every acceptor. Only the participant may use ballot 0, and it sends one value
//! only, so ballot 0 needs no phase 1.

use crate::msg::Msg;
use crate::types::{Participant, ReplicaId, TxnId, Vote};

/// The phase 2a messages of `participant`'s vote, one per acceptor.
///
/// Send `Vote::Prepared` only after `PREPARE TRANSACTION` succeeded, and `Vote::Aborted` only
/// on a definite failure: a participant that does not know whether it prepared sends nothing
/// and leaves the instance to recovery.
pub fn vote(
    txn: TxnId,
    participant: &str,
    vote: Vote,
    participants: &[Participant],
    replicas: u32,
) -> Vec<(ReplicaId, Msg)> {
    (0..replicas)
        .map(|r| {
            (
                r,
                Msg::Phase2a {
                    txn,
                    participant: participant.to_string(),
                    ballot: 0,
                    vote,
                    participants: participants.to_vec(),
                },
            )
        })
        .collect()
}
