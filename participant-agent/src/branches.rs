//! The branches of one database: each transaction's statements run in one PostgreSQL
//! transaction on one pooled connection, which is prepared, voted on and finished here.
//!
//! The only durable state is PostgreSQL's own: a branch this process lost (crash, restart)
//! is either in `pg_prepared_xacts` under its gid, and is finished from there, or was rolled
//! back by PostgreSQL when its connection dropped.

use crate::coordinators::Coordinators;
use crate::error::AgentError;
use crate::values;
use deadpool_postgres::{Object, Pool};
use paxos_commit_core::types::{gid, parse_gid};
use paxos_commit_core::{Outcome, Participant, TxnId, Vote};
use paxos_commit_proto::pb;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;

enum State {
    /// Created by the first Execute, not begun yet.
    New,
    /// A PostgreSQL transaction is open on `conn`; `failed` once a statement failed (the
    /// branch can then only roll back).
    Open {
        conn: Box<Object>,
        failed: Option<String>,
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
            State::New | State::Open { .. } => "open",
            State::Prepared { .. } => "prepared",
            State::Uncertain { .. } => "preparing",
            State::Done(Outcome::Committed) => "committed",
            State::Done(Outcome::Aborted) => "aborted",
        }
    }
}

struct Branch {
    state: tokio::sync::Mutex<State>,
    touched: Mutex<Instant>,
    resolving: AtomicBool,
}

impl Branch {
    fn new(state: State) -> Arc<Branch> {
        Arc::new(Branch {
            state: tokio::sync::Mutex::new(state),
            touched: Mutex::new(Instant::now()),
            resolving: AtomicBool::new(false),
        })
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

/// What a prepared transaction of ours in `pg_prepared_xacts` looks like.
pub struct PreparedRow {
    pub gid: String,
    pub txn: TxnId,
    pub age_ms: u64,
    pub database: String,
}

pub struct Branches {
    group: String,
    /// BEGIN with a lock timeout: PostgreSQL cannot see a deadlock that spans two
    /// databases, so a branch waiting on a lock gives up and its transaction aborts.
    begin_sql: String,
    pool: Pool,
    coordinators: Coordinators,
    branches: Mutex<HashMap<TxnId, Arc<Branch>>>,
}

/// Statements that would take the branch's fate away from the coordinator.
fn is_transaction_control(sql: &str) -> bool {
    let mut words = sql
        .split_whitespace()
        .map(|w| w.trim_end_matches(';').to_ascii_uppercase());
    let first = words.next().unwrap_or_default();
    match first.as_str() {
        "BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" => true,
        "PREPARE" => words.next().as_deref() == Some("TRANSACTION"),
        _ => false,
    }
}

impl Branches {
    pub fn new(
        group: String,
        pool: Pool,
        coordinators: Coordinators,
        lock_timeout: Duration,
    ) -> Branches {
        Branches {
            begin_sql: format!(
                "BEGIN; SET LOCAL lock_timeout = '{}ms'",
                lock_timeout.as_millis()
            ),
            group,
            pool,
            coordinators,
            branches: Mutex::new(HashMap::new()),
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

    /// Branches open and not prepared yet (one busy with a statement counts as open).
    pub fn open_count(&self) -> usize {
        self.map()
            .values()
            .filter(|b| {
                b.state
                    .try_lock()
                    .map_or(true, |s| matches!(*s, State::New | State::Open { .. }))
            })
            .count()
    }

    /// Runs one statement in `txn`'s branch, opening the branch (and enlisting with the
    /// leader) on the first one.
    pub async fn execute(
        &self,
        txn: TxnId,
        sql: &str,
        params: &[pb::Value],
    ) -> Result<pb::ExecuteResponse, AgentError> {
        if sql.trim().is_empty() {
            return Err(AgentError::BadRequest("empty SQL statement".into()));
        }
        if is_transaction_control(sql) {
            return Err(AgentError::BadRequest(
                "transaction control (BEGIN, COMMIT, ROLLBACK, PREPARE TRANSACTION) belongs to \
                 the coordinator; send only the statements of the transaction"
                    .into(),
            ));
        }
        let branch = self
            .map()
            .entry(txn)
            .or_insert_with(|| Branch::new(State::New))
            .clone();
        let mut state = branch.state.lock().await;
        if matches!(*state, State::New) {
            branch.touch();
            return match self.begin(txn, sql, params).await {
                Ok((conn, first)) => {
                    let failed = match &first {
                        Err(e) if e.aborts_branch() => Some(e.to_string()),
                        _ => None,
                    };
                    *state = State::Open {
                        conn: Box::new(conn),
                        failed,
                    };
                    first
                }
                Err(e) => {
                    *state = State::Done(Outcome::Aborted);
                    drop(state);
                    self.remove(txn);
                    Err(e)
                }
            };
        }
        let State::Open { conn, failed } = &mut *state else {
            return Err(AgentError::Closed {
                txn,
                state: state.name(),
            });
        };
        if let Some(reason) = failed {
            return Err(AgentError::BranchFailed {
                txn,
                reason: reason.clone(),
            });
        }
        branch.touch();
        match run(conn, sql, params).await {
            Ok(resp) => Ok(resp),
            Err(e) => {
                if e.aborts_branch() {
                    *failed = Some(e.to_string());
                }
                Err(e)
            }
        }
    }

    /// Opens the PostgreSQL transaction and runs the branch's first statement while the
    /// enlistment is in flight. BEGIN and the statement are pipelined on the connection
    /// (tokio-postgres sends requests in the order they are first polled, here in one
    /// write), so the first statement costs one database round trip, and the round trip to
    /// the leader hides behind it. The statement's own result (which may be an error that
    /// fails the branch) comes back beside the connection.
    async fn begin(
        &self,
        txn: TxnId,
        sql: &str,
        params: &[pb::Value],
    ) -> Result<(Object, Result<pb::ExecuteResponse, AgentError>), AgentError> {
        let open = async {
            let conn = self.pool.get().await.map_err(AgentError::pool)?;
            let (begun, first) =
                tokio::join!(conn.batch_execute(&self.begin_sql), run(&conn, sql, params));
            match begun {
                Ok(()) => Ok::<_, AgentError>((conn, first)),
                Err(e) => {
                    // Whatever the statement did, it did outside our transaction or on a
                    // broken connection: this connection does not go back to the pool.
                    drop(Object::take(conn));
                    Err(AgentError::sql(e))
                }
            }
        };
        let (enlisted, opened) = tokio::join!(self.coordinators.enlist(txn), open);
        match (enlisted, opened) {
            (Ok(()), opened) => opened,
            (Err(status), Ok((conn, _))) => {
                roll_back(conn).await;
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
                } else {
                    Vote::Aborted
                };
                self.coordinators.vote(txn, vote, &participants);
                return Ok(());
            }
        };
        let mut state = branch.state.lock().await;
        let vote = match std::mem::replace(&mut *state, State::Done(Outcome::Aborted)) {
            State::New => Some(Vote::Aborted),
            State::Open { conn, failed: None } => {
                let sql = format!("PREPARE TRANSACTION '{}'", self.gid(txn));
                match conn.batch_execute(&sql).await {
                    Ok(()) => {
                        paxos_commit_proto::crash_point("agent-after-prepare");
                        *state = State::Prepared {
                            participants: participants.clone(),
                            since: Instant::now(),
                        };
                        Some(Vote::Prepared)
                    }
                    // PostgreSQL refused and rolled the transaction back.
                    Err(e) if e.as_db_error().is_some() => {
                        tracing::info!(%txn, "PREPARE TRANSACTION refused: {e}");
                        Some(Vote::Aborted)
                    }
                    Err(e) => {
                        tracing::warn!(%txn, "connection lost during PREPARE TRANSACTION: {e}");
                        *state = State::Uncertain {
                            participants: participants.clone(),
                            since: Instant::now(),
                        };
                        None
                    }
                }
            }
            State::Open {
                conn,
                failed: Some(_),
            } => {
                roll_back(*conn).await;
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
            self.coordinators.vote(txn, vote, &participants);
        }
        Ok(())
    }

    /// Applies a decision; idempotent ("already finished" is success).
    pub async fn decide(&self, txn: TxnId, outcome: Outcome) -> Result<(), AgentError> {
        tracing::debug!(%txn, %outcome, "decision received");
        let Some(branch) = self.get(txn) else {
            return self.finish_prepared(txn, outcome).await;
        };
        let mut state = branch.state.lock().await;
        match std::mem::replace(&mut *state, State::Done(outcome)) {
            State::New => {}
            State::Open { conn, .. } => {
                if outcome == Outcome::Committed {
                    *state = State::Open { conn, failed: None };
                    return Err(AgentError::NotPrepared { txn });
                }
                roll_back(*conn).await;
            }
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
        if let State::Open { conn, .. } =
            std::mem::replace(&mut *state, State::Done(Outcome::Aborted))
        {
            roll_back(*conn).await;
        }
        branch.touch();
    }

    /// `COMMIT PREPARED` / `ROLLBACK PREPARED` by gid. A gid that no longer exists was
    /// finished before (by us, or by an operator), which is success.
    async fn finish_prepared(&self, txn: TxnId, outcome: Outcome) -> Result<(), AgentError> {
        match self.finish_gid(&self.gid(txn), outcome).await {
            Err(AgentError::Sql { code, .. }) if code == *SqlState::UNDEFINED_OBJECT.code() => {
                Ok(())
            }
            other => other,
        }
    }

    async fn finish_gid(&self, gid: &str, outcome: Outcome) -> Result<(), AgentError> {
        let verb = match outcome {
            Outcome::Committed => "COMMIT",
            Outcome::Aborted => "ROLLBACK",
        };
        let conn = self.pool.get().await.map_err(AgentError::pool)?;
        conn.batch_execute(&format!("{verb} PREPARED '{gid}'"))
            .await
            .map_err(AgentError::sql)
    }

    async fn is_prepared(&self, txn: TxnId) -> Result<bool, AgentError> {
        let conn = self.pool.get().await.map_err(AgentError::pool)?;
        let row = conn
            .query_opt(
                "SELECT 1 FROM pg_prepared_xacts WHERE gid = $1",
                &[&self.gid(txn)],
            )
            .await
            .map_err(AgentError::sql)?;
        Ok(row.is_some())
    }

    /// Our prepared transactions, from PostgreSQL itself.
    pub async fn list_prepared(&self) -> Result<Vec<PreparedRow>, AgentError> {
        let conn = self.pool.get().await.map_err(AgentError::pool)?;
        let rows = conn
            .query(
                "SELECT gid, database::text, \
                        (extract(epoch FROM now() - prepared) * 1000)::int8 \
                   FROM pg_prepared_xacts \
                  WHERE gid LIKE 'pxc:%' AND database = current_database() \
                  ORDER BY prepared",
                &[],
            )
            .await
            .map_err(AgentError::sql)?;
        let mut out = Vec::new();
        for row in rows {
            let gid: String = row.get(0);
            let Some((group, txn, participant)) = parse_gid(&gid) else {
                continue;
            };
            if group != self.group || participant != self.participant() {
                continue;
            }
            out.push(PreparedRow {
                txn,
                database: row.get(1),
                age_ms: row.get::<_, i64>(2).max(0) as u64,
                gid,
            });
        }
        Ok(out)
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
    pub async fn heuristic(&self, gid: &str, outcome: Outcome) -> Result<(), AgentError> {
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
        self.finish_gid(gid, outcome).await?;
        if let Some(branch) = self.get(ours) {
            *branch.state.lock().await = State::Done(outcome);
            self.remove(ours);
        }
        Ok(())
    }

    /// Periodic duties: roll back abandoned open branches, and ask the group about prepared
    /// branches that waited too long for their decision.
    pub async fn sweep(self: &Arc<Self>, branch_timeout: Duration, in_doubt_after: Duration) {
        let branches: Vec<(TxnId, Arc<Branch>)> =
            self.map().iter().map(|(t, b)| (*t, b.clone())).collect();
        for (txn, branch) in branches {
            let Ok(state) = branch.state.try_lock() else {
                continue; // busy: not abandoned
            };
            match &*state {
                State::Open { .. } | State::New if branch.idle() > branch_timeout => {
                    tracing::info!(%txn, "rolling back a branch abandoned for {:?}", branch.idle());
                    self.roll_back_open(&branch, state).await;
                }
                State::Done(_) if branch.idle() > branch_timeout => {
                    drop(state);
                    self.remove(txn);
                }
                State::Open { .. } | State::New if branch.idle() > in_doubt_after => {
                    // Idle for a while: is its leader still there to finish it?
                    if branch.resolving.swap(true, Ordering::AcqRel) {
                        continue;
                    }
                    drop(state);
                    let this = self.clone();
                    tokio::spawn(async move {
                        if !this.coordinators.leader_holds_open(txn).await {
                            let state = branch.state.lock().await;
                            if matches!(*state, State::Open { .. } | State::New) {
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

/// Rolls back the open transaction on `conn`. A connection on which that fails does not go
/// back to the pool: the next branch would start inside the old transaction.
async fn roll_back(conn: Object) {
    if conn.batch_execute("ROLLBACK").await.is_err() {
        drop(Object::take(conn));
    }
}

async fn run(
    conn: &Object,
    sql: &str,
    params: &[pb::Value],
) -> Result<pb::ExecuteResponse, AgentError> {
    let stmt = conn.prepare_cached(sql).await.map_err(AgentError::sql)?;
    if stmt.params().len() != params.len() {
        return Err(AgentError::BadRequest(format!(
            "the statement takes {} parameters, {} given",
            stmt.params().len(),
            params.len()
        )));
    }
    let bound = params
        .iter()
        .zip(stmt.params())
        .enumerate()
        .map(|(i, (v, ty))| values::param(i, v, ty))
        .collect::<Result<Vec<_>, _>>()
        .map_err(AgentError::BadRequest)?;
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = bound
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    if stmt.columns().is_empty() {
        let n = conn.execute(&stmt, &refs).await.map_err(AgentError::sql)?;
        return Ok(pb::ExecuteResponse {
            rows_affected: n,
            ..Default::default()
        });
    }
    let rows = conn.query(&stmt, &refs).await.map_err(AgentError::sql)?;
    let columns = stmt
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let values = (0..row.len())
            .map(|i| values::column(row, i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(AgentError::BadRequest)?;
        out.push(pb::Row { values });
    }
    Ok(pb::ExecuteResponse {
        columns,
        rows_affected: rows.len() as u64,
        rows: out,
    })
}

#[cfg(test)]
mod tests {
    use super::is_transaction_control;

    #[test]
    fn transaction_control_is_refused() {
        for sql in [
            "COMMIT",
            "rollback;",
            "  begin",
            "PREPARE TRANSACTION 'x'",
            "end",
        ] {
            assert!(is_transaction_control(sql), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "UPDATE t SET x = 1",
            "PREPARE foo AS SELECT 1",
            "SAVEPOINT a",
        ] {
            assert!(!is_transaction_control(sql), "{sql}");
        }
    }
}
