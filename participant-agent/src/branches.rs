//! The branches of one database: each transaction's statements run in one PostgreSQL
//! transaction on one pooled connection, which is prepared, voted on and finished here.
//!
//! The only durable state is PostgreSQL's own: a branch this process lost (crash, restart)
//! is either in `pg_prepared_xacts` under its gid, and is finished from there, or was rolled
//! back by PostgreSQL when its connection dropped. A branch that commits also leaves a row in
//! `paxos_commit.committed`, written in its own transaction: the proof, after its gid is gone,
//! of which way it was finished.
//!
//! A client's statement can never end, prepare or escape its branch's transaction: the guard
//! (`guard.rs`) refuses what could, PostgreSQL is asked after every statement whether the
//! connection is still in the branch's transaction (`paxos_commit.branch`, set with SET LOCAL
//! at BEGIN, and the transaction's start time), and PREPARE TRANSACTION runs only behind
//! `paxos_commit.assert_branch` and counts only once the gid is seen in `pg_prepared_xacts`.
//! Each connection's session is reset when a branch takes it.

use crate::config::AgentConfig;
use crate::coordinators::Coordinators;
use crate::db_tls::DbConnect;
use crate::error::AgentError;
use crate::guard;
use crate::values::{self, PgTimestamp};
use deadpool_postgres::{Object, Pool};
use futures::TryStreamExt;
use paxos_commit_core::types::{gid, parse_gid};
use paxos_commit_core::{Outcome, Participant, TxnId, Vote};
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::ErrorReason;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::SimpleQueryMessage;

/// Statements kept prepared per pooled connection; past it the cache starts over.
const MAX_CACHED_STATEMENTS: usize = 256;

/// The most parameters one statement can have: the protocol counts them in 16 bits.
pub const MAX_PARAMS: usize = 65535;

/// Run on a branch's connection right after its transaction ended (PREPARE TRANSACTION or
/// ROLLBACK), in the same query message as that statement and as its own implicit
/// transaction, before the connection goes back to the pool: whatever session state the
/// branch's statements left is gone, so every connection at rest in the pool is clean (the
/// agent's own work, which runs no client SQL, then needs no reset of its own). Settings made with `set_config(.., false)`
/// (RESET ALL), a role or session user set the same way (RESET ALL leaves those), session
/// advisory locks, LISTEN from dynamic SQL, temporary tables (which would shadow the next
/// branch's tables of the same name), sequence state. Cursors need no CLOSE ALL: only
/// DECLARE, which the guard refuses, makes one outlive its transaction. DISCARD ALL and
/// DEALLOCATE are not here: the pool's statement cache must stay valid. About 0.01 ms of
/// server time, once per branch, in the message that ends it.
const CLEAN_SESSION: &str = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; \
     SELECT pg_catalog.pg_advisory_unlock_all(); UNLISTEN *; DISCARD TEMP; DISCARD SEQUENCES";

/// The statements of the batch that prepares a branch (see `prepare_transaction`): the
/// assertion, the proof, PREPARE TRANSACTION, then those of [`CLEAN_SESSION`].
const PREPARE_BATCH_STATEMENTS: usize = PREPARED_AFTER + statements_in(CLEAN_SESSION);
/// Once this many of them completed, PREPARE TRANSACTION did.
const PREPARED_AFTER: usize = 3;

/// The statements of `sql`, our own constant text with no `;` inside a literal.
const fn statements_in(sql: &str) -> usize {
    let bytes = sql.as_bytes();
    let mut count = 1;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b';' {
            count += 1;
        }
        i += 1;
    }
    count
}

/// What PostgreSQL says about the transaction a connection is in: the branch marker and the
/// transaction's start time. The marker alone could be forged with `set_config`; the start
/// time cannot, and changes whenever a transaction ends. Schema-qualified, so a branch's
/// search_path cannot substitute its own functions.
const MARK_SQL: &str =
    "SELECT pg_catalog.current_setting('paxos_commit.branch', true), pg_catalog.now()";

const IS_PREPARED_SQL: &str = "SELECT 1 FROM pg_catalog.pg_prepared_xacts \
     WHERE gid = $1 AND database = pg_catalog.current_database()";

/// How often committed proofs older than the retention are pruned, at most.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Proofs deleted per statement while pruning, so one prune never holds many locks long.
const PRUNE_BATCH: i64 = 10_000;

/// The limits and settings every branch runs with (its lock and statement timeouts are the
/// pool connections' defaults: see `startup::prepare_database`).
#[derive(Debug, Clone)]
pub struct BranchSettings {
    /// Longest SQL text accepted.
    pub max_statement_bytes: usize,
    /// Largest result returned (about its size in the response).
    pub max_result_bytes: usize,
    /// Branches open (not prepared yet) at once; each holds a pooled connection.
    pub max_open_branches: usize,
    /// How long a commit proof stays in `paxos_commit.committed`. A decision that arrives
    /// later than this for a gid that is gone cannot be checked any more.
    pub commit_proof_retention: Duration,
    /// How the database is reached, for a request that cancels a running statement.
    pub database_tls: DbConnect,
}

impl BranchSettings {
    pub fn from_config(cfg: &AgentConfig) -> BranchSettings {
        BranchSettings {
            database_tls: cfg.database_tls.clone(),
            max_statement_bytes: cfg.max_statement_bytes,
            max_result_bytes: cfg.max_result_bytes,
            max_open_branches: cfg.max_open_branches,
            commit_proof_retention: cfg.commit_proof_retention,
        }
    }
}

enum State {
    /// Created by the first Execute, not begun yet. Holds one of the open-branch slots.
    New {
        slot: OwnedSemaphorePermit,
    },
    /// A PostgreSQL transaction is open on `conn`, begun at `started` (PostgreSQL's clock);
    /// `failed` once a statement failed (the branch can then only roll back).
    Open {
        conn: Box<Object>,
        failed: Option<pb::Cause>,
        started: PgTimestamp,
        slot: OwnedSemaphorePermit,
    },
    /// A statement left the branch's transaction. Its connection was closed (PostgreSQL
    /// rolled back whatever it still had open); the branch can only abort.
    Failed {
        reason: pb::Cause,
    },
    /// `PREPARE TRANSACTION` succeeded; the vote was Prepared.
    Prepared {
        participants: Vec<Participant>,
        since: Instant,
    },
    /// The connection broke during `PREPARE TRANSACTION`: whether it prepared is unknown, so
    /// no vote was sent. `pg_prepared_xacts` and the group's recovery settle it.
    Uncertain {
        participants: Vec<Participant>,
        since: Instant,
    },
    Done(Outcome),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::New { .. } | State::Open { .. } | State::Failed { .. } => "open",
            State::Prepared { .. } => "prepared",
            State::Uncertain { .. } => "preparing",
            State::Done(Outcome::Committed) => "committed",
            State::Done(Outcome::Aborted) => "aborted",
        }
    }

    fn is_open(&self) -> bool {
        matches!(
            self,
            State::New { .. } | State::Open { .. } | State::Failed { .. }
        )
    }
}

/// What a numbered statement's caller was told (see `ExecuteRequest.seq`).
enum Answer {
    Ok(pb::ExecuteResponse),
    /// The status with its details, as sent the first time.
    Err(tonic::Status),
    /// Dropped once the branch is prepared, where no statement runs any more: a prepared
    /// branch does not hold an open-branch slot, so its rows would not be bounded by
    /// `max_open_branches`. A late repeat is told that the branch is closed.
    Forgotten,
}

/// The last numbered statement run on a branch. Read and written with the branch's `state`
/// locked, so that a repeat waiting for the first sees its answer.
struct Last {
    seq: u64,
    /// Of the statement's text and parameters: a repeat must be the same statement.
    digest: u64,
    answer: Answer,
}

#[derive(Default)]
struct Memo {
    last: Option<Last>,
    /// The first Execute failed before anything took effect, and removed the branch: a
    /// request that waited for it starts over (a retry of statement 1 then runs).
    vanished: bool,
}

struct Branch {
    state: tokio::sync::Mutex<State>,
    memo: Mutex<Memo>,
    touched: Mutex<Instant>,
    resolving: AtomicBool,
    /// While a client's statement runs (with `state` locked): how to cancel it, should it
    /// outlive a stopping agent's drain.
    running: Mutex<Option<tokio_postgres::CancelToken>>,
}

impl Branch {
    fn new(state: State) -> Arc<Branch> {
        Arc::new(Branch {
            state: tokio::sync::Mutex::new(state),
            memo: Mutex::new(Memo::default()),
            touched: Mutex::new(Instant::now()),
            resolving: AtomicBool::new(false),
            running: Mutex::new(None),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Option<tokio_postgres::CancelToken>> {
        // A panic while holding this lock leaves the token itself consistent.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, Memo> {
        // A panic while holding this lock leaves the memo itself consistent.
        self.memo.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self) {
        if let Ok(mut t) = self.touched.lock() {
            *t = Instant::now();
        }
    }

    fn idle(&self) -> Duration {
        self.touched.lock().map(|t| t.elapsed()).unwrap_or_default()
    }
}

/// Marks a branch as running a client's statement on a connection, until dropped. Only for
/// the statement's duration: the connection goes back to the pool when the branch ends, and
/// a token kept longer could cancel another branch's statement.
struct Running<'a>(&'a Branch);

impl<'a> Running<'a> {
    fn on(branch: &'a Branch, conn: &Object) -> Running<'a> {
        *branch.running() = Some(conn.cancel_token());
        Running(branch)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        *self.0.running() = None;
    }
}

/// What a prepared transaction of ours in `pg_prepared_xacts` looks like.
pub struct PreparedRow {
    pub gid: String,
    pub txn: TxnId,
    pub age_ms: u64,
    pub database: String,
}

/// A commit proof, as the audit sees it.
pub struct ProofRow {
    pub txn: TxnId,
    pub participants: Vec<String>,
    pub age_ms: u64,
}

pub struct Branches {
    group: String,
    settings: BranchSettings,
    pool: Pool,
    coordinators: Coordinators,
    branches: Mutex<HashMap<TxnId, Arc<Branch>>>,
    /// One permit per branch that is open (not prepared yet).
    open_slots: Arc<Semaphore>,
    last_prune: Mutex<Instant>,
    pruning: Arc<AtomicBool>,
    /// Told to stop: no new branches, and the open ones are being rolled back.
    stopping: AtomicBool,
}

/// What stopping did with the branches (see [`Branches::shut_down`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Open branches rolled back: their row locks are gone and their transactions abort.
    pub rolled_back: usize,
    /// Prepared branches (and those whose PREPARE's outcome is unknown) left to recovery:
    /// they stay in `pg_prepared_xacts` and the next start resolves them through the group.
    pub prepared: usize,
    /// Of the branches rolled back, those whose statement was still running when the drain
    /// ended, and was cancelled.
    pub cancelled: usize,
    /// Branches still busy after that (PostgreSQL did not answer, or a PREPARE or a decision
    /// still running): their connections close with the process, PostgreSQL rolls back what
    /// they had open, and recovery settles what they may have prepared.
    pub busy: usize,
}

/// How long cancelling the statements that outlived the drain, and the ROLLBACKs of the open
/// branches, may take once the drain has ended.
const ROLLBACK_GRACE: Duration = Duration::from_secs(1);

/// What PostgreSQL said about a connection's transaction (see [`MARK_SQL`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    branch: Option<String>,
    started: PgTimestamp,
}

async fn mark(conn: &Object) -> Result<Mark, tokio_postgres::Error> {
    // Cached: after a connection's first branch it costs a bind and an execute, no parse.
    let stmt = conn.prepare_cached(MARK_SQL).await?;
    let rows = conn.query(&stmt, &[]).await?;
    match rows.first() {
        Some(row) => Ok(Mark {
            branch: row.try_get(0)?,
            started: row.try_get(1)?,
        }),
        // A SELECT without FROM returns one row; anything else is not PostgreSQL talking.
        None => Ok(Mark {
            branch: None,
            started: PgTimestamp(i64::MIN),
        }),
    }
}

/// A statement's own result, and — when it ran — what PostgreSQL said right after it about
/// the transaction (the two are pipelined: one round trip).
struct Ran {
    result: Result<pb::ExecuteResponse, AgentError>,
    after: Option<Result<Mark, tokio_postgres::Error>>,
}

/// What a statement means for its branch.
enum Verdict {
    Done(pb::ExecuteResponse),
    /// Refused before it ran; the branch goes on.
    Refused(AgentError),
    /// It failed, or ran and cannot be reported: the branch can only roll back.
    Failed(AgentError),
    /// It left the branch's transaction: the connection must not be used again.
    Escaped(AgentError),
}

fn judge(txn: TxnId, expected: &Mark, ran: Ran) -> Verdict {
    let escaped = |detail: String| Verdict::Escaped(AgentError::LeftTransaction { txn, detail });
    match ran.after {
        None => {}
        Some(Ok(mark)) if mark == *expected => {}
        Some(Ok(mark)) => {
            let detail = if mark.branch != expected.branch {
                format!(
                    "the connection is now marked {:?}",
                    mark.branch.as_deref().unwrap_or("as no branch")
                )
            } else {
                "the connection is in a transaction that began after the branch's".to_string()
            };
            return escaped(detail);
        }
        // A failed statement aborts the transaction, and the check behind it fails with it.
        Some(Err(_)) if ran.result.as_ref().is_err_and(AgentError::aborts_branch) => {}
        // The statement succeeded and PostgreSQL then refused a plain SELECT: the connection
        // is not where the branch left it.
        Some(Err(e)) if e.as_db_error().is_some() => {
            return escaped(format!(
                "checking the transaction failed: {}",
                AgentError::sql(e)
            ))
        }
        Some(Err(e)) => return Verdict::Failed(AgentError::sql(e)),
    }
    match ran.result {
        Ok(resp) => Verdict::Done(resp),
        Err(e) if e.aborts_branch() => Verdict::Failed(e),
        Err(e) => Verdict::Refused(e),
    }
}

/// A branch's connection just after BEGIN and its first statement.
struct Opened {
    conn: Object,
    started: PgTimestamp,
    first: Verdict,
}

/// How a PREPARE TRANSACTION went.
enum Prepared {
    Yes,
    /// Refused, or it did not prepare: the vote is Aborted, with this cause.
    No(pb::Cause),
    /// The connection broke: nobody knows.
    Unknown,
}

impl Branches {
    pub fn with_settings(
        group: String,
        pool: Pool,
        coordinators: Coordinators,
        settings: BranchSettings,
    ) -> Branches {
        let long_ago = Instant::now()
            .checked_sub(PRUNE_EVERY)
            .unwrap_or_else(Instant::now);
        Branches {
            open_slots: Arc::new(Semaphore::new(settings.max_open_branches.max(1))),
            settings,
            group,
            pool,
            coordinators,
            branches: Mutex::new(HashMap::new()),
            last_prune: Mutex::new(long_ago),
            pruning: Arc::new(AtomicBool::new(false)),
            stopping: AtomicBool::new(false),
        }
    }

    pub fn participant(&self) -> &str {
        &self.coordinators.me().id
    }

    pub fn coordinators(&self) -> &Coordinators {
        &self.coordinators
    }

    fn gid(&self, txn: TxnId) -> String {
        gid(&self.group, txn, self.participant())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<TxnId, Arc<Branch>>> {
        // A panic while holding this lock leaves the map itself consistent.
        self.branches.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, txn: TxnId) -> Option<Arc<Branch>> {
        self.map().get(&txn).cloned()
    }

    fn remove(&self, txn: TxnId) {
        self.map().remove(&txn);
    }

    /// Branches open and not prepared yet.
    pub fn open_count(&self) -> usize {
        self.settings
            .max_open_branches
            .max(1)
            .saturating_sub(self.open_slots.available_permits())
    }

    /// Whether the agent was told to stop.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// `txn`'s branch, created (taking an open-branch slot) if it does not exist yet.
    fn branch_for(&self, txn: TxnId) -> Result<Arc<Branch>, AgentError> {
        let mut map = self.map();
        if let Some(b) = map.get(&txn) {
            return Ok(b.clone());
        }
        if self.is_stopping() {
            return Err(AgentError::ShuttingDown { txn });
        }
        let slot = self.open_slots.clone().try_acquire_owned().map_err(|_| {
            AgentError::Busy(format!(
                "{} transactions already have an open branch on this participant \
                 (max_open_branches); try again when some have finished",
                self.settings.max_open_branches
            ))
        })?;
        let branch = Branch::new(State::New { slot });
        map.insert(txn, branch.clone());
        Ok(branch)
    }

    /// The input bounds every statement must meet before anything runs.
    fn check_request(&self, sql: &str, params: &[pb::Value]) -> Result<(), AgentError> {
        if sql.len() > self.settings.max_statement_bytes {
            return Err(AgentError::BadRequest(format!(
                "the statement is {} bytes long; this participant takes at most {} \
                 (max_statement_bytes)",
                sql.len(),
                self.settings.max_statement_bytes
            )));
        }
        if params.len() > MAX_PARAMS {
            return Err(AgentError::BadRequest(format!(
                "{} parameters given; a PostgreSQL statement takes at most {MAX_PARAMS}",
                params.len()
            )));
        }
        guard::check(sql).map_err(|e| AgentError::Refused(e.to_string()))
    }

    /// Removes a branch whose first Execute failed before anything took effect (the slot goes
    /// with its state; the branch never existed for anyone), and sends a request that waited
    /// for it to start over. Called with the branch's `state` locked.
    fn vanish(&self, txn: TxnId, branch: &Arc<Branch>) {
        branch.memo().vanished = true;
        let mut map = self.map();
        if map.get(&txn).is_some_and(|b| Arc::ptr_eq(b, branch)) {
            map.remove(&txn);
        }
    }

    fn out_of_order(&self, txn: TxnId, seq: u64, last: Option<u64>) -> AgentError {
        AgentError::OutOfOrder {
            txn,
            participant: self.participant().to_string(),
            seq,
            last,
        }
    }

    /// A statement after the first for a branch this agent does not hold: the branch
    /// finished here (prepared, or committed and forgotten), or statement 1 never arrived.
    /// PostgreSQL tells the first apart, so that the client hears "closed", not "out of
    /// order".
    async fn no_branch(&self, txn: TxnId, seq: u64) -> AgentError {
        if self.is_prepared(txn).await.unwrap_or(false) {
            return AgentError::Closed {
                txn,
                state: "prepared",
            };
        }
        if self.has_commit_proof(txn).await.unwrap_or(false) {
            return AgentError::Closed {
                txn,
                state: "committed",
            };
        }
        self.out_of_order(txn, seq, None)
    }

    /// Runs one statement in `txn`'s branch, opening the branch (and enlisting with the
    /// leader) on the first one. `seq` numbers the statement (`ExecuteRequest.seq`): the
    /// last one run is answered again from memory, only the next one runs; 0 runs without
    /// a number.
    pub async fn execute(
        &self,
        txn: TxnId,
        seq: u64,
        sql: &str,
        params: &[pb::Value],
    ) -> Result<pb::ExecuteResponse, AgentError> {
        let refused = self.check_request(sql, params).err();
        if let Some(e) = &refused {
            tracing::warn!(%txn, seq, "refused a statement: {e}");
        }
        let digest = digest(sql, params);
        loop {
            let branch = match self.get(txn) {
                Some(b) => b,
                // Only statement 1 opens a branch: a later one with none here follows a
                // first statement that never arrived, or failed and left nothing.
                None if seq > 1 => return Err(self.no_branch(txn, seq).await),
                None => self.branch_for(txn)?,
            };
            let mut state = branch.state.lock().await;
            if branch.memo().vanished {
                continue;
            }
            branch.touch();
            if seq == 0 {
                return self
                    .run(txn, &branch, &mut state, refused, sql, params)
                    .await;
            }
            let last = branch.memo().last.as_ref().map(|l| l.seq);
            if last == Some(seq) {
                // A retry, or a duplicate that waited above for the first copy to finish.
                let memo = branch.memo();
                if let Some(l) = &memo.last {
                    if l.digest != digest {
                        return Err(AgentError::NotARepeat {
                            txn,
                            participant: self.participant().to_string(),
                            seq,
                        });
                    }
                    return match &l.answer {
                        Answer::Ok(resp) => Ok(resp.clone()),
                        Answer::Err(status) => Err(AgentError::Answered(status.clone())),
                        Answer::Forgotten => Err(AgentError::Closed {
                            txn,
                            state: state.name(),
                        }),
                    };
                }
            }
            let next = last.unwrap_or(0) + 1;
            if seq != next {
                let e = self.out_of_order(txn, seq, last);
                if seq > next {
                    // A statement sent before this one never ran here: the transaction must
                    // not commit without it. (One older than the last is a stale duplicate,
                    // and changes nothing.)
                    return Err(self.refuse(txn, &branch, &mut state, e).await);
                }
                return Err(e);
            }
            let result = self
                .run(txn, &branch, &mut state, refused, sql, params)
                .await;
            let mut memo = branch.memo();
            if memo.vanished {
                // Nothing took effect: a retry of this statement runs.
                return result;
            }
            // Only the last answer is kept: its size is bounded by max_result_bytes, and the
            // branches holding one by max_open_branches.
            let (answer, result) = match result {
                Ok(resp) => (Answer::Ok(resp.clone()), Ok(resp)),
                Err(e) => {
                    let status = tonic::Status::from(e);
                    (
                        Answer::Err(status.clone()),
                        Err(AgentError::Answered(status)),
                    )
                }
            };
            memo.last = Some(Last {
                seq,
                digest,
                answer,
            });
            return result;
        }
    }

    /// Runs one statement in the branch, whose `state` the caller has locked.
    async fn run(
        &self,
        txn: TxnId,
        branch: &Arc<Branch>,
        state: &mut State,
        refused: Option<AgentError>,
        sql: &str,
        params: &[pb::Value],
    ) -> Result<pb::ExecuteResponse, AgentError> {
        if self.is_stopping() && state.is_open() {
            if matches!(*state, State::New { .. }) {
                // Nothing ran and nobody was told of it: the branch never existed.
                self.vanish(txn, branch);
                return Err(AgentError::ShuttingDown { txn });
            }
            // About to be rolled back: the statement must not run, nor the branch commit
            // without it.
            return Err(self
                .refuse(txn, branch, state, AgentError::ShuttingDown { txn })
                .await);
        }
        if let Some(e) = refused {
            return Err(self.refuse(txn, branch, state, e).await);
        }
        match std::mem::replace(state, State::Done(Outcome::Aborted)) {
            State::New { slot } => {
                let opened = match self.begin(branch, txn, sql, params).await {
                    Ok(opened) => opened,
                    Err(e) => {
                        self.vanish(txn, branch);
                        return Err(e);
                    }
                };
                let (new_state, result) = open_state(opened, slot);
                *state = new_state;
                result
            }
            State::Open {
                conn,
                failed: None,
                started,
                slot,
            } => {
                let expected = Mark {
                    branch: Some(txn.to_string()),
                    started,
                };
                let ran = {
                    let _running = Running::on(branch, &conn);
                    statement(&conn, txn, sql, params, self.settings.max_result_bytes).await
                };
                let opened = Opened {
                    conn: *conn,
                    started,
                    first: judge(txn, &expected, ran),
                };
                let (new_state, result) = open_state(opened, slot);
                *state = new_state;
                result
            }
            State::Open {
                failed: Some(reason),
                conn,
                started,
                slot,
            } => {
                let message = reason.message.clone();
                *state = State::Open {
                    failed: Some(reason),
                    conn,
                    started,
                    slot,
                };
                Err(AgentError::BranchFailed {
                    txn,
                    reason: message,
                })
            }
            State::Failed { reason } => {
                let message = reason.message.clone();
                *state = State::Failed { reason };
                Err(AgentError::BranchFailed {
                    txn,
                    reason: message,
                })
            }
            other => {
                let name = other.name();
                *state = other;
                Err(AgentError::Closed { txn, state: name })
            }
        }
    }

    /// A statement refused before it ran (the guard, the input bounds) dooms its transaction
    /// as an error in PostgreSQL would: the client asked for something that did not happen,
    /// so the transaction must not commit without it. A branch not begun yet is enlisted
    /// (with no connection), so that the leader counts this participant and its Aborted vote.
    async fn refuse(
        &self,
        txn: TxnId,
        branch: &Arc<Branch>,
        state: &mut State,
        e: AgentError,
    ) -> AgentError {
        let reason = failure(&e);
        match std::mem::replace(state, State::Done(Outcome::Aborted)) {
            State::New { slot } => {
                drop(slot);
                match self.coordinators.enlist(txn).await {
                    Ok(()) => *state = State::Failed { reason },
                    Err(status) => {
                        tracing::warn!(%txn, "the leader refused the enlistment: {}", status.message());
                        self.vanish(txn, branch);
                    }
                }
            }
            State::Open {
                conn,
                failed,
                started,
                slot,
            } => {
                *state = State::Open {
                    conn,
                    failed: failed.or(Some(reason)),
                    started,
                    slot,
                }
            }
            other => *state = other,
        }
        e
    }

    /// The SQL that opens a branch's transaction, with the marker that later checks compare
    /// with. The agent's lock and statement timeouts are the pool's connection defaults
    /// (startup options, which RESET ALL restores), so they cost no statement here.
    fn begin_sql(&self, txn: TxnId) -> String {
        format!(
            "BEGIN; SET LOCAL paxos_commit.branch = {}",
            literal(&txn.to_string()),
        )
    }

    /// Opens the PostgreSQL transaction and runs the branch's first statement while the
    /// enlistment is in flight. BEGIN with the branch marker, the statement and the marker
    /// check behind it are pipelined on the connection (tokio-postgres sends requests in the
    /// order they are first polled, here in one write), so the first statement costs one
    /// database round trip, and the round trip to the leader hides behind it. The statement's
    /// own result (which may be an error that fails the branch) comes back beside the
    /// connection.
    ///
    /// The check behind the first statement also says when the branch's transaction began:
    /// later checks compare with that. No check runs before the statement, because no single
    /// statement can both leave the transaction and mark another one as this branch's (that
    /// takes a transaction-control command and `set_config` on a `paxos_commit` name, which
    /// the guard refuses, one statement per Execute); a statement that left it is seen by
    /// the marker alone.
    async fn begin(
        &self,
        branch: &Branch,
        txn: TxnId,
        sql: &str,
        params: &[pb::Value],
    ) -> Result<Opened, AgentError> {
        let open = async {
            let conn = self.pool.get().await.map_err(AgentError::pool)?;
            let _running = Running::on(branch, &conn);
            let begin_sql = self.begin_sql(txn);
            let (begun, mut ran) = tokio::join!(
                conn.batch_execute(&begin_sql),
                statement(&conn, txn, sql, params, self.settings.max_result_bytes),
            );
            if let Err(e) = begun {
                // Whatever the statement did, it did outside our transaction or on a broken
                // connection: this connection does not go back to the pool.
                discard(conn);
                return Err(AgentError::sql(e));
            }
            if ran.after.is_none() {
                // Refused before it ran (parameters, types): the branch goes on, and later
                // statements need to know where its transaction began.
                ran.after = Some(mark(&conn).await);
            }
            let me = txn.to_string();
            let started = match &ran.after {
                Some(Ok(mark)) if mark.branch.as_deref() == Some(me.as_str()) => mark.started,
                // The statement failed (the branch only rolls back from here) or left the
                // transaction (the marker differs, and `judge` says so).
                _ => PgTimestamp(i64::MIN),
            };
            let expected = Mark {
                branch: Some(me),
                started,
            };
            let first = judge(txn, &expected, ran);
            Ok(Opened {
                conn,
                started,
                first,
            })
        };
        let (enlisted, opened) = tokio::join!(self.coordinators.enlist(txn), open);
        match (enlisted, opened) {
            (Ok(()), opened) => opened,
            (Err(status), Ok(opened)) => {
                if matches!(opened.first, Verdict::Escaped(_)) {
                    discard(opened.conn);
                } else {
                    roll_back(opened.conn).await;
                }
                Err(AgentError::Enlist(status))
            }
            (Err(status), Err(_)) => Err(AgentError::Enlist(status)),
        }
    }

    /// Prepares the branch and votes. A definite failure votes Aborted; a connection lost
    /// during PREPARE votes nothing.
    pub async fn prepare(
        &self,
        txn: TxnId,
        participants: Vec<Participant>,
    ) -> Result<(), AgentError> {
        let branch = match self.get(txn) {
            Some(b) => b,
            None => {
                // Lost (restart, timeout) or never opened here: prepared only if PostgreSQL
                // says so.
                let vote = if self.is_prepared(txn).await? {
                    self.map().insert(
                        txn,
                        Branch::new(State::Prepared {
                            participants: participants.clone(),
                            since: Instant::now(),
                        }),
                    );
                    Vote::Prepared
                } else if self.has_commit_proof(txn).await? {
                    // Prepared, voted Prepared and committed here before: this Prepare is
                    // late or repeated (a replica's retry, a stream replayed after a
                    // restart). Aborted now would contradict the vote on record at ballot 0.
                    tracing::debug!(%txn, "Prepare for a branch that committed here; no vote");
                    return Ok(());
                } else {
                    Vote::Aborted
                };
                self.coordinators.vote(txn, vote, &participants, None);
                return Ok(());
            }
        };
        let mut state = branch.state.lock().await;
        // No statement runs from here on: a late repeat is told the branch is closed.
        if let Some(last) = &mut branch.memo().last {
            last.answer = Answer::Forgotten;
        }
        let mut cause = None;
        let vote = match std::mem::replace(&mut *state, State::Done(Outcome::Aborted)) {
            State::New { .. } => Some(Vote::Aborted),
            State::Failed { reason } => {
                cause = Some(failed_cause(&reason));
                Some(Vote::Aborted)
            }
            State::Open {
                conn, failed: None, ..
            } => match self.prepare_transaction(txn, *conn, &participants).await {
                Prepared::Yes => {
                    paxos_commit_proto::crash_point("agent-after-prepare");
                    *state = State::Prepared {
                        participants: participants.clone(),
                        since: Instant::now(),
                    };
                    Some(Vote::Prepared)
                }
                Prepared::No(why) => {
                    cause = Some(why);
                    Some(Vote::Aborted)
                }
                Prepared::Unknown => {
                    *state = State::Uncertain {
                        participants: participants.clone(),
                        since: Instant::now(),
                    };
                    None
                }
            },
            State::Open {
                conn,
                failed: Some(reason),
                ..
            } => {
                roll_back(*conn).await;
                cause = Some(failed_cause(&reason));
                Some(Vote::Aborted)
            }
            prepared @ State::Prepared { .. } => {
                *state = prepared;
                Some(Vote::Prepared)
            }
            uncertain @ State::Uncertain { .. } => {
                *state = uncertain;
                None
            }
            State::Done(outcome) => {
                *state = State::Done(outcome);
                (outcome == Outcome::Aborted).then_some(Vote::Aborted)
            }
        };
        drop(state);
        if let Some(vote) = vote {
            self.coordinators.vote(txn, vote, &participants, cause);
        }
        Ok(())
    }

    /// `PREPARE TRANSACTION`, only from inside the branch's own transaction, with the commit
    /// proof written in that transaction first, and the session reset behind it: one query
    /// message, one round trip, statements run in order until one fails.
    ///
    /// PREPARE outside a transaction block is a mere WARNING, reported as success. That
    /// cannot happen here: `assert_branch` runs in the same message right before it and
    /// raises unless the session is inside the branch's own transaction, begun before this
    /// message (inside this message nothing but our own INSERT runs between the two). So
    /// the command tags say what happened: PREPARE's is the third; an error after it is the
    /// reset's, and the branch is prepared.
    ///
    /// The proof names every participant, so that an audit that finds it here knows which
    /// other databases must hold one too.
    async fn prepare_transaction(
        &self,
        txn: TxnId,
        conn: Object,
        participants: &[Participant],
    ) -> Prepared {
        let all: Vec<&str> = participants.iter().map(|p| p.id.as_str()).collect();
        let batch = prepare_sql(&txn.to_string(), self.participant(), &all, &self.gid(txn));
        let (completed, result) = run_counting(&conn, &batch).await;
        match result {
            Ok(()) if completed == PREPARE_BATCH_STATEMENTS => Prepared::Yes,
            _ if completed >= PREPARED_AFTER => {
                // Prepared, but the session could not be reset: it does not go back.
                if let Err(e) = result {
                    tracing::warn!(%txn, "prepared, but resetting the session failed: {e}");
                }
                discard(conn);
                Prepared::Yes
            }
            Ok(()) => {
                // Fewer command tags than statements and no error: not PostgreSQL talking.
                tracing::error!(%txn, completed, "PREPARE's batch ended early without an error");
                discard(conn);
                Prepared::Unknown
            }
            // `assert_branch` found the connection outside the branch's transaction: nothing
            // about this session can be trusted any more.
            Err(e) if e.code() == Some(&SqlState::INVALID_TRANSACTION_STATE) => {
                let e = AgentError::sql(e);
                tracing::error!(%txn, "not preparing: {e}; closing the connection");
                discard(conn);
                Prepared::No(cause_of(ErrorReason::StatementRefused, "", &e.to_string()))
            }
            // PostgreSQL refused (the proof, or PREPARE itself): the transaction is aborted,
            // and ROLLBACK ends it before the connection goes back.
            Err(e) if e.as_db_error().is_some() => {
                let e = AgentError::sql(e);
                tracing::warn!(%txn, "PREPARE TRANSACTION refused: {e}");
                roll_back(conn).await;
                Prepared::No(prepare_refused(&e))
            }
            Err(e) => {
                tracing::warn!(%txn, "connection lost during PREPARE TRANSACTION: {e}");
                Prepared::Unknown
            }
        }
    }

    /// Applies a decision; idempotent ("already finished" is success, when the commit proof
    /// agrees).
    pub async fn decide(&self, txn: TxnId, outcome: Outcome) -> Result<(), AgentError> {
        tracing::debug!(%txn, %outcome, "decision received");
        let Some(branch) = self.get(txn) else {
            return self.finish_prepared(txn, outcome).await;
        };
        let mut state = branch.state.lock().await;
        match std::mem::replace(&mut *state, State::Done(outcome)) {
            State::New { .. } => {}
            open @ (State::Open { .. } | State::Failed { .. }) if outcome == Outcome::Committed => {
                *state = open;
                return Err(AgentError::NotPrepared { txn });
            }
            State::Open { conn, .. } => roll_back(*conn).await,
            State::Failed { .. } => {}
            State::Prepared {
                participants,
                since,
            } => {
                // Voted, and the decision is here: dying now leaves it prepared.
                paxos_commit_proto::crash_point("agent-before-finish");
                if let Err(e) = self.finish_prepared(txn, outcome).await {
                    *state = State::Prepared {
                        participants,
                        since,
                    };
                    return Err(e);
                }
            }
            State::Uncertain {
                participants,
                since,
            } => {
                if let Err(e) = self.finish_prepared(txn, outcome).await {
                    *state = State::Uncertain {
                        participants,
                        since,
                    };
                    return Err(e);
                }
            }
            State::Done(previous) if previous != outcome => {
                *state = State::Done(previous);
                return Err(AgentError::Conflict {
                    txn,
                    applied: previous,
                    asked: outcome,
                });
            }
            State::Done(_) => {}
        }
        drop(state);
        self.remove(txn);
        Ok(())
    }

    /// Ends an unprepared branch with ROLLBACK. The branch stays, aborted, for one more
    /// branch timeout: a later statement must fail rather than open a fresh branch that would
    /// commit without the statements rolled back here, and a later Prepare votes Aborted.
    async fn roll_back_open(&self, branch: &Branch, mut state: tokio::sync::MutexGuard<'_, State>) {
        match std::mem::replace(&mut *state, State::Done(Outcome::Aborted)) {
            State::Open { conn, .. } => roll_back(*conn).await,
            State::New { .. } | State::Failed { .. } => {}
            other => *state = other,
        }
        branch.touch();
    }

    /// `COMMIT PREPARED` / `ROLLBACK PREPARED` by gid. A gid that no longer exists was
    /// finished before (by us, or by an operator); which way is in its commit proof.
    async fn finish_prepared(&self, txn: TxnId, outcome: Outcome) -> Result<(), AgentError> {
        match self.finish_gid(&self.gid(txn), outcome).await {
            Err(AgentError::Sql { code, .. }) if code == *SqlState::UNDEFINED_OBJECT.code() => {
                self.finished_before(txn, outcome).await
            }
            other => other,
        }
    }

    /// `txn`'s gid is gone: success if it went the way asked. The proof row exists iff the
    /// branch committed (it was written in the branch's transaction), so a missing gid with
    /// no proof was rolled back, and one with a proof was committed.
    async fn finished_before(&self, txn: TxnId, asked: Outcome) -> Result<(), AgentError> {
        let applied = if self.has_commit_proof(txn).await? {
            Outcome::Committed
        } else {
            Outcome::Aborted
        };
        if applied == asked {
            return Ok(());
        }
        tracing::error!(
            %txn,
            %applied,
            %asked,
            "the branch's prepared transaction is gone and was finished the other way"
        );
        Err(AgentError::Conflict {
            txn,
            applied,
            asked,
        })
    }

    async fn has_commit_proof(&self, txn: TxnId) -> Result<bool, AgentError> {
        let conn = self.pool.get().await.map_err(AgentError::pool)?;
        let txid = txn.to_string();
        let txid_param = [(&txid as &(dyn ToSql + Sync), Type::TEXT)];
        let rows = conn
            .query_typed(
                "SELECT 1 FROM paxos_commit.committed WHERE txid = $1",
                &txid_param,
            )
            .await
            .map_err(AgentError::sql)?;
        Ok(!rows.is_empty())
    }

    async fn finish_gid(&self, gid: &str, outcome: Outcome) -> Result<(), AgentError> {
        let conn = self.pool.get().await.map_err(AgentError::pool)?;
        let sql = finish_sql(gid, outcome);
        conn.batch_execute(&sql).await.map_err(AgentError::sql)
    }

    async fn is_prepared(&self, txn: TxnId) -> Result<bool, AgentError> {
        let conn = self.pool.get().await.map_err(AgentError::pool)?;
        is_prepared_on(&conn, &self.gid(txn))
            .await
            .map_err(AgentError::sql)
    }

    /// The connection pool's size, idle connections and waiters.
    pub fn pool_status(&self) -> deadpool_postgres::Status {
        self.pool.status()
    }

    /// Our prepared transactions, from PostgreSQL itself.
    pub async fn list_prepared(&self) -> Result<Vec<PreparedRow>, AgentError> {
        let conn = self.pool.get().await.map_err(AgentError::pool)?;
        let rows = conn
            .query_typed(
                "SELECT gid, database::text, \
                        (extract(epoch FROM pg_catalog.now() - prepared) * 1000)::int8 \
                   FROM pg_catalog.pg_prepared_xacts \
                  WHERE gid LIKE 'pxc:%' AND database = pg_catalog.current_database() \
                  ORDER BY prepared",
                &[],
            )
            .await
            .map_err(AgentError::sql)?;
        let mut out = Vec::new();
        for row in rows {
            let gid: String = row.try_get(0).map_err(AgentError::sql)?;
            let Some((group, txn, participant)) = parse_gid(&gid) else {
                continue;
            };
            if group != self.group || participant != self.participant() {
                continue;
            }
            out.push(PreparedRow {
                txn,
                database: row.try_get(1).map_err(AgentError::sql)?,
                age_ms: row.try_get::<_, i64>(2).map_err(AgentError::sql)?.max(0) as u64,
                gid,
            });
        }
        Ok(out)
    }

    /// One page of commit proofs in txid order, after `after`, for the audit; and whether
    /// more follow.
    pub async fn proofs_page(
        &self,
        after: &str,
        limit: usize,
        younger_than: Option<Duration>,
    ) -> Result<(Vec<ProofRow>, bool), AgentError> {
        let limit = limit.clamp(1, paxos_commit_proto::limits::MAX_AUDIT_PAGE);
        let conn = self.pool.get().await.map_err(AgentError::pool)?;
        let fetch = limit as i64 + 1;
        // No bound (or a larger one): three centuries, further back than any retention and
        // still an interval PostgreSQL can subtract from now().
        const NO_BOUND_SECS: f64 = 1.0e10;
        let secs = younger_than.map_or(NO_BOUND_SECS, |d| d.as_secs_f64().min(NO_BOUND_SECS));
        let rows = conn
            .query_typed(
                "SELECT txid, coalesce(participants, '{}'::text[]), \
                        (extract(epoch FROM pg_catalog.now() - at) * 1000)::int8 \
                   FROM paxos_commit.committed \
                  WHERE txid > $1 \
                    AND at > pg_catalog.now() - pg_catalog.make_interval(secs => $3) \
                  ORDER BY txid LIMIT $2",
                &[
                    (&after, Type::TEXT),
                    (&fetch, Type::INT8),
                    (&secs, Type::FLOAT8),
                ],
            )
            .await
            .map_err(AgentError::sql)?;
        let more = rows.len() > limit;
        let mut out = Vec::with_capacity(rows.len().min(limit));
        for row in rows.iter().take(limit) {
            if let Some(proof) = proof_row(row)? {
                out.push(proof);
            }
        }
        Ok((out, more))
    }

    /// The audit's second look at suspects: which of `txns` are prepared here right now, and
    /// the proofs of those that committed. Prepared first: a branch committed in between is
    /// then seen by the second query, so that nothing in flight is missed by both.
    pub async fn proofs_of(
        &self,
        txns: &[TxnId],
    ) -> Result<(Vec<ProofRow>, Vec<TxnId>), AgentError> {
        let conn = self.pool.get().await.map_err(AgentError::pool)?;
        let gids: Vec<String> = txns.iter().map(|t| self.gid(*t)).collect();
        let rows = conn
            .query_typed(
                "SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE gid = ANY($1)",
                &[(&gids, Type::TEXT_ARRAY)],
            )
            .await
            .map_err(AgentError::sql)?;
        let mut prepared = Vec::new();
        for row in rows {
            let gid: String = row.try_get(0).map_err(AgentError::sql)?;
            if let Some((_, txn, _)) = parse_gid(&gid) {
                prepared.push(txn);
            }
        }
        let txids: Vec<String> = txns.iter().map(TxnId::to_string).collect();
        let rows = conn
            .query_typed(
                "SELECT txid, coalesce(participants, '{}'::text[]), \
                        (extract(epoch FROM pg_catalog.now() - at) * 1000)::int8 \
                   FROM paxos_commit.committed WHERE txid = ANY($1)",
                &[(&txids, Type::TEXT_ARRAY)],
            )
            .await
            .map_err(AgentError::sql)?;
        let mut proofs = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(proof) = proof_row(row)? {
                proofs.push(proof);
            }
        }
        Ok((proofs, prepared))
    }

    pub fn commit_proof_retention(&self) -> Duration {
        self.settings.commit_proof_retention
    }

    /// After a restart: every prepared transaction of ours is in doubt; the in-doubt sweep
    /// asks the group for its outcome right away.
    pub async fn recover(&self) -> Result<usize, AgentError> {
        let prepared = self.list_prepared().await?;
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(Instant::now);
        for row in &prepared {
            self.map().insert(
                row.txn,
                Branch::new(State::Prepared {
                    participants: Vec::new(),
                    since: long_ago,
                }),
            );
            // No vote here: R died with the process, and a Prepared vote without R could be
            // chosen yet leave the group unable to commit (R unknown) or abort (the instance
            // is Prepared). The sweep asks the group instead, naming this instance, which lets
            // a takeover choose Aborted for it if its vote never reached the acceptors.
        }
        Ok(prepared.len())
    }

    /// The operator's last resort (txctl heuristic): finish a prepared transaction by gid.
    /// The attempt is recorded in `paxos_commit.heuristic_log` (who, what, the checks made)
    /// in its own transaction before anything is done, and its result after.
    pub async fn heuristic(
        &self,
        gid: &str,
        outcome: Outcome,
        operator: &str,
        checks: &str,
    ) -> Result<(), AgentError> {
        let ours = parse_gid(gid)
            .filter(|(g, _, p)| *g == self.group && *p == self.participant())
            .map(|(_, txn, _)| txn)
            .ok_or_else(|| {
                AgentError::BadRequest(format!(
                    "gid {gid:?} is not a transaction of participant {} in group {}",
                    self.participant(),
                    self.group
                ))
            })?;
        let conn = self.pool.get().await.map_err(AgentError::pool)?;
        let outcome_text = outcome.to_string();
        let record: [(&(dyn ToSql + Sync), Type); 4] = [
            (&operator, Type::TEXT),
            (&gid, Type::TEXT),
            (&outcome_text, Type::TEXT),
            (&checks, Type::TEXT),
        ];
        let rows = conn
            .query_typed(
                "INSERT INTO paxos_commit.heuristic_log (operator, gid, outcome, result, checks) \
                 VALUES ($1, $2, $3, 'attempting', $4) RETURNING id",
                &record,
            )
            .await
            .map_err(AgentError::sql)?;
        let id: Option<i64> = rows.first().and_then(|r| r.try_get(0).ok());
        let finished = conn
            .batch_execute(&finish_sql(gid, outcome))
            .await
            .map_err(AgentError::sql);
        let result = match &finished {
            Ok(()) => "done".to_string(),
            Err(e) => e.to_string(),
        };
        if let Some(id) = id {
            if let Err(e) = conn
                .execute_typed(
                    "UPDATE paxos_commit.heuristic_log SET result = $2 WHERE id = $1",
                    &[(&id, Type::INT8), (&result, Type::TEXT)],
                )
                .await
            {
                tracing::warn!(
                    gid,
                    id,
                    "could not record the heuristic's result ({result}): {e}"
                );
            }
        }
        tracing::warn!(gid, operator, %outcome, result, "heuristic decision finished");
        finished?;
        if let Some(branch) = self.get(ours) {
            *branch.state.lock().await = State::Done(outcome);
            self.remove(ours);
        }
        Ok(())
    }

    /// Deletes commit proofs older than the retention, in batches; at most one prune at a
    /// time.
    async fn prune_proofs(&self) -> Result<u64, AgentError> {
        let conn = self.pool.get().await.map_err(AgentError::pool)?;
        let retention = self.settings.commit_proof_retention.as_secs_f64();
        let mut total = 0;
        loop {
            let n = conn
                .execute_typed(
                    "DELETE FROM paxos_commit.committed WHERE txid IN \
                       (SELECT txid FROM paxos_commit.committed \
                         WHERE at < pg_catalog.now() - pg_catalog.make_interval(secs => $1) \
                         LIMIT $2)",
                    &[(&retention, Type::FLOAT8), (&PRUNE_BATCH, Type::INT8)],
                )
                .await
                .map_err(AgentError::sql)?;
            total += n;
            if n < PRUNE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Whether the once-a-minute prune is due (and, if so, claims it).
    fn prune_due(&self) -> bool {
        let mut last = self.last_prune.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() < PRUNE_EVERY || self.pruning.swap(true, Ordering::AcqRel) {
            return false;
        }
        *last = Instant::now();
        true
    }

    /// Stops the agent's branches (SIGTERM): no new branch is opened from now on; each open
    /// branch is rolled back as soon as the statement or PREPARE it is running (if any) has
    /// finished, for at most `drain`; prepared branches are left alone. Their transactions
    /// are the group's to decide, and the next start finds them in `pg_prepared_xacts` and
    /// asks the group (`recover`), as after a crash.
    ///
    /// A rolled-back branch stays as an aborted tombstone, as after a branch timeout: a
    /// Prepare that arrives before the process is gone votes Aborted, and one that arrives
    /// later finds nothing prepared and votes Aborted too.
    pub async fn shut_down(&self, drain: Duration) -> Stopped {
        self.stopping.store(true, Ordering::Release);
        let drained = tokio::time::Instant::now() + drain;
        let branches: Vec<Arc<Branch>> = self.map().values().cloned().collect();
        let ends = branches.iter().map(|b| self.stop_branch(b, drained));
        futures::future::join_all(ends)
            .await
            .into_iter()
            .fold(Stopped::default(), |a, b| Stopped {
                rolled_back: a.rolled_back + b.rolled_back,
                prepared: a.prepared + b.prepared,
                cancelled: a.cancelled + b.cancelled,
                busy: a.busy + b.busy,
            })
    }

    /// One branch of [`Branches::shut_down`].
    async fn stop_branch(&self, branch: &Branch, drained: tokio::time::Instant) -> Stopped {
        let none = Stopped::default();
        let busy = Stopped { busy: 1, ..none };
        let grace = drained + ROLLBACK_GRACE;
        let mut cancelled = 0;
        let state = match tokio::time::timeout_at(drained, branch.state.lock()).await {
            Ok(state) => state,
            Err(_) => {
                // A client's statement that outlived the drain is cancelled: PostgreSQL would
                // not notice the agent's connection close while the statement runs, and
                // would hold its row locks until it ended. Its branch fails and is rolled
                // back below. Anything else (a PREPARE, a decision being applied) is left
                // to finish, or to end with the process, and to recovery.
                let token = branch.running().clone();
                let Some(token) = token else { return busy };
                match tokio::time::timeout_at(grace, self.settings.database_tls.cancel(&token))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("could not cancel a running statement: {e}"),
                    Err(_) => tracing::warn!("cancelling a running statement did not answer"),
                }
                match tokio::time::timeout_at(grace, branch.state.lock()).await {
                    Ok(state) => {
                        cancelled = 1;
                        state
                    }
                    Err(_) => return busy,
                }
            }
        };
        match &*state {
            s if s.is_open() => {
                match tokio::time::timeout_at(grace, self.roll_back_open(branch, state)).await {
                    Ok(()) => Stopped {
                        rolled_back: 1,
                        cancelled,
                        ..none
                    },
                    // PostgreSQL did not answer: the connection closes with the process.
                    Err(_) => busy,
                }
            }
            State::Prepared { .. } | State::Uncertain { .. } => Stopped {
                prepared: 1,
                ..none
            },
            _ => none,
        }
    }

    /// Periodic duties: roll back abandoned open branches, ask the group about prepared
    /// branches that waited too long for their decision, and prune old commit proofs.
    /// Nothing once the agent is stopping: its prepared branches are left to the next start.
    pub async fn sweep(self: &Arc<Self>, branch_timeout: Duration, in_doubt_after: Duration) {
        if self.is_stopping() {
            return;
        }
        if self.prune_due() {
            let this = self.clone();
            tokio::spawn(async move {
                match this.prune_proofs().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!("pruned {n} commit proofs past their retention"),
                    Err(e) => tracing::warn!("pruning commit proofs: {e}"),
                }
                this.pruning.store(false, Ordering::Release);
            });
        }
        let branches: Vec<(TxnId, Arc<Branch>)> =
            self.map().iter().map(|(t, b)| (*t, b.clone())).collect();
        for (txn, branch) in branches {
            let Ok(state) = branch.state.try_lock() else {
                continue; // busy: not abandoned
            };
            match &*state {
                s if s.is_open() && branch.idle() > branch_timeout => {
                    tracing::info!(%txn, "rolling back a branch abandoned for {:?}", branch.idle());
                    self.roll_back_open(&branch, state).await;
                }
                State::Done(_) if branch.idle() > branch_timeout => {
                    drop(state);
                    self.remove(txn);
                }
                s if s.is_open() && branch.idle() > in_doubt_after => {
                    // Idle for a while: is its leader still there to finish it?
                    if branch.resolving.swap(true, Ordering::AcqRel) {
                        continue;
                    }
                    drop(state);
                    let this = self.clone();
                    tokio::spawn(async move {
                        if !this.coordinators.leader_holds_open(txn).await {
                            let state = branch.state.lock().await;
                            if state.is_open() {
                                tracing::info!(
                                    %txn,
                                    "rolling back an open branch whose leader (replica {}) is gone",
                                    txn.leader()
                                );
                                this.roll_back_open(&branch, state).await;
                            }
                        }
                        branch.resolving.store(false, Ordering::Release);
                    });
                }
                State::Prepared {
                    participants,
                    since,
                }
                | State::Uncertain {
                    participants,
                    since,
                } if since.elapsed() > in_doubt_after => {
                    if branch.resolving.swap(true, Ordering::AcqRel) {
                        continue;
                    }
                    let participants = participants.clone();
                    drop(state);
                    let this = self.clone();
                    tokio::spawn(async move {
                        match this.coordinators.resolve(txn, &participants).await {
                            Ok(outcome) => {
                                if let Err(e) = this.decide(txn, outcome).await {
                                    tracing::warn!(%txn, "could not apply the resolved outcome: {e}");
                                }
                            }
                            Err(s) => {
                                tracing::info!(%txn, "in doubt, group not reachable: {}", s.message())
                            }
                        }
                        branch.resolving.store(false, Ordering::Release);
                    });
                }
                _ => {}
            }
        }
    }
}

/// The state a branch is in after a statement, and what the client hears.
fn open_state(
    opened: Opened,
    slot: OwnedSemaphorePermit,
) -> (State, Result<pb::ExecuteResponse, AgentError>) {
    let Opened {
        conn,
        started,
        first,
    } = opened;
    let (failed, result) = match first {
        Verdict::Done(resp) => (None, Ok(resp)),
        Verdict::Refused(e) => (None, Err(e)),
        Verdict::Failed(e) => (Some(failure(&e)), Err(e)),
        Verdict::Escaped(e) => {
            tracing::error!("{e}; closing its connection");
            discard(conn);
            let reason = failure(&e);
            return (State::Failed { reason }, Err(e));
        }
    };
    let state = State::Open {
        conn: Box::new(conn),
        failed,
        started,
        slot,
    };
    (state, result)
}

fn cause_of(reason: ErrorReason, sqlstate: &str, message: &str) -> pb::Cause {
    pb::Cause {
        reason: reason as i32,
        participant: String::new(),
        sqlstate: sqlstate.to_string(),
        message: message.to_string(),
    }
}

/// What made a branch fail, kept for the cause of its Aborted vote.
fn failure(e: &AgentError) -> pb::Cause {
    let (reason, sqlstate) = e.reason();
    cause_of(reason, sqlstate.unwrap_or_default(), &e.to_string())
}

/// The cause of an Aborted vote for a branch a statement failed: that statement's own
/// reason and SQLSTATE (a deadlock victim is worth running again, a CHECK violation not).
fn failed_cause(failed: &pb::Cause) -> pb::Cause {
    let mut cause = failed.clone();
    if cause.reason == ErrorReason::Unspecified as i32 {
        cause.reason = ErrorReason::BranchFailed as i32;
    }
    cause.message = format!("a statement failed: {}", failed.message);
    cause
}

/// The cause of an Aborted vote when PostgreSQL refused the PREPARE batch. Running out of
/// resources there is running out of prepared-transaction slots (max_prepared_transactions;
/// PostgreSQL says 53200, out of memory), which frees up as other transactions finish.
fn prepare_refused(e: &AgentError) -> pb::Cause {
    let (reason, sqlstate) = e.reason();
    let sqlstate = sqlstate.unwrap_or_default();
    let reason = match sqlstate {
        "53000" | "53200" => ErrorReason::PreparedTransactionsExhausted,
        _ => reason,
    };
    cause_of(reason, sqlstate, &e.to_string())
}

/// Tells one statement from another, for a repeat's check (see `Last`). Not a security
/// measure: only the client that numbers the statements can get it wrong.
fn digest(sql: &str, params: &[pb::Value]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sql.hash(&mut h);
    params.len().hash(&mut h);
    for p in params {
        prost::Message::encode_to_vec(p).hash(&mut h);
    }
    h.finish()
}

/// A string as an SQL literal. The agent's own values (txids, gids, participant ids) are
/// plain ASCII; doubling quotes keeps anything else a literal too.
/// A proof row, or `None` for a txid that is not one of ours (written by hand).
fn proof_row(row: &tokio_postgres::Row) -> Result<Option<ProofRow>, AgentError> {
    let txid: String = row.try_get(0).map_err(AgentError::sql)?;
    let Ok(txn) = txid.parse::<TxnId>() else {
        tracing::warn!(
            txid,
            "paxos_commit.committed holds a row that is no txid; ignored"
        );
        return Ok(None);
    };
    Ok(Some(ProofRow {
        txn,
        participants: row.try_get(1).map_err(AgentError::sql)?,
        age_ms: row.try_get::<_, i64>(2).map_err(AgentError::sql)?.max(0) as u64,
    }))
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn finish_sql(gid: &str, outcome: Outcome) -> String {
    let verb = match outcome {
        Outcome::Committed => "COMMIT",
        Outcome::Aborted => "ROLLBACK",
    };
    format!("{verb} PREPARED {}", literal(gid))
}

/// Closes a connection instead of returning it to the pool: its session is in a state no
/// other branch may inherit, and PostgreSQL rolls back whatever it had open.
fn discard(conn: Object) {
    drop(Object::take(conn));
}

/// Rolls back the open transaction on `conn`. A connection on which that fails does not go
/// back to the pool: the next branch would start inside the old transaction.
async fn roll_back(conn: Object) {
    if conn
        .batch_execute(&format!("ROLLBACK; {CLEAN_SESSION}"))
        .await
        .is_err()
    {
        discard(conn);
    }
}

/// The query message that prepares branch `txid` under `gid`: the assertion that the session
/// is inside the branch's own transaction, the commit proof naming every participant,
/// PREPARE TRANSACTION, and the session reset (see `Branches::prepare_transaction`).
/// Public for the tests that run it where it must fail.
pub fn prepare_sql(txid: &str, participant: &str, participants: &[&str], gid: &str) -> String {
    let txid = literal(txid);
    let all: Vec<String> = participants.iter().map(|p| literal(p)).collect();
    format!(
        "SELECT paxos_commit.assert_branch({txid}); \
         INSERT INTO paxos_commit.committed (txid, participant, participants) \
         VALUES ({txid}, {}, ARRAY[{}]::text[]); \
         PREPARE TRANSACTION {}; {CLEAN_SESSION}",
        literal(participant),
        all.join(", "),
        literal(gid),
    )
}

/// Runs `batch` (several statements, one query message) and counts the statements that
/// completed before it ended or failed.
async fn run_counting(conn: &Object, batch: &str) -> (usize, Result<(), tokio_postgres::Error>) {
    let stream = match conn.simple_query_raw(batch).await {
        Ok(stream) => stream,
        Err(e) => return (0, Err(e)),
    };
    futures::pin_mut!(stream);
    let mut completed = 0;
    loop {
        match stream.try_next().await {
            Ok(Some(SimpleQueryMessage::CommandComplete(_))) => completed += 1,
            Ok(Some(_)) => {}
            Ok(None) => return (completed, Ok(())),
            Err(e) => return (completed, Err(e)),
        }
    }
}

/// Whether `gid` is in `pg_prepared_xacts` (a cached statement: no parse per call).
async fn is_prepared_on(conn: &Object, gid: &str) -> Result<bool, tokio_postgres::Error> {
    let stmt = conn
        .prepare_typed_cached(IS_PREPARED_SQL, &[Type::TEXT])
        .await?;
    Ok(!conn.query(&stmt, &[&gid]).await?.is_empty())
}

/// Runs one statement of `txn`'s branch, with the transaction check pipelined behind it.
async fn statement(
    conn: &Object,
    txn: TxnId,
    sql: &str,
    params: &[pb::Value],
    max_result_bytes: usize,
) -> Ran {
    let refused = |e: AgentError| Ran {
        result: Err(e),
        after: None,
    };
    // Each distinct text stays prepared on the connection (and in the backend) while cached:
    // a client sending ever new texts must not grow either without bound.
    if conn.statement_cache.size() >= MAX_CACHED_STATEMENTS {
        conn.statement_cache.clear();
    }
    let stmt = match conn.prepare_cached(sql).await {
        Ok(stmt) => stmt,
        Err(e) => return refused(AgentError::sql(e)),
    };
    if stmt.params().len() != params.len() {
        return refused(AgentError::BadRequest(format!(
            "the statement takes {} parameters, {} given",
            stmt.params().len(),
            params.len()
        )));
    }
    let bound = match params
        .iter()
        .zip(stmt.params())
        .enumerate()
        .map(|(i, (v, ty))| values::param(i, v, ty))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(bound) => bound,
        Err(e) => return refused(AgentError::UnsupportedType(e)),
    };
    if let Err(e) = values::check_columns(stmt.columns()) {
        return refused(AgentError::UnsupportedType(e));
    }
    let (result, after) =
        tokio::join!(rows(conn, txn, &stmt, &bound, max_result_bytes), mark(conn));
    Ran {
        result,
        after: Some(after),
    }
}

/// Executes a prepared statement and converts its rows, up to `max_result_bytes`.
async fn rows(
    conn: &Object,
    txn: TxnId,
    stmt: &tokio_postgres::Statement,
    bound: &[values::Param],
    max_result_bytes: usize,
) -> Result<pb::ExecuteResponse, AgentError> {
    let refs = bound.iter().map(|p| p as &(dyn ToSql + Sync));
    let stream = conn.query_raw(stmt, refs).await.map_err(AgentError::sql)?;
    futures::pin_mut!(stream);
    let columns: Vec<String> = stmt
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let mut size: usize = columns.iter().map(|c| c.len() + 8).sum();
    let mut out = Vec::new();
    while let Some(row) = stream.try_next().await.map_err(AgentError::sql)? {
        let values = (0..row.len())
            .map(|i| values::column(&row, i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|detail| AgentError::UnreadableResult { txn, detail })?;
        size += 8 + values.iter().map(values::response_size).sum::<usize>();
        if size > max_result_bytes {
            // Dropping the stream leaves the rest of the rows to the connection, which reads
            // and discards them.
            return Err(AgentError::ResultTooLarge {
                txn,
                limit: max_result_bytes,
            });
        }
        out.push(pb::Row { values });
    }
    let rows_affected = if columns.is_empty() {
        stream.rows_affected().unwrap_or(0)
    } else {
        out.len() as u64
    };
    Ok(pb::ExecuteResponse {
        columns,
        rows_affected,
        rows: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn() -> TxnId {
        TxnId(0x00a1_b2c3_d4e5_f607)
    }

    fn expected() -> Mark {
        Mark {
            branch: Some(txn().to_string()),
            started: PgTimestamp(1_000),
        }
    }

    fn ok() -> Result<pb::ExecuteResponse, AgentError> {
        Ok(pb::ExecuteResponse::default())
    }

    #[test]
    fn a_statement_inside_the_branch_is_fine() {
        let ran = Ran {
            result: ok(),
            after: Some(Ok(expected())),
        };
        assert!(matches!(judge(txn(), &expected(), ran), Verdict::Done(_)));
    }

    #[test]
    fn a_statement_that_left_the_transaction_is_caught() {
        // The marker survives (forged with set_config), the transaction does not.
        let later = Mark {
            started: PgTimestamp(2_000),
            ..expected()
        };
        // The marker is gone (COMMIT or ROLLBACK ended the SET LOCAL).
        let unmarked = Mark {
            branch: None,
            ..expected()
        };
        for mark in [later, unmarked] {
            let ran = Ran {
                result: ok(),
                after: Some(Ok(mark.clone())),
            };
            match judge(txn(), &expected(), ran) {
                Verdict::Escaped(e) => {
                    assert!(matches!(e, AgentError::LeftTransaction { .. }), "{e}");
                    assert!(e.aborts_branch());
                }
                _ => panic!("not caught: {mark:?}"),
            }
        }
    }

    #[test]
    fn a_failed_statement_fails_the_branch_and_a_refused_one_does_not() {
        let failed = Ran {
            result: Err(AgentError::Sql {
                code: "42601".into(),
                message: "syntax error".into(),
            }),
            after: None,
        };
        assert!(matches!(
            judge(txn(), &expected(), failed),
            Verdict::Failed(_)
        ));
        let refused = Ran {
            result: Err(AgentError::BadRequest("parameters".into())),
            after: None,
        };
        assert!(matches!(
            judge(txn(), &expected(), refused),
            Verdict::Refused(_)
        ));
        let too_large = Ran {
            result: Err(AgentError::ResultTooLarge {
                txn: txn(),
                limit: 10,
            }),
            after: Some(Ok(expected())),
        };
        assert!(matches!(
            judge(txn(), &expected(), too_large),
            Verdict::Failed(_)
        ));
    }

    #[test]
    fn the_prepare_batch_counts_the_session_reset_as_six_statements() {
        // PREPARE's outcome is read from how many command tags came back: the count must
        // follow the reset's text.
        let reset = CLEAN_SESSION
            .split(';')
            .filter(|s| !s.trim().is_empty())
            .count();
        assert_eq!(PREPARE_BATCH_STATEMENTS, PREPARED_AFTER + reset);
    }

    #[test]
    fn sql_built_here_quotes_its_values() {
        assert_eq!(literal("a'b"), "'a''b'");
        assert_eq!(
            finish_sql("pxc:g:00a1b2c3d4e5f607:p", Outcome::Committed),
            "COMMIT PREPARED 'pxc:g:00a1b2c3d4e5f607:p'"
        );
        assert_eq!(finish_sql("x", Outcome::Aborted), "ROLLBACK PREPARED 'x'");
    }
}
