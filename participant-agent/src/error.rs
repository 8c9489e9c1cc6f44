//! The agent's errors, and the gRPC status that means the same thing.

use paxos_commit_core::{Outcome, TxnId};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid request: {0}")]
    BadRequest(String),
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
}

impl AgentError {
    pub fn sql(e: tokio_postgres::Error) -> AgentError {
        match e.as_db_error() {
            Some(db) => {
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
        AgentError::Database(e.to_string())
    }

    /// Whether PostgreSQL aborted the branch's transaction along with this error.
    pub fn aborts_branch(&self) -> bool {
        matches!(self, AgentError::Sql { .. } | AgentError::Database(_))
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        let msg = e.to_string();
        match &e {
            AgentError::BadRequest(_) => Status::invalid_argument(msg),
            AgentError::Sql { code, .. } => {
                let code = match &code[..2.min(code.len())] {
                    // lock timeout: like a deadlock, retryable
                    _ if code == "55P03" => Code::Aborted,
                    // syntax, undefined objects, bad data
                    "42" | "22" | "0A" | "26" | "34" | "3F" => Code::InvalidArgument,
                    // integrity constraints (CHECK, UNIQUE, FK, NOT NULL)
                    "23" => Code::FailedPrecondition,
                    // serialization failure, deadlock
                    "40" => Code::Aborted,
                    "08" | "53" | "57" => Code::Unavailable,
                    _ => Code::FailedPrecondition,
                };
                Status::new(code, msg)
            }
            AgentError::Database(_) => Status::unavailable(msg),
            AgentError::Enlist(s) => Status::new(s.code(), msg),
            AgentError::Closed { .. }
            | AgentError::BranchFailed { .. }
            | AgentError::NotPrepared { .. } => Status::failed_precondition(msg),
            AgentError::Conflict { .. } => Status::internal(msg),
        }
    }
}
