//! A thin client of paxos-commit: a transaction handle that begins on a coordinator replica,
//! executes statements on named participants, and prepares, commits or aborts.
//!
//! It never guesses an outcome. When the replica it talked to is lost mid-commit it asks the
//! others; if none can say, the error is [`ClientError::OutcomeUnknown`], to be settled later
//! with [`Client::status`].
//!
//! Statements are numbered per participant (`ExecuteRequest.seq`), so one whose reply was
//! lost is sent again and runs once; and a [`Transaction`] dropped before it was finished is
//! aborted, so that an early `?` does not leave its row locks to the leader's open timeout.

use crate::convert::outcome_from_pb;
use crate::pb;
use crate::pb::agent_client::AgentClient;
use crate::pb::coordinator_client::CoordinatorClient;
use crate::pb::ErrorReason;
use crate::reason;
use crate::telemetry;
use crate::tls::{Security, Tls};
use paxos_commit_core::Outcome;
pub use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid address {address:?}: {reason}")]
    BadAddress { address: String, reason: String },
    #[error("no participant named {0:?} is configured")]
    UnknownParticipant(String),
    #[error("no coordinator replica answered: {0}")]
    Unreachable(Status),
    #[error("the outcome of transaction {txid} is unknown ({status}); ask GetStatus later")]
    OutcomeUnknown { txid: String, status: Status },
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(Status),
    /// `run`: the transaction was decided Aborted, for a cause that retrying would not cure
    /// (or after the last attempt).
    #[error("transaction {txid} aborted: {}", .decision.reason)]
    Aborted {
        txid: String,
        decision: Box<Decision>,
    },
    /// An error of the application's own, returned from a `run` closure: the transaction is
    /// aborted and the error handed back as it is.
    #[error(transparent)]
    Application(Box<dyn std::error::Error + Send + Sync>),
}

impl ClientError {
    /// The gRPC status behind the error, if there is one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Unreachable(s)
            | ClientError::OutcomeUnknown { status: s, .. }
            | ClientError::Rpc(s) => Some(s),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }

    /// Why it failed, as the servers typed it (see `ErrorReason` in the .proto); `None` for
    /// an application's own error and for a status that carries no reason (a transport
    /// failure).
    pub fn reason(&self) -> Option<ErrorReason> {
        match self {
            ClientError::BadAddress { .. } => Some(ErrorReason::InvalidArgument),
            ClientError::UnknownParticipant(_) => Some(ErrorReason::UnknownParticipant),
            ClientError::OutcomeUnknown { .. } => Some(ErrorReason::OutcomeUnknown),
            ClientError::Unreachable(s) => Some(
                reason::of(s)
                    .map(|r| r.reason)
                    .unwrap_or(ErrorReason::ReplicaUnavailable),
            ),
            ClientError::Rpc(s) => reason::of(s).map(|r| r.reason),
            ClientError::Aborted { decision, .. } => Some(decision.cause_reason()),
            ClientError::Application(_) => None,
        }
    }

    /// PostgreSQL's SQLSTATE, when PostgreSQL said no.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            ClientError::Aborted { decision, .. } => decision
                .cause
                .as_ref()
                .map(|c| c.sqlstate.clone())
                .filter(|s| !s.is_empty()),
            _ => self.status().and_then(reason::of).and_then(|r| r.sqlstate),
        }
    }

    /// Whether running the whole transaction again may succeed (see [`reason::is_transient`]);
    /// also a call that failed in transport even after `execute`'s own retries (the
    /// transaction is aborted before it runs again, so nothing is applied twice).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Rpc(s) if reason::of(s).is_none() => may_be_lost(s),
            _ => self.reason().is_some_and(reason::is_transient),
        }
    }

    /// Wraps an application's own error for a `run` closure.
    pub fn application(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ClientError {
        ClientError::Application(e.into())
    }
}

/// A decision as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub reason: String,
    /// Every participant confirmed applying it (see `DecisionResponse.all_applied`).
    pub all_applied: bool,
    /// Participants that had not confirmed when the answer was given.
    pub not_applied: Vec<String>,
    /// Aborted: why, as far as the deciding replica knows.
    pub cause: Option<pb::Cause>,
}

impl Decision {
    /// The reason of an abort (`ERROR_REASON_UNSPECIFIED` when the deciding replica did not
    /// know it, or for a commit).
    pub fn cause_reason(&self) -> ErrorReason {
        self.cause
            .as_ref()
            .and_then(|c| ErrorReason::try_from(c.reason).ok())
            .unwrap_or(ErrorReason::Unspecified)
    }
}

/// Where the coordinator replicas and the participants' agents listen.
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    /// Replica addresses (host:port), in replica-id order.
    pub replicas: Vec<String>,
    /// Participant id → agent address (host:port).
    pub agents: BTreeMap<String, String>,
    /// Deadline of each RPC.
    pub rpc_timeout: Option<Duration>,
    /// This client's certificate (`spiffe://<group>/client/<name>`) and the deployment's CA;
    /// `None` talks plaintext, which only servers started `insecure` accept.
    pub tls: Option<Arc<Tls>>,
}

/// A lazily connected gRPC channel to `address` (host:port), over mutual TLS unless
/// `security` is insecure; for the servers' own outbound links too.
pub fn lazy_channel(
    address: &str,
    timeout: Option<Duration>,
    security: &Security,
) -> Result<Channel, ClientError> {
    let bad = |reason: String| ClientError::BadAddress {
        address: address.to_string(),
        reason,
    };
    if address.contains("://") {
        return Err(bad(
            "give host:port; the scheme follows from the TLS setting".into(),
        ));
    }
    let scheme = if security.tls().is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        // A peer that vanished without closing its connection (host gone, a partition) must
        // not leave a long-lived stream hanging until TCP gives up, minutes later.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(tls) = security.tls() {
        let host = endpoint.uri().host().unwrap_or_default().to_string();
        endpoint = endpoint
            .tls_config(tls.client_config(&host))
            .map_err(|e| bad(e.to_string()))?;
    }
    if let Some(t) = timeout {
        endpoint = endpoint.timeout(t);
    }
    Ok(endpoint.connect_lazy())
}

struct Inner {
    replicas: Vec<CoordinatorClient<Channel>>,
    agents: BTreeMap<String, AgentClient<Channel>>,
    /// The replica to try first for Begin; moves on when one fails.
    preferred: AtomicUsize,
}

/// A handle on the whole deployment; cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Errors that mean "this replica did not get the request, or cannot serve it", so another
/// one may be asked.
fn is_unreachable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) && !is_outcome_unknown(s)
}

fn is_outcome_unknown(s: &Status) -> bool {
    reason::of(s).is_some_and(|r| r.reason == ErrorReason::OutcomeUnknown)
}

impl Client {
    pub fn new(cfg: &ClientConfig) -> Result<Client, ClientError> {
        let timeout = cfg.rpc_timeout.or(Some(Duration::from_secs(30)));
        let security = match &cfg.tls {
            Some(tls) => Security::Tls(tls.clone()),
            None => Security::Insecure,
        };
        let channel = |a: &String| lazy_channel(a, timeout, &security);
        let replicas = cfg
            .replicas
            .iter()
            .map(|a| {
                channel(a).map(|c| {
                    CoordinatorClient::new(c)
                        .max_decoding_message_size(crate::limits::MAX_MESSAGE_BYTES)
                })
            })
            .collect::<Result<_, _>>()?;
        let agents = cfg
            .agents
            .iter()
            .map(|(id, a)| {
                let agent = AgentClient::new(channel(a)?)
                    .max_decoding_message_size(crate::limits::MAX_MESSAGE_BYTES);
                Ok((id.clone(), agent))
            })
            .collect::<Result<_, ClientError>>()?;
        Ok(Client {
            inner: Arc::new(Inner {
                replicas,
                agents,
                preferred: AtomicUsize::new(0),
            }),
        })
    }

    pub fn replica_count(&self) -> usize {
        self.inner.replicas.len()
    }

    /// The coordinator client of one replica.
    pub fn replica(&self, index: usize) -> Option<CoordinatorClient<Channel>> {
        self.inner.replicas.get(index).cloned()
    }

    /// The agent client of one participant.
    pub fn agent(&self, participant: &str) -> Result<AgentClient<Channel>, ClientError> {
        self.inner
            .agents
            .get(participant)
            .cloned()
            .ok_or_else(|| ClientError::UnknownParticipant(participant.to_string()))
    }

    /// Begins a transaction on the first replica that answers.
    pub async fn begin(&self) -> Result<Transaction, ClientError> {
        self.begin_with(pb::BeginRequest::default()).await
    }

    /// Begins a transaction with an idempotency key: sent again with the same key (after a
    /// lost reply, by a restarted process), the replica that began it answers with the same
    /// transaction instead of beginning another. A key is this client's (its certificate's)
    /// and the replica's, and lasts the replica's retention window.
    pub async fn begin_idempotent(&self, key: &str) -> Result<Transaction, ClientError> {
        self.begin_with(pb::BeginRequest {
            idempotency_key: key.to_string(),
            ..Default::default()
        })
        .await
    }

    async fn begin_with(&self, req: pb::BeginRequest) -> Result<Transaction, ClientError> {
        let span = crate::phase_span!("begin", txid = tracing::field::Empty);
        let begun = self.begin_on_any(req).instrument(span.clone()).await;
        if let Ok(t) = &begun {
            span.record("txid", t.id());
        }
        begun
    }

    async fn begin_on_any(&self, req: pb::BeginRequest) -> Result<Transaction, ClientError> {
        let n = self.inner.replicas.len();
        let start = self.inner.preferred.load(Ordering::Relaxed);
        let mut last = Status::unavailable("no replicas configured");
        for k in 0..n {
            let i = (start + k) % n;
            let mut c = self.inner.replicas[i].clone();
            match c.begin(telemetry::request(req.clone())).await {
                Ok(r) => {
                    self.inner.preferred.store(i, Ordering::Relaxed);
                    let r = r.into_inner();
                    // A transaction begun before (the same idempotency key) may have used
                    // statement numbers this handle does not know: it sends them unnumbered,
                    // as a resumed handle does.
                    let numbered = !r.existing;
                    return Ok(Transaction::new(self, r.txid, r.leader as usize, numbered));
                }
                // A replica at its limit of open transactions, stopping, degraded or too slow
                // to answer: another may serve. (A Begin that took effect unanswered costs
                // only an open transaction that times out.)
                Err(s)
                    if is_unreachable(&s)
                        || s.code() == Code::ResourceExhausted
                        || s.code() == Code::DeadlineExceeded =>
                {
                    last = s
                }
                Err(s) => return Err(ClientError::Rpc(s)),
            }
        }
        self.inner
            .preferred
            .store((start + 1) % n.max(1), Ordering::Relaxed);
        Err(ClientError::Unreachable(last))
    }

    /// Status of a transaction from any replica that answers.
    pub async fn status(&self, txid: &str) -> Result<pb::StatusResponse, ClientError> {
        let mut last = Status::unavailable("no replicas configured");
        for c in &self.inner.replicas {
            let req = pb::StatusRequest {
                txid: txid.to_string(),
                local_only: false,
            };
            match c.clone().get_status(req).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if is_unreachable(&s) => last = s,
                Err(s) => return Err(ClientError::Rpc(s)),
            }
        }
        Err(ClientError::Unreachable(last))
    }

    /// Resumes a handle on a transaction begun elsewhere (for example after a client restart).
    ///
    /// Which statement numbers were used before is unknown here, so this handle's statements
    /// go unnumbered (`seq` 0): each runs every time it arrives, and a lost reply is not
    /// retried. Dropped unfinished, it aborts the transaction, as a begun one does.
    pub fn transaction(&self, txid: &str, leader: usize) -> Transaction {
        Transaction::new(self, txid.to_string(), leader, false)
    }
}

/// How often an Execute whose reply was lost is sent again, and the pause before the first
/// retry (doubled for each next one).
const EXECUTE_RETRIES: u32 = 3;
const EXECUTE_BACKOFF: Duration = Duration::from_millis(50);

/// One distributed transaction. Clones share it: the statement numbers, and whether it was
/// finished.
///
/// **Dropped unfinished, it aborts.** When the last clone goes before `commit`, `commit_fast`,
/// `prepare` or `abort` was called (an early `?`, a panic, a cancelled task), an Abort is
/// sent on the current tokio runtime without waiting for it, so the transaction's row locks go
/// at once rather than at the leader's open timeout. Best effort: outside a runtime, or with
/// the leader unreachable, nothing is sent and the open timeout still ends it. Once one of
/// those calls was made, even if it failed or was cancelled, the drop sends nothing: a commit
/// whose outcome is unknown is the group's to settle, not the drop's. [`Transaction::detach`]
/// leaves a transaction open on purpose.
///
/// **Statements are numbered** per participant (1, 2, ...; see `ExecuteRequest.seq`), and
/// `execute` calls on one participant are sent one at a time, in order. An Execute that fails
/// in transport (UNAVAILABLE, UNKNOWN, CANCELLED, DEADLINE_EXCEEDED raised by the connection
/// or the deadline, not answered by the agent: it may or may not have arrived) is sent again
/// with the same number, up to three times: the agent runs it at most once and answers a
/// repeat with the first answer.
#[derive(Clone)]
pub struct Transaction {
    inner: Arc<TxnInner>,
}

struct TxnInner {
    client: Client,
    txid: String,
    leader: usize,
    /// Participant → the number of the last statement sent there. Each participant's lane is
    /// locked while its statement is in flight, so that numbers arrive in order.
    lanes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<u64>>>>,
    /// Whether statements are numbered (not on a resumed handle).
    numbered: bool,
    /// A Prepare, Commit or Abort was sent (or about to be), or the handle was detached:
    /// dropping then sends nothing.
    hands_off: AtomicBool,
}

impl Drop for TxnInner {
    fn drop(&mut self) {
        if self.hands_off.load(Ordering::Acquire) {
            return;
        }
        // Not awaited: a drop must not block, and may happen outside any runtime.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!(txid = %self.txid, "dropped unfinished outside a runtime; not aborted");
            return;
        };
        let client = self.client.clone();
        let txid = std::mem::take(&mut self.txid);
        let leader = self.leader;
        runtime.spawn(async move {
            match finish(&client, &txid, leader, Finish::Abort).await {
                Ok(_) => tracing::debug!(%txid, "dropped unfinished; aborted"),
                Err(e) => tracing::debug!(%txid, "dropped unfinished; abort failed: {e}"),
            }
        });
    }
}

/// Errors after which an Execute may or may not have reached the agent: the transport's
/// (a connection lost or refused, the deadline). A status the agent itself answered carries
/// an ErrorInfo of ours and is its final word (a shutting-down agent, a statement timeout):
/// sending it again would only repeat it. The same rule serves any language (PROTOCOL.md).
fn may_be_lost(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    ) && reason::of(s).is_none()
}

#[derive(Clone, Copy)]
enum Finish {
    Prepare,
    Commit { return_on_decision: bool },
    Abort,
}

impl Transaction {
    fn new(client: &Client, txid: String, leader: usize, numbered: bool) -> Transaction {
        Transaction {
            inner: Arc::new(TxnInner {
                client: client.clone(),
                txid,
                leader,
                lanes: Mutex::new(HashMap::new()),
                numbered,
                hands_off: AtomicBool::new(false),
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.inner.txid
    }

    pub fn leader(&self) -> usize {
        self.inner.leader
    }

    /// Leaves the transaction open for someone else to finish (a handle resumed with
    /// [`Client::transaction`], another process): dropping this handle, or any of its clones,
    /// no longer aborts it. Returns its id.
    pub fn detach(self) -> String {
        self.inner.hands_off.store(true, Ordering::Release);
        self.inner.txid.clone()
    }

    /// Runs one statement on `participant`'s database within this transaction; sent again
    /// if its reply is lost (see [`Transaction`]).
    pub async fn execute(
        &self,
        participant: &str,
        sql: &str,
        params: &[pb::Value],
    ) -> Result<pb::ExecuteResponse, ClientError> {
        let span = crate::phase_span!("execute", txid = %self.inner.txid, participant);
        self.execute_on(participant, sql, params)
            .instrument(span)
            .await
    }

    async fn execute_on(
        &self,
        participant: &str,
        sql: &str,
        params: &[pb::Value],
    ) -> Result<pb::ExecuteResponse, ClientError> {
        let mut agent = self.inner.client.agent(participant)?;
        let mut req = pb::ExecuteRequest {
            txid: self.inner.txid.clone(),
            sql: sql.to_string(),
            params: params.to_vec(),
            seq: 0,
        };
        if !self.inner.numbered {
            return agent
                .execute(telemetry::request(req))
                .await
                .map(tonic::Response::into_inner)
                .map_err(ClientError::Rpc);
        }
        let lane = {
            // A panic while holding this lock leaves the map itself consistent.
            let mut lanes = self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
            lanes.entry(participant.to_string()).or_default().clone()
        };
        let mut last = lane.lock().await;
        // Taken before sending: a call cancelled midway leaves its number used, so that the
        // next statement is not mistaken for a repeat of one that may have run.
        *last += 1;
        req.seq = *last;
        let mut backoff = EXECUTE_BACKOFF;
        let mut attempt = 0;
        loop {
            match agent.execute(telemetry::request(req.clone())).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if may_be_lost(&s) && attempt < EXECUTE_RETRIES => {
                    tracing::debug!(
                        txid = %req.txid,
                        participant,
                        seq = req.seq,
                        "Execute failed in transport ({}); sending it again",
                        s.message()
                    );
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(s) => return Err(ClientError::Rpc(s)),
            }
        }
    }

    /// Runs the voting phase and returns the decision, without waiting for it to be applied.
    pub async fn prepare(&self) -> Result<Decision, ClientError> {
        self.finish(Finish::Prepare).await
    }

    /// Commits (or learns that it aborted) and waits until every participant applied it.
    pub async fn commit(&self) -> Result<Decision, ClientError> {
        self.finish(Finish::Commit {
            return_on_decision: false,
        })
        .await
    }

    /// Commits and returns as soon as the decision is chosen.
    pub async fn commit_fast(&self) -> Result<Decision, ClientError> {
        self.finish(Finish::Commit {
            return_on_decision: true,
        })
        .await
    }

    pub async fn abort(&self) -> Result<Decision, ClientError> {
        self.finish(Finish::Abort).await
    }

    async fn finish(&self, what: Finish) -> Result<Decision, ClientError> {
        self.inner.hands_off.store(true, Ordering::Release);
        let txid = &self.inner.txid;
        let span = match what {
            Finish::Prepare => crate::phase_span!("prepare", txid = %txid),
            Finish::Commit { .. } => crate::phase_span!("commit", txid = %txid),
            Finish::Abort => crate::phase_span!("abort", txid = %txid),
        };
        finish(&self.inner.client, txid, self.inner.leader, what)
            .instrument(span)
            .await
    }
}

/// Asks the leader first, then the other replicas (which take the transaction over).
/// A request that may have reached a replica and got no answer leaves the outcome unknown.
async fn finish(
    client: &Client,
    txid: &str,
    leader: usize,
    what: Finish,
) -> Result<Decision, ClientError> {
    let replicas = &client.inner.replicas;
    let n = replicas.len();
    let mut last = Status::unavailable("no replicas configured");
    for k in 0..n {
        let mut c = replicas[(leader + k) % n].clone();
        let id = txid.to_string();
        let result = match what {
            Finish::Prepare => {
                c.prepare(telemetry::request(pb::TxnRequest { txid: id }))
                    .await
            }
            Finish::Commit { return_on_decision } => {
                c.commit(telemetry::request(pb::CommitRequest {
                    txid: id,
                    return_on_decision,
                }))
                .await
            }
            Finish::Abort => {
                c.abort(telemetry::request(pb::TxnRequest { txid: id }))
                    .await
            }
        };
        match result {
            Ok(r) => {
                let r = r.into_inner();
                let outcome = outcome_from_pb(r.outcome)
                    .map_err(|e| ClientError::Rpc(Status::internal(format!("bad reply: {e}"))))?;
                return Ok(Decision {
                    outcome,
                    reason: r.reason,
                    all_applied: r.all_applied,
                    not_applied: r.not_applied,
                    cause: r.cause,
                });
            }
            Err(s) if is_unreachable(&s) => last = s,
            Err(s) if s.code() == Code::NotFound && k > 0 => last = s,
            Err(s) if reason::of(&s).is_some_and(|r| r.reason == ErrorReason::NotLeader) => {
                last = s
            }
            Err(s) if s.code() == Code::DeadlineExceeded || is_outcome_unknown(&s) => {
                return Err(ClientError::OutcomeUnknown {
                    txid: txid.to_string(),
                    status: s,
                })
            }
            Err(s) => return Err(ClientError::Rpc(s)),
        }
    }
    Err(ClientError::OutcomeUnknown {
        txid: txid.to_string(),
        status: last,
    })
}

impl From<i64> for pb::Value {
    fn from(v: i64) -> pb::Value {
        pb::Value {
            kind: Some(pb::value::Kind::Int(v)),
        }
    }
}

impl From<f64> for pb::Value {
    fn from(v: f64) -> pb::Value {
        pb::Value {
            kind: Some(pb::value::Kind::Float(v)),
        }
    }
}

impl From<bool> for pb::Value {
    fn from(v: bool) -> pb::Value {
        pb::Value {
            kind: Some(pb::value::Kind::Bool(v)),
        }
    }
}

impl From<&str> for pb::Value {
    fn from(v: &str) -> pb::Value {
        pb::Value {
            kind: Some(pb::value::Kind::Text(v.to_string())),
        }
    }
}

impl From<String> for pb::Value {
    fn from(v: String) -> pb::Value {
        pb::Value {
            kind: Some(pb::value::Kind::Text(v)),
        }
    }
}

/// An exact numeric (PostgreSQL `numeric`), for money: sent as a decimal string.
impl From<Decimal> for pb::Value {
    fn from(v: Decimal) -> pb::Value {
        pb::Value::kind(pb::value::Kind::Decimal(v.to_string()))
    }
}

/// A point in time, as a `timestamptz` (microseconds since the Unix epoch).
impl From<std::time::SystemTime> for pb::Value {
    fn from(v: std::time::SystemTime) -> pb::Value {
        let us = match v.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |us| -us),
        };
        pb::Value::kind(pb::value::Kind::Timestamptz(us))
    }
}

impl From<Vec<u8>> for pb::Value {
    fn from(v: Vec<u8>) -> pb::Value {
        pb::Value::kind(pb::value::Kind::Bytes(v))
    }
}

impl<T: Into<pb::Value>> From<Option<T>> for pb::Value {
    fn from(v: Option<T>) -> pb::Value {
        v.map_or_else(pb::Value::null, Into::into)
    }
}

impl pb::Value {
    fn kind(kind: pb::value::Kind) -> pb::Value {
        pb::Value { kind: Some(kind) }
    }

    pub fn null() -> pb::Value {
        pb::Value::kind(pb::value::Kind::Null(true))
    }

    /// A `numeric` from its decimal text ("12.50"), for values beyond [`Decimal`]'s 28
    /// digits; the agent checks it.
    pub fn decimal(text: &str) -> pb::Value {
        pb::Value::kind(pb::value::Kind::Decimal(text.to_string()))
    }

    /// A `timestamptz`: microseconds since 1970-01-01T00:00:00Z.
    pub fn timestamptz_micros(us: i64) -> pb::Value {
        pb::Value::kind(pb::value::Kind::Timestamptz(us))
    }

    /// A `timestamp` (no time zone): microseconds since 1970-01-01T00:00:00.
    pub fn timestamp_micros(us: i64) -> pb::Value {
        pb::Value::kind(pb::value::Kind::Timestamp(us))
    }

    /// A `date`: days since 1970-01-01.
    pub fn date_days(days: i32) -> pb::Value {
        pb::Value::kind(pb::value::Kind::Date(days))
    }

    pub fn uuid(text: &str) -> pb::Value {
        pb::Value::kind(pb::value::Kind::Uuid(text.to_string()))
    }

    /// A `json` or `jsonb` value from its JSON text.
    pub fn json(text: &str) -> pb::Value {
        pb::Value::kind(pb::value::Kind::Json(text.to_string()))
    }

    pub fn is_null(&self) -> bool {
        matches!(self.kind, None | Some(pb::value::Kind::Null(_)))
    }

    /// A `numeric` result as a [`Decimal`]: `None` if it is not a numeric, an error if it
    /// does not fit one (NaN, infinities, more than 28 digits: [`pb::Value::as_decimal_text`]
    /// has it exactly).
    pub fn as_decimal(&self) -> Option<Result<Decimal, rust_decimal::Error>> {
        self.as_decimal_text().map(Decimal::from_str_exact)
    }

    pub fn as_decimal_text(&self) -> Option<&str> {
        match &self.kind {
            Some(pb::value::Kind::Decimal(v)) => Some(v),
            _ => None,
        }
    }

    /// A `timestamptz` result in microseconds since the Unix epoch.
    pub fn as_timestamptz_micros(&self) -> Option<i64> {
        match self.kind {
            Some(pb::value::Kind::Timestamptz(v)) => Some(v),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self.kind {
            Some(pb::value::Kind::Int(v)) => Some(v),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match &self.kind {
            Some(pb::value::Kind::Text(v)) => Some(v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transport_failures_are_sent_again() {
        // Raised here, by the connection or the deadline: the request may have arrived.
        let lost = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert_eq!(lost.code(), Code::Unknown);
        assert!(may_be_lost(&lost));
        let timeout = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert!(may_be_lost(&timeout), "{timeout:?}");
        // Answered by the agent, with a reason: its final word.
        let answered = |code, r| reason::status(code, "answered", r, &[]);
        assert!(!may_be_lost(&answered(
            Code::Unavailable,
            ErrorReason::AgentShuttingDown
        )));
        assert!(!may_be_lost(&answered(
            Code::DeadlineExceeded,
            ErrorReason::StatementTimeout
        )));
        assert!(!may_be_lost(&answered(
            Code::FailedPrecondition,
            ErrorReason::OutOfOrder
        )));
    }
}
