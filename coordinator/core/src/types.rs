//! The nouns of Paxos Commit: transactions, participants, ballots, votes and decisions.
//!
//! Kept free of any wire or storage format so that the core, the model checker and the
//! servers share one vocabulary.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Index of a coordinator replica in the group's configured list (0-based).
pub type ReplicaId = u32;

/// A Paxos ballot. Ballot 0 belongs to the participant itself (its one vote); ballots above 0
/// are partitioned among replicas: `round * replicas + replica`, round ≥ 1.
pub type Ballot = u64;

/// A transaction id. The top byte names the replica that leads it, so anyone holding the id
/// knows where to enlist and where ballot-0 phase 2b messages go; the rest is random.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxnId(pub u64);

impl TxnId {
    const NONCE_MASK: u64 = (1 << 56) - 1;

    pub fn new(leader: ReplicaId, nonce: u64) -> TxnId {
        TxnId((u64::from(leader & 0xff) << 56) | (nonce & Self::NONCE_MASK))
    }

    pub fn leader(self) -> ReplicaId {
        (self.0 >> 56) as ReplicaId
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "T{self}")
    }
}

/// A transaction id that is not 16 hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadTxnId(pub String);

impl fmt::Display for BadTxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed transaction id {:?}: expected 16 hex digits",
            self.0
        )
    }
}

impl std::error::Error for BadTxnId {}

impl FromStr for TxnId {
    type Err = BadTxnId;

    fn from_str(s: &str) -> Result<TxnId, BadTxnId> {
        if s.len() != 16 {
            return Err(BadTxnId(s.to_string()));
        }
        u64::from_str_radix(s, 16)
            .map(TxnId)
            .map_err(|_| BadTxnId(s.to_string()))
    }
}

/// A participant: the agent beside one database, named by its configured id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Participant {
    pub id: String,
    pub address: String,
}

impl Participant {
    pub fn new(id: impl Into<String>, address: impl Into<String>) -> Participant {
        Participant {
            id: id.into(),
            address: address.into(),
        }
    }
}

/// The value of one participant's Paxos instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Vote {
    Prepared,
    Aborted,
}

/// The transaction's decision: Commit iff every instance chose Prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Outcome {
    Committed,
    Aborted,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Committed => "committed",
            Outcome::Aborted => "aborted",
        })
    }
}

/// Smallest number of acceptors that forms a majority of `replicas`.
pub fn majority(replicas: u32) -> usize {
    replicas as usize / 2 + 1
}

/// The replica that owns a ballot above 0.
pub fn ballot_owner(ballot: Ballot, replicas: u32) -> ReplicaId {
    (ballot % u64::from(replicas)) as ReplicaId
}

/// The ballot of `replica` in `round` (round ≥ 1).
pub fn ballot_of(round: u64, replica: ReplicaId, replicas: u32) -> Ballot {
    round * u64::from(replicas) + u64::from(replica)
}

/// The global transaction id PostgreSQL stores for a branch: self-describing (group, txid,
/// participant) so that an agent can find its own prepared transactions after a crash.
pub fn gid(group: &str, txn: TxnId, participant: &str) -> String {
    format!("pxc:{group}:{txn}:{participant}")
}

/// Splits a gid made by [`gid`] into (group, txid, participant).
pub fn parse_gid(gid: &str) -> Option<(&str, TxnId, &str)> {
    let rest = gid.strip_prefix("pxc:")?;
    let (group, rest) = rest.split_once(':')?;
    let (txn, participant) = rest.split_once(':')?;
    Some((group, txn.parse().ok()?, participant))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_id_names_its_leader_and_round_trips() {
        let t = TxnId::new(3, 0xdead_beef_1234_5678);
        assert_eq!(t.leader(), 3);
        assert_eq!(t.to_string().parse::<TxnId>(), Ok(t));
        assert!("xyz".parse::<TxnId>().is_err());
        assert!("0123456789abcdeg".parse::<TxnId>().is_err());
    }

    #[test]
    fn ballots_are_partitioned_by_replica() {
        for r in 0..5 {
            for round in 1..4 {
                assert_eq!(ballot_owner(ballot_of(round, r, 5), 5), r);
            }
        }
        assert_eq!(majority(1), 1);
        assert_eq!(majority(3), 2);
        assert_eq!(majority(5), 3);
    }

    #[test]
    fn gid_round_trips() {
        let t = TxnId::new(1, 42);
        let g = gid("bank", t, "bank_a");
        assert!(g.len() < 200);
        assert_eq!(parse_gid(&g), Some(("bank", t, "bank_a")));
        assert_eq!(parse_gid("other"), None);
    }
}
