"""The closure API's loop (retry.run) against a fake client: what is retried, what is not,
how long it waits, and how an unknown outcome is settled."""

import random
import unittest
from typing import Any, Callable, Optional

import grpc

from fakes import FakeClock
from paxos_commit import (
    Backoff,
    Cause,
    ConstraintViolation,
    Decision,
    Outcome,
    OutcomeUnknown,
    TransactionAborted,
    TransientError,
    TxnState,
)
from paxos_commit.retry import run


def decision(outcome: Outcome, cause: Optional[Cause] = None) -> Decision:
    return Decision("t", outcome, "", cause, True, ())


COMMITTED = decision(Outcome.COMMITTED)


class FakeTxn:
    """Commits with the next of the client's scripted commit answers; aborts when its block
    is left unfinished, as Transaction does."""

    def __init__(self, client: "FakeClient", txid: str) -> None:
        self.client, self.txid, self.finishing = client, txid, False

    def commit(self) -> Decision:
        self.finishing = True
        answer = self.client.commits.pop(0) if self.client.commits else COMMITTED
        if isinstance(answer, Exception):
            raise answer
        return answer

    def __enter__(self) -> "FakeTxn":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.finishing:
            self.client.aborted.append(self.txid)


class FakeClient:
    def __init__(self, commits: Optional[list[Any]] = None, states: Optional[list[TxnState]] = None):
        self.commits = list(commits or [])
        self.states = list(states or [])
        self.begun: list[str] = []
        self.keys: list[Optional[str]] = []
        self.aborted: list[str] = []
        self.status_calls = 0

    def begin(self, idempotency_key: Optional[str] = None) -> FakeTxn:
        self.keys.append(idempotency_key)
        txid = f"t{len(self.begun) + 1}"
        self.begun.append(txid)
        return FakeTxn(self, txid)

    def status(self, txid: str) -> Any:
        self.status_calls += 1
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return type("Status", (), {"state": state})()


def transient(reason: str = "DEADLOCK") -> TransientError:
    return TransientError("contention", code=grpc.StatusCode.ABORTED, reason=reason)


def unknown() -> OutcomeUnknown:
    return OutcomeUnknown("?", code=grpc.StatusCode.UNAVAILABLE, reason="OUTCOME_UNKNOWN", txid="t1")


def failing(times: int, error: Callable[[], Exception], value: Any = "done") -> Callable[[Any], Any]:
    """fn that raises `error()` on its first `times` calls, then returns `value`."""
    calls = {"n": 0}

    def fn(txn: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error()
        return value

    return fn


class Run(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = FakeClock()

    def run_(self, client: FakeClient, fn: Callable[[Any], Any], **kw: Any) -> Any:
        kw.setdefault("rng", lambda: 1.0)
        kw.setdefault("backoff", Backoff(base_s=0.05, cap_s=2.0))
        return run(client, fn, sleep=self.clock.sleep, clock=self.clock.now, **kw)

    def test_returns_what_fn_returned_after_one_commit(self) -> None:
        client = FakeClient()
        self.assertEqual(self.run_(client, lambda txn: 42), 42)
        self.assertEqual(client.begun, ["t1"])
        self.assertEqual(client.aborted, [])
        self.assertEqual(self.clock.sleeps, [])

    def test_each_attempt_begins_with_its_own_idempotency_key(self) -> None:
        client = FakeClient()
        self.run_(client, failing(2, transient))
        self.assertEqual(len(set(client.keys)), 3)
        self.assertTrue(all(client.keys))

    def test_a_transient_failure_aborts_and_runs_again(self) -> None:
        client = FakeClient()
        self.assertEqual(self.run_(client, failing(2, transient)), "done")
        self.assertEqual(client.begun, ["t1", "t2", "t3"])
        self.assertEqual(client.aborted, ["t1", "t2"])
        # Full jitter with rng() = 1: the ceiling itself, doubling from the base.
        self.assertEqual(self.clock.sleeps, [0.05, 0.1])

    def test_a_permanent_failure_is_raised_at_once(self) -> None:
        client = FakeClient()
        violation = lambda: ConstraintViolation(  # noqa: E731
            "check", code=grpc.StatusCode.FAILED_PRECONDITION,
            reason="CONSTRAINT_VIOLATION", sqlstate="23514",
        )
        with self.assertRaises(ConstraintViolation) as caught:
            self.run_(client, failing(1, violation))
        self.assertEqual(caught.exception.sqlstate, "23514")
        self.assertEqual(client.begun, ["t1"])
        self.assertEqual(client.aborted, ["t1"])

    def test_any_other_exception_aborts_and_is_raised(self) -> None:
        client = FakeClient()
        with self.assertRaises(ZeroDivisionError):
            self.run_(client, lambda txn: 1 / 0)
        self.assertEqual(client.aborted, ["t1"])
        self.assertEqual(client.begun, ["t1"])

    def test_a_commit_aborted_for_a_transient_cause_runs_again(self) -> None:
        aborted = decision(Outcome.ABORTED, Cause("PREPARED_TRANSACTIONS_EXHAUSTED", "bank_a", "53200"))
        client = FakeClient(commits=[aborted])
        self.assertEqual(self.run_(client, lambda txn: "v"), "v")
        self.assertEqual(client.begun, ["t1", "t2"])
        self.assertEqual(client.aborted, [])  # it was decided: nothing to abort

    def test_a_commit_aborted_for_a_permanent_or_unknown_cause_is_raised(self) -> None:
        for cause in [Cause("CONSTRAINT_VIOLATION", "bank_b", "23505"), None]:
            with self.subTest(cause=cause):
                client = FakeClient(commits=[decision(Outcome.ABORTED, cause)])
                with self.assertRaises(TransactionAborted) as caught:
                    self.run_(client, lambda txn: "v")
                self.assertEqual(caught.exception.cause, cause)
                self.assertEqual(client.begun, ["t1"])

    def test_attempts_are_bounded(self) -> None:
        client = FakeClient()
        with self.assertRaises(TransientError):
            self.run_(client, failing(100, transient), max_attempts=4)
        self.assertEqual(len(client.begun), 4)
        self.assertEqual(len(self.clock.sleeps), 3)

    def test_the_time_budget_is_bounded(self) -> None:
        client = FakeClient()
        with self.assertRaises(TransientError):
            self.run_(client, failing(100, transient), max_attempts=1000, budget_s=5.0)
        self.assertLessEqual(self.clock.t, 5.0)
        # Pauses of 0.05 + 0.1 + ... + 1.6 = 3.15 s between 7 attempts; the next pause (2 s,
        # the cap) would end past the budget.
        self.assertEqual(len(client.begun), 7)

    def test_an_unknown_outcome_that_committed_returns_without_running_again(self) -> None:
        client = FakeClient(commits=[unknown()], states=[TxnState.IN_PROGRESS, TxnState.COMMITTED])
        self.assertEqual(self.run_(client, lambda txn: "v"), "v")
        self.assertEqual(client.begun, ["t1"])
        self.assertEqual(client.status_calls, 2)
        self.assertEqual(client.aborted, [])

    def test_an_unknown_outcome_that_aborted_runs_again(self) -> None:
        client = FakeClient(commits=[unknown()], states=[TxnState.ABORTED])
        self.assertEqual(self.run_(client, lambda txn: "v"), "v")
        self.assertEqual(client.begun, ["t1", "t2"])

    def test_an_outcome_still_unknown_at_the_bound_is_raised(self) -> None:
        client = FakeClient(commits=[unknown()], states=[TxnState.UNKNOWN])
        with self.assertRaises(OutcomeUnknown):
            self.run_(client, lambda txn: "v", settle_s=3.0)
        self.assertEqual(client.begun, ["t1"])
        self.assertLessEqual(self.clock.t, 3.0)
        # Asked every 0.2 s (the default poll) within the 3 s: at 0, 0.2, ..., 2.8.
        self.assertEqual(client.status_calls, 15)


class Backoffs(unittest.TestCase):
    def test_full_jitter_stays_within_a_doubling_capped_ceiling(self) -> None:
        b = Backoff(base_s=0.05, cap_s=2.0)
        self.assertEqual([b.ceiling(n) for n in range(7)], [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
        self.assertEqual(b.ceiling(10_000), 2.0)
        self.assertEqual(Backoff().ceiling(0), 0.02)
        self.assertEqual(b.pause(3, rng=lambda: 0.0), 0.0)
        self.assertEqual(b.pause(3, rng=lambda: 0.5), 0.2)
        rng = random.Random(7).random
        for n in range(20):
            self.assertTrue(0.0 <= b.pause(n, rng) <= b.ceiling(n))


if __name__ == "__main__":
    unittest.main()
