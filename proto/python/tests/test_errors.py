"""Typed errors from fabricated statuses, as the servers send them."""

import unittest

import grpc

from fakes import FakeRpcError
from paxos_commit import (
    Cause,
    ConstraintViolation,
    OutcomeUnknown,
    PaxosCommitError,
    StatementError,
    TransactionAborted,
    TransientError,
    is_transient,
)
from paxos_commit.errors import TRANSIENT_REASONS, error_info, from_rpc_error
from paxos_commit._pb import paxoscommit_pb2 as pb


class FromStatus(unittest.TestCase):
    def test_the_error_info_decides_class_and_fields(self) -> None:
        e = from_rpc_error(
            FakeRpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                'new row for relation "accounts" violates check constraint',
                "CONSTRAINT_VIOLATION",
                sqlstate="23514",
                participant="bank_a",
                txid="00ab",
            )
        )
        self.assertIsInstance(e, ConstraintViolation)
        self.assertIsInstance(e, StatementError)
        self.assertEqual(e.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(e.reason, "CONSTRAINT_VIOLATION")
        self.assertEqual((e.sqlstate, e.participant, e.txid), ("23514", "bank_a", "00ab"))
        self.assertFalse(e.transient)
        self.assertFalse(e.from_transport)

    def test_reason_groups(self) -> None:
        cases = {
            "OUTCOME_UNKNOWN": OutcomeUnknown,
            "TRANSACTION_ABORTED": TransactionAborted,
            "DEADLOCK": TransientError,
            "LOCK_TIMEOUT": TransientError,
            "PREPARED_TRANSACTIONS_EXHAUSTED": TransientError,
            "SQL_ERROR": StatementError,
            "STATEMENT_REFUSED": StatementError,
            "PERMISSION_DENIED": PaxosCommitError,
            "A_REASON_FROM_A_NEWER_SERVER": PaxosCommitError,
        }
        for reason, cls in cases.items():
            with self.subTest(reason=reason):
                e = from_rpc_error(FakeRpcError(grpc.StatusCode.ABORTED, "", reason))
                self.assertIs(type(e), cls)
                self.assertEqual(e.reason, reason)

    def test_the_transient_reasons_are_the_protos(self) -> None:
        # That they are the servers' own set (proto/src/reason.rs) is checked from Rust, in
        # integration/tests/python_client.rs.
        self.assertTrue(TRANSIENT_REASONS)
        for name in TRANSIENT_REASONS:
            pb.ErrorReason.Value(name)  # every name is one of the proto's
        self.assertFalse(is_transient(None))

    def test_a_transport_failure_has_no_error_info(self) -> None:
        for code in [
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ]:
            with self.subTest(code=code):
                e = from_rpc_error(
                    FakeRpcError(code, "connection reset"),
                    participant="bank_b",
                    transport_reason="PARTICIPANT_UNREACHABLE",
                )
                self.assertTrue(e.from_transport)
                self.assertEqual(e.reason, "PARTICIPANT_UNREACHABLE")
                self.assertEqual(e.participant, "bank_b")
                self.assertIsInstance(e, TransientError)

    def test_an_answer_with_a_transport_code_is_the_servers_word(self) -> None:
        e = from_rpc_error(
            FakeRpcError(grpc.StatusCode.UNAVAILABLE, "shutting down", "AGENT_SHUTTING_DOWN")
        )
        self.assertFalse(e.from_transport)
        self.assertTrue(e.transient)

    def test_other_codes_without_error_info_have_no_reason(self) -> None:
        e = from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, "boom"))
        self.assertIs(type(e), PaxosCommitError)
        self.assertIsNone(e.reason)
        self.assertFalse(e.from_transport)
        self.assertFalse(e.transient)

    def test_another_domain_is_not_ours(self) -> None:
        from fakes import details_trailer

        trailer = details_trailer(grpc.StatusCode.ABORTED, "DEADLOCK", domain="example.com")
        self.assertIsNone(error_info((trailer,)))
        self.assertIsNone(error_info((("grpc-status-details-bin", b"\xff\x00garbage"),)))
        self.assertIsNone(error_info(None))


class Aborted(unittest.TestCase):
    def test_an_abort_takes_its_causes_reason(self) -> None:
        e = TransactionAborted(
            "aborted", cause=Cause("DEADLOCK", participant="bank_a", sqlstate="40P01")
        )
        self.assertEqual((e.reason, e.participant, e.sqlstate), ("DEADLOCK", "bank_a", "40P01"))
        self.assertTrue(e.transient)
        self.assertFalse(TransactionAborted("x", cause=Cause("CONSTRAINT_VIOLATION")).transient)
        unspecified = TransactionAborted("x", cause=Cause("ERROR_REASON_UNSPECIFIED"))
        self.assertEqual(unspecified.reason, "TRANSACTION_ABORTED")
        self.assertFalse(unspecified.transient)
        self.assertTrue(TransactionAborted("x", retryable=True).transient)

    def test_str_names_reason_sqlstate_and_participant(self) -> None:
        e = from_rpc_error(
            FakeRpcError(
                grpc.StatusCode.ABORTED, "deadlock detected", "DEADLOCK",
                sqlstate="40P01", participant="bank_a",
            )
        )
        self.assertEqual(str(e), "DEADLOCK [40P01] at bank_a: deadlock detected")


if __name__ == "__main__":
    unittest.main()
