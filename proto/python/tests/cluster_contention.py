"""Against a cluster: two transfers over the same two accounts in opposite order, started
together, run by `run` to success.

In one database PostgreSQL detects the deadlock and aborts one of them (DEADLOCK, 40P01);
across two databases nothing can detect it, and the agents' lock_timeout ends the wait
(LOCK_TIMEOUT, 55P03). Either is transient: `run` aborts the loser and runs it again. A
barrier makes the first attempts collide for certain; the attempts after it go unhindered.
The Rust side checks the balances: both transfers applied, once each.
"""

import threading
from typing import Callable

from paxos_commit import Client, PaxosCommitError, Transaction

DEBIT = "UPDATE accounts SET balance = balance - $1 WHERE id = $2"
CREDIT = "UPDATE accounts SET balance = balance + $1 WHERE id = $2"

Side = tuple[str, int]


def crossing(client: Client, one: tuple[Side, Side, int], two: tuple[Side, Side, int]) -> list[str]:
    """Runs both transfers at once; returns the reasons of the failures `run` retried."""
    barrier = threading.Barrier(2, timeout=20)
    reasons: list[str] = []
    errors: list[BaseException] = []

    def transfer(source: Side, target: Side, amount: int) -> Callable[[Transaction], int]:
        attempts = 0

        def fn(txn: Transaction) -> int:
            nonlocal attempts
            attempts += 1
            try:
                txn.execute(source[0], DEBIT, (amount, source[1]))
                if attempts == 1:
                    barrier.wait()
                txn.execute(target[0], CREDIT, (amount, target[1]))
            except PaxosCommitError as e:
                reasons.append(e.reason or e.code.name)
                print(f"attempt {attempts} of {source}->{target}: {e}")
                raise
            return attempts

        return fn

    def worker(args: tuple[Side, Side, int]) -> None:
        try:
            attempts = client.run(transfer(*args), max_attempts=10, budget_s=60.0)
            print(f"{args} committed on attempt {attempts}")
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"a transfer failed: {errors!r}"
    return reasons


def main() -> None:
    client = Client.from_env()
    same = crossing(client, (("bank_a", 1), ("bank_a", 2), 10), (("bank_a", 2), ("bank_a", 1), 20))
    print(f"one database: retried after {same}")
    assert "DEADLOCK" in same, same
    across = crossing(client, (("bank_a", 3), ("bank_b", 3), 5), (("bank_b", 3), ("bank_a", 3), 7))
    print(f"two databases: retried after {across}")
    assert "LOCK_TIMEOUT" in across, across
    print("contention ok")


if __name__ == "__main__":
    main()
