//! Conversions between the wire types and the core's types, shared by the coordinator and
//! the agent so that both speak exactly the same protocol.
//!
//! Everything that arrives from the network passes through here first, so this is where
//! unbounded or out-of-range input is refused (with [`BadMessage`], before the core sees it):
//! ballots above [`MAX_BALLOT`] (their arithmetic would overflow), more than
//! [`MAX_PARTICIPANTS`] participants or accepted values, participant ids that are not 1–64
//! characters of `[A-Za-z0-9_-]` (the agent's own configuration rule), addresses longer than
//! [`MAX_ADDRESS_LEN`], a participant listed twice. The core checks the protocol-level rules
//! again (defence in depth), since the model checker and tests feed it directly.

use crate::pb;
use paxos_commit_core::types::{
    ballot_in_range, is_valid_address, is_valid_participant_id, MAX_ADDRESS_LEN,
    MAX_PARTICIPANT_ID_LEN,
};
pub use paxos_commit_core::types::{MAX_BALLOT, MAX_PARTICIPANTS};
use paxos_commit_core::{Ballot, Msg, Outcome, Participant, ReplicaId, TxnId, Vote};
use std::collections::BTreeSet;

/// Longest text an Enlisted answer may carry (an error message for the agent's log).
pub const MAX_ENLISTED_MESSAGE_LEN: usize = 4096;

/// A message on the wire that does not make sense to the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMessage(pub String);

impl std::fmt::Display for BadMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed protocol message: {}", self.0)
    }
}

impl std::error::Error for BadMessage {}

/// At most the first 64 characters of an input, for an error message: a refused input may be
/// megabytes long and must not be copied whole into logs.
fn excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

fn ballot_from_pb(what: &str, ballot: u64) -> Result<Ballot, BadMessage> {
    if ballot_in_range(ballot) {
        Ok(ballot)
    } else {
        Err(BadMessage(format!(
            "{what} {ballot} is above the highest ballot {MAX_BALLOT}"
        )))
    }
}

/// A participant id from the wire: 1–64 characters of `[A-Za-z0-9_-]`.
pub fn participant_id_from_pb(id: &str) -> Result<String, BadMessage> {
    if is_valid_participant_id(id) {
        Ok(id.to_string())
    } else {
        Err(BadMessage(format!(
            "participant id {:?} is not 1-{MAX_PARTICIPANT_ID_LEN} characters of [A-Za-z0-9_-]",
            excerpt(id)
        )))
    }
}

/// A participant from the wire, checked: a valid id and an address of 1–256 bytes.
pub fn checked_participant_from_pb(p: &pb::Participant) -> Result<Participant, BadMessage> {
    let id = participant_id_from_pb(&p.id)?;
    if !is_valid_address(&p.address) {
        return Err(BadMessage(format!(
            "address {:?} of participant {id} is not 1-{MAX_ADDRESS_LEN} bytes without \
             control characters",
            excerpt(&p.address)
        )));
    }
    Ok(Participant::new(id, p.address.clone()))
}

/// A participant set R from the wire, checked: at most [`MAX_PARTICIPANTS`], each valid,
/// none listed twice (R is a set; two entries for one id would be two addresses for one
/// participant).
pub fn checked_participants_from_pb(
    ps: &[pb::Participant],
) -> Result<Vec<Participant>, BadMessage> {
    if ps.len() > MAX_PARTICIPANTS {
        return Err(BadMessage(format!(
            "{} participants (at most {MAX_PARTICIPANTS})",
            ps.len()
        )));
    }
    let mut seen = BTreeSet::new();
    ps.iter()
        .map(|p| {
            let p = checked_participant_from_pb(p)?;
            if !seen.insert(p.id.clone()) {
                return Err(BadMessage(format!("participant {} listed twice", p.id)));
            }
            Ok(p)
        })
        .collect()
}

pub fn participant_to_pb(p: &Participant) -> pb::Participant {
    pb::Participant {
        id: p.id.clone(),
        address: p.address.clone(),
    }
}

/// Unchecked: only for what a trusted peer reports (a replica's status answer). Anything a
/// caller sends goes through [`checked_participant_from_pb`].
pub fn participant_from_pb(p: &pb::Participant) -> Participant {
    Participant::new(p.id.clone(), p.address.clone())
}

pub fn participants_to_pb(ps: &[Participant]) -> Vec<pb::Participant> {
    ps.iter().map(participant_to_pb).collect()
}

/// Unchecked: see [`participant_from_pb`]; callers' input goes through
/// [`checked_participants_from_pb`].
pub fn participants_from_pb(ps: &[pb::Participant]) -> Vec<Participant> {
    ps.iter().map(participant_from_pb).collect()
}

pub fn vote_to_pb(v: Vote) -> i32 {
    match v {
        Vote::Prepared => pb::Vote::Prepared as i32,
        Vote::Aborted => pb::Vote::Aborted as i32,
    }
}

pub fn vote_from_pb(v: i32) -> Result<Vote, BadMessage> {
    match pb::Vote::try_from(v) {
        Ok(pb::Vote::Prepared) => Ok(Vote::Prepared),
        Ok(pb::Vote::Aborted) => Ok(Vote::Aborted),
        _ => Err(BadMessage(format!("vote {v}"))),
    }
}

pub fn outcome_to_pb(o: Outcome) -> i32 {
    match o {
        Outcome::Committed => pb::Outcome::Committed as i32,
        Outcome::Aborted => pb::Outcome::Aborted as i32,
    }
}

pub fn outcome_from_pb(o: i32) -> Result<Outcome, BadMessage> {
    match pb::Outcome::try_from(o) {
        Ok(pb::Outcome::Committed) => Ok(Outcome::Committed),
        Ok(pb::Outcome::Aborted) => Ok(Outcome::Aborted),
        _ => Err(BadMessage(format!("outcome {o}"))),
    }
}

pub fn txid_from_pb(s: &str) -> Result<TxnId, BadMessage> {
    s.parse()
        .map_err(|e: paxos_commit_core::types::BadTxnId| BadMessage(e.to_string()))
}

/// A list of txids from an audit request: at most [`crate::limits::MAX_AUDIT_PAGE`], each
/// well-formed.
pub fn txids_from_pb(list: &[String]) -> Result<Vec<TxnId>, BadMessage> {
    let max = crate::limits::MAX_AUDIT_PAGE;
    if list.len() > max {
        return Err(BadMessage(format!(
            "{} txids asked; at most {max}",
            list.len()
        )));
    }
    list.iter().map(|t| txid_from_pb(t)).collect()
}

/// A message of the core on the wire, marked as sent by replica `from` (agents use 0).
pub fn msg_to_pb(from: ReplicaId, msg: &Msg) -> pb::PaxosMessage {
    use pb::paxos_message::Body;
    let body = match msg {
        Msg::Phase1a {
            ballot,
            participants,
            ..
        } => Body::Phase1a(pb::Phase1a {
            ballot: *ballot,
            participants: participants_to_pb(participants),
        }),
        Msg::Phase1b {
            ballot,
            accepted,
            participants,
            ..
        } => Body::Phase1b(pb::Phase1b {
            ballot: *ballot,
            accepted: accepted
                .iter()
                .map(|(p, b, v)| pb::Accepted {
                    participant: p.clone(),
                    ballot: *b,
                    vote: vote_to_pb(*v),
                })
                .collect(),
            participants: participants_to_pb(participants),
        }),
        Msg::Phase2a {
            participant,
            ballot,
            vote,
            participants,
            ..
        } => Body::Phase2a(pb::Phase2a {
            participant: participant.clone(),
            ballot: *ballot,
            vote: vote_to_pb(*vote),
            participants: participants_to_pb(participants),
            cause: None,
        }),
        Msg::Phase2b {
            participant,
            ballot,
            vote,
            ..
        } => Body::Phase2b(pb::Phase2b {
            participant: participant.clone(),
            ballot: *ballot,
            vote: vote_to_pb(*vote),
        }),
        Msg::Nack {
            ballot, promised, ..
        } => Body::Nack(pb::Nack {
            ballot: *ballot,
            promised: *promised,
        }),
        Msg::Decided {
            outcome,
            participants,
            ..
        } => Body::Decided(pb::Decided {
            outcome: outcome_to_pb(*outcome),
            participants: participants_to_pb(participants),
        }),
        Msg::Finished { outcome, .. } => Body::Finished(pb::Finished {
            outcome: outcome_to_pb(*outcome),
        }),
        Msg::Prepare { participants, .. } => Body::Prepare(pb::Prepare {
            participants: participants_to_pb(participants),
        }),
        Msg::Decide { outcome, .. } => Body::Decide(pb::Decide {
            outcome: outcome_to_pb(*outcome),
        }),
    };
    wire(msg.txn(), from, body)
}

fn wire(txn: TxnId, from: ReplicaId, body: pb::paxos_message::Body) -> pb::PaxosMessage {
    pb::PaxosMessage {
        txid: txn.to_string(),
        from_replica: from,
        body: Some(body),
        traceparent: String::new(),
    }
}

/// Agent → leader: join `txn`.
pub fn enlist_to_pb(txn: TxnId, me: &Participant) -> pb::PaxosMessage {
    wire(
        txn,
        0,
        pb::paxos_message::Body::Enlist(pb::Enlist {
            participant: Some(participant_to_pb(me)),
        }),
    )
}

/// Leader → agent: the answer to an enlistment, as a gRPC status code and message.
pub fn enlisted_to_pb(txn: TxnId, from: ReplicaId, code: i32, message: String) -> pb::PaxosMessage {
    wire(
        txn,
        from,
        pb::paxos_message::Body::Enlisted(pb::Enlisted { code, message }),
    )
}

/// Agent → replica: `participant` applied the decision of `txn`.
pub fn applied_to_pb(txn: TxnId, participant: &str) -> pb::PaxosMessage {
    wire(
        txn,
        0,
        pb::paxos_message::Body::Applied(pb::Applied {
            participant: participant.to_string(),
        }),
    )
}

/// What arrives on a `DeliverStream`: a message of the core, or one of the agents'
/// enlistment and acknowledgement messages that live beside it.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivered {
    Msg(ReplicaId, Msg),
    Enlist {
        txn: TxnId,
        participant: Participant,
    },
    Enlisted {
        txn: TxnId,
        code: i32,
        message: String,
    },
    Applied {
        txn: TxnId,
        participant: String,
    },
}

pub fn delivered_from_pb(m: &pb::PaxosMessage) -> Result<Delivered, BadMessage> {
    use pb::paxos_message::Body;
    let txn = txid_from_pb(&m.txid)?;
    Ok(match &m.body {
        Some(Body::Enlist(x)) => Delivered::Enlist {
            txn,
            participant: x
                .participant
                .as_ref()
                .filter(|p| !p.id.is_empty() && !p.address.is_empty())
                .ok_or_else(|| BadMessage("enlist needs a participant id and address".into()))
                .and_then(checked_participant_from_pb)?,
        },
        Some(Body::Enlisted(x)) if x.message.len() > MAX_ENLISTED_MESSAGE_LEN => {
            return Err(BadMessage(format!(
                "enlisted message of {} bytes (at most {MAX_ENLISTED_MESSAGE_LEN})",
                x.message.len()
            )))
        }
        Some(Body::Enlisted(x)) => Delivered::Enlisted {
            txn,
            code: x.code,
            message: x.message.clone(),
        },
        Some(Body::Applied(x)) if !x.participant.is_empty() => Delivered::Applied {
            txn,
            participant: participant_id_from_pb(&x.participant)?,
        },
        Some(Body::Applied(_)) => return Err(BadMessage("applied needs a participant".into())),
        _ => {
            let (from, msg) = msg_from_pb(m)?;
            Delivered::Msg(from, msg)
        }
    })
}

pub fn msg_from_pb(m: &pb::PaxosMessage) -> Result<(ReplicaId, Msg), BadMessage> {
    use pb::paxos_message::Body;
    let txn = txid_from_pb(&m.txid)?;
    let body = m
        .body
        .as_ref()
        .ok_or_else(|| BadMessage("empty body".into()))?;
    let msg = match body {
        Body::Phase1a(x) => Msg::Phase1a {
            txn,
            ballot: ballot_from_pb("phase 1a ballot", x.ballot)?,
            participants: checked_participants_from_pb(&x.participants)?,
        },
        Body::Phase1b(x) => Msg::Phase1b {
            txn,
            ballot: ballot_from_pb("phase 1b ballot", x.ballot)?,
            accepted: accepted_from_pb(&x.accepted)?,
            participants: checked_participants_from_pb(&x.participants)?,
        },
        Body::Phase2a(x) => Msg::Phase2a {
            txn,
            participant: participant_id_from_pb(&x.participant)?,
            ballot: ballot_from_pb("phase 2a ballot", x.ballot)?,
            vote: vote_from_pb(x.vote)?,
            participants: checked_participants_from_pb(&x.participants)?,
        },
        Body::Phase2b(x) => Msg::Phase2b {
            txn,
            participant: participant_id_from_pb(&x.participant)?,
            ballot: ballot_from_pb("phase 2b ballot", x.ballot)?,
            vote: vote_from_pb(x.vote)?,
        },
        Body::Nack(x) => Msg::Nack {
            txn,
            ballot: ballot_from_pb("nack ballot", x.ballot)?,
            promised: ballot_from_pb("nack promise", x.promised)?,
        },
        Body::Decided(x) => Msg::Decided {
            txn,
            outcome: outcome_from_pb(x.outcome)?,
            participants: checked_participants_from_pb(&x.participants)?,
        },
        Body::Finished(x) => Msg::Finished {
            txn,
            outcome: outcome_from_pb(x.outcome)?,
        },
        Body::Prepare(x) => Msg::Prepare {
            txn,
            participants: checked_participants_from_pb(&x.participants)?,
        },
        Body::Decide(x) => Msg::Decide {
            txn,
            outcome: outcome_from_pb(x.outcome)?,
        },
        Body::Enlist(_) | Body::Enlisted(_) | Body::Applied(_) => {
            return Err(BadMessage(
                "an enlistment message is not a Paxos message".into(),
            ))
        }
    };
    Ok((m.from_replica, msg))
}

/// A phase 1b's accepted values: at most one per instance, so at most [`MAX_PARTICIPANTS`].
fn accepted_from_pb(accepted: &[pb::Accepted]) -> Result<Vec<(String, Ballot, Vote)>, BadMessage> {
    if accepted.len() > MAX_PARTICIPANTS {
        return Err(BadMessage(format!(
            "{} accepted values (at most {MAX_PARTICIPANTS})",
            accepted.len()
        )));
    }
    let mut seen = BTreeSet::new();
    accepted
        .iter()
        .map(|a| {
            let p = participant_id_from_pb(&a.participant)?;
            if !seen.insert(p.clone()) {
                return Err(BadMessage(format!("accepted value of {p} listed twice")));
            }
            let ballot = ballot_from_pb("accepted ballot", a.ballot)?;
            Ok((p, ballot, vote_from_pb(a.vote)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paxos_messages_round_trip() {
        let txn = TxnId::new(2, 77);
        let r = vec![Participant::new("a", "127.0.0.1:1")];
        let msgs = vec![
            Msg::Phase1a {
                txn,
                ballot: 5,
                participants: r.clone(),
            },
            Msg::Phase1b {
                txn,
                ballot: 5,
                accepted: vec![("a".into(), 0, Vote::Prepared)],
                participants: r.clone(),
            },
            Msg::Phase2a {
                txn,
                participant: "a".into(),
                ballot: 0,
                vote: Vote::Aborted,
                participants: r.clone(),
            },
            Msg::Phase2b {
                txn,
                participant: "a".into(),
                ballot: 5,
                vote: Vote::Prepared,
            },
            Msg::Nack {
                txn,
                ballot: 4,
                promised: 8,
            },
            Msg::Decided {
                txn,
                outcome: Outcome::Committed,
                participants: r,
            },
            Msg::Finished {
                txn,
                outcome: Outcome::Aborted,
            },
            Msg::Prepare {
                txn,
                participants: vec![Participant::new("b", "127.0.0.1:2")],
            },
            Msg::Decide {
                txn,
                outcome: Outcome::Committed,
            },
        ];
        for m in msgs {
            let wire = msg_to_pb(1, &m);
            assert_eq!(msg_from_pb(&wire), Ok((1, m.clone())));
            assert_eq!(delivered_from_pb(&wire), Ok(Delivered::Msg(1, m)));
        }
    }

    #[test]
    fn enlistment_messages_round_trip_and_bad_ones_are_refused() {
        let txn = TxnId::new(0, 9);
        let me = Participant::new("bank_a", "127.0.0.1:7000");
        assert_eq!(
            delivered_from_pb(&enlist_to_pb(txn, &me)),
            Ok(Delivered::Enlist {
                txn,
                participant: me.clone()
            })
        );
        assert_eq!(
            delivered_from_pb(&enlisted_to_pb(txn, 0, 5, "gone".into())),
            Ok(Delivered::Enlisted {
                txn,
                code: 5,
                message: "gone".into()
            })
        );
        assert_eq!(
            delivered_from_pb(&applied_to_pb(txn, "bank_a")),
            Ok(Delivered::Applied {
                txn,
                participant: "bank_a".into()
            })
        );
        let nobody = enlist_to_pb(txn, &Participant::new("", ""));
        assert!(delivered_from_pb(&nobody).is_err());
        assert!(msg_from_pb(&enlist_to_pb(txn, &me)).is_err());
        assert!(delivered_from_pb(&applied_to_pb(txn, "")).is_err());
    }

    fn phase2a(
        ballot: u64,
        participant: &str,
        participants: Vec<pb::Participant>,
    ) -> pb::PaxosMessage {
        wire(
            TxnId::new(1, 3),
            1,
            pb::paxos_message::Body::Phase2a(pb::Phase2a {
                participant: participant.into(),
                ballot,
                vote: vote_to_pb(Vote::Prepared),
                participants,
                cause: None,
            }),
        )
    }

    fn pbp(id: &str, address: &str) -> pb::Participant {
        pb::Participant {
            id: id.into(),
            address: address.into(),
        }
    }

    /// Regression: a ballot of u64::MAX reached the core, whose ballot arithmetic overflowed.
    #[test]
    fn ballots_above_the_limit_are_refused() {
        use pb::paxos_message::Body;
        let ok = || vec![pbp("a", "x:1")];
        assert!(msg_from_pb(&phase2a(MAX_BALLOT, "a", ok())).is_ok());
        for b in [MAX_BALLOT + 1, u64::MAX] {
            assert!(msg_from_pb(&phase2a(b, "a", ok())).is_err());
            let t = TxnId::new(0, 1);
            let bodies = [
                Body::Phase1a(pb::Phase1a {
                    ballot: b,
                    participants: ok(),
                }),
                Body::Phase1b(pb::Phase1b {
                    ballot: 1,
                    accepted: vec![pb::Accepted {
                        participant: "a".into(),
                        ballot: b,
                        vote: 1,
                    }],
                    participants: ok(),
                }),
                Body::Phase2b(pb::Phase2b {
                    participant: "a".into(),
                    ballot: b,
                    vote: 1,
                }),
                Body::Nack(pb::Nack {
                    ballot: 1,
                    promised: b,
                }),
                Body::Nack(pb::Nack {
                    ballot: b,
                    promised: 1,
                }),
            ];
            for body in bodies {
                let m = wire(t, 0, body);
                assert!(msg_from_pb(&m).is_err(), "{m:?}");
                assert!(delivered_from_pb(&m).is_err(), "{m:?}");
            }
        }
    }

    /// Regression: participant lists, ids and addresses were unbounded.
    #[test]
    fn unbounded_participants_ids_and_addresses_are_refused() {
        let many = |n: usize| (0..n).map(|i| pbp(&format!("p{i}"), "x:1")).collect();
        assert!(msg_from_pb(&phase2a(1, "p0", many(MAX_PARTICIPANTS))).is_ok());
        assert!(msg_from_pb(&phase2a(1, "p0", many(MAX_PARTICIPANTS + 1))).is_err());
        let long_id = "x".repeat(65);
        let bad: Vec<pb::PaxosMessage> = vec![
            phase2a(1, &long_id, vec![]),
            phase2a(1, "", vec![]),
            phase2a(1, "a:b", vec![]),
            phase2a(1, "a", vec![pbp(&long_id, "x:1")]),
            phase2a(1, "a", vec![pbp("a", "")]),
            phase2a(1, "a", vec![pbp("a", &"x".repeat(257))]),
            phase2a(1, "a", vec![pbp("a", "x\n1")]),
            phase2a(1, "a", vec![pbp("a", "x:1"), pbp("a", "x:2")]),
            applied_to_pb(TxnId::new(0, 1), "no spaces"),
            enlist_to_pb(TxnId::new(0, 1), &Participant::new("a", "y".repeat(300))),
            enlisted_to_pb(TxnId::new(0, 1), 0, 5, "m".repeat(5000)),
            wire(
                TxnId::new(0, 1),
                0,
                pb::paxos_message::Body::Phase1b(pb::Phase1b {
                    ballot: 1,
                    accepted: (0..=MAX_PARTICIPANTS)
                        .map(|i| pb::Accepted {
                            participant: format!("p{i}"),
                            ballot: 0,
                            vote: 1,
                        })
                        .collect(),
                    participants: vec![],
                }),
            ),
            wire(
                TxnId::new(0, 1),
                0,
                pb::paxos_message::Body::Phase1b(pb::Phase1b {
                    ballot: 1,
                    accepted: ["a", "a"]
                        .iter()
                        .map(|p| pb::Accepted {
                            participant: p.to_string(),
                            ballot: 0,
                            vote: 1,
                        })
                        .collect(),
                    participants: vec![],
                }),
            ),
        ];
        for m in bad {
            let err = delivered_from_pb(&m).expect_err("refused");
            assert!(err.0.len() < 300, "error echoes the input: {err}");
        }
        assert!(msg_from_pb(&phase2a(1, &"x".repeat(64), vec![])).is_ok());
        let mut plus = phase2a(1, "a", vec![]);
        plus.txid = "+123456789abcdef".into();
        assert!(msg_from_pb(&plus).is_err());
    }
}
