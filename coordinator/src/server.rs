//! The gRPC face of a replica: thin handlers that check who is calling, parse, forward a
//! command to the driver, and map the answer (or its absence) to a reply or a status.
//!
//! Who may call what follows DESIGN.md's table and is decided from the caller's certificate
//! ([`Gate`]): only replicas speak Paxos, each as itself and only with its own ballots; an
//! agent speaks only for its own participant (its enlistment, its ballot-0 vote, its
//! acknowledgement); clients run transactions; operators read and resolve.

use crate::begins::{Begins, Begun, MAX_KEY_BYTES};
use crate::causes::Causes;
use crate::config::ReplicaConfig;
use crate::driver::{Command, Decision, Info, Until};
use crate::error::CoordinatorError;
use crate::lifecycle::Lifecycle;
use crate::recent::{Ended, Recent};
use paxos_commit_core::status::{combine, TxnState};
use paxos_commit_core::{
    AbortCause, JoinAnswer, JoinMode, LocalStatus, Msg, Outcome, ReplicaId, TxnError, TxnId,
};
use paxos_commit_proto::client::lazy_channel;
use paxos_commit_proto::convert::{
    checked_participants_from_pb, delivered_from_pb, outcome_to_pb, participant_from_pb,
    participant_id_from_pb, participant_to_pb, txid_from_pb, txids_from_pb, vote_to_pb, Delivered,
};
use paxos_commit_proto::limits::MAX_AUDIT_PAGE;
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::coordinator_client::CoordinatorClient;
use paxos_commit_proto::phase_span;
use paxos_commit_proto::sender::INCARNATION_HEADER;
use paxos_commit_proto::telemetry::{set_parent, TraceParent};
use paxos_commit_proto::tls::{Caller, Gate, Kind, Role};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// The span of a client's call, a child of the caller's trace context when it sent one.
fn call_span<T>(req: &Request<T>, span: tracing::Span) -> tracing::Span {
    set_parent(&span, TraceParent::from_metadata(req.metadata()).as_ref());
    span
}

/// Names the transaction on the current (call) span once it is known.
fn record_txid(txn: TxnId) {
    tracing::Span::current().record("txid", tracing::field::display(txn));
}

#[derive(Clone)]
pub struct Handle {
    cfg: Arc<ReplicaConfig>,
    commands: mpsc::UnboundedSender<Command>,
    /// Other replicas, for GetStatus answers that need more than this replica knows.
    peers: Arc<Vec<Option<CoordinatorClient<Channel>>>>,
    gate: Gate,
    life: Arc<Lifecycle>,
    /// Why participants voted Aborted, as they said.
    causes: Arc<Causes>,
    /// Idempotency keys of Begin. An async lock: two Begins with one key must not both miss.
    begins: Arc<tokio::sync::Mutex<Begins>>,
    /// The last minutes of commits, for the operator page.
    recent: Arc<Recent>,
}

impl Handle {
    pub fn new(
        cfg: Arc<ReplicaConfig>,
        commands: mpsc::UnboundedSender<Command>,
        life: Arc<Lifecycle>,
    ) -> Result<Handle, CoordinatorError> {
        let peers = cfg
            .replicas
            .iter()
            .enumerate()
            .map(|(i, a)| {
                if i as u32 == cfg.id {
                    return Ok(None);
                }
                lazy_channel(a, Some(Duration::from_secs(1)), &cfg.security)
                    .map(|c| Some(CoordinatorClient::new(c)))
                    .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Handle {
            gate: Gate::new(&cfg.security, cfg.max_concurrent_calls),
            cfg,
            commands,
            peers: Arc::new(peers),
            life,
            causes: Arc::default(),
            begins: Arc::default(),
            recent: Arc::default(),
        })
    }

    /// The last minutes of commits this replica led.
    pub fn recent(&self) -> &Recent {
        &self.recent
    }

    /// Serving, draining or degraded, and why.
    pub fn state(&self) -> (&'static str, String) {
        self.life.state()
    }

    /// Asks the driver, and gives up after `bound`: an answer that waits for an fsync must
    /// not make a call outlive its deadline when the disk hangs.
    async fn ask_within<T>(
        &self,
        bound: Duration,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| Status::from(CoordinatorError::ShuttingDown))?;
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(CoordinatorError::ShuttingDown.into()),
            Err(_) => Err(Status::unavailable(format!(
                "replica {} did not answer within {} ms (is its acceptor log stalled?)",
                self.cfg.id,
                bound.as_millis()
            ))),
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        self.ask_within(self.cfg.commit_timeout, make).await
    }

    /// Waits for a decision, never longer than the commit timeout whatever the disk or the
    /// network do. Past it, a decision that is known but not yet applied everywhere is still
    /// an answer (saying who has not applied it); an undecided transaction is an
    /// unknown-outcome Unavailable, never a failure.
    async fn decision(
        &self,
        txn: TxnId,
        make: impl FnOnce(oneshot::Sender<Result<Decision, TxnError>>) -> Command,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let deadline = tokio::time::Instant::now() + self.cfg.commit_timeout;
        // Time kept back to ask what is known when the wait runs out.
        let margin = (self.cfg.commit_timeout / 10).min(Duration::from_millis(500));
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| Status::from(CoordinatorError::ShuttingDown))?;
        let unknown = || -> Status {
            CoordinatorError::NoDecision {
                txid: txn.to_string(),
                waited_ms: self.cfg.commit_timeout.as_millis() as u64,
            }
            .into()
        };
        let waited = tokio::select! {
            r = tokio::time::timeout_at(deadline - margin, rx) => r,
            // The replica is closing its streams: it will not learn more.
            () = self.life.closed() => return Err(unknown()),
        };
        let decision = match waited {
            Ok(Ok(Ok(d))) => d,
            Ok(Ok(Err(e))) => return Err(CoordinatorError::from(e).into()),
            Ok(Err(_)) => return Err(CoordinatorError::ShuttingDown.into()),
            Err(_) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let Ok((status, reason)) = self
                    .ask_within(left, |reply| Command::Status { txn, reply })
                    .await
                else {
                    return Err(unknown());
                };
                match status.decided {
                    Some(outcome) => {
                        let d = Decision::from_status(outcome, reason, &status);
                        tracing::info!(
                            txid = %txn,
                            ?outcome,
                            not_applied = ?d.not_applied,
                            "answering Commit at the commit timeout: decided, not yet applied \
                             by every participant"
                        );
                        d
                    }
                    None => return Err(unknown()),
                }
            }
        };
        let cause = decision.cause.as_ref().map(|c| self.cause_to_pb(txn, c));
        let reason = match (&decision.cause, &cause) {
            (Some(c), Some(pc)) if !pc.message.is_empty() => format!("{c}: {}", pc.message),
            (Some(c), _) => c.to_string(),
            (None, _) => String::new(),
        };
        Ok(Response::new(pb::DecisionResponse {
            txid: txn.to_string(),
            outcome: outcome_to_pb(decision.outcome),
            reason,
            all_applied: decision.all_applied,
            not_applied: decision.not_applied,
            cause,
        }))
    }

    /// An abort's cause as the client sees it: typed, with what the participant said of its
    /// own Aborted vote when it said something.
    fn cause_to_pb(&self, txn: TxnId, cause: &AbortCause) -> pb::Cause {
        use pb::ErrorReason as R;
        let of = |reason: R, participant: &str| pb::Cause {
            reason: reason as i32,
            participant: participant.to_string(),
            ..Default::default()
        };
        match cause {
            AbortCause::Client => of(R::AbortedByClient, ""),
            AbortCause::Abandoned | AbortCause::OpenTimeout => of(R::TransactionTimeout, ""),
            AbortCause::Voted(p) => self
                .causes
                .get(txn, p)
                .unwrap_or_else(|| of(R::ParticipantAborted, p)),
            // The leader's own ballot filled in a vote that did not come; another replica's
            // did so because the leader went silent.
            AbortCause::NoVote(p) if txn.leader() == self.cfg.id => {
                of(R::ParticipantUnreachable, p)
            }
            AbortCause::NoVote(p) => of(R::AbortedByTakeover, p),
        }
    }

    async fn begin_one(&self, timeout_ms: u64) -> Result<Begun, Status> {
        let (txn, deadline_unix_ms) = self
            .ask(|reply| Command::Begin {
                timeout_ms,
                reply,
                trace: TraceParent::current(),
            })
            .await?
            .ok_or_else(|| {
                // Refusals come in floods when they come: the 1st, 2nd, 4th... are logged.
                static REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        refused = n,
                        "refused a Begin: leading {} open transactions already \
                         (max_open_transactions)",
                        self.cfg.max_open_transactions
                    );
                }
                paxos_commit_proto::reason::status(
                    tonic::Code::ResourceExhausted,
                    format!(
                        "this replica leads {} open transactions already \
                         (max_open_transactions); commit or abort some, or begin on another \
                         replica",
                        self.cfg.max_open_transactions
                    ),
                    pb::ErrorReason::TooManyTransactions,
                    &[],
                )
            })?;
        Ok(Begun {
            txn,
            deadline_unix_ms,
        })
    }

    fn until(&self, return_on_decision: bool) -> Until {
        if return_on_decision || self.cfg.return_on_decision {
            Until::Decided
        } else {
            Until::Applied
        }
    }

    async fn local_status(&self, txn: TxnId) -> Result<(LocalStatus, Option<AbortCause>), Status> {
        self.ask(|reply| Command::Status { txn, reply }).await
    }

    pub async fn info(&self) -> Result<Info, Status> {
        self.ask(|reply| Command::Info { reply }).await
    }
}

/// The client calls of a transaction's life, each run inside its call span.
impl Handle {
    async fn begin_call(
        &self,
        req: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        let (caller, _permit) = self
            .gate
            .admit(&req, "Coordinator.Begin", &[Kind::Client])?;
        self.life.admit_begin()?;
        let req = req.into_inner();
        let key = req.idempotency_key;
        if key.len() > MAX_KEY_BYTES {
            return Err(CoordinatorError::InvalidArgument(format!(
                "the idempotency key is {} bytes long; at most {MAX_KEY_BYTES}",
                key.len()
            ))
            .into());
        }
        let response = |begun: Begun, existing| pb::BeginResponse {
            txid: begun.txn.to_string(),
            leader: self.cfg.id,
            leader_address: self.cfg.replicas[self.cfg.id as usize].clone(),
            deadline_unix_ms: begun.deadline_unix_ms,
            existing,
        };
        if key.is_empty() {
            let begun = self.begin_one(req.timeout_ms).await?;
            record_txid(begun.txn);
            return Ok(Response::new(response(begun, false)));
        }
        let mut begins = self.begins.lock().await;
        let now = std::time::Instant::now();
        if let Some(begun) = begins.get(&caller.name(), &key, now) {
            return Ok(Response::new(response(begun, true)));
        }
        let begun = self.begin_one(req.timeout_ms).await?;
        record_txid(begun.txn);
        let now_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let open_for = Duration::from_millis(begun.deadline_unix_ms.saturating_sub(now_unix_ms));
        begins.insert(
            &caller.name(),
            &key,
            begun,
            now,
            open_for + self.cfg.retention,
        );
        Ok(Response::new(response(begun, false)))
    }

    async fn prepare_call(
        &self,
        req: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let _admitted = self
            .gate
            .admit(&req, "Coordinator.Prepare", &[Kind::Client])?;
        let txn = parse_txid(&req.into_inner().txid)?;
        record_txid(txn);
        self.decision(txn, |reply| Command::Commit {
            txn,
            until: Until::Decided,
            reply,
            trace: TraceParent::current(),
        })
        .await
    }

    async fn commit_call(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let _admitted = self
            .gate
            .admit(&req, "Coordinator.Commit", &[Kind::Client])?;
        let req = req.into_inner();
        let txn = parse_txid(&req.txid)?;
        record_txid(txn);
        let until = self.until(req.return_on_decision);
        let started = std::time::Instant::now();
        let answer = self
            .decision(txn, |reply| Command::Commit {
                txn,
                until,
                reply,
                trace: TraceParent::current(),
            })
            .await;
        let (ended, label) = match &answer {
            Ok(r) if r.get_ref().outcome == pb::Outcome::Committed as i32 => {
                (Ended::Committed, "committed")
            }
            Ok(_) => (Ended::Aborted, "aborted"),
            Err(_) => (Ended::Failed, "error"),
        };
        let took = started.elapsed();
        metrics::histogram!("paxos_commit_commit_seconds", "outcome" => label)
            .record(took.as_secs_f64());
        self.recent.record(ended, took);
        answer
    }

    async fn abort_call(
        &self,
        req: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let _admitted = self
            .gate
            .admit(&req, "Coordinator.Abort", &[Kind::Client])?;
        let txn = parse_txid(&req.into_inner().txid)?;
        record_txid(txn);
        let until = self.until(false);
        self.decision(txn, |reply| Command::Abort {
            txn,
            until,
            reply,
            trace: TraceParent::current(),
        })
        .await
    }
}

fn parse_txid(s: &str) -> Result<TxnId, Status> {
    txid_from_pb(s).map_err(|e| CoordinatorError::InvalidArgument(e.to_string()).into())
}

fn status_response(
    txn: TxnId,
    views: &BTreeMap<u32, LocalStatus>,
    replicas: u32,
) -> pb::StatusResponse {
    let state = combine(views, replicas);
    let participants = views
        .values()
        .map(|v| &v.participants)
        .find(|p| !p.is_empty())
        .cloned()
        .unwrap_or_default();
    let participants = participants
        .iter()
        .map(|p| pb::ParticipantStatus {
            participant: Some(participant_to_pb(p)),
            votes: views
                .iter()
                .filter_map(|(r, v)| {
                    v.accepted
                        .get(&p.id)
                        .map(|(ballot, vote)| pb::AcceptorVote {
                            acceptor: *r,
                            ballot: *ballot,
                            vote: vote_to_pb(*vote),
                        })
                })
                .collect(),
            applied: views
                .values()
                .any(|v| v.finished || v.applied.contains(&p.id)),
        })
        .collect();
    let (pb_state, expired) = match state {
        TxnState::InProgress => (pb::TxnState::InProgress, false),
        TxnState::Decided(paxos_commit_core::Outcome::Committed) => {
            (pb::TxnState::Committed, false)
        }
        TxnState::Decided(paxos_commit_core::Outcome::Aborted) => (pb::TxnState::Aborted, false),
        TxnState::Unknown { expired } => (pb::TxnState::Unknown, expired),
    };
    let mut resp = pb::StatusResponse {
        txid: txn.to_string(),
        state: pb_state as i32,
        participants,
        leader: txn.leader(),
        expired,
        promised_ballot: views.values().map(|v| v.promised).max().unwrap_or(0),
        age_ms: 0,
    };
    if views.values().any(|v| v.open) {
        resp.state = pb::TxnState::InProgress as i32;
    }
    resp
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Handle {
    async fn begin(
        &self,
        req: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        let span = call_span(&req, phase_span!("begin", txid = tracing::field::Empty));
        self.begin_call(req).instrument(span).await
    }

    async fn prepare(
        &self,
        req: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let span = call_span(&req, phase_span!("prepare", txid = tracing::field::Empty));
        self.prepare_call(req).instrument(span).await
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let span = call_span(&req, phase_span!("commit", txid = tracing::field::Empty));
        self.commit_call(req).instrument(span).await
    }

    async fn abort(
        &self,
        req: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let span = call_span(&req, phase_span!("abort", txid = tracing::field::Empty));
        self.abort_call(req).instrument(span).await
    }

    async fn get_status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let _admitted = self.gate.admit(
            &req,
            "Coordinator.GetStatus",
            &[Kind::Client, Kind::Operator, Kind::Replica, Kind::Agent],
        )?;
        let req = req.into_inner();
        let txn = parse_txid(&req.txid)?;
        let (local, _) = self.local_status(txn).await?;
        let age_ms = match local.since {
            Some(since) => self.info().await?.now_ms.saturating_sub(since),
            None => 0,
        };
        let mut views = BTreeMap::new();
        let decided = local.decided.is_some();
        views.insert(self.cfg.id, local);
        if !req.local_only && !decided {
            // Ask the others: their acceptors may hold votes (or the decision) this one lacks.
            let asks = self.peers.iter().enumerate().filter_map(|(i, p)| {
                let mut p = p.clone()?;
                let txid = req.txid.clone();
                Some(async move {
                    let r = p
                        .get_status(pb::StatusRequest {
                            txid,
                            local_only: true,
                        })
                        .await;
                    (i as u32, r)
                })
            });
            for (i, r) in futures::future::join_all(asks).await {
                if let Ok(r) = r {
                    views.insert(i, view_from_pb(&r.into_inner()));
                }
            }
        }
        let mut resp = status_response(txn, &views, self.cfg.replicas.len() as u32);
        resp.age_ms = age_ms;
        Ok(Response::new(resp))
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let (caller, _permit) =
            self.gate
                .admit(&req, "Coordinator.Resolve", &[Kind::Agent, Kind::Operator])?;
        let req = req.into_inner();
        let txn = parse_txid(&req.txid)?;
        if let Caller::Peer(paxos_commit_proto::tls::Role::Agent(own)) = &caller {
            // An agent asks about its own instance only, and must name it: the instance it
            // names is one the takeover may settle.
            if &req.participant != own {
                return Err(Status::permission_denied(format!(
                    "agent {own} may not resolve on behalf of participant {}",
                    req.participant
                )));
            }
        }
        let bad = |e: paxos_commit_proto::convert::BadMessage| {
            Status::from(CoordinatorError::InvalidArgument(e.to_string()))
        };
        let participants = checked_participants_from_pb(&req.participants).map_err(bad)?;
        let participant = match req.participant.as_str() {
            "" => None,
            p => Some(participant_id_from_pb(p).map_err(bad)?),
        };
        self.decision(txn, |reply| Command::Resolve {
            txn,
            participant,
            participants,
            reply,
        })
        .await
    }

    async fn cluster_info(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        let _admitted = self.gate.admit(
            &req,
            "Coordinator.ClusterInfo",
            &[Kind::Operator, Kind::Replica],
        )?;
        let info = self.info().await?;
        let (state, state_reason) = self.life.state();
        Ok(Response::new(pb::ClusterInfoResponse {
            replica: self.cfg.id,
            replicas: self.cfg.replicas.len() as u32,
            group: self.cfg.group.clone(),
            log_bytes: info.log_bytes,
            leading: info.stats.leading as u64,
            undecided: info.stats.undecided as u64,
            oldest_undecided: info
                .stats
                .oldest_undecided
                .map(|(txn, since)| pb::ReplicaTxn {
                    txid: txn.to_string(),
                    state: pb::TxnState::InProgress as i32,
                    age_ms: info.now_ms.saturating_sub(since),
                    participants: Vec::new(),
                }),
            decided_retained: info.stats.decided_retained as u64,
            fsyncs: info.counters.fsyncs,
            records: info.counters.records,
            sent: info.sent.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            state: state.to_string(),
            state_reason,
            rejoined: info.stats.rejoined,
            incarnation: info.stats.incarnation.unwrap_or(0),
            not_heard: info.counters.not_heard,
        }))
    }

    async fn outcomes(
        &self,
        req: Request<pb::OutcomesRequest>,
    ) -> Result<Response<pb::OutcomesResponse>, Status> {
        let _admitted = self.gate.admit(
            &req,
            "Coordinator.Outcomes",
            &[Kind::Operator, Kind::Replica],
        )?;
        let txns = txids_from_pb(&req.into_inner().txids)
            .map_err(|e| Status::from(CoordinatorError::InvalidArgument(e.to_string())))?;
        let outcomes = self.ask(|reply| Command::Outcomes { txns, reply }).await?;
        Ok(Response::new(pb::OutcomesResponse {
            states: outcomes
                .into_iter()
                .map(|o| match o {
                    Some(Outcome::Committed) => pb::TxnState::Committed as i32,
                    Some(Outcome::Aborted) => pb::TxnState::Aborted as i32,
                    None => pb::TxnState::Unknown as i32,
                })
                .collect(),
            outcome_retention_ms: self.cfg.outcome_retention.as_millis() as u64,
        }))
    }

    async fn list_committed(
        &self,
        req: Request<pb::ListCommittedRequest>,
    ) -> Result<Response<pb::ListCommittedResponse>, Status> {
        let _admitted = self.gate.admit(
            &req,
            "Coordinator.ListCommitted",
            &[Kind::Operator, Kind::Replica],
        )?;
        let req = req.into_inner();
        let after = if req.after_txid.is_empty() {
            None
        } else {
            Some(parse_txid(&req.after_txid)?)
        };
        let limit = match req.limit as usize {
            0 => MAX_AUDIT_PAGE,
            n => n.min(MAX_AUDIT_PAGE),
        };
        let now_ms = self.info().await?.now_ms;
        // One more than asked tells whether another page follows.
        let mut committed = self
            .ask(|reply| Command::Committed {
                after,
                limit: limit + 1,
                reply,
            })
            .await?;
        let more = committed.len() > limit;
        committed.truncate(limit);
        Ok(Response::new(pb::ListCommittedResponse {
            txns: committed
                .into_iter()
                .map(|(txn, participants, since)| pb::ReplicaTxn {
                    txid: txn.to_string(),
                    state: pb::TxnState::Committed as i32,
                    age_ms: now_ms.saturating_sub(since),
                    participants: participants.into_iter().map(|p| p.id).collect(),
                })
                .collect(),
            more,
        }))
    }
}

/// Rebuilds a peer's local view from its status reply.
fn view_from_pb(r: &pb::StatusResponse) -> LocalStatus {
    let state = pb::TxnState::try_from(r.state).unwrap_or(pb::TxnState::Unknown);
    let mut view = LocalStatus {
        known: state != pb::TxnState::Unknown,
        expired: r.expired,
        decided: match state {
            pb::TxnState::Committed => Some(paxos_commit_core::Outcome::Committed),
            pb::TxnState::Aborted => Some(paxos_commit_core::Outcome::Aborted),
            _ => None,
        },
        promised: r.promised_ballot,
        ..LocalStatus::default()
    };
    for ps in &r.participants {
        let Some(p) = &ps.participant else { continue };
        view.participants.push(participant_from_pb(p));
        for v in &ps.votes {
            if let Ok(vote) = paxos_commit_proto::convert::vote_from_pb(v.vote) {
                view.accepted.insert(p.id.clone(), (v.ballot, vote));
            }
        }
        if ps.applied {
            view.applied.insert(p.id.clone());
        }
    }
    view
}

/// Who may send this message, judged from the caller's certificate: the sender replica a
/// message is attributed to, or a denial. A replica sends only as itself and proposes only
/// in ballots it owns; ballot 0 and the enlistment messages belong to the participant's own
/// agent.
fn authorize(caller: &Caller, d: &Delivered, replicas: u32) -> Result<ReplicaId, Status> {
    let deny = |what: String| {
        tracing::warn!(caller = %caller.name(), "refused a message: {what}");
        Err(Status::permission_denied(format!(
            "{} may not send {what}",
            caller.name()
        )))
    };
    let agent_only = |participant: &str, what: &str| {
        if caller.is_agent(participant) {
            Ok(0)
        } else {
            deny(format!("{what} for participant {participant}"))
        }
    };
    match d {
        Delivered::Enlist { participant, .. } => agent_only(&participant.id, "an enlistment"),
        Delivered::Applied { participant, .. } => agent_only(participant, "an acknowledgement"),
        Delivered::Enlisted { .. } => deny("Enlisted (an answer to agents)".into()),
        Delivered::Msg(
            _,
            Msg::Phase2a {
                participant,
                ballot: 0,
                ..
            },
        ) => agent_only(participant, "a ballot-0 vote"),
        Delivered::Msg(claimed, msg) => {
            let Some(from) = caller.replica_or(*claimed) else {
                return deny(format!("a Paxos message ({})", crate::peers::kind(msg)));
            };
            if from != *claimed {
                return deny(format!(
                    "a message signed as replica {claimed} (its certificate says replica {from})"
                ));
            }
            let proposed = match msg {
                Msg::Phase1a { ballot, .. } | Msg::Phase2a { ballot, .. } => Some(*ballot),
                Msg::Prepare { .. } | Msg::Decide { .. } => {
                    return deny("an agent's message to a replica".into())
                }
                _ => None,
            };
            if let Some(ballot) = proposed {
                let owner = paxos_commit_core::types::ballot_owner(ballot, replicas);
                if owner != from {
                    return deny(format!("ballot {ballot}, which belongs to replica {owner}"));
                }
            }
            Ok(from)
        }
    }
}

impl Handle {
    /// Refuses, before anything it sends is read, a replica's call or stream from an
    /// incarnation other than the one admitted here: the sender learns that it was replaced
    /// (each batch is checked again as it arrives, in case the fence moves meanwhile).
    async fn check_heard(&self, caller: &Caller, incarnation: Option<u64>) -> Result<(), Status> {
        let (Caller::Peer(Role::Replica(from)), Some(incarnation)) = (caller, incarnation) else {
            return Ok(());
        };
        if *from as usize >= self.cfg.replicas.len() {
            return Err(Status::permission_denied(format!(
                "replica {from} is not in this group of {}",
                self.cfg.replicas.len()
            )));
        }
        let gone = || Status::from(CoordinatorError::ShuttingDown);
        let (reply, heard) = oneshot::channel();
        self.commands
            .send(Command::Hears {
                from: *from,
                incarnation,
                reply,
            })
            .map_err(|_| gone())?;
        match heard.await.map_err(|_| gone())? {
            Ok(()) => Ok(()),
            Err(known) => Err(Status::failed_precondition(format!(
                "replica {from} incarnation {incarnation} is not the one admitted here \
                 ({known}): this process's replica was replaced (--rejoin) and it must stop, \
                 or it is a new log that was refused"
            ))),
        }
    }

    /// Paxos messages go to the core as one command; the agents' enlistments and
    /// acknowledgements as commands of their own. A malformed message fails the whole batch
    /// before any of it is applied.
    fn deliver_batch(
        &self,
        caller: &Caller,
        incarnation: Option<u64>,
        batch: &pb::PaxosBatch,
    ) -> Result<(), Status> {
        let delivered = batch
            .messages
            .iter()
            .map(delivered_from_pb)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let replicas = self.cfg.replicas.len() as u32;
        let mut msgs = Vec::with_capacity(delivered.len());
        let mut others = Vec::new();
        for (d, wire) in delivered.into_iter().zip(&batch.messages) {
            let from = authorize(caller, &d, replicas)?;
            if let (
                Delivered::Msg(
                    _,
                    Msg::Phase2a {
                        txn,
                        participant,
                        ballot: 0,
                        vote: paxos_commit_core::Vote::Aborted,
                        ..
                    },
                ),
                Some(pb::paxos_message::Body::Phase2a(pb::Phase2a {
                    cause: Some(cause), ..
                })),
            ) = (&d, &wire.body)
            {
                // `authorize` checked that a ballot-0 vote is the participant's own.
                self.causes.record(*txn, participant, cause);
            }
            match d {
                Delivered::Msg(_, msg) => msgs.push((from, msg, TraceParent::from_pb(wire))),
                Delivered::Enlist { txn, participant } => {
                    others.push(Command::Enlist { txn, participant })
                }
                Delivered::Applied { txn, participant } => {
                    others.push(Command::Applied { txn, participant })
                }
                Delivered::Enlisted { .. } => {
                    return Err(Status::invalid_argument(
                        "Enlisted is an answer to agents, not a message to replicas",
                    ))
                }
            }
        }
        let gone = || Status::from(CoordinatorError::ShuttingDown);
        if !msgs.is_empty() {
            // A replica's messages are heard only from the incarnation its peers admitted.
            let replica = match (caller, incarnation) {
                (Caller::Peer(Role::Replica(from)), Some(incarnation)) => {
                    Some((*from, incarnation))
                }
                (Caller::Peer(Role::Replica(from)), None) => {
                    return Err(Status::failed_precondition(format!(
                        "replica {from} sent messages without its incarnation \
                         ({INCARNATION_HEADER}): it runs a version from before incarnations"
                    )))
                }
                (Caller::Anyone, Some(incarnation)) => {
                    msgs.first().map(|(from, _, _)| (*from, incarnation))
                }
                _ => None,
            };
            self.commands
                .send(Command::Deliver { replica, msgs })
                .map_err(|_| gone())?;
        }
        for c in others {
            self.commands.send(c).map_err(|_| gone())?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::acceptor_server::Acceptor for Handle {
    async fn deliver(&self, req: Request<pb::PaxosBatch>) -> Result<Response<pb::Empty>, Status> {
        let caller = self
            .gate
            .allow(&req, "Acceptor.Deliver", &[Kind::Replica, Kind::Agent])?;
        let incarnation = incarnation_of(req.metadata())?;
        self.check_heard(&caller, incarnation).await?;
        self.deliver_batch(&caller, incarnation, &req.into_inner())?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn deliver_stream(
        &self,
        req: Request<tonic::Streaming<pb::PaxosBatch>>,
    ) -> Result<Response<pb::Empty>, Status> {
        let caller = self.gate.allow(
            &req,
            "Acceptor.DeliverStream",
            &[Kind::Replica, Kind::Agent],
        )?;
        let incarnation = incarnation_of(req.metadata())?;
        self.check_heard(&caller, incarnation).await?;
        let mut stream = req.into_inner();
        let closed = self.life.closed();
        tokio::pin!(closed);
        loop {
            tokio::select! {
                batch = stream.message() => match batch? {
                    Some(batch) => self.deliver_batch(&caller, incarnation, &batch)?,
                    None => break,
                },
                // A stopping replica is no longer anyone's acceptor: end the stream, so
                // that the sender notices and the server can stop.
                () = &mut closed => break,
            }
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let caller = self.gate.allow(&req, "Acceptor.Join", &[Kind::Replica])?;
        let r = req.into_inner();
        let Some(from) = caller.replica_or(r.replica) else {
            return Err(Status::permission_denied(format!(
                "{} may not join as a replica",
                caller.name()
            )));
        };
        if from != r.replica {
            tracing::warn!(caller = %caller.name(), claimed = r.replica, "refused a join for another replica");
            return Err(Status::permission_denied(format!(
                "{} may not join as replica {}",
                caller.name(),
                r.replica
            )));
        }
        if from == self.cfg.id || from as usize >= self.cfg.replicas.len() {
            return Err(Status::invalid_argument(format!(
                "replica {from} is not a peer of replica {} (group of {})",
                self.cfg.id,
                self.cfg.replicas.len()
            )));
        }
        if r.incarnation == 0 {
            return Err(Status::invalid_argument("incarnation 0 names no life"));
        }
        let mode = match pb::JoinMode::try_from(r.mode) {
            Ok(pb::JoinMode::First) => JoinMode::First,
            Ok(pb::JoinMode::Rejoin) => JoinMode::Rejoin,
            Ok(pb::JoinMode::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "join mode {} is neither first nor rejoin",
                    r.mode
                )))
            }
        };
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Join {
                from,
                incarnation: r.incarnation,
                mode,
                reply,
            })
            .map_err(|_| Status::from(CoordinatorError::ShuttingDown))?;
        let (answer, own) = answer
            .await
            .map_err(|_| Status::from(CoordinatorError::ShuttingDown))?;
        Ok(Response::new(match answer {
            JoinAnswer::Admitted => pb::JoinResponse {
                admitted: true,
                known_incarnation: 0,
                incarnation: own,
            },
            JoinAnswer::Known { incarnation } => pb::JoinResponse {
                admitted: false,
                known_incarnation: incarnation,
                incarnation: own,
            },
        }))
    }
}

/// The incarnation a replica names in a call's metadata, if any (agents name none).
fn incarnation_of(metadata: &tonic::metadata::MetadataMap) -> Result<Option<u64>, Status> {
    let Some(value) = metadata.get(INCARNATION_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&v| v != 0)
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument(format!("{INCARNATION_HEADER} is not a nonzero number"))
        })
}
