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

/// A replica-to-replica or agent-to-replica message on the wire. Agent-bound messages
/// (Prepare, Decide) travel as their own RPCs and are not encoded here.
pub fn msg_to_pb(from: ReplicaId, msg: &Msg) -> Option<pb::PaxosMessage> {
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
        Msg::Prepare { .. } | Msg::Decide { .. } => return None,
    };
    Some(pb::PaxosMessage {
        txid: msg.txn().to_string(),
        from_replica: from,
        body: Some(body),
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
        ];
        for m in msgs {
            let wire = msg_to_pb(1, &m).expect("encodable");
            assert_eq!(msg_from_pb(&wire), Ok((1, m)));
        }
    }
}
