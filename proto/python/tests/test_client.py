"""The client's rules with scripted stubs in place of the servers: statement numbers, what
is sent again, which replica is asked, and the context manager."""

import unittest
from decimal import Decimal
from typing import Any
from unittest import mock

import grpc

from fakes import FakeRpcError, Method
from paxos_commit import Client, Outcome, OutcomeUnknown, PaxosCommitError, TransientError
from paxos_commit._pb import paxoscommit_pb2 as pb

lost = lambda: FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection reset")  # noqa: E731


def ok_execute(request: pb.ExecuteRequest) -> pb.ExecuteResponse:
    return pb.ExecuteResponse(
        columns=["seq", "n"],
        rows=[pb.Row(values=[pb.Value(int=request.seq), pb.Value(decimal="0.30")])],
        rows_affected=1,
    )


def committed(request: Any) -> pb.DecisionResponse:
    return pb.DecisionResponse(txid=request.txid, outcome=pb.OUTCOME_COMMITTED, all_applied=True)


class Stub:
    """A service stub whose methods are scripted Methods."""

    def __init__(self, **methods: Method) -> None:
        self.__dict__.update(methods)


def client(replicas: list[Stub], agents: dict[str, Stub]) -> Client:
    c = Client([f"127.0.0.1:{i + 1}" for i in range(len(replicas))], {}, insecure=True)
    c._replicas = replicas  # type: ignore[assignment]
    c._agents = agents  # type: ignore[assignment]
    return c


def begun(leader: int = 0) -> Method:
    return Method(pb.BeginResponse(txid="00aa", leader=leader))


@mock.patch("paxos_commit.client.time.sleep", lambda s: None)
class Execute(unittest.TestCase):
    def test_statements_are_numbered_per_participant(self) -> None:
        a, b = Method(ok_execute), Method(ok_execute)
        c = client([Stub(Begin=begun())], {"a": Stub(Execute=a), "b": Stub(Execute=b)})
        txn = c.begin()
        r = txn.execute("a", "SELECT $1, $2", (7, Decimal("0.1")))
        txn.execute("b", "SELECT 1")
        txn.execute("a", "SELECT 2")
        self.assertEqual([q.seq for q in a.requests], [1, 2])
        self.assertEqual([q.seq for q in b.requests], [1])
        self.assertEqual(a.requests[0].txid, "00aa")
        self.assertEqual(a.requests[0].params[1].decimal, "0.1")
        self.assertEqual(r.columns, ["seq", "n"])
        self.assertEqual(r.rows, [(1, Decimal("0.30"))])
        self.assertEqual(r.rows_affected, 1)

    def test_a_transport_failure_is_sent_again_with_the_same_number(self) -> None:
        a = Method(lost(), lost(), ok_execute)
        c = client([Stub(Begin=begun())], {"a": Stub(Execute=a)})
        txn = c.begin()
        txn.execute("a", "UPDATE t SET x = 1")
        self.assertEqual([q.seq for q in a.requests], [1, 1, 1])

    def test_three_times_at_most_then_the_participant_is_unreachable(self) -> None:
        a = Method(lost())
        c = client([Stub(Begin=begun())], {"a": Stub(Execute=a)})
        with self.assertRaises(TransientError) as caught:
            c.begin().execute("a", "UPDATE t SET x = 1")
        e = caught.exception
        self.assertEqual(len(a.requests), 4)
        self.assertTrue(e.from_transport)
        self.assertEqual((e.reason, e.participant, e.txid), ("PARTICIPANT_UNREACHABLE", "a", "00aa"))

    def test_an_answer_is_final_and_the_next_statement_takes_the_next_number(self) -> None:
        answered = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "stopping", "AGENT_SHUTTING_DOWN")
        a = Method(answered, ok_execute)
        c = client([Stub(Begin=begun())], {"a": Stub(Execute=a)})
        txn = c.begin()
        with self.assertRaises(PaxosCommitError) as caught:
            txn.execute("a", "UPDATE t SET x = 1")
        self.assertFalse(caught.exception.from_transport)
        txn.execute("a", "UPDATE t SET x = 2")
        self.assertEqual([q.seq for q in a.requests], [1, 2])

    def test_a_parameter_without_a_kind_uses_no_number(self) -> None:
        a = Method(ok_execute)
        c = client([Stub(Begin=begun())], {"a": Stub(Execute=a)})
        txn = c.begin()
        with self.assertRaises(TypeError):
            txn.execute("a", "SELECT $1", (object(),))
        txn.execute("a", "SELECT 1")
        self.assertEqual([q.seq for q in a.requests], [1])

    def test_an_unknown_participant(self) -> None:
        c = client([Stub(Begin=begun())], {})
        with self.assertRaises(PaxosCommitError) as caught:
            c.begin().execute("nope", "SELECT 1")
        self.assertEqual(caught.exception.reason, "UNKNOWN_PARTICIPANT")


@mock.patch("paxos_commit.client.time.sleep", lambda s: None)
class Begin(unittest.TestCase):
    def test_moves_on_from_a_replica_that_cannot_serve_and_prefers_the_one_that_did(self) -> None:
        full = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", "TOO_MANY_TRANSACTIONS")
        r0, r1 = Method(lost()), Method(full)
        r2 = Method(pb.BeginResponse(txid="00bb", leader=2))
        c = client([Stub(Begin=r0), Stub(Begin=r1), Stub(Begin=r2)], {})
        txn = c.begin()
        self.assertEqual((txn.txid, txn.leader), ("00bb", 2))
        c.begin()
        self.assertEqual((len(r0.requests), len(r1.requests), len(r2.requests)), (1, 1, 2))

    def test_a_refusal_is_raised_at_once(self) -> None:
        denied = FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "no", "PERMISSION_DENIED")
        r1 = begun()
        c = client([Stub(Begin=Method(denied)), Stub(Begin=r1)], {})
        with self.assertRaises(PaxosCommitError) as caught:
            c.begin()
        self.assertEqual(caught.exception.reason, "PERMISSION_DENIED")
        self.assertEqual(r1.requests, [])

    def test_with_a_key_a_lost_reply_is_asked_again_of_the_same_replica(self) -> None:
        r0 = Method(lost(), pb.BeginResponse(txid="00cc", existing=True))
        c = client([Stub(Begin=r0), Stub(Begin=begun())], {})
        txn = c.begin(idempotency_key="k")
        self.assertEqual(txn.txid, "00cc")
        self.assertTrue(txn.existing)
        self.assertEqual([q.idempotency_key for q in r0.requests], ["k", "k"])

    def test_no_replica_serves(self) -> None:
        c = client([Stub(Begin=Method(lost())), Stub(Begin=Method(lost()))], {})
        with self.assertRaises(TransientError) as caught:
            c.begin()
        self.assertEqual(caught.exception.reason, "REPLICA_UNAVAILABLE")


class Finish(unittest.TestCase):
    def replicas(self, *commits: Method) -> Client:
        stubs = [Stub(Begin=begun(leader=1), Commit=m, Abort=m, Prepare=m) for m in commits]
        return client(stubs, {})

    def test_the_leader_is_asked_first(self) -> None:
        r0, r1 = Method(committed), Method(committed)
        d = self.replicas(r0, r1).begin().commit()
        self.assertEqual(d.outcome, Outcome.COMMITTED)
        self.assertTrue(d.committed and d.all_applied)
        self.assertEqual((len(r0.requests), len(r1.requests)), (0, 1))
        self.assertFalse(r1.requests[0].return_on_decision)

    def test_then_the_others_and_not_found_from_those_moves_on(self) -> None:
        not_found = FakeRpcError(grpc.StatusCode.NOT_FOUND, "?", "UNKNOWN_TRANSACTION")
        r0, r1, r2 = Method(committed), Method(lost()), Method(not_found)
        stubs = [Stub(Begin=begun(leader=1), Commit=m) for m in (r0, r1, r2)]
        d = client(stubs, {}).begin().commit_fast()
        self.assertTrue(d.committed)
        self.assertEqual([len(m.requests) for m in (r1, r2, r0)], [1, 1, 1])
        self.assertTrue(r0.requests[0].return_on_decision)

    def test_not_found_from_the_leader_is_raised(self) -> None:
        not_found = FakeRpcError(grpc.StatusCode.NOT_FOUND, "?", "UNKNOWN_TRANSACTION")
        with self.assertRaises(PaxosCommitError) as caught:
            self.replicas(Method(committed), Method(not_found)).begin().commit()
        self.assertEqual(caught.exception.reason, "UNKNOWN_TRANSACTION")

    def test_no_answer_from_any_is_an_unknown_outcome(self) -> None:
        deadline = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")
        with self.assertRaises(OutcomeUnknown) as caught:
            self.replicas(Method(lost()), Method(deadline)).begin().commit()
        self.assertEqual(caught.exception.txid, "00aa")
        self.assertEqual(caught.exception.reason, "OUTCOME_UNKNOWN")

    def test_outcome_unknown_from_the_leader_is_raised_at_once(self) -> None:
        said = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "outcome unknown", "OUTCOME_UNKNOWN")
        r0 = Method(committed)
        with self.assertRaises(OutcomeUnknown):
            self.replicas(r0, Method(said)).begin().commit()
        self.assertEqual(r0.requests, [])

    def test_an_aborted_decision_carries_its_cause(self) -> None:
        def aborted(request: Any) -> pb.DecisionResponse:
            cause = pb.Cause(reason=pb.DEADLOCK, participant="a", sqlstate="40P01", message="m")
            return pb.DecisionResponse(txid=request.txid, outcome=pb.OUTCOME_ABORTED, reason="r",
                                       cause=cause, not_applied=["b"])

        d = self.replicas(Method(aborted), Method(aborted)).begin().commit()
        self.assertEqual(d.outcome, Outcome.ABORTED)
        self.assertEqual(d.cause.reason, "DEADLOCK")  # type: ignore[union-attr]
        self.assertTrue(d.cause.transient)  # type: ignore[union-attr]
        self.assertEqual((d.cause.participant, d.cause.sqlstate), ("a", "40P01"))  # type: ignore[union-attr]
        self.assertEqual(d.not_applied, ("b",))


class ContextManager(unittest.TestCase):
    def test_aborts_on_an_exception_and_when_left_uncommitted(self) -> None:
        abort = Method(committed)
        c = client([Stub(Begin=begun(), Abort=abort)], {})
        with self.assertRaises(KeyError):
            with c.begin():
                raise KeyError("x")
        with c.begin():
            pass
        self.assertEqual(len(abort.requests), 2)

    def test_sends_nothing_after_commit(self) -> None:
        abort, commit = Method(committed), Method(committed)
        c = client([Stub(Begin=begun(), Abort=abort, Commit=commit)], {})
        with self.assertRaises(KeyError):
            with c.begin() as txn:
                txn.commit()
                raise KeyError("after commit")
        self.assertEqual(abort.requests, [])

    def test_a_failed_abort_does_not_hide_the_exception(self) -> None:
        c = client([Stub(Begin=begun(), Abort=Method(lost()))], {})
        with self.assertRaises(KeyError):
            with c.begin():
                raise KeyError("x")


if __name__ == "__main__":
    unittest.main()
