//! The replica's errors and the gRPC status that means the same thing to a client.

use crate::log::LogError;
use paxos_commit_core::TxnError;
use paxos_commit_proto::pb::ErrorReason;
use paxos_commit_proto::reason;
use tonic::{Code, Status};

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

impl CoordinatorError {
    /// The gRPC code and ErrorInfo reason that mean the same thing to a client.
    fn code_and_reason(&self) -> (Code, ErrorReason) {
        match self {
            CoordinatorError::Txn(TxnError::Unknown { .. }) => {
                (Code::NotFound, ErrorReason::UnknownTransaction)
            }
            CoordinatorError::Txn(TxnError::NotLeader { .. }) => {
                (Code::FailedPrecondition, ErrorReason::NotLeader)
            }
            CoordinatorError::Txn(TxnError::Frozen { .. }) => {
                (Code::FailedPrecondition, ErrorReason::TransactionClosed)
            }
            // Another replica can answer: callers move on as from one that is down.
            CoordinatorError::Txn(TxnError::Abstains { .. }) => {
                (Code::Unavailable, ErrorReason::ReplicaUnavailable)
            }
            CoordinatorError::Txn(TxnError::DuplicateParticipant { .. }) => {
                (Code::FailedPrecondition, ErrorReason::InvalidArgument)
            }
            CoordinatorError::InvalidArgument(_) => {
                (Code::InvalidArgument, ErrorReason::InvalidArgument)
            }
            CoordinatorError::NoDecision { .. } => (Code::Unavailable, ErrorReason::OutcomeUnknown),
            CoordinatorError::ShuttingDown
            | CoordinatorError::Refused(_)
            | CoordinatorError::Log(_) => (Code::Unavailable, ErrorReason::ReplicaUnavailable),
        }
    }

    fn txid(&self) -> String {
        match self {
            CoordinatorError::Txn(
                TxnError::Unknown { txn, .. }
                | TxnError::NotLeader { txn, .. }
                | TxnError::Frozen { txn }
                | TxnError::Abstains { txn }
                | TxnError::DuplicateParticipant { txn, .. },
            ) => txn.to_string(),
            CoordinatorError::NoDecision { txid, .. } => txid.clone(),
            _ => String::new(),
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let (code, r) = e.code_and_reason();
        let txid = e.txid();
        reason::status(code, e.to_string(), r, &[(reason::TXID, &txid)])
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
