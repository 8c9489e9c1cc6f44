"""`Client.run`: a transaction as a function, run again while it fails for a transient
reason.

The algorithm (docs/PROTOCOL.md, "The closure"):

1. Begin (with a fresh idempotency key, so that a Begin whose reply was lost is sent again
   safely), call fn(txn), Commit. An exception from fn aborts the transaction (best effort)
   and is raised on.
2. Committed: return what fn returned.
3. A failure is retried only when it is transient (its reason is in errors.TRANSIENT_REASONS:
   lock timeout, deadlock, serialization failure, prepared transactions exhausted, a busy or
   restarting agent or replica, a participant that did not vote in time, a takeover abort),
   including a Commit decided Aborted whose cause is transient. Anything else is raised at
   once, typed: retrying a constraint violation or an SQL error only repeats it.
4. OutcomeUnknown from Commit is never answered by running fn again (the first run may have
   committed): GetStatus is asked every `poll_s` for up to `settle_s`. Committed returns fn's value;
   aborted counts as a transient abort (the fault that hid the outcome is what aborted it,
   and nothing of it was applied); still undecided at the bound raises OutcomeUnknown.
5. Between attempts: full jitter, a pause drawn uniformly from [0, min(cap, base * 2^n)]
   after the n-th failure (n from 0), so that transactions that collided do not collide
   again in step; at most `max_attempts` attempts, and none begun when its pause would
   end past `budget_s` from the start.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Optional, Protocol, TypeVar

from .errors import OutcomeUnknown, PaxosCommitError, TransactionAborted
from .outcomes import Decision, TxnState

log = logging.getLogger("paxos_commit")

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with full jitter."""

    base_s: float = 0.02
    cap_s: float = 2.0

    def ceiling(self, failures: int) -> float:
        """The longest pause after `failures` + 1 failures in a row."""
        return min(self.cap_s, self.base_s * 2.0 ** min(failures, 62))

    def pause(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        return rng() * self.ceiling(failures)


class _Txn(Protocol):
    txid: str

    def commit(self) -> Decision: ...

    def __enter__(self) -> Any: ...

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None: ...


class _Client(Protocol):
    def begin(self, idempotency_key: Optional[str] = None) -> Any: ...

    def status(self, txid: str) -> Any: ...


@dataclass(frozen=True)
class _Time:
    """Time as the loop sees it; a fake in the unit tests."""

    sleep: Callable[[float], None]
    now: Callable[[], float]
    rng: Callable[[], float]


def run(
    client: _Client,
    fn: Callable[[Any], T],
    *,
    max_attempts: int = 10,
    budget_s: float = 60.0,
    settle_s: float = 60.0,
    poll_s: float = 0.2,
    backoff: Backoff = Backoff(),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
) -> T:
    """Runs fn(txn) in a transaction and commits it; see the module's docstring.
    `sleep`, `clock` and `rng` are for tests."""
    time_ = _Time(sleep, clock, rng)
    give_up_at = time_.now() + budget_s
    failures = 0
    while True:
        try:
            return _attempt(client, fn, settle_s, poll_s, time_)
        except PaxosCommitError as e:
            if not e.transient:
                raise
            pause = backoff.pause(failures, time_.rng)
            failures += 1
            if failures >= max_attempts or time_.now() + pause > give_up_at:
                log.info("giving up after %d attempts: %s", failures, e)
                raise
            log.info("attempt %d failed (%s); again in %.3f s", failures, e, pause)
            time_.sleep(pause)


def _attempt(
    client: _Client, fn: Callable[[Any], T], settle_s: float, poll_s: float, time_: _Time
) -> T:
    txn: _Txn = client.begin(idempotency_key=uuid.uuid4().hex)
    # The block aborts the transaction if fn raises (or anything before Commit does).
    with txn:
        value = fn(txn)
        try:
            decision = txn.commit()
        except OutcomeUnknown as unknown:
            if _settle(client, txn.txid, settle_s, poll_s, time_, unknown):
                return value
            raise TransactionAborted(
                f"{txn.txid} aborted (learnt from GetStatus after its outcome was unknown)",
                txid=txn.txid,
                retryable=True,
            ) from unknown
    if decision.committed:
        return value
    raise TransactionAborted(
        f"{txn.txid} aborted: {decision.reason}",
        txid=txn.txid,
        cause=decision.cause,
        decision=decision,
    )


def _settle(
    client: _Client,
    txid: str,
    settle_s: float,
    poll_s: float,
    time_: _Time,
    unknown: OutcomeUnknown,
) -> bool:
    """Whether the transaction committed (True) or aborted (False), from GetStatus asked
    every `poll_s` until `settle_s` have passed; `unknown` is raised again if it is still
    undecided then."""
    until = time_.now() + settle_s
    while True:
        try:
            state = client.status(txid).state
        except PaxosCommitError as e:
            log.debug("GetStatus of %s failed: %s", txid, e)
        else:
            if state is TxnState.COMMITTED:
                return True
            if state is TxnState.ABORTED:
                return False
        if time_.now() + poll_s > until:
            raise unknown
        time_.sleep(poll_s)
