//! The replica's errors and the gRPC status that means the same thing to a client.

use crate::log::LogError;
use paxos_commit_core::TxnError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Txn(#[from] TxnError),
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// No decision in time: usually a majority of replicas is unreachable. The outcome is
    /// unknown, not failed.
    #[error(
        "no decision for transaction {txid} within {waited_ms} ms: a majority of replicas may be \
         down; the outcome is unknown, ask GetStatus later"
    )]
    NoDecision { txid: String, waited_ms: u64 },
    #[error("this replica is shutting down")]
    ShuttingDown,
    /// Starting could be unsafe (another process on this data directory, a damaged log):
    /// an operator must act first.
    #[error("refused to start: {0}")]
    Refused(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let msg = e.to_string();
        match e {
            CoordinatorError::Txn(TxnError::Unknown { .. }) => Status::not_found(msg),
            CoordinatorError::Txn(TxnError::NotLeader { .. }) => Status::failed_precondition(msg),
            CoordinatorError::Txn(TxnError::Frozen { .. }) => Status::failed_precondition(msg),
            // Another replica can answer: callers move on as from one that is down.
            CoordinatorError::Txn(TxnError::Abstains { .. }) => Status::unavailable(msg),
            CoordinatorError::Txn(TxnError::DuplicateParticipant { .. }) => {
                Status::failed_precondition(msg)
            }
            CoordinatorError::InvalidArgument(_) => Status::invalid_argument(msg),
            CoordinatorError::NoDecision { .. } => Status::unavailable(msg),
            CoordinatorError::ShuttingDown => Status::unavailable(msg),
            CoordinatorError::Refused(_) => Status::failed_precondition(msg),
            CoordinatorError::Log(_) => Status::unavailable(msg),
        }
    }
}

impl paxos_commit_proto::ServeFailure for CoordinatorError {
    fn exit_code(&self) -> u8 {
        match self {
            CoordinatorError::Refused(_) => paxos_commit_proto::EXIT_REFUSED,
            CoordinatorError::Log(_) => paxos_commit_proto::EXIT_LOG_FAILED,
            _ => 1,
        }
    }
}
