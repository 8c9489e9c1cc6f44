"""Python values to and from `message Value` of paxoscommit.proto.

| Python                          | Value kind    | PostgreSQL          |
|---------------------------------|---------------|---------------------|
| None                            | null          | NULL of any type    |
| bool                            | bool          | boolean             |
| int (within int64)              | int           | int2/int4/int8/...  |
| int (beyond int64)              | decimal       | numeric             |
| float                           | float         | float4/float8       |
| str                             | text          | text, varchar, ...  |
| bytes, bytearray, memoryview    | bytes         | bytea               |
| decimal.Decimal                 | decimal       | numeric, exactly    |
| datetime with tzinfo            | timestamptz   | timestamptz         |
| datetime without tzinfo         | timestamp     | timestamp           |
| date                            | date          | date                |
| uuid.UUID                       | uuid          | uuid                |
| dict, list, Json(x)             | json          | json, jsonb         |
| Infinity(kind), -Infinity(kind) | kind's ±max   | 'infinity' values   |

Results come back the same way: a timestamptz as an aware datetime in UTC, a timestamp as a
naive one, numeric as Decimal (with PostgreSQL's scale: 0.30 stays Decimal('0.30')), json
and jsonb parsed with json.loads. PostgreSQL's infinite timestamps and dates, which datetime
cannot hold, are `Infinity` objects (see there); numeric's infinities and NaN are Decimal's.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

from ._pb import paxoscommit_pb2 as pb

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

EPOCH_UTC = datetime(1970, 1, 1, tzinfo=timezone.utc)
EPOCH_NAIVE = datetime(1970, 1, 1)
EPOCH_DATE = date(1970, 1, 1)
MICROSECOND = timedelta(microseconds=1)

InfiniteKind = Literal["timestamptz", "timestamp", "date"]


@dataclass(frozen=True)
class Json:
    """A value to send as json whatever its Python type: a JSON string or number
    (`Json("text")` is the JSON string "text", where a bare str would be text)."""

    value: Any


@dataclass(frozen=True)
class Infinity:
    """PostgreSQL's 'infinity' (or, negated, '-infinity') of a timestamptz, timestamp or
    date column, which datetime and date cannot represent.

    `Infinity("date")` is a parameter for date 'infinity', `-Infinity("date")` for
    '-infinity'; results compare equal to these.
    """

    kind: InfiniteKind
    negative: bool = False

    def __neg__(self) -> "Infinity":
        return Infinity(self.kind, not self.negative)

    def __repr__(self) -> str:
        return f"{'-' if self.negative else ''}Infinity({self.kind!r})"


def _micros(delta: timedelta) -> int:
    # Exact: timedelta // timedelta is integer arithmetic, no float rounding.
    return delta // MICROSECOND


def to_value(v: Any) -> pb.Value:
    """The Value for a statement parameter; TypeError for a type it has no kind for."""
    # bool before int, datetime before date: each is a subclass of the other.
    if v is None:
        return pb.Value(null=True)
    if isinstance(v, bool):
        return pb.Value(bool=v)
    if isinstance(v, int):
        if INT64_MIN <= v <= INT64_MAX:
            return pb.Value(int=v)
        return pb.Value(decimal=str(v))
    if isinstance(v, float):
        return pb.Value(float=v)
    if isinstance(v, str):
        return pb.Value(text=v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return pb.Value(bytes=bytes(v))
    if isinstance(v, Decimal):
        if v.is_snan():
            raise TypeError("a signalling NaN has no numeric value")
        return pb.Value(decimal=str(v))
    if isinstance(v, datetime):
        if v.tzinfo is not None and v.utcoffset() is not None:
            return pb.Value(timestamptz=_micros(v - EPOCH_UTC))
        return pb.Value(timestamp=_micros(v - EPOCH_NAIVE))
    if isinstance(v, date):
        return pb.Value(date=(v - EPOCH_DATE).days)
    if isinstance(v, uuid.UUID):
        return pb.Value(uuid=str(v))
    if isinstance(v, Json):
        return pb.Value(json=json.dumps(v.value))
    if isinstance(v, (dict, list)):
        return pb.Value(json=json.dumps(v))
    if isinstance(v, Infinity):
        return _infinity(v)
    raise TypeError(
        f"no Value kind for {type(v).__name__}: pass it as one of None, bool, int, float, "
        "str, bytes, Decimal, datetime, date, UUID, dict, list, Json or Infinity"
    )


def _infinity(v: Infinity) -> pb.Value:
    if v.kind == "date":
        return pb.Value(date=INT32_MIN if v.negative else INT32_MAX)
    bound = INT64_MIN if v.negative else INT64_MAX
    if v.kind == "timestamptz":
        return pb.Value(timestamptz=bound)
    return pb.Value(timestamp=bound)


def _instant(kind: InfiniteKind, micros: int, epoch: datetime) -> Any:
    if micros in (INT64_MIN, INT64_MAX):
        return Infinity(kind, micros == INT64_MIN)
    try:
        return epoch + timedelta(microseconds=micros)
    except OverflowError:
        raise ValueError(
            f"a {kind} beyond year 9999 does not fit a Python datetime: cast the column "
            "to text in SQL"
        ) from None


def from_value(v: pb.Value) -> Any:
    """The Python value of a result column."""
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null":
        return None
    if kind in ("bool", "int", "float", "text", "bytes"):
        return getattr(v, kind)
    if kind == "decimal":
        return Decimal(v.decimal)
    if kind == "timestamptz":
        return _instant("timestamptz", v.timestamptz, EPOCH_UTC)
    if kind == "timestamp":
        return _instant("timestamp", v.timestamp, EPOCH_NAIVE)
    if kind == "date":
        if v.date in (INT32_MIN, INT32_MAX):
            return Infinity("date", v.date == INT32_MIN)
        try:
            return EPOCH_DATE + timedelta(days=v.date)
        except OverflowError:
            raise ValueError(
                "a date beyond year 9999 does not fit a Python date: cast the column to text"
            ) from None
    if kind == "uuid":
        return uuid.UUID(v.uuid)
    if kind == "json":
        return json.loads(v.json)
    raise ValueError(f"a Value of kind {kind!r}, which this client does not know")
