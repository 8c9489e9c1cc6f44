//! One answer from several replicas' partial views: a transaction is decided if any replica
//! learned the decision, or if the acceptors' accepted values already imply it.

use crate::replica::LocalStatus;
use crate::types::{majority, Ballot, Outcome, Vote};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnState {
    InProgress,
    Decided(Outcome),
    Unknown { expired: bool },
}

/// Combines the views of the replicas that answered (indexed by replica id).
pub fn combine(views: &BTreeMap<u32, LocalStatus>, replicas: u32) -> TxnState {
    if let Some(o) = views.values().find_map(|v| v.decided) {
        return TxnState::Decided(o);
    }
    if !views.values().any(|v| v.known) {
        return TxnState::Unknown {
            expired: views.values().any(|v| v.expired),
        };
    }
    // instance → (ballot, vote) → how many acceptors accepted it.
    let mut counts: BTreeMap<&str, BTreeMap<(Ballot, Vote), usize>> = BTreeMap::new();
    for v in views.values() {
        for (p, bv) in &v.accepted {
            *counts.entry(p).or_default().entry(*bv).or_default() += 1;
        }
    }
    let chosen = |p: &str| {
        counts.get(p).and_then(|m| {
            m.iter()
                .find(|(_, n)| **n >= majority(replicas))
                .map(|((_, v), _)| *v)
        })
    };
    let participants = views
        .values()
        .map(|v| &v.participants)
        .find(|p| !p.is_empty());
    // As the decision rule: only the instances of R count, once R is known.
    let in_r = |p: &str| participants.is_none_or(|ps| ps.iter().any(|x| x.id == p));
    if counts
        .keys()
        .any(|p| in_r(p) && chosen(p) == Some(Vote::Aborted))
    {
        return TxnState::Decided(Outcome::Aborted);
    }
    if let Some(ps) = participants {
        if ps.iter().all(|p| chosen(&p.id) == Some(Vote::Prepared)) {
            return TxnState::Decided(Outcome::Committed);
        }
    }
    TxnState::InProgress
}
