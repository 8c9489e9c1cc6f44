//! The agent's links to the coordinator group: enlisting with a transaction's leader, sending
//! its ballot-0 vote to every acceptor, and asking any replica to resolve an in-doubt branch.

use paxos_commit_core::{participant, Outcome, Participant, ReplicaId, TxnId, Vote};
use paxos_commit_proto::client::{lazy_channel, ClientError};
use paxos_commit_proto::convert::{
    applied_to_pb, enlist_to_pb, msg_to_pb, outcome_from_pb, participants_to_pb,
};
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::acceptor_client::AcceptorClient;
use paxos_commit_proto::pb::coordinator_client::CoordinatorClient;
use paxos_commit_proto::sender::{self, Link};
use paxos_commit_proto::telemetry::{self, TraceParent};
use paxos_commit_proto::tls::Security;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long an enlistment waits for the leader's answer. A leader that is down never
/// answers: the statement then fails with Unavailable, as a refused connection would.
const ENLIST_TIMEOUT: Duration = Duration::from_secs(2);

/// When an unanswered enlistment is sent again, counted from the previous send. The message
/// or its answer can be lost with a stream that broke (a replica or this agent restarted, a
/// connection reset), and one lost answer must not cost the statement the whole deadline.
/// The leader answers a repeated enlistment as it did the first (the same agent is simply
/// enlisted), so repeating is safe; the first answer to arrive is the one that counts.
const ENLIST_RESEND: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_millis(500),
];

/// Enlistments sent and not answered yet, by transaction.
type Waiting = HashMap<TxnId, oneshot::Sender<Result<(), Status>>>;

#[derive(Clone)]
pub struct Coordinators {
    coordinators: Vec<CoordinatorClient<Channel>>,
    /// One streaming sender per replica, shared by every branch: votes to its acceptor,
    /// enlistments to the leaders, acknowledgements of decisions.
    links: Vec<Link>,
    enlisting: Arc<Mutex<Waiting>>,
    me: Participant,
}

impl Coordinators {
    pub fn new(
        addresses: &[String],
        me: Participant,
        security: &Security,
    ) -> Result<Coordinators, ClientError> {
        let mut coordinators = Vec::new();
        let mut links = Vec::new();
        for a in addresses {
            coordinators.push(CoordinatorClient::new(lazy_channel(
                a,
                Some(Duration::from_secs(5)),
                security,
            )?));
            // An agent is no replica: it has no incarnation to name.
            links.push(sender::to_replica(
                AcceptorClient::new(lazy_channel(a, None, security)?),
                None,
            ));
        }
        Ok(Coordinators {
            coordinators,
            links,
            enlisting: Arc::new(Mutex::new(HashMap::new())),
            me,
        })
    }

    pub fn me(&self) -> &Participant {
        &self.me
    }

    /// The replicas' Coordinator services, in replica-id order.
    pub fn replicas(&self) -> &[CoordinatorClient<Channel>] {
        &self.coordinators
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // A panic while holding this lock leaves the map itself consistent.
        self.enlisting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins `txn` with its leader (named by the transaction id) and waits for its answer.
    pub async fn enlist(&self, txn: TxnId) -> Result<(), Status> {
        let leader = self.links.get(txn.leader() as usize).ok_or_else(|| {
            Status::not_found(format!(
                "transaction {txn} names replica {} as its leader, which is not configured",
                txn.leader()
            ))
        })?;
        let (tx, mut rx) = oneshot::channel();
        self.waiting().insert(txn, tx);
        let deadline = Instant::now() + ENLIST_TIMEOUT;
        let mut resend = ENLIST_RESEND.iter();
        let mut sent = 0;
        let answer = loop {
            leader.send(enlist_to_pb(txn, &self.me));
            sent += 1;
            let next = resend
                .next()
                .map_or(deadline, |after| (Instant::now() + *after).min(deadline));
            match tokio::time::timeout_at(next, &mut rx).await {
                Ok(answer) => break answer.ok(),
                Err(_) if Instant::now() >= deadline => break None,
                Err(_) => {}
            }
        };
        self.waiting().remove(&txn);
        if sent > 1 {
            tracing::debug!(%txn, sent, answered = answer.is_some(), "enlistment sent again");
        }
        answer.unwrap_or_else(|| {
            Err(Status::unavailable(format!(
                "the leader of {txn} (replica {}) did not answer the enlistment within {} ms \
                 ({sent} attempts)",
                txn.leader(),
                ENLIST_TIMEOUT.as_millis()
            )))
        })
    }

    /// The leader's answer to an enlistment (`code` 0: enlisted). An answer nobody waits for
    /// any more (timed out) is dropped.
    pub fn enlisted(&self, txn: TxnId, code: i32, message: String) {
        let Some(waiter) = self.waiting().remove(&txn) else {
            return;
        };
        let result = match Code::from_i32(code) {
            Code::Ok => Ok(()),
            code => Err(Status::new(code, message)),
        };
        let _ = waiter.send(result);
    }

    /// Tells replica `to` (the one that sent the decision) that it is applied here.
    pub fn applied(&self, txn: TxnId, to: ReplicaId) {
        if let Some(link) = self.links.get(to as usize) {
            link.send(applied_to_pb(txn, &self.me.id));
        }
    }

    /// Sends this participant's ballot-0 vote to every acceptor. Lost messages are fine:
    /// recovery (phase 1 of a takeover) settles an instance whose vote did not land.
    pub fn vote(
        &self,
        txn: TxnId,
        vote: Vote,
        participants: &[Participant],
        cause: Option<pb::Cause>,
    ) {
        let msgs = participant::vote(
            txn,
            &self.me.id,
            vote,
            participants,
            self.links.len() as u32,
        );
        // The prepare span this runs in, for the acceptors' accept spans.
        let trace = TraceParent::current();
        for (r, msg) in msgs {
            if let Some(link) = self.links.get(r as usize) {
                let mut wire = msg_to_pb(0, &msg);
                telemetry::attach(&mut wire, trace.as_ref());
                if let Some(pb::paxos_message::Body::Phase2a(p2a)) = &mut wire.body {
                    p2a.cause.clone_from(&cause);
                }
                link.send(wire);
            }
        }
    }

    /// Whether `txn`'s leader still holds it open. An unprepared branch may be rolled back
    /// at any time (its participant has not voted), and must be once its leader is gone: the
    /// leader is the only replica that knows an open transaction, so nobody else will ever
    /// abort it, and its row locks would stand until the branch timeout. "Gone" is a leader
    /// that cannot be reached, or that no longer knows the transaction or aborted it (it
    /// restarted, or the open deadline passed).
    pub async fn leader_holds_open(&self, txn: TxnId) -> bool {
        let Some(leader) = self.coordinators.get(txn.leader() as usize) else {
            return false;
        };
        let req = pb::StatusRequest {
            txid: txn.to_string(),
            local_only: true,
        };
        match leader.clone().get_status(req).await {
            Ok(r) => !matches!(
                pb::TxnState::try_from(r.into_inner().state),
                Ok(pb::TxnState::Unknown | pb::TxnState::Aborted)
            ),
            Err(s) => !matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
            ),
        }
    }

    /// Asks the group for the outcome of an in-doubt transaction: the leader first, then the
    /// others, which take the transaction over if they must.
    pub async fn resolve(
        &self,
        txn: TxnId,
        participants: &[Participant],
    ) -> Result<Outcome, Status> {
        let n = self.coordinators.len();
        let first = txn.leader() as usize % n.max(1);
        let mut last = Status::unavailable("no coordinator replica configured");
        for k in 0..n {
            let mut c = self.coordinators[(first + k) % n].clone();
            let req = pb::ResolveRequest {
                txid: txn.to_string(),
                participant: self.me.id.clone(),
                participants: participants_to_pb(participants),
            };
            match c.resolve(req).await {
                Ok(r) => {
                    return outcome_from_pb(r.into_inner().outcome)
                        .map_err(|e| Status::internal(e.to_string()))
                }
                Err(s) if s.code() == Code::InvalidArgument => return Err(s),
                Err(s) => last = s,
            }
        }
        Err(last)
    }
}
