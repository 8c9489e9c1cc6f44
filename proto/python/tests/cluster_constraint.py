"""Against a cluster: a CHECK violation (accounts.balance >= 0) is a typed
ConstraintViolation with SQLSTATE 23514, raised by run at once and never retried; and a
transaction committed after one of its statements failed is decided Aborted with that
cause. The Rust side checks that nothing was applied.
"""

from paxos_commit import (
    Client,
    ConstraintViolation,
    PaxosCommitError,
    Transaction,
    TransactionAborted,
)

DEBIT = "UPDATE accounts SET balance = balance - $1 WHERE id = $2"
CREDIT = "UPDATE accounts SET balance = balance + $1 WHERE id = $2"


def main() -> None:
    client = Client.from_env()
    attempts = []

    def overdraw(txn: Transaction) -> None:
        attempts.append(txn.txid)
        # Credit first, so that bank_b holds a statement when bank_a refuses the debit.
        txn.execute("bank_b", CREDIT, (500, 1))
        txn.execute("bank_a", DEBIT, (500, 1))

    try:
        client.run(overdraw)
        raise AssertionError("an overdraft committed")
    except ConstraintViolation as e:
        print(f"raised: {e!r} {e}")
        assert e.reason == "CONSTRAINT_VIOLATION", e.reason
        assert e.sqlstate == "23514", e.sqlstate
        assert e.participant == "bank_a", e.participant
        assert e.txid == attempts[0], (e.txid, attempts)
        assert not e.transient and not e.from_transport
    assert len(attempts) == 1, f"a constraint violation was retried: {attempts}"

    # Going on to commit after the failed statement: the decision is Aborted, and its cause is
    # what PostgreSQL said at bank_a (Cause.sqlstate: "PostgreSQL's SQLSTATE, when PostgreSQL
    # said no"), so that its transience is the failure's own: a deadlock swallowed by fn must
    # still read as DEADLOCK here for run to retry it.
    def ignore_the_failure(txn: Transaction) -> None:
        txn.execute("bank_b", CREDIT, (500, 1))
        try:
            txn.execute("bank_a", DEBIT, (500, 1))
        except PaxosCommitError:
            pass

    try:
        client.run(ignore_the_failure)
        raise AssertionError("a transaction with a failed statement committed")
    except TransactionAborted as e:
        print(f"raised: {e!r} {e} cause={e.cause}")
        assert e.cause is not None, "Commit's decision carries no cause"
        assert e.cause.participant == "bank_a", e.cause
        assert (e.cause.reason, e.cause.sqlstate) == ("CONSTRAINT_VIOLATION", "23514"), e.cause
        assert not e.transient
    print("constraint ok")


if __name__ == "__main__":
    main()
