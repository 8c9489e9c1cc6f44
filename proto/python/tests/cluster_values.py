"""Against a cluster: typed values through PostgreSQL and back.

The Rust side created `typed` (see integration/tests/python_client.rs) and afterwards reads
row 1 and row 3 as text in PostgreSQL, so a value both encoded and decoded wrongly in the
same way still fails there.
"""

import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

from paxos_commit import Client, Infinity, Json, Transaction

COLUMNS = "n, ts, t, d, u, j, js, b, f, tx, flag, big"
INSERT = f"INSERT INTO typed (id, {COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
SELECT = f"SELECT {COLUMNS} FROM typed WHERE id = $1"

U = uuid.UUID("6f1c2a4e-8b2d-4c1e-9a3f-0123456789ab")
TS = datetime(2024, 2, 29, 14, 34, 56, 123456, tzinfo=timezone(timedelta(hours=2)))
T = datetime(1999, 12, 31, 23, 59, 59, 999999)
D = date(2024, 2, 29)
J = {"a": [1, "two", None], "b": {"c": True}}
ROW = (Decimal("0.1"), TS, T, D, U, J, Json("just a string"), b"\x00\x01\xfe\xff", 2.5, "héllo", True, 2**62)


def main() -> None:
    client = Client.from_env()

    def write(txn: Transaction) -> None:
        txn.execute("bank_a", INSERT, (1, *ROW))
        txn.execute("bank_a", "UPDATE typed SET n = n + $1 WHERE id = 1", (Decimal("0.2"),))
        txn.execute("bank_a", INSERT, (2, *([None] * len(ROW))))
        infinite = (Decimal("NaN"), Infinity("timestamptz"), -Infinity("timestamp"), Infinity("date"))
        txn.execute("bank_a", INSERT, (3, *infinite, *([None] * (len(ROW) - len(infinite)))))
        # The same row in the other database, so that one transaction carries both.
        txn.execute("bank_b", INSERT, (1, *ROW))

    client.run(write)

    def read(txn: Transaction) -> list[tuple[object, ...]]:
        result = txn.execute("bank_a", SELECT, (1,))
        assert result.columns == [c.strip() for c in COLUMNS.split(",")], result.columns
        rows = [result.rows[0]]
        for i in (2, 3):
            rows.append(txn.execute("bank_a", SELECT, (i,)).rows[0])
        rows.append(txn.execute("bank_b", SELECT, (1,)).rows[0])
        return rows

    one, nulls, infinite, other = client.run(read)
    print(f"row 1: {one!r}\nrow 2: {nulls!r}\nrow 3: {infinite!r}")

    n = one[0]
    assert isinstance(n, Decimal) and n == Decimal("0.3") and str(n) == "0.3", repr(n)
    expected = (Decimal("0.3"), *ROW[1:6], "just a string", *ROW[7:])
    assert one == expected, f"{one!r} != {expected!r}"
    assert isinstance(one[1], datetime) and one[1].utcoffset() == timedelta(0), "not in UTC"
    assert one[1] == TS and one[2] == T and one[3] == D
    assert nulls == (None,) * len(ROW), nulls
    assert isinstance(infinite[0], Decimal) and infinite[0].is_nan(), infinite[0]
    assert infinite[1:4] == (Infinity("timestamptz"), -Infinity("timestamp"), Infinity("date")), infinite
    assert other == (Decimal("0.1"), *expected[1:]), other

    def conversions(txn: Transaction) -> tuple[object, ...]:
        # An int where PostgreSQL declares numeric or float8, a big int as an exact numeric,
        # text where it declares uuid or jsonb.
        result = txn.execute(
            "bank_a",
            "SELECT $1::numeric + 1, $2::float8, $3::numeric, $4::uuid, $5::jsonb",
            (41, 3, 2**70, str(U), '{"k": 1}'),
        )
        return result.rows[0]

    converted = client.run(conversions)
    print(f"conversions: {converted!r}")
    assert converted == (Decimal(42), 3.0, Decimal(2**70), U, {"k": 1}), converted
    print("values ok")


if __name__ == "__main__":
    main()
