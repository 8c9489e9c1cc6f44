"""What calls answer: a statement's result, a decision, a transaction's status."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

from ._pb import paxoscommit_pb2 as pb
from .errors import Cause


class Outcome(enum.Enum):
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"


class TxnState(enum.Enum):
    IN_PROGRESS = "IN_PROGRESS"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"
    # Never seen, or forgotten after the retention window. Never means aborted.
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class Result:
    """What a statement returned."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    rows_affected: int


@dataclass(frozen=True)
class Decision:
    """A transaction's decision, as Prepare, Commit or Abort answered it."""

    txid: str
    outcome: Outcome
    # For people; `cause` is for programs.
    reason: str
    # Why it aborted, when the deciding replica knew.
    cause: Optional[Cause]
    # Every participant confirmed applying the decision; `not_applied` names those that had
    # not when the answer was given (they still hold their prepared branch and its locks).
    all_applied: bool
    not_applied: tuple[str, ...]

    @property
    def committed(self) -> bool:
        return self.outcome is Outcome.COMMITTED


@dataclass(frozen=True)
class TransactionStatus:
    """GetStatus's answer; `raw` has every participant's votes."""

    txid: str
    state: TxnState
    # UNKNOWN because it was known and has been forgotten.
    expired: bool
    raw: pb.StatusResponse
