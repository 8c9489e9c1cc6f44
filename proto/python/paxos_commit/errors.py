"""Typed errors, decided from the google.rpc.ErrorInfo every server status carries.

A server of paxos-commit attaches one ErrorInfo (domain "paxos-commit") to each error status
it sends, in the standard ``grpc-status-details-bin`` trailer. Its ``reason`` is the name of
an ErrorReason of paxoscommit.proto; that name, never the message text, is what a caller
decides from. A status without such an ErrorInfo was not answered by a server of ours: it
was raised by the transport (a refused or broken connection, a deadline) or came from
something in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol

import grpc
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from .outcomes import Decision

DOMAIN = "paxos-commit"
DETAILS_TRAILER = "grpc-status-details-bin"

# Reasons after which the whole transaction may succeed if run again from the start: the
# same set as `is_transient` in proto/src/reason.rs.
TRANSIENT_REASONS = frozenset(
    {
        "LOCK_TIMEOUT",
        "DEADLOCK",
        "SERIALIZATION_FAILURE",
        "PREPARED_TRANSACTIONS_EXHAUSTED",
        "AGENT_BUSY",
        "AGENT_SHUTTING_DOWN",
        "TOO_MANY_TRANSACTIONS",
        "OVERLOADED",
        "REPLICA_UNAVAILABLE",
        "DATABASE_UNAVAILABLE",
        "PARTICIPANT_UNREACHABLE",
        "ABORTED_BY_TAKEOVER",
    }
)

# The codes a broken connection or an expired deadline produce on the client's side.
TRANSPORT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

# Statement failures that retrying the transaction will not cure.
STATEMENT_REASONS = frozenset(
    {
        "CONSTRAINT_VIOLATION",
        "SQL_ERROR",
        "STATEMENT_TIMEOUT",
        "STATEMENT_REFUSED",
        "UNSUPPORTED_TYPE",
        "RESULT_TOO_LARGE",
    }
)


def is_transient(reason: Optional[str]) -> bool:
    """Whether a transaction that failed for `reason` may succeed when run again."""
    return reason in TRANSIENT_REASONS


@dataclass(frozen=True)
class ErrorInfo:
    """The paxos-commit ErrorInfo of a status."""

    reason: str
    sqlstate: Optional[str] = None
    participant: Optional[str] = None
    txid: Optional[str] = None


@dataclass(frozen=True)
class Cause:
    """Why a transaction aborted, as the deciding replica knows it (DecisionResponse.cause)."""

    reason: str
    participant: Optional[str] = None
    sqlstate: Optional[str] = None
    message: str = ""

    @property
    def transient(self) -> bool:
        return is_transient(self.reason)


class PaxosCommitError(Exception):
    """A call failed. Decide from `reason` (an ErrorReason name), `code` and `transient`.

    `reason` is None when the status carried no ErrorInfo of paxos-commit, unless the client
    itself gave the failure a reason (see `from_transport`). `message` is for people.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        reason: Optional[str] = None,
        sqlstate: Optional[str] = None,
        participant: Optional[str] = None,
        txid: Optional[str] = None,
        from_transport: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.sqlstate = sqlstate
        self.participant = participant
        self.txid = txid
        # True when no server answered: the connection failed or the deadline passed.
        self.from_transport = from_transport

    @property
    def transient(self) -> bool:
        """Whether running the whole transaction again may succeed."""
        return is_transient(self.reason)

    def __str__(self) -> str:
        where = f" at {self.participant}" if self.participant else ""
        sqlstate = f" [{self.sqlstate}]" if self.sqlstate else ""
        return f"{self.reason or self.code.name}{sqlstate}{where}: {self.message}"


class TransientError(PaxosCommitError):
    """Contention or a passing fault (deadlock, lock timeout, a replica restarting...):
    the whole transaction may succeed when run again. `Client.run` does that."""


class StatementError(PaxosCommitError):
    """The statement failed for a reason retrying will not cure (SQL error, refused kind,
    unsupported type, statement timeout); the transaction can only abort."""


class ConstraintViolation(StatementError):
    """A CHECK, UNIQUE, FOREIGN KEY or NOT NULL constraint refused the statement (class 23)."""


class OutcomeUnknown(PaxosCommitError):
    """The transaction may or may not have committed: no majority answered in time.

    Not a failure to retry blindly: `Client.status(txid)` settles it (and `Client.run` does
    so by itself). Sending Commit again is safe; running the transaction again is not.
    """


class TransactionAborted(PaxosCommitError):
    """The transaction is aborted: its Commit decided so, or a call found it aborted.

    `cause` says why when the deciding replica knew, and then `reason`, `sqlstate` and
    `participant` are the cause's, so `transient` tells whether running it again may help.
    `decision` is the Commit's answer, when there was one. `retryable` overrides that
    judgement where the client knows better than the reason (see retry.py).
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.ABORTED,
        reason: Optional[str] = "TRANSACTION_ABORTED",
        sqlstate: Optional[str] = None,
        participant: Optional[str] = None,
        txid: Optional[str] = None,
        from_transport: bool = False,
        cause: Optional[Cause] = None,
        decision: Optional["Decision"] = None,
        retryable: Optional[bool] = None,
    ) -> None:
        if cause is not None and cause.reason != "ERROR_REASON_UNSPECIFIED":
            reason, sqlstate, participant = cause.reason, cause.sqlstate, cause.participant
        super().__init__(
            message,
            code=code,
            reason=reason,
            sqlstate=sqlstate,
            participant=participant,
            txid=txid,
            from_transport=from_transport,
        )
        self.cause = cause
        self.decision = decision
        self._retryable = retryable

    @property
    def transient(self) -> bool:
        if self._retryable is not None:
            return self._retryable
        return is_transient(self.reason)


def error_info(trailing_metadata: Any) -> Optional[ErrorInfo]:
    """The paxos-commit ErrorInfo in a call's trailers, if there is one.

    The trailer is parsed directly rather than through grpc_status.rpc_status.from_call,
    which rejects a details block whose code differs from the call's: the ErrorInfo is the
    server's word whatever code something on the way rewrote.
    """
    for key, value in trailing_metadata or ():
        if key != DETAILS_TRAILER:
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a malformed trailer is as good as none
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == DOMAIN:
                meta = info.metadata
                return ErrorInfo(
                    reason=info.reason,
                    sqlstate=meta.get("sqlstate") or None,
                    participant=meta.get("participant") or None,
                    txid=meta.get("txid") or None,
                )
    return None


def is_transport_failure(code: grpc.StatusCode, info: Optional[ErrorInfo]) -> bool:
    """Whether a failed call may not have reached the server (so may be sent again, where
    that is safe): a transport code and no ErrorInfo, i.e. no server of ours answered."""
    return info is None and code in TRANSPORT_CODES


def class_for(reason: Optional[str]) -> type[PaxosCommitError]:
    """The exception class a caller catches for `reason`."""
    if reason == "OUTCOME_UNKNOWN":
        return OutcomeUnknown
    if reason == "TRANSACTION_ABORTED":
        return TransactionAborted
    if reason == "CONSTRAINT_VIOLATION":
        return ConstraintViolation
    if reason in STATEMENT_REASONS:
        return StatementError
    if is_transient(reason):
        return TransientError
    return PaxosCommitError


def make_error(
    message: str,
    *,
    code: grpc.StatusCode,
    reason: Optional[str],
    sqlstate: Optional[str] = None,
    participant: Optional[str] = None,
    txid: Optional[str] = None,
    from_transport: bool = False,
) -> PaxosCommitError:
    """An instance of the class for `reason`, with every field set."""
    return class_for(reason)(
        message,
        code=code,
        reason=reason,
        sqlstate=sqlstate,
        participant=participant,
        txid=txid,
        from_transport=from_transport,
    )


class FailedCall(Protocol):
    """What a failed sync gRPC call raises: a grpc.RpcError that is also a grpc.Call."""

    def code(self) -> grpc.StatusCode: ...

    def details(self) -> Optional[str]: ...

    def trailing_metadata(self) -> Any: ...


def from_rpc_error(
    error: FailedCall,
    *,
    txid: Optional[str] = None,
    participant: Optional[str] = None,
    transport_reason: Optional[str] = None,
) -> PaxosCommitError:
    """The typed error for a failed call.

    `txid` and `participant` fill in what the ErrorInfo does not say. A failure of the
    transport gets `transport_reason` (what the caller concluded from it, e.g.
    PARTICIPANT_UNREACHABLE after an agent could not be reached) and `from_transport`.
    """
    code = error.code()
    info = error_info(error.trailing_metadata())
    transport = is_transport_failure(code, info)
    reason = info.reason if info else (transport_reason if transport else None)
    return make_error(
        error.details() or "",
        code=code,
        reason=reason,
        sqlstate=info.sqlstate if info else None,
        participant=(info.participant if info else None) or participant,
        txid=(info.txid if info else None) or txid,
        from_transport=transport,
    )
