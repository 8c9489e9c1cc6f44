"""Against a cluster: the calls around the transaction, and typed refusals.

commit_fast, prepare then commit, status; a statement of a refused kind and an SQL error are
typed StatementErrors; Begin with an idempotency key answers the same transaction twice.
"""

from paxos_commit import Client, Outcome, StatementError, TxnState

CREDIT = "UPDATE accounts SET balance = balance + $1 WHERE id = $2"


def main() -> None:
    client = Client.from_env()

    fast = client.begin()
    fast.execute("bank_a", CREDIT, (1, 4))
    decision = fast.commit_fast()
    assert decision.outcome is Outcome.COMMITTED, decision
    assert client.status(fast.txid).state is TxnState.COMMITTED

    txn = client.begin()
    txn.execute("bank_a", CREDIT, (1, 5))
    txn.execute("bank_b", CREDIT, (1, 5))
    prepared = txn.prepare()
    assert prepared.committed, prepared
    final = txn.commit()
    assert final.committed and final.all_applied and not final.not_applied, final

    unknown = client.status("00ffffffffffff01")
    assert unknown.state is TxnState.UNKNOWN, unknown

    for sql, reason, sqlstate in [
        ("COMMIT", "STATEMENT_REFUSED", None),
        ("SELECT * FROM no_such_table", "SQL_ERROR", "42P01"),
    ]:
        with client.begin() as txn:
            try:
                txn.execute("bank_b", sql)
                raise AssertionError(f"{sql!r} ran")
            except StatementError as e:
                print(f"{sql!r}: {e}")
                assert (e.reason, e.sqlstate) == (reason, sqlstate), (e.reason, e.sqlstate)
                assert e.participant == "bank_b", e.participant

    # Last, so that a server without keys fails here, after everything else was checked.
    first = client.begin(idempotency_key="python-api-1")
    again = client.begin(idempotency_key="python-api-1")
    print(f"keyed Begin: {first.txid} then {again.txid} (existing={again.existing})")
    assert again.txid == first.txid and again.existing and not first.existing, (
        first.txid,
        again.txid,
        again.existing,
    )
    other = client.begin(idempotency_key="python-api-2")
    assert other.txid != first.txid and not other.existing
    other.abort()
    again.execute("bank_a", CREDIT, (1, 6))
    assert again.commit().committed
    print("api ok")


if __name__ == "__main__":
    main()
