"""Moves 30 from account 1 in bank_a to account 7 in bank_b: both or neither.

    export PAXOS_COMMIT_REPLICAS=10.0.0.1:7400,10.0.0.2:7400,10.0.0.3:7400
    export PAXOS_COMMIT_AGENTS=bank_a=10.0.1.1:7500,bank_b=10.0.1.2:7500
    export PAXOS_COMMIT_TLS_CA=ca.pem PAXOS_COMMIT_TLS_CERT=client-payments.pem \\
           PAXOS_COMMIT_TLS_KEY=client-payments-key.pem
    python examples/transfer.py
"""

from paxos_commit import Client, Transaction

client = Client.from_env()  # or Client(replicas=[...], agents={...}, ca=..., cert=..., key=...)


def transfer(txn: Transaction) -> None:
    txn.execute("bank_a", "UPDATE accounts SET balance = balance - $1 WHERE id = $2", (30, 1))
    txn.execute("bank_b", "UPDATE accounts SET balance = balance + $1 WHERE id = $2", (30, 7))


client.run(transfer)  # retried on deadlocks and other transient aborts; typed errors otherwise
print("committed")
