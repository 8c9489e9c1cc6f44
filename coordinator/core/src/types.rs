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

/// The highest ballot anything in the protocol may carry (2^48); the wire refuses, and the
/// core drops, every message whose ballot (or promise) is above it.
///
/// Why a bound at all: ballots grow by one round per takeover, so an honest group needs a
/// handful per transaction, but a u64 from the network could be anything. Near `u64::MAX`,
/// `round * replicas + replica` and `round + 1` overflow (a panic in debug builds, a wrapped
/// and therefore *reused or lower* ballot in release ones) and an acceptor that promised such
/// a ballot would refuse every ballot a proposer can still build, so the transaction could
/// never be decided. With every ballot ≤ 2^48, every round is ≤ 2^48 and
/// `round * replicas + replica` stays below 2^57 for any group of at most 256 replicas (the
/// transaction id names its leader in 8 bits), so the arithmetic cannot overflow; and 2^48
/// ballots are about 2^40 takeovers of one transaction even for 256 replicas, which no
/// deployment comes near.
pub const MAX_BALLOT: Ballot = 1 << 48;

/// Whether a ballot from the network or the log is in range (see [`MAX_BALLOT`]).
pub fn ballot_in_range(ballot: Ballot) -> bool {
    ballot <= MAX_BALLOT
}

/// Most participants one transaction may have; also the longest participant list (and the
/// most accepted values in a phase 1b) a message may carry. A bound for the wire, far above
/// any real transaction (each participant is a database).
pub const MAX_PARTICIPANTS: usize = 1024;

/// Longest participant id, in bytes (ids are `[A-Za-z0-9_-]`, as the agent's configuration
/// requires: they end up in PostgreSQL gids, which are at most 200 bytes).
pub const MAX_PARTICIPANT_ID_LEN: usize = 64;

/// Longest participant address (host:port or URL), in bytes.
pub const MAX_ADDRESS_LEN: usize = 256;

/// Whether `id` can name a participant: 1–64 characters of `[A-Za-z0-9_-]`, the same rule the
/// agent applies to its configuration, so every id an honest agent uses passes.
pub fn is_valid_participant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_PARTICIPANT_ID_LEN
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// Whether `address` can be a participant's address: 1–256 bytes, no control characters.
pub fn is_valid_address(address: &str) -> bool {
    !address.is_empty()
        && address.len() <= MAX_ADDRESS_LEN
        && !address.chars().any(char::is_control)
}

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
        // Hex digits only: `from_str_radix` alone would also take a leading '+', and then two
        // spellings would name one transaction.
        if s.len() != 16 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(BadTxnId(s.chars().take(32).collect()));
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
    // `max(1)`: a group has at least one replica; never divide by zero on a bad config.
    (ballot % u64::from(replicas.max(1))) as ReplicaId
}

/// The ballot of `replica` in `round` (round ≥ 1), or `None` when it would not be below
/// [`MAX_BALLOT`]: the proposer has run out of ballots (see [`MAX_BALLOT`] for why that cannot
/// happen to an honest group) and must not wrap around to a ballot already used.
///
/// Strictly below: `MAX_BALLOT` itself is left to no proposer, so an acceptor whose replayed
/// promise had to be clamped to it (see `AcceptorTxn::apply`) still refuses every ballot a
/// proposer can build, exactly as the larger promise did.
pub fn ballot_of(round: u64, replica: ReplicaId, replicas: u32) -> Option<Ballot> {
    round
        .checked_mul(u64::from(replicas))?
        .checked_add(u64::from(replica))
        .filter(|b| *b < MAX_BALLOT)
}

/// The highest round a replica of a group of `replicas` can ever have used: the round of the
/// highest ballot in range. A round read from a log or inferred from a Nack is clamped to it.
pub fn max_round(replicas: u32) -> u64 {
    MAX_BALLOT / u64::from(replicas.max(1))
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
                assert_eq!(ballot_owner(ballot_of(round, r, 5).unwrap(), 5), r);
            }
        }
        assert_eq!(majority(1), 1);
        assert_eq!(majority(3), 2);
        assert_eq!(majority(5), 3);
    }

    /// Regression: ballot arithmetic near u64::MAX overflowed (a panic in debug builds, a
    /// wrapped ballot in release ones). Out of range now means "no ballot", never a wrap.
    #[test]
    fn ballot_arithmetic_never_overflows_and_stays_in_range() {
        for replicas in [1u32, 3, 5, 256] {
            let top = max_round(replicas);
            for r in 0..replicas.min(8) {
                assert_eq!(ballot_of(u64::MAX, r, replicas), None);
                assert_eq!(ballot_of(top + 1, r, replicas), None);
                if let Some(b) = ballot_of(top, r, replicas) {
                    assert!(b < MAX_BALLOT);
                    assert_eq!(ballot_owner(b, replicas), r);
                }
            }
            // round * replicas + replica for the highest round a replica can hold, plus one
            // more round, still fits in a u64 many times over.
            assert!((top + 1)
                .checked_mul(u64::from(replicas))
                .and_then(|b| b.checked_add(u64::from(replicas)))
                .is_some());
        }
        assert!(ballot_in_range(MAX_BALLOT));
        assert!(!ballot_in_range(MAX_BALLOT + 1));
        assert!(!ballot_in_range(u64::MAX));
    }

    #[test]
    fn participant_ids_follow_the_agent_configuration_rule() {
        assert!(is_valid_participant_id("bank_a"));
        assert!(is_valid_participant_id("B-2"));
        assert!(is_valid_participant_id(&"x".repeat(64)));
        assert!(!is_valid_participant_id(""));
        assert!(!is_valid_participant_id(&"x".repeat(65)));
        assert!(!is_valid_participant_id("a:b"));
        assert!(!is_valid_participant_id("a b"));
        assert!(!is_valid_participant_id("é"));
        assert!(is_valid_address("127.0.0.1:7000"));
        assert!(!is_valid_address(""));
        assert!(!is_valid_address(&"x".repeat(257)));
        assert!(!is_valid_address("a\nb"));
        assert!("+123456789abcdef".parse::<TxnId>().is_err());
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
