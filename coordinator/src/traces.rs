//! Which trace each transaction belongs to, kept by the driver beside the core (which knows
//! nothing of tracing), so that the messages the core sends about a transaction carry its
//! trace context, and the spans of the leader's decision and of the acceptor's phase 2 can
//! be open while the core works.
//!
//! Only filled when this process exports traces: otherwise no trace context arrives (see
//! `paxos_commit_proto::telemetry`) and every method returns at once. Bounded: at most
//! [`MAX_TRACED`] transactions and [`MAX_OPEN_ACCEPTS`] open accept spans per transaction;
//! the oldest transaction is forgotten first, and a finished one at once.

use paxos_commit_core::{Outcome, TxnId};
use paxos_commit_proto::phase_span;
use paxos_commit_proto::telemetry::{set_parent, TraceParent};
use std::collections::{HashMap, VecDeque};

/// Most transactions whose trace context is kept. Past that the oldest goes: its later
/// messages then travel without one, which costs a gap in a trace, nothing else.
pub const MAX_TRACED: usize = 16_384;

/// Most accept spans open for one transaction (one per participant's instance and ballot).
pub const MAX_OPEN_ACCEPTS: usize = 64;

struct Traced {
    trace: TraceParent,
    /// The leader's decision: from Commit (or Abort) until the outcome is chosen.
    decide: Option<tracing::Span>,
    /// This acceptor's phase 2 of an instance: from the 2a until its 2b leaves, after the
    /// acceptance is on disk.
    accepts: Vec<(String, tracing::Span)>,
}

#[derive(Default)]
pub struct Traces {
    by_txn: HashMap<TxnId, Traced>,
    /// Insertion order, for forgetting the oldest; may name transactions already forgotten.
    order: VecDeque<TxnId>,
}

impl Traces {
    /// The trace context messages about `txn` carry.
    pub fn get(&self, txn: TxnId) -> Option<&TraceParent> {
        self.by_txn.get(&txn).map(|t| &t.trace)
    }

    /// Remembers `txn`'s trace (a client's call on the leader); a later call's replaces it.
    pub fn set(&mut self, txn: TxnId, trace: Option<TraceParent>) {
        let Some(trace) = trace else { return };
        match self.by_txn.get_mut(&txn) {
            Some(t) => t.trace = trace,
            None => self.insert(txn, trace),
        }
    }

    fn insert(&mut self, txn: TxnId, trace: TraceParent) {
        while self.by_txn.len() >= MAX_TRACED {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.by_txn.remove(&oldest);
        }
        if self.order.len() >= 2 * MAX_TRACED {
            let by_txn = &self.by_txn;
            self.order.retain(|t| by_txn.contains_key(t));
        }
        self.by_txn.insert(
            txn,
            Traced {
                trace,
                decide: None,
                accepts: Vec::new(),
            },
        );
        self.order.push_back(txn);
    }

    /// The leader starts deciding `txn` (a client's Commit, Prepare or Abort, traced by
    /// `trace`): its decide span opens, and what it sends from now on (Prepare to the agents)
    /// belongs to that span.
    pub fn deciding(&mut self, txn: TxnId, trace: Option<TraceParent>) {
        self.set(txn, trace);
        let Some(t) = self.by_txn.get_mut(&txn) else {
            return;
        };
        if t.decide.is_some() {
            return;
        }
        let span = phase_span!("decide", txid = %txn, outcome = tracing::field::Empty);
        set_parent(&span, Some(&t.trace));
        if let Some(own) = TraceParent::of(&span) {
            t.trace = own;
        }
        t.decide = Some(span);
    }

    /// The outcome of `txn` is chosen: its decide span closes.
    pub fn decided(&mut self, txn: TxnId, outcome: Outcome) {
        if let Some(span) = self.by_txn.get_mut(&txn).and_then(|t| t.decide.take()) {
            span.record("outcome", tracing::field::debug(outcome));
        }
    }

    /// A phase 2a for `participant`'s instance of `txn` arrived at this acceptor, traced by
    /// `trace`: its accept span opens (closed by [`Traces::accepted`]). A transaction this
    /// replica does not lead takes that trace for what it sends about it.
    pub fn accepting(&mut self, txn: TxnId, participant: &str, ballot: u64, trace: TraceParent) {
        if !self.by_txn.contains_key(&txn) {
            self.insert(txn, trace.clone());
        }
        let Some(t) = self.by_txn.get_mut(&txn) else {
            return;
        };
        if t.accepts.len() >= MAX_OPEN_ACCEPTS {
            // Refused or lost 2as leave spans that no 2b closes: never more than this.
            t.accepts.clear();
        }
        let span = phase_span!("accept", txid = %txn, participant, ballot);
        set_parent(&span, Some(&trace));
        t.accepts.push((participant.to_string(), span));
    }

    /// This acceptor's phase 2b for `participant`'s instance of `txn` leaves (its acceptance
    /// is durable): the accept spans of that instance close.
    pub fn accepted(&mut self, txn: TxnId, participant: &str) {
        if let Some(t) = self.by_txn.get_mut(&txn) {
            t.accepts.retain(|(p, _)| p != participant);
        }
    }

    /// `txn` is finished (every participant applied the decision): nothing more to trace.
    pub fn forget(&mut self, txn: TxnId) {
        self.by_txn.remove(&txn);
    }

    pub fn len(&self) -> usize {
        self.by_txn.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_txn.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(n: u64) -> TraceParent {
        TraceParent::parse(&format!(
            "00-0af7651916cd43dd8448eb211c80319c-{:016x}-01",
            n + 1
        ))
        .expect("valid")
    }

    #[test]
    fn the_map_is_bounded_and_forgets_the_oldest_first() {
        let mut traces = Traces::default();
        for i in 0..(MAX_TRACED as u64 + 10) {
            traces.set(TxnId::new(0, i), Some(tp(i)));
        }
        assert_eq!(traces.len(), MAX_TRACED);
        assert!(traces.get(TxnId::new(0, 0)).is_none());
        assert_eq!(
            traces.get(TxnId::new(0, MAX_TRACED as u64 + 9)),
            Some(&tp(MAX_TRACED as u64 + 9))
        );
        // Forgetting and inserting again and again keeps the order queue bounded too.
        for i in 0..(4 * MAX_TRACED as u64) {
            let t = TxnId::new(1, i);
            traces.set(t, Some(tp(i)));
            traces.forget(t);
        }
        assert!(traces.order.len() <= 2 * MAX_TRACED + 1);
    }

    #[test]
    fn without_a_trace_context_nothing_is_kept() {
        let mut traces = Traces::default();
        let t = TxnId::new(0, 1);
        traces.set(t, None);
        traces.deciding(t, None);
        traces.decided(t, Outcome::Committed);
        assert!(traces.is_empty());
        traces.set(t, Some(tp(1)));
        for _ in 0..(3 * MAX_OPEN_ACCEPTS) {
            traces.accepting(t, "a", 0, tp(2));
        }
        assert!(traces.by_txn[&t].accepts.len() <= MAX_OPEN_ACCEPTS);
        traces.accepted(t, "a");
        assert!(traces.by_txn[&t].accepts.is_empty());
        traces.forget(t);
        assert!(traces.is_empty());
    }
}
