//! The agent's errors, and the gRPC status that means the same thing.

use paxos_commit_core::{Outcome, TxnId};
use paxos_commit_proto::pb::ErrorReason;
use paxos_commit_proto::reason::{self, SQLSTATE, TXID};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// A statement of a kind no branch may run (transaction control, session state, ...).
    #[error("statement refused: {0}")]
    Refused(String),
    /// A parameter that does not fit its declared type, or a result column of a type the
    /// wire cannot carry: refused before the statement ran.
    #[error("{0}; the statement did not run")]
    UnsupportedType(String),
    /// A result row that could not be converted after the statement ran: the branch can
    /// only abort, since running the statement again in it would apply it twice.
    #[error("{detail}; the statement ran, and transaction {txn} can only abort now")]
    UnreadableResult { txn: TxnId, detail: String },
    /// PostgreSQL answered with an error.
    #[error("PostgreSQL error {code}: {message}")]
    Sql { code: String, message: String },
    /// PostgreSQL could not be reached (or the connection broke).
    #[error("database unavailable: {0}")]
    Database(String),
    #[error("could not join the transaction: {}", .0.message())]
    Enlist(Status),
    #[error("transaction {txn} is already {state} on this participant; no more statements")]
    Closed { txn: TxnId, state: &'static str },
    #[error("an earlier statement of transaction {txn} failed ({reason}); it can only abort")]
    BranchFailed { txn: TxnId, reason: String },
    #[error("transaction {txn} was never prepared here and cannot commit")]
    NotPrepared { txn: TxnId },
    #[error("transaction {txn} was already {applied} here; refusing to make it {asked}")]
    Conflict {
        txn: TxnId,
        applied: Outcome,
        asked: Outcome,
    },
    /// The agent is at a limit that frees up as other work finishes (connection pool, open
    /// branches): the caller may try again later.
    #[error("agent busy: {0}")]
    Busy(String),
    /// The agent was told to stop: it takes no new branches, and a statement for a branch
    /// it has dooms that branch (it is about to be rolled back).
    #[error(
        "this agent is shutting down: the statement did not run, and transaction {txn} cannot \
         commit on this participant; abort it and try again once the agent is back"
    )]
    ShuttingDown { txn: TxnId },
    /// The statement ran, and its result is over the limit: the branch can only abort, since
    /// running the statement again in it would apply its changes twice.
    #[error(
        "the statement's result is larger than {limit} bytes (max_result_bytes), so it was not \
         returned; the statement ran, and transaction {txn} can only abort now: select fewer \
         rows or columns"
    )]
    ResultTooLarge { txn: TxnId, limit: usize },
    /// PostgreSQL says the connection is no longer in the branch's transaction after a
    /// statement: the statement ended or escaped it.
    #[error(
        "the statement left the transaction of branch {txn} ({detail}); the branch can only \
         abort, and what the statement did outside it is not the coordinator's to undo"
    )]
    LeftTransaction { txn: TxnId, detail: String },
    /// An Execute whose sequence number is neither the last one run on the branch (a repeat)
    /// nor the next.
    #[error(
        "statement {seq} of transaction {txn} at {participant} is out of order: the last one \
         run here was {}; nothing was run",
        last.map_or_else(|| "none".to_string(), |l| l.to_string())
    )]
    OutOfOrder {
        txn: TxnId,
        participant: String,
        seq: u64,
        last: Option<u64>,
    },
    /// A repeat of the last statement's number with another statement: the client numbers
    /// its statements wrongly, and the first answer would not be this statement's.
    #[error(
        "statement {seq} of transaction {txn} at {participant} was already run as a different \
         statement; nothing was run"
    )]
    NotARepeat {
        txn: TxnId,
        participant: String,
        seq: u64,
    },
    /// The answer to a numbered statement, as its first copy was told (and every repeat is),
    /// with its error details.
    #[error("{}", .0.message())]
    Answered(Status),
}

impl AgentError {
    pub fn sql(e: tokio_postgres::Error) -> AgentError {
        match e.as_db_error() {
            Some(db) => {
                let class = db.code().code().get(..2).unwrap_or("??").to_string();
                metrics::counter!("paxos_commit_agent_sql_errors_total", "class" => class)
                    .increment(1);
                let mut message = db.message().to_string();
                if let Some(detail) = db.detail() {
                    message.push_str(": ");
                    message.push_str(detail);
                }
                AgentError::Sql {
                    code: db.code().code().to_string(),
                    message,
                }
            }
            None => AgentError::Database(e.to_string()),
        }
    }

    pub fn pool(e: deadpool_postgres::PoolError) -> AgentError {
        use deadpool_postgres::{PoolError, TimeoutType};
        match e {
            PoolError::Timeout(TimeoutType::Wait) => AgentError::Busy(
                "every database connection is in use (pool_size) and none became free within \
                 pool_wait_timeout_ms"
                    .into(),
            ),
            PoolError::Backend(e) => AgentError::sql(e),
            e => AgentError::Database(e.to_string()),
        }
    }

    /// Whether this error ends the branch's usefulness: PostgreSQL aborted its transaction,
    /// or the statement ran and its effect cannot be reported or trusted.
    pub fn aborts_branch(&self) -> bool {
        matches!(
            self,
            AgentError::Sql { .. }
                | AgentError::Database(_)
                | AgentError::ResultTooLarge { .. }
                | AgentError::LeftTransaction { .. }
                | AgentError::UnreadableResult { .. }
        )
    }

    /// The ErrorInfo reason of this error, and its SQLSTATE when PostgreSQL gave one.
    pub fn reason(&self) -> (ErrorReason, Option<&str>) {
        let r = match self {
            AgentError::BadRequest(_) => ErrorReason::InvalidArgument,
            AgentError::Refused(_) => ErrorReason::StatementRefused,
            AgentError::UnsupportedType(_) | AgentError::UnreadableResult { .. } => {
                ErrorReason::UnsupportedType
            }
            AgentError::Sql { code, .. } => return (reason::of_sqlstate(code), Some(code)),
            AgentError::Database(_) => ErrorReason::DatabaseUnavailable,
            AgentError::Enlist(s) => match reason::of(s) {
                Some(r) => r.reason,
                None if s.code() == Code::FailedPrecondition => ErrorReason::TransactionClosed,
                None => reason::default_for(s.code()),
            },
            AgentError::Closed { .. } => ErrorReason::TransactionClosed,
            AgentError::BranchFailed { .. } => ErrorReason::BranchFailed,
            AgentError::NotPrepared { .. } => ErrorReason::NotPrepared,
            AgentError::Conflict { .. } => ErrorReason::DecisionConflict,
            AgentError::Busy(_) => ErrorReason::AgentBusy,
            AgentError::ShuttingDown { .. } => ErrorReason::AgentShuttingDown,
            AgentError::ResultTooLarge { .. } => ErrorReason::ResultTooLarge,
            AgentError::LeftTransaction { .. } => ErrorReason::StatementRefused,
            AgentError::OutOfOrder { .. } | AgentError::NotARepeat { .. } => {
                ErrorReason::OutOfOrder
            }
            AgentError::Answered { .. } => ErrorReason::Unspecified,
        };
        (r, None)
    }

    fn txn(&self) -> Option<TxnId> {
        match self {
            AgentError::Closed { txn, .. }
            | AgentError::BranchFailed { txn, .. }
            | AgentError::NotPrepared { txn }
            | AgentError::Conflict { txn, .. }
            | AgentError::ShuttingDown { txn }
            | AgentError::ResultTooLarge { txn, .. }
            | AgentError::LeftTransaction { txn, .. }
            | AgentError::UnreadableResult { txn, .. }
            | AgentError::OutOfOrder { txn, .. }
            | AgentError::NotARepeat { txn, .. } => Some(*txn),
            _ => None,
        }
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        if let AgentError::Answered(s) = e {
            return s;
        }
        let msg = e.to_string();
        let (reason, sqlstate) = e.reason();
        let txid = e.txn().map(|t| t.to_string()).unwrap_or_default();
        let code = code(&e);
        reason::status(
            code,
            msg,
            reason,
            &[(SQLSTATE, sqlstate.unwrap_or_default()), (TXID, &txid)],
        )
    }
}

/// The gRPC code that means the same thing as `e`.
fn code(e: &AgentError) -> Code {
    match e {
        AgentError::Sql { code, .. } => {
            match &code[..2.min(code.len())] {
                // lock timeout: like a deadlock, retryable
                _ if code == "55P03" => Code::Aborted,
                // statement_timeout (or a cancel): not a sign that PostgreSQL is down,
                // and the branch is aborted, so not Unavailable (which clients retry)
                _ if code == "57014" => Code::DeadlineExceeded,
                // syntax, undefined objects, bad data
                "42" | "22" | "0A" | "26" | "34" | "3F" => Code::InvalidArgument,
                // integrity constraints (CHECK, UNIQUE, FK, NOT NULL)
                "23" => Code::FailedPrecondition,
                // serialization failure, deadlock
                "40" => Code::Aborted,
                "08" | "53" | "57" => Code::Unavailable,
                _ => Code::FailedPrecondition,
            }
        }
        AgentError::BadRequest(_)
        | AgentError::Refused(_)
        | AgentError::UnsupportedType(_)
        | AgentError::UnreadableResult { .. } => Code::InvalidArgument,
        AgentError::Database(_) => Code::Unavailable,
        AgentError::Enlist(s) => s.code(),
        AgentError::Answered(s) => s.code(),
        AgentError::Closed { .. }
        | AgentError::OutOfOrder { .. }
        | AgentError::NotARepeat { .. }
        | AgentError::BranchFailed { .. }
        | AgentError::NotPrepared { .. } => Code::FailedPrecondition,
        AgentError::Conflict { .. } => Code::Internal,
        AgentError::Busy(_) => Code::ResourceExhausted,
        AgentError::ShuttingDown { .. } => Code::Unavailable,
        AgentError::ResultTooLarge { .. } | AgentError::LeftTransaction { .. } => {
            Code::InvalidArgument
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_timeouts_have_codes_clients_do_not_retry_blindly() {
        let txn = TxnId(1);
        let code = |e: AgentError| Status::from(e).code();
        assert_eq!(code(AgentError::Busy("x".into())), Code::ResourceExhausted);
        assert_eq!(
            code(AgentError::ResultTooLarge { txn, limit: 1 }),
            Code::InvalidArgument
        );
        assert_eq!(
            code(AgentError::LeftTransaction {
                txn,
                detail: "x".into()
            }),
            Code::InvalidArgument
        );
        assert_eq!(
            code(AgentError::BadRequest("x".into())),
            Code::InvalidArgument
        );
        let sql = |c: &str| AgentError::Sql {
            code: c.into(),
            message: String::new(),
        };
        assert_eq!(code(sql("57014")), Code::DeadlineExceeded);
        assert_eq!(code(sql("55P03")), Code::Aborted);
        assert_eq!(code(sql("57P01")), Code::Unavailable);
        assert_eq!(code(AgentError::ShuttingDown { txn }), Code::Unavailable);
    }
}
