"""Python client of paxos-commit: atomic transactions across several PostgreSQL databases.

    client = Client.from_env()          # or Client(replicas, agents, ca=..., cert=..., key=...)
    client.run(lambda txn: txn.execute("bank_a", "UPDATE ...", (30, 1)))

See README.md beside this package and docs/PROTOCOL.md for the rules it follows.
"""

try:
    from ._pb import paxoscommit_pb2 as _stubs  # noqa: F401  (checked before the rest)
except ModuleNotFoundError as e:  # pragma: no cover
    if e.name and e.name.startswith(__name__ + "._pb"):
        raise ImportError(
            "the gRPC stubs of paxos_commit are missing: run `python generate.py` in "
            "proto/python (after `pip install -r requirements.txt`)"
        ) from e
    raise

from .client import Client, Transaction
from .errors import (
    Cause,
    ConstraintViolation,
    OutcomeUnknown,
    PaxosCommitError,
    StatementError,
    TransactionAborted,
    TransientError,
    is_transient,
)
from .outcomes import Decision, Outcome, Result, TransactionStatus, TxnState
from .retry import Backoff
from .values import Infinity, Json

__all__ = [
    "Backoff",
    "Cause",
    "Client",
    "ConstraintViolation",
    "Decision",
    "Infinity",
    "Json",
    "Outcome",
    "OutcomeUnknown",
    "PaxosCommitError",
    "Result",
    "StatementError",
    "Transaction",
    "TransactionAborted",
    "TransactionStatus",
    "TransientError",
    "TxnState",
    "is_transient",
]
