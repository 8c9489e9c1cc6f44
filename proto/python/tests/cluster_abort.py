"""Against a cluster (integration/tests/python_client.rs): what aborts leaves nothing.

An exception inside run's fn aborts the transaction at once (its row locks go: another
transaction updates the same rows right after) and is raised as it was, not retried; a
`with` block left without commit aborts too. The Rust side checks the balances.
"""

import time

from paxos_commit import Client, Transaction, TxnState

DEBIT = "UPDATE accounts SET balance = balance - $1 WHERE id = $2"
CREDIT = "UPDATE accounts SET balance = balance + $1 WHERE id = $2"


class ChangedMyMind(Exception):
    pass


def main() -> None:
    client = Client.from_env()
    calls = []

    def regret(txn: Transaction) -> None:
        calls.append(txn.txid)
        txn.execute("bank_a", DEBIT, (10, 2))
        txn.execute("bank_b", CREDIT, (10, 2))
        raise ChangedMyMind()

    try:
        client.run(regret)
        raise AssertionError("run returned after fn raised")
    except ChangedMyMind:
        pass
    assert len(calls) == 1, f"an application's exception was retried: {calls}"
    assert client.status(calls[0]).state is TxnState.ABORTED, client.status(calls[0])

    # The aborted transaction's row locks are gone: the same rows update at once, well
    # within the agents' lock_timeout.
    started = time.monotonic()
    with client.begin() as txn:
        txn.execute("bank_a", DEBIT, (0, 2))
        txn.execute("bank_b", CREDIT, (0, 2))
        assert txn.commit().committed
    assert time.monotonic() - started < 1.5, "the aborted transaction's locks were kept"

    # A block left without commit aborts.
    with client.begin() as left:
        left.execute("bank_a", DEBIT, (10, 3))
    assert client.status(left.txid).state is TxnState.ABORTED
    print("aborts ok")


if __name__ == "__main__":
    main()
