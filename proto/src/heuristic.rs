//! Whether a heuristic decision (an operator's COMMIT or ROLLBACK PREPARED by hand) would
//! contradict what the coordinator group knows.
//!
//! Shared by txctl, which shows the checks before asking, and the agent, which runs them
//! again itself before it obeys: the agent must not rely on its caller having checked.

use crate::pb;
use crate::pb::coordinator_client::CoordinatorClient;
use paxos_commit_core::Outcome;
use std::collections::BTreeSet;
use tonic::transport::Channel;
use tonic::Status;

/// What was checked, and the first contradiction found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupCheck {
    pub replicas_reached: Vec<u32>,
    pub replicas_unreachable: Vec<u32>,
    pub checks: Vec<String>,
    pub contradiction: Option<String>,
}

/// How operators read a transaction state.
pub fn state_name(s: i32) -> &'static str {
    match pb::TxnState::try_from(s).unwrap_or(pb::TxnState::Unspecified) {
        pb::TxnState::InProgress => "in progress",
        pb::TxnState::Committed => "committed",
        pb::TxnState::Aborted => "aborted",
        pb::TxnState::Unknown => "unknown",
        pb::TxnState::Unspecified => "unspecified",
    }
}

/// How operators read a vote.
pub fn vote_name(v: i32) -> &'static str {
    match pb::Vote::try_from(v).unwrap_or(pb::Vote::Unspecified) {
        pb::Vote::Prepared => "prepared",
        pb::Vote::Aborted => "aborted",
        pb::Vote::Unspecified => "?",
    }
}

/// Each replica's own record of `txid` (`local_only`), asked in parallel.
pub async fn local_statuses(
    replicas: &[CoordinatorClient<Channel>],
    txid: &str,
) -> Vec<(u32, Result<pb::StatusResponse, Status>)> {
    let asks = replicas.iter().enumerate().map(|(i, r)| {
        let mut r = r.clone();
        let req = pb::StatusRequest {
            txid: txid.to_string(),
            local_only: true,
        };
        async move {
            let res = r.get_status(req).await.map(tonic::Response::into_inner);
            (i as u32, res)
        }
    });
    futures::future::join_all(asks).await
}

/// Checks `asked` against every replica's answer. Abort contradicts a transaction that may
/// have committed (every participant has a Prepared vote on record, or a replica knows it
/// committed); Commit contradicts one where some participant never prepared, the
/// participants are unknown, or a replica knows it aborted.
pub fn check(asked: Outcome, statuses: &[(u32, Result<pb::StatusResponse, Status>)]) -> GroupCheck {
    let mut out = GroupCheck::default();
    let mut participants: Vec<String> = Vec::new();
    let mut prepared: BTreeSet<String> = BTreeSet::new();
    let mut contradiction: Option<String> = None;
    for (i, r) in statuses {
        let r = match r {
            Ok(r) => r,
            Err(s) => {
                out.replicas_unreachable.push(*i);
                out.checks
                    .push(format!("replica {i}: unreachable ({})", s.message()));
                continue;
            }
        };
        out.replicas_reached.push(*i);
        let state = pb::TxnState::try_from(r.state).unwrap_or(pb::TxnState::Unspecified);
        out.checks.push(format!(
            "replica {i}: state {}, {} participant(s) known",
            state_name(r.state),
            r.participants.len()
        ));
        let decided = match state {
            pb::TxnState::Committed => Some(Outcome::Committed),
            pb::TxnState::Aborted => Some(Outcome::Aborted),
            _ => None,
        };
        if let Some(d) = decided.filter(|d| *d != asked) {
            contradiction.get_or_insert(format!("replica {i} knows the decision: {d}"));
        }
        for p in &r.participants {
            let id = p
                .participant
                .as_ref()
                .map(|x| x.id.clone())
                .unwrap_or_default();
            if !participants.contains(&id) {
                participants.push(id.clone());
            }
            for v in &p.votes {
                let vote = pb::Vote::try_from(v.vote).unwrap_or(pb::Vote::Unspecified);
                out.checks.push(format!(
                    "replica {i}: {id} voted {} in ballot {}",
                    vote_name(v.vote),
                    v.ballot
                ));
                match vote {
                    pb::Vote::Prepared => {
                        prepared.insert(id.clone());
                    }
                    pb::Vote::Aborted if asked == Outcome::Committed => {
                        contradiction.get_or_insert(format!(
                            "replica {i} accepted an Aborted vote for {id}"
                        ));
                    }
                    _ => {}
                }
            }
        }
    }
    match asked {
        Outcome::Aborted => {
            if !participants.is_empty() && participants.iter().all(|p| prepared.contains(p)) {
                contradiction.get_or_insert(
                    "every participant has a Prepared vote on record: it may have committed"
                        .to_string(),
                );
            }
        }
        Outcome::Committed => {
            if participants.is_empty() {
                contradiction.get_or_insert(
                    "no reachable replica knows the participants: committing one branch alone \
                     could break atomicity"
                        .to_string(),
                );
            }
            for p in &participants {
                if !prepared.contains(p) {
                    contradiction.get_or_insert(format!("no Prepared vote of {p} on record"));
                }
            }
        }
    }
    out.contradiction = contradiction;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: pb::TxnState, votes: &[(&str, pb::Vote)]) -> pb::StatusResponse {
        pb::StatusResponse {
            state: state as i32,
            participants: votes
                .iter()
                .map(|(p, v)| pb::ParticipantStatus {
                    participant: Some(pb::Participant {
                        id: p.to_string(),
                        address: String::new(),
                    }),
                    votes: vec![pb::AcceptorVote {
                        acceptor: 0,
                        ballot: 0,
                        vote: *v as i32,
                    }],
                    applied: false,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn abort_of_a_transaction_that_may_have_committed_is_refused() {
        let all_prepared = status(
            pb::TxnState::InProgress,
            &[("a", pb::Vote::Prepared), ("b", pb::Vote::Prepared)],
        );
        let c = check(Outcome::Aborted, &[(0, Ok(all_prepared.clone()))]);
        assert!(c.contradiction.is_some());
        let c = check(Outcome::Committed, &[(0, Ok(all_prepared))]);
        assert_eq!(c.contradiction, None);
    }

    #[test]
    fn commit_needs_every_prepared_vote_and_known_participants() {
        let one = status(pb::TxnState::InProgress, &[("a", pb::Vote::Prepared)]);
        let mut two = one.clone();
        two.participants.push(pb::ParticipantStatus {
            participant: Some(pb::Participant {
                id: "b".into(),
                address: String::new(),
            }),
            votes: Vec::new(),
            applied: false,
        });
        assert!(check(Outcome::Committed, &[(0, Ok(two))])
            .contradiction
            .is_some());
        let unreachable = check(Outcome::Committed, &[(0, Err(Status::unavailable("down")))]);
        assert!(unreachable.contradiction.is_some());
        assert_eq!(unreachable.replicas_unreachable, vec![0]);
        let decided = status(pb::TxnState::Committed, &[("a", pb::Vote::Prepared)]);
        assert!(check(Outcome::Aborted, &[(1, Ok(decided))])
            .contradiction
            .is_some());
    }
}
