//! Conversions between the wire types and the core's types, shared by the coordinator and
//! the agent so that both speak exactly the same protocol.

use crate::pb;
use paxos_commit_core::{Msg, Outcome, Participant, ReplicaId, TxnId, Vote};

/// A message on the wire that does not make sense to the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMessage(pub String);

impl std::fmt::Display for BadMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed protocol message: {}", self.0)
    }
}

impl std::error::Error for BadMessage {}

pub fn participant_to_pb(p: &Participant) -> pb::Participant {
    pb::Participant {
        id: p.id.clone(),
        address: p.address.clone(),
    }
}

pub fn participant_from_pb(p: &pb::Participant) -> Participant {
    Participant::new(p.id.clone(), p.address.clone())
}

pub fn participants_to_pb(ps: &[Participant]) -> Vec<pb::Participant> {
    ps.iter().map(participant_to_pb).collect()
}

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
                .map(participant_from_pb)
                .ok_or_else(|| BadMessage("enlist needs a participant id and address".into()))?,
        },
        Some(Body::Enlisted(x)) => Delivered::Enlisted {
            txn,
            code: x.code,
            message: x.message.clone(),
        },
        Some(Body::Applied(x)) if !x.participant.is_empty() => Delivered::Applied {
            txn,
            participant: x.participant.clone(),
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
            ballot: x.ballot,
            participants: participants_from_pb(&x.participants),
        },
        Body::Phase1b(x) => Msg::Phase1b {
            txn,
            ballot: x.ballot,
            accepted: x
                .accepted
                .iter()
                .map(|a| Ok((a.participant.clone(), a.ballot, vote_from_pb(a.vote)?)))
                .collect::<Result<_, BadMessage>>()?,
            participants: participants_from_pb(&x.participants),
        },
        Body::Phase2a(x) => Msg::Phase2a {
            txn,
            participant: x.participant.clone(),
            ballot: x.ballot,
            vote: vote_from_pb(x.vote)?,
            participants: participants_from_pb(&x.participants),
        },
        Body::Phase2b(x) => Msg::Phase2b {
            txn,
            participant: x.participant.clone(),
            ballot: x.ballot,
            vote: vote_from_pb(x.vote)?,
        },
        Body::Nack(x) => Msg::Nack {
            txn,
            ballot: x.ballot,
            promised: x.promised,
        },
        Body::Decided(x) => Msg::Decided {
            txn,
            outcome: outcome_from_pb(x.outcome)?,
            participants: participants_from_pb(&x.participants),
        },
        Body::Finished(x) => Msg::Finished {
            txn,
            outcome: outcome_from_pb(x.outcome)?,
        },
        Body::Prepare(x) => Msg::Prepare {
            txn,
            participants: participants_from_pb(&x.participants),
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
}
